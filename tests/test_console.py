"""What a command prints: a line per phase with its duration, each warning once, library INFO only in
the log file (moee_jax.console)."""

from __future__ import annotations

import logging
import re

import pytest

from moee_jax import console


@pytest.fixture
def quiet():
    console.configure(verbose=False)
    yield
    console.configure(verbose=False)


def test_a_phase_prints_its_start_and_its_duration(capsys):
    with console.phase("stage1", "500 steps") as p:
        p["note"] = "loss 0.41"
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "▸ stage1: 500 steps"
    assert re.fullmatch(r"✓ stage1 in \d+\.\d s \(loss 0\.41\)", lines[1]), lines
    assert p["seconds"] >= 0


def test_a_failed_phase_says_so_and_the_error_goes_on(capsys):
    with pytest.raises(KeyError), console.phase("reader"):
        raise KeyError("x")
    assert re.fullmatch(r"✗ reader failed after \d+\.\d s", capsys.readouterr().out.splitlines()[-1])


@pytest.mark.parametrize(("seconds", "text"), [(4.25, "4.2 s"), (723, "12m03s"), (7500, "2h05m")])
def test_durations_read_as_a_person_writes_them(seconds, text):
    assert console.duration(seconds) == text


def test_info_goes_to_the_log_file_only_and_each_warning_reaches_the_terminal_once(quiet, tmp_path, capfd):
    with console.log_to(tmp_path / "run.log") as path:
        logging.getLogger("absl").info("Saving checkpoint at step 4")  # Orbax logs through absl at INFO
        for _ in range(3):
            logging.getLogger("moee_jax.train").warning("perceptual loss disabled")
        console.line("step 4/8 | loss 0.5")
    err = capfd.readouterr()
    assert "Saving checkpoint" not in err.err + err.out
    assert err.err.count("warning: perceptual loss disabled") == 1
    assert "step 4/8 | loss 0.5" in err.out
    log = path.read_text()
    assert "I absl: Saving checkpoint at step 4" in log
    assert log.count("perceptual loss disabled") == 3  # the file keeps every record
    assert "moee_jax.console: step 4/8 | loss 0.5" in log
    logging.getLogger("absl").info("after the block")
    assert "after the block" not in path.read_text()  # the file is closed with the block


def test_verbose_shows_info_on_the_terminal(tmp_path, capfd):
    console.configure(verbose=True)
    try:
        logging.getLogger("absl").info("restoring step 8")
    finally:
        console.configure(verbose=False)
    assert "restoring step 8" in capfd.readouterr().err


def test_summary_lists_every_output(capsys):
    console.summary({"videos": "out/videos", "metrics": "out/metrics.md"})
    assert capsys.readouterr().out.splitlines() == ["outputs:", "  videos   out/videos", "  metrics  out/metrics.md"]
