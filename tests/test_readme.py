"""Every `moee` command line in the README is one the CLI accepts: its command, flags and config
overrides parse exactly as a user's would (``moee_jax.cli.run`` up to the point where the command
starts working). Lines that need files a user supplies (weights, videos) parse too; only running them
would need those files."""

from __future__ import annotations

import pathlib
import re
import shlex
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
# "NPROC=2 launch/local.sh train …" or "moee animate …": the environment, the launcher, the command.
COMMAND = re.compile(r"^(?:[A-Z_]+=\S+\s+)*(?:moee|launch/local\.sh)\s+([a-z]+)\b(.*)$")

# Parse a command line the way `moee` does, but stop where the command would start its work.
HARNESS = """
import sys
from absl import app
from moee_jax import cli
app.run = lambda *args, **kwargs: print("PARSED")
sys.argv = ["moee", *sys.argv[1:]]
cli.run(sys.argv)
"""
ANALYZE = """
import sys
from moee_jax.analysis.__main__ import parser
from moee_jax.cli import underscored
parser().parse_args([underscored(a) for a in sys.argv[2:]])
print("PARSED")
"""


def readme_commands() -> list[tuple[int, str, list[str]]]:
    """``(line number, command, arguments)`` of every moee command in the README's code blocks, with
    ``\\`` continuations joined and comments dropped; ``...`` stands for the arguments of the line
    above with the same command, and ``…`` for a value the user fills in."""
    found, block, pending, start = [], False, "", 0
    for number, line in enumerate((REPO / "README.md").read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            block, pending = not block, ""
            continue
        if not block:
            continue
        if not pending:
            start = number
        pending += line.strip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        text, pending = pending, ""
        words = shlex.split(text, comments=True)
        match = COMMAND.match(shlex.join(words))
        if match:
            command, args = match.group(1), shlex.split(match.group(2))
            above = next((a for _, c, a in reversed(found) if c == command), [])
            args = [part for w in args for part in (above if w == "..." else ["VALUE"] if w == "…" else [w])]
            found.append((start, command, args))
    return found


COMMANDS = readme_commands()


def test_the_readme_shows_every_main_command():
    shown = {command for _, command, _ in COMMANDS}
    assert {"train", "animate", "eval", "ablate", "analyze", "prepare", "convert", "serve"} <= shown


@pytest.mark.parametrize("line, command, args", COMMANDS, ids=[f"README:{n}:{c}" for n, c, _ in COMMANDS])
def test_readme_command_parses(line, command, args):
    code = ANALYZE if command == "analyze" else HARNESS
    proc = subprocess.run([sys.executable, "-c", code, command, *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "PARSED" in proc.stdout, f"README line {line}: moee {command} {shlex.join(args)}\n{proc.stderr[-2000:]}"
