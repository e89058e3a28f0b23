"""The within-clip coupling of the jaw and the upper face (moee_jax.eval.coupling)."""

import pathlib
import subprocess
import sys

import numpy as np
import pytest

from moee_jax.data import synthetic, video_io
from moee_jax.eval import coupling as C

NUM_AUS = len(synthetic.ACTION_UNITS)
REPO = pathlib.Path(__file__).resolve().parent.parent
JAW, LID, BROW = (synthetic.ACTION_UNITS.index(a) for a in ("AU26", "AU5", "AU1"))


def _aus(jaw, **others):
    aus = np.full((len(jaw), NUM_AUS), 0.3)
    aus[:, JAW] = jaw
    for name, values in others.items():
        aus[:, synthetic.ACTION_UNITS.index(name)] = values
    return aus


def test_an_au_that_follows_the_jaw_is_coupled_one_that_opposes_it_anti_coupled_and_a_still_one_not():
    jaw = np.sin(np.linspace(0, 6, 30)) * 0.4 + 0.5
    r = C.au_coupling(_aus(jaw, AU5=0.2 + 0.5 * jaw, AU15=1.0 - jaw, AU1=np.full(30, 0.7)), watched=("AU5", "AU15", "AU1"))
    assert r["AU5"] == pytest.approx(1.0)
    assert r["AU15"] == pytest.approx(-1.0)
    assert r["AU1"] == 0.0


def test_a_clip_too_short_to_correlate_gives_no_coupling():
    assert C.au_coupling(_aus(np.array([0.1, 0.9]), AU5=np.array([0.1, 0.9])), watched=("AU5",)) == {"AU5": 0.0}


@pytest.mark.parametrize("bad, message", [
    (dict(watched=("AU99",)), "unknown action unit 'AU99'"),
    (dict(driver="jaw"), "unknown action unit 'jaw'"),
])  # fmt: skip
def test_an_unknown_action_unit_is_named(bad, message):
    with pytest.raises(ValueError, match=message):
        C.au_coupling(_aus(np.linspace(0, 1, 5)), **bad)


def test_aus_of_the_wrong_shape_are_refused():
    with pytest.raises(ValueError, match=rf"aus must be \(frames, {NUM_AUS}\)"):
        C.au_coupling(np.zeros((5, 3)))


class _BrightnessReader:
    """Reads the jaw and the lids both from a frame's brightness: the generated lids follow the jaw."""

    size = 8

    def predict(self, frames):
        level = frames.reshape(len(frames), -1).mean(1) / 255.0
        aus = np.full((len(frames), NUM_AUS), 0.5, np.float32)
        aus[:, JAW] = level
        aus[:, LID] = level
        aus[:, BROW] = 1.0 - level
        return {"aus": aus}


def test_rows_average_generated_clips_per_class_and_report_what_they_left_out(tmp_path):
    levels = (40 + 150 * (0.5 + 0.5 * np.sin(np.linspace(0, 9, 20)))).astype(np.uint8)
    frames = np.broadcast_to(levels[:, None, None, None], (20, 16, 16, 3)).copy()
    video_io.write_video(tmp_path / "id0001_sadness.mp4", frames, fps=25)
    # No neutral record: the truth of the request cannot be drawn, and the table says so.
    tests = {"id0001": {}, "id0002": {}}
    rows, skipped = C.coupling_rows(_BrightnessReader(), tests, tmp_path, classes=("sadness", "fear"), skip_frames=2)
    assert [row["class"] for row in rows] == ["sadness"]  # fear has no clip at all
    (row,) = rows
    assert row["clips"] == 1 and row["truth"] is None
    assert row["generated"]["r"]["AU5"] == pytest.approx(1.0, abs=1e-3)
    assert row["generated"]["r"]["AU1"] == pytest.approx(-1.0, abs=1e-3)
    assert 0.2 < row["generated"]["mean"]["AU26"] < 0.8
    assert "id0001_sadness: its ground truth cannot be drawn" in " ".join(skipped)
    assert any(s.startswith("id0002_sadness: no ") for s in skipped)
    assert any(s.startswith("id0001_fear: no ") for s in skipped)
    table = C.format_rows(rows)
    assert "| sadness | 1 | " in table and "+1.00 / –" in table


def test_unknown_action_units_are_refused_before_any_video_is_read(tmp_path):
    with pytest.raises(ValueError, match="unknown action unit 'AU0'"):
        C.coupling_rows(_BrightnessReader(), {"id0001": {}}, tmp_path / "absent", watched=("AU0",))


@pytest.mark.parametrize("args, message", [
    (["--videos", "no/such/folder"], "--videos no/such/folder: not a folder"),
    (["--videos", "tests", "--reader", "no/such/reader.msgpack"], "--reader no/such/reader.msgpack: no reader file"),
    (["--videos", "tests", "--skip_frames", "-1"], "--skip_frames must be"),
])  # fmt: skip
def test_the_command_line_refuses_bad_arguments_before_loading_anything(args, message):
    command = [sys.executable, "benchmarks/au_coupling.py", "--data_dir", "x", "--dataset", "synthetic_talking_faces/x", *args]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and message in result.stderr
