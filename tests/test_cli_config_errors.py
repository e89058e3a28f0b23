"""A bad --config or config override is one line naming the flag and what would be accepted, exit 1,
never a traceback, and nothing is created."""

from __future__ import annotations

import subprocess
import sys

import pytest

CASES = {
    "unknown_field": (["--config=stage1.py:tiny", "--config.train.batchsize=4"], ["--config.train.batchsize", 'Did you mean "batch_size"']),
    "missing_file": (["--config=nothere.py"], ["--config", "nothere.py", "stage1.py"]),
    "unknown_variant": (["--config=stage1.py:huge"], ["unknown config variant 'huge'", "tiny"]),
    "wrong_type": (["--config=stage1.py:tiny", "--config.train.batch_size=abc"], ["--config.train.batch_size=abc"]),
    "unknown_flag": (["--config=stage1.py:tiny", "--nosuchflag=1"], ["nosuchflag"]),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_config_errors_are_one_line_naming_the_flag(case, tmp_path):
    args, phrases = CASES[case]
    run = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "moee_jax.cli", "train", f"--run_dir={run}", *args], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 1
    assert "Traceback" not in out.stderr, out.stderr
    message = out.stderr.strip().splitlines()[-1]
    assert message.startswith("moee train: ")
    for phrase in phrases:
        assert phrase in message, (phrase, message)
    assert not run.exists()


@pytest.mark.parametrize("command", ["eval", "ladder", "analyze"])
def test_a_missing_run_is_one_line_and_nothing_is_created(command, tmp_path):
    run = tmp_path / "no_such_run"
    out = subprocess.run([sys.executable, "-m", "moee_jax.cli", command, str(run)], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
    message = out.stderr.strip().splitlines()[-1]
    assert message.startswith(f"moee {command}: ") and str(run) in message and "--checkpoint" not in message
    assert not run.exists()
