"""The ``talking_face_clips`` TFDS builder: prepared clips → ArrayRecord, readable by ``tfds`` and by
grain without TensorFlow, with the crops, landmarks, audio and emotion fields of each clip."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from moee_jax.data import landmarks, prepare, schema, synthetic
from tests.test_prepare import CROP, GOOD, MIN_FRAMES, make_video_folder

pytest.importorskip("av")
tfds = pytest.importorskip("tensorflow_datasets")

REPO = pathlib.Path(__file__).resolve().parent.parent
NAME = "talking_face_clips"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from moee_jax.data.builders.talking_face_clips import build

    root = tmp_path_factory.mktemp("clips")
    folder = make_video_folder(root / "videos")
    prepare.prepare_videos(folder, root / "prepared", size=CROP, min_frames=MIN_FRAMES, progress=False)
    build(root / "prepared", root / "tfds")
    return folder, root / "prepared", root / "tfds"


def _records(data_dir: pathlib.Path, split: str) -> dict[str, dict]:
    source = tfds.builder_from_directory(str(data_dir / NAME / "1.1.0")).as_data_source()[split]
    return {r["id"].decode(): r for r in (source[i] for i in range(len(source)))}


def test_splits_follow_the_manifest_with_train_by_default(built):
    _, _, data_dir = built
    assert sorted(_records(data_dir, "train")) == ["anna/anna_happy", "anna/anna_mixed"]  # anna_mixed: blank split
    assert sorted(_records(data_dir, "test")) == ["ben/ben_sad"]


def test_records_hold_face_crops_audio_landmarks_and_emotion_fields(built):
    _, _, data_dir = built
    records = {**_records(data_dir, "train"), **_records(data_dir, "test")}
    for clip_id, record in records.items():
        name = clip_id.split("/")[1]
        emotion, intensity, _ = GOOD[name]
        frames = schema.decode_frames(record["frames"])
        t = frames.shape[0]
        assert frames.shape == (40, CROP, CROP, 3) and frames.dtype == np.uint8
        assert record["landmarks"].shape == (t, 72, 2) and record["landmark_layout"] == b"synthetic72"
        assert np.isfinite(record["landmarks"]).all()
        assert (record["landmarks"] >= -0.5).all() and (record["landmarks"] <= CROP - 0.5).all()
        assert record["audio"].shape == (t * schema.SAMPLE_RATE // 25,) and record["fps"] == 25.0
        expected = schema.emotion_fields(emotion)
        assert record["emotion"].decode() == expected["emotion"]
        assert record["emotion_class"] == expected["emotion_class"]
        np.testing.assert_allclose(record["palette"], expected["palette"])
        assert record["intensity"] == pytest.approx(intensity)
        assert record["speaker"].decode() == name.split("_")[0]
        assert record["action_units"].shape == (0, synthetic.NUM_AUS) and record["identity"].shape == (0,)
    assert records["anna/anna_happy"]["emotion_class"] == schema.CLASSES.index("happiness")
    assert records["anna/anna_mixed"]["emotion_class"] == -1
    assert records["ben/ben_sad"]["text"] == b"a sad person speaking"


def test_crop_shows_the_source_face_where_its_landmarks_say(built):
    folder, _, data_dir = built
    record = _records(data_dir, "train")["anna/anna_happy"]
    source, layout = landmarks.read_sidecar(folder / "anna_happy.landmarks.npz")
    oval = source[:, list(schema.layout_groups(layout)["face_oval"])]
    # One square box per clip around every frame's face oval, 1.6 × its longer side.
    lo, hi = oval.min(axis=(0, 1)), oval.max(axis=(0, 1))
    centre, side = (lo + hi) / 2, 1.6 * (hi - lo).max()
    expected = (source + 0.5 - (centre + 0.5 - side / 2)) * (CROP / side) - 0.5
    np.testing.assert_allclose(record["landmarks"], expected, atol=1e-3)
    # The crop's pixels are that box of the source frame (independently resampled; H.264 + JPEG noise).
    frame = synthetic.generate_clip(0, "happy", 0.8, seed=0, num_frames=40, size=64).frames[0]
    x0, y0 = centre + 0.5 - side / 2
    padded = np.pad(frame, ((32, 32), (32, 32), (0, 0)), mode="edge")
    reference = Image.fromarray(padded).resize(
        (CROP, CROP), Image.Resampling.BILINEAR, box=(x0 + 32, y0 + 32, x0 + side + 32, y0 + side + 32)
    )
    crop = schema.decode_frames(record["frames"], [0])[0]
    assert np.abs(crop.astype(np.int16) - np.asarray(reference)).mean() < 12


def test_grain_reads_records_without_importing_tensorflow(built):
    _, _, data_dir = built
    script = f"""
import json, sys
import grain
import tensorflow_datasets as tfds
from moee_jax.data import schema
source = tfds.data_source({NAME!r}, split="train", data_dir={str(data_dir)!r})
dataset = grain.MapDataset.source(source).map(
    lambda r: {{"id": r["id"].decode(), "frames": schema.decode_frames(r["frames"]).shape,
               "landmarks": r["landmarks"].shape, "emotion": r["emotion"].decode()}})
print(json.dumps({{"records": [dataset[i] for i in range(len(dataset))], "tf": "tensorflow" in sys.modules}}))
"""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["tf"] is False
    assert sorted(r["id"] for r in result["records"]) == ["anna/anna_happy", "anna/anna_mixed"]
    for r in result["records"]:
        assert r["frames"] == [40, CROP, CROP, 3] and r["landmarks"] == [40, 72, 2]
    assert {r["id"]: r["emotion"] for r in result["records"]}["anna/anna_happy"] == "happiness"


def test_rebuild_picks_up_newly_prepared_clips(built, tmp_path):
    from moee_jax.data.builders.talking_face_clips import build

    _, prepared, _ = built
    clip = prepare.read_clip(prepare.clip_path(prepared, "ben/ben_sad"))
    out = tmp_path / "prepared"
    prepare.write_clip(prepare.clip_path(out, clip.clip_id), clip)
    assert build(out, tmp_path / "tfds").info.splits["test"].num_examples == 1
    prepare.write_clip(prepare.clip_path(out, "ben/ben_sad_again"), dataclasses.replace(clip, clip_id="ben/ben_sad_again"))
    assert build(out, tmp_path / "tfds").info.splits["test"].num_examples == 2


def test_building_an_empty_prepared_folder_says_what_to_run(tmp_path):
    from moee_jax.data.builders.talking_face_clips import build

    with pytest.raises(FileNotFoundError, match="run `moee prepare`"):
        build(tmp_path / "nothing", tmp_path / "tfds")
