"""`moee <subcommand> --help` (and -h) lists that subcommand's own flags with their defaults and an
example, exits 0, and leaves absl's and JAX's flags to --helpfull."""

from __future__ import annotations

import subprocess
import sys

import pytest

from moee_jax import cli

COMMANDS = [*cli.COMMANDS, "analyze"]


def _moee(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moee_jax.cli", *args], capture_output=True, text=True, timeout=120)


def test_top_level_help_lists_every_subcommand_with_a_line_each():
    out = _moee("--help")
    assert out.returncode == 0, out.stderr
    for command in COMMANDS:
        assert cli.summary(command), f"no line for {command} in moee --help"
        assert f"  {command} " in out.stdout


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_subcommand_help_names_every_own_flag_and_exits_0(command):
    from absl import flags

    before = set(flags.FLAGS)
    cli.COMMANDS[command]()  # defines the subcommand's flags in this process, as `run` does
    own = set(flags.FLAGS) - before
    assert own, f"moee {command} defines no flags"
    for spelling in ("--help", "-h"):
        out = _moee(command, spelling)
        assert out.returncode == 0, out.stderr
        for name in own:
            assert f"--{name}" in out.stdout, f"moee {command} {spelling} does not name --{name}"
        assert "example:" in out.stdout and f"moee {command}" in out.stdout
        assert "--jax_" not in out.stdout and "--verbosity" not in out.stdout  # the internals stay in --helpfull
    for name in own:
        delattr(flags.FLAGS, name)


def test_required_flags_and_defaults_are_shown():
    out = _moee("convert", "--help").stdout
    assert "--out=STRING (required)" in out
    assert "--allow_pickle (default: false)" in out


def test_analyze_help_exits_0():
    out = _moee("analyze", "--help")
    assert out.returncode == 0, out.stderr
    assert "--" in out.stdout
