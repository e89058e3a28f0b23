"""`moee prepare`: video I/O, face crops, manifests and MEAD trees, and a batch that skips bad videos,
resumes after an interruption and refuses to start without landmarks."""

from __future__ import annotations

import dataclasses
import fractions
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from moee_jax.data import face_crop, landmarks, manifest, prepare, synthetic, video_io

pytest.importorskip("av")

REPO = pathlib.Path(__file__).resolve().parent.parent
SOURCE_SIZE = 64
CROP = 32
MIN_FRAMES = 10

# name: (emotion, intensity, split) of the good videos of the fixture folder
GOOD = {
    "anna_happy": ("happy", 0.8, "train"),
    "ben_sad": ("sad", 1.0, "test"),
    "anna_mixed": ("happy:0.6,surprised:0.4", 0.5, ""),
}
# name: the words the report's reason must contain
BAD = {
    "truncated": "corrupt or truncated MP4",
    "notes": "not a video file",
    "mute": "no audio track",
    "silent": "audio is silent",
    "noise": "no face",
    "short": "too short",
}


def make_video_folder(root: pathlib.Path, *, sidecars: bool = True) -> pathlib.Path:
    """A folder of good and deliberately broken videos with landmark sidecars and a manifest.csv.

    Good: ``GOOD`` (40 frames, 1.6 s, 64 px). Broken: ``BAD`` — the first half of a good file's
    bytes, a text file named .mp4, a video without an audio track, one with a silent track, noise
    frames whose sidecar has no face, and an 8-frame clip. The manifest also has a row with an
    unknown emotion.
    """
    root.mkdir(parents=True, exist_ok=True)
    rows = ["path,speaker,emotion,intensity,text,split"]

    def add(name, frames, audio, lm, speaker="anna", emotion="neutral", intensity=1.0, split="train"):
        video_io.write_video(root / f"{name}.mp4", frames, 25, audio)
        if sidecars and lm is not None:
            landmarks.write_sidecar(landmarks.sidecar_path(root / f"{name}.mp4"), lm, "synthetic72")
        rows.append(f'{name}.mp4,{speaker},"{emotion}",{intensity},,{split}')

    for seed, (name, (emotion, intensity, split)) in enumerate(GOOD.items()):
        clip = synthetic.generate_clip(seed, emotion, intensity, seed=seed, num_frames=40, size=SOURCE_SIZE)
        add(name, clip.frames, clip.audio, clip.landmarks, name.split("_")[0], emotion, intensity, split)

    base = synthetic.generate_clip(7, "angry", seed=7, num_frames=40, size=SOURCE_SIZE)
    data = (root / "anna_happy.mp4").read_bytes()
    (root / "truncated.mp4").write_bytes(data[: len(data) // 2])
    rows.append("truncated.mp4,anna,happy,1,,train")
    (root / "notes.mp4").write_text("these are my notes, not a video\n")
    rows.append("notes.mp4,anna,happy,1,,train")
    add("mute", base.frames, None, base.landmarks)
    add("silent", base.frames, np.zeros_like(base.audio), base.landmarks)
    noise = np.random.default_rng(0).integers(0, 256, base.frames.shape, dtype=np.uint8)
    add("noise", noise, base.audio, np.full_like(base.landmarks, np.nan))
    add("short", base.frames[:8], base.audio[: 8 * 640], base.landmarks[:8])
    rows.append("anna_happy.mp4,anna,bored,1,,train")  # unknown emotion: skipped, row 10
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root


def _moee(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", "moee_jax.cli", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_video_folder(tmp_path_factory.mktemp("videos"))


@pytest.fixture(scope="module")
def cli_run(folder, tmp_path_factory):
    """One `moee prepare` run over the fixture folder in two worker processes, building the dataset too."""
    work = tmp_path_factory.mktemp("cli")
    out, data_dir = work / "prepared", work / "tfds"
    proc = _moee(
        "prepare", "--input", str(folder), "--out", str(out), "--data_dir", str(data_dir),
        "--size", str(CROP), "--min_frames", str(MIN_FRAMES), "--workers", "2",
    )  # fmt: skip
    return proc, out, data_dir


# ---- video I/O --------------------------------------------------------------------------------


def test_write_video_roundtrips_frames_fps_and_audio(tmp_path):
    clip = synthetic.generate_clip(1, "happy", num_frames=30, size=SOURCE_SIZE)
    path = video_io.write_video(tmp_path / "clip.mp4", clip.frames, 25, clip.audio)
    frames, fps, audio = video_io.read_video(path)
    assert frames.shape == clip.frames.shape and frames.dtype == np.uint8
    assert np.abs(frames.astype(np.int16) - clip.frames).mean() < 8  # H.264 at crf 18
    assert fps == 25.0
    assert audio.dtype == np.float32 and abs(audio.size - clip.audio.size) <= 16  # AAC padding trimmed
    n = min(audio.size, clip.audio.size)
    assert np.corrcoef(audio[:n], clip.audio[:n])[0, 1] > 0.9  # AAC keeps the wave in sync
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]


def test_write_video_pads_odd_sizes_and_writes_silent_video(tmp_path):
    frames = np.full((5, 31, 45, 3), 128, np.uint8)
    decoded, fps, audio = video_io.read_video(video_io.write_video(tmp_path / "odd.mp4", frames, 30))
    assert decoded.shape == (5, 32, 46, 3) and fps == 30.0 and audio is None


def test_write_video_streams_any_iterable_of_frames_and_names_a_bad_one(tmp_path):
    made = []

    def frames():  # consumed one at a time: the writer never asks for the whole video
        for i in range(6):
            made.append(i)
            yield np.full((16, 16, 3), 40 * i, np.uint8)

    decoded, _, _ = video_io.read_video(video_io.write_video(tmp_path / "stream.mp4", frames(), 25))
    assert decoded.shape == (6, 16, 16, 3) and made == list(range(6))
    assert abs(int(decoded[5].mean()) - 200) < 4
    mixed = (np.zeros((8, 8, 3) if i < 2 else (8, 10, 3), np.uint8) for i in range(4))
    with pytest.raises(ValueError, match=r"bad\.mp4: frame 2 is \(8, 10\)"):
        video_io.write_video(tmp_path / "bad.mp4", mixed, 25)
    with pytest.raises(ValueError, match="got no frames"):
        video_io.write_video(tmp_path / "none.mp4", iter([]), 25)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stream.mp4"]


def test_write_video_leaves_no_partial_file_when_interrupted(tmp_path, monkeypatch):
    def fail(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(video_io, "_encode", fail)
    with pytest.raises(KeyboardInterrupt):
        video_io.write_video(tmp_path / "out.mp4", np.zeros((2, 8, 8, 3), np.uint8), 25)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "name, reason",
    [("truncated.mp4", "corrupt or truncated MP4/MOV"), ("notes.mp4", "not a video file"), ("absent.mp4", "file not found")],
)
def test_read_video_names_the_file_and_reason(folder, name, reason):
    with pytest.raises(video_io.VideoError, match=reason) as info:
        video_io.read_video(folder / name)
    assert info.value.path == folder / name and str(folder / name) in str(info.value)


def test_read_video_detects_truncation_after_the_header(tmp_path):
    av = pytest.importorskip("av")
    frames = synthetic.generate_clip(2, "sad", num_frames=50, size=48).frames
    path = tmp_path / "faststart.mp4"
    with av.open(str(path), "w", format="mp4", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width = stream.height = 48
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # the header (moov) survives, half the frames do not
    with pytest.raises(video_io.VideoError, match="truncated"):
        video_io.read_video(path)


def _write_audio_only(path: pathlib.Path, wave: np.ndarray, *, start: int = 0, sr: int = 16000) -> pathlib.Path:
    """An AAC track in an MP4 container (an .m4a) whose first sample has timestamp ``start / sr``."""
    av = pytest.importorskip("av")
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=sr, layout="mono")
        for i in range(0, wave.size, 1024):
            frame = av.AudioFrame.from_ndarray(wave[None, i : i + 1024], format="fltp", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = sr, start + i, fractions.Fraction(1, sr)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def test_read_video_aligns_audio_to_the_first_frame(tmp_path):
    av = pytest.importorskip("av")
    path, sr = tmp_path / "late_audio.mp4", 16000
    tone = (0.5 * np.sin(np.arange(sr) * 0.1)).astype(np.float32)
    with av.open(str(path), "w", format="mp4") as container:
        video = container.add_stream("libx264", rate=25)
        video.width = video.height = 16
        video.pix_fmt = "yuv420p"
        sound = container.add_stream("aac", rate=sr, layout="mono")
        for _ in range(25):
            container.mux(video.encode(av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")))
        container.mux(video.encode(None))
        for i in range(0, sr, 1024):  # the audio starts 0.2 s (3200 samples) after the first frame
            frame = av.AudioFrame.from_ndarray(tone[None, i : i + 1024], format="fltp", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = sr, 3200 + i, fractions.Fraction(1, sr)
            container.mux(sound.encode(frame))
        container.mux(sound.encode(None))
    _, _, audio = video_io.read_video(path)
    onset = np.flatnonzero(np.abs(audio) > 0.05)[0]
    assert abs(onset - 3200) < 32 and abs(audio.size - (3200 + sr)) < 32


def test_read_audio_decodes_an_m4a(tmp_path):
    wave = (0.3 * np.sin(np.arange(8000) * 0.05)).astype(np.float32)
    audio = video_io.read_audio(_write_audio_only(tmp_path / "speech.m4a", wave))
    assert abs(audio.size - wave.size) < 32 and np.corrcoef(audio[:7000], wave[:7000])[0, 1] > 0.9
    with pytest.raises(video_io.VideoError, match="has no audio track"):
        video_io.read_audio(video_io.write_video(tmp_path / "mute.mp4", np.zeros((2, 8, 8, 3), np.uint8), 25))


def test_resample_indices_picks_the_nearest_frame_in_time():
    np.testing.assert_array_equal(video_io.resample_indices(10, 50, 25), [0, 2, 4, 6, 8])
    np.testing.assert_array_equal(video_io.resample_indices(6, 30, 25), [0, 1, 2, 4, 5])
    np.testing.assert_array_equal(video_io.resample_indices(3, 12.5, 25), [0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(video_io.resample_indices(7, 25, 25), np.arange(7))
    assert video_io.resample_frames(np.arange(10), 50, 25).tolist() == [0, 2, 4, 6, 8]


# ---- face crops -------------------------------------------------------------------------------


def test_crop_coordinates_follow_the_pixels():
    frame = np.zeros((40, 50, 3), np.uint8)
    frame[12, 30] = 255  # one bright pixel at (x=30, y=12)
    box = np.array([[24.5, 14.5, 16.0]])  # centre between pixels: crop columns 17–32, rows 7–22, ×4 to 64 px
    crop = face_crop.crop_frame(frame, box[0], 64).astype(np.float64).sum(axis=-1)
    ys, xs = np.mgrid[:64, :64]
    centroid = np.array([(crop * xs).sum(), (crop * ys).sum()]) / crop.sum()
    expected = face_crop.to_crop_coords(np.array([[[30.0, 12.0]]]), box, 64)[0, 0]
    np.testing.assert_allclose(expected, [(30 - 17 + 0.5) * 4 - 0.5, (12 - 7 + 0.5) * 4 - 0.5])
    np.testing.assert_allclose(centroid, expected, atol=0.5)


def test_crop_past_the_border_replicates_edge_pixels():
    frame = np.zeros((20, 20, 3), np.uint8)
    frame[:, -1] = 200
    crop = face_crop.crop_frame(frame, (19.0, 10.0, 10.0), 10)
    assert crop.shape == (10, 10, 3) and (crop[:, -3:] > 190).all()


def test_one_box_per_clip_contains_every_frame_and_smoothing_follows_the_face():
    clip = synthetic.generate_clip(3, "fear", num_frames=30, size=SOURCE_SIZE)
    oval = synthetic.LANDMARK_GROUPS["face_oval"]
    fixed = face_crop.face_boxes(clip.landmarks, oval, margin=1.6)
    assert (fixed == fixed[0]).all()
    moving = face_crop.face_boxes(clip.landmarks, oval, margin=1.6, smooth_window=5)
    assert np.ptp(moving[:, 0]) > 0
    for boxes in (fixed, moving):
        crop_lm = face_crop.to_crop_coords(clip.landmarks, boxes, CROP)
        face_crop.check_regions(crop_lm, CROP, "synthetic72")


def test_short_face_gaps_are_interpolated_and_long_ones_rejected():
    lm = np.repeat(np.arange(10, dtype=np.float32)[:, None, None], 3, axis=1).repeat(2, axis=2)  # (10, 3, 2)
    gappy = lm.copy()
    gappy[[0, 4, 5]] = np.nan
    filled, missing = face_crop.fill_missing(gappy, max_missing=0.3)
    assert missing.tolist() == [True, False, False, False, True, True, False, False, False, False]
    np.testing.assert_allclose(filled[4:6], lm[4:6])  # linear between frames 3 and 6
    np.testing.assert_allclose(filled[0], lm[1])  # held before the first face
    with pytest.raises(face_crop.NoFaceError, match="3 of 10 frames"):
        face_crop.fill_missing(gappy, max_missing=0.2)
    with pytest.raises(face_crop.NoFaceError, match="none of the 10 frames"):
        face_crop.fill_missing(np.full_like(lm, np.nan), max_missing=0.5)


# ---- manifests and MEAD -----------------------------------------------------------------------


def _write(path: pathlib.Path, text: str) -> pathlib.Path:
    path.write_text(text)
    return path


def test_manifest_rows_become_clips_with_defaults(tmp_path):
    path = _write(tmp_path / "m.csv", "path,speaker,emotion,intensity,text,split\n"
                  'a/x.mp4,anna,happy,0.8,,\n/abs/y.mp4,ben,"happy:0.6,surprised:0.4",,smiling,test\n')  # fmt: skip
    clips = manifest.read_manifest(path).clips
    assert [c.clip_id for c in clips] == ["anna/x", "ben/y"]
    assert clips[0].video == tmp_path / "a/x.mp4" and clips[1].video == pathlib.Path("/abs/y.mp4")
    assert (clips[0].intensity, clips[0].split, clips[0].text) == (0.8, "train", "a happy person speaking")
    assert (clips[1].intensity, clips[1].split, clips[1].text) == (1.0, "test", "smiling")


def test_manifest_without_a_required_column_names_file_and_column(tmp_path):
    path = _write(tmp_path / "m.csv", "path,emotion\nx.mp4,happy\n")
    with pytest.raises(manifest.ManifestError, match=r"m\.csv: missing column\(s\) speaker"):
        manifest.read_manifest(path)


def test_a_video_given_as_the_input_is_named_as_a_video_not_read_as_a_manifest(tmp_path):
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"\x00\x00\x00\x18ftypmp42")
    with pytest.raises(manifest.ManifestError, match="this is a video, not a manifest") as err:
        manifest.load_inputs(video)
    assert "clip.mp4" in str(err.value)


@pytest.mark.parametrize(
    "row, field, words",
    [
        ("x.mp4,anna,bored,1,,", "emotion", "unknown emotion 'bored'"),
        ("x.mp4,anna,happy,loud,,", "intensity", "'loud' is not a number"),
        ("x.mp4,anna,happy,1.5,,", "intensity", "outside [0, 1]"),
        ("x.mp4,anna,happy,1,,dev", "split", "'dev' is not one of"),
        ("x.mp4,,happy,1,,", "speaker", "is empty"),
    ],
)
def test_bad_manifest_rows_are_rejected_naming_file_row_and_field(tmp_path, row, field, words):
    path = _write(tmp_path / "m.csv", f"path,speaker,emotion,intensity,text,split\nok.mp4,anna,sad,1,,\n{row}\n")
    inputs = manifest.read_manifest(path)
    assert [c.name for c in inputs.clips] == ["ok"]
    (rejected,) = inputs.rejected
    assert f"m.csv, row 2, field {field!r}" in rejected.reason and words in rejected.reason


def test_mead_tree_gives_speakers_emotions_levels_and_audio(tmp_path):
    root = tmp_path / "MEAD"
    for rel in ("M003/video/front/angry/level_2/001.mp4", "M003/video/front/neutral/level_1/001.mp4",
                "M003/video/front/contempt/level_1/001.mp4", "W009/video/front/happy/level_3/002.mp4",
                "W009/audio/happy/level_3/002.m4a"):  # fmt: skip
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"")
    inputs = manifest.load_inputs(root, mead=True)
    by_id = {c.clip_id: c for c in inputs.clips}
    assert sorted(by_id) == ["M003/angry_level_2_001", "M003/neutral_level_1_001", "W009/happy_level_3_002"]
    angry, neutral, happy = (by_id[k] for k in sorted(by_id))
    assert (angry.emotion, angry.intensity, angry.audio) == ("anger", pytest.approx(2 / 3), None)
    assert (neutral.emotion, neutral.intensity) == ("neutral", 0.0)
    assert (happy.emotion, happy.intensity, happy.text) == ("happiness", 1.0, "a happy person speaking")
    assert happy.audio == root / "W009/audio/happy/level_3/002.m4a"
    (contempt,) = inputs.rejected
    assert "contempt" in contempt.source and "not one of the emotion classes" in contempt.reason


def test_folder_without_metadata_says_how_to_give_it(tmp_path):
    with pytest.raises(manifest.ManifestError, match="--manifest.*--mead"):
        manifest.load_inputs(tmp_path)


# ---- the batch --------------------------------------------------------------------------------


def test_cli_prepares_good_videos_and_reports_each_bad_one(cli_run):
    proc, out, _ = cli_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert sorted(e["id"] for e in report["done"]) == sorted(f"{n.split('_')[0]}/{n}" for n in GOOD)
    assert [p.relative_to(out / "clips").as_posix() for p in prepare.list_clips(out)] == sorted(f"{n.split('_')[0]}/{n}.npz" for n in GOOD)
    reasons = {pathlib.Path(e["video"]).stem: e["reason"] for e in report["skipped"] if "video" in e}
    assert sorted(reasons) == sorted(BAD)
    for name, words in BAD.items():
        assert words in reasons[name], (name, reasons[name])
    (row,) = [e for e in report["skipped"] if "video" not in e]
    assert "row 10" in row["source"] and "field 'emotion'" in row["reason"] and "bored" in row["reason"]
    assert report["failed"] == [] and report["counts"]["skipped"] == len(BAD) + 1
    assert "prepared 3 clip(s)" in proc.stdout and "built talking_face_clips" in proc.stdout


def test_prepared_clip_holds_the_crop_audio_and_metadata(cli_run):
    _, out, _ = cli_run
    clip = prepare.read_clip(prepare.clip_path(out, "anna/anna_happy"))
    assert (clip.speaker, clip.emotion, clip.intensity, clip.split, clip.fps) == ("anna", "happy", pytest.approx(0.8), "train", 25.0)
    assert len(clip.frames) == 40 and clip.landmarks.shape == (40, 72, 2) and clip.landmark_layout == "synthetic72"
    assert clip.audio.shape == (40 * 640,) and not clip.face_missing.any()
    assert (clip.landmarks >= -0.5).all() and (clip.landmarks <= CROP - 0.5).all()
    assert prepare.read_clip(prepare.clip_path(out, "anna/anna_mixed")).split == "train"  # blank split → train


def test_worker_processes_write_the_same_clips_as_one_process(cli_run, folder, tmp_path):
    _, out, _ = cli_run
    prepare.prepare_videos(folder, tmp_path, size=CROP, min_frames=MIN_FRAMES, progress=False)
    for path in prepare.list_clips(out):
        a, b = prepare.read_clip(path), prepare.read_clip(tmp_path / path.relative_to(out))
        assert a.frames == b.frames
        np.testing.assert_array_equal(a.landmarks, b.landmarks)
        np.testing.assert_array_equal(a.audio, b.audio)


def test_interrupted_run_resumes_without_redoing_finished_clips(folder, tmp_path, monkeypatch):
    real = prepare.prepare_clip
    calls = []

    def interrupt_on_second(spec, *args, **kwargs):
        calls.append(spec.clip_id)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(prepare, "prepare_clip", interrupt_on_second)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare_videos(folder, out, size=CROP, min_frames=MIN_FRAMES, progress=False)
    first = json.loads((out / "report.json").read_text())
    assert first["interrupted"] and [e["id"] for e in first["done"]] == [calls[0]]
    assert [p.stem for p in prepare.list_clips(out)] == [calls[0].split("/")[1]]
    assert not list((out / "clips").glob("*/.*"))  # no partial files

    calls.clear()
    monkeypatch.setattr(prepare, "prepare_clip", lambda spec, *a, **k: (calls.append(spec.clip_id), real(spec, *a, **k))[1])
    report = prepare.prepare_videos(folder, out, size=CROP, min_frames=MIN_FRAMES, progress=False)
    assert [e["id"] for e in report.cached] == [first["done"][0]["id"]]
    assert first["done"][0]["id"] not in calls
    assert len(report.done) == len(GOOD) - 1 and len(prepare.list_clips(out)) == len(GOOD)


def test_a_video_without_audio_uses_its_separate_audio_file(folder, tmp_path):
    clip = synthetic.generate_clip(7, "angry", seed=7, num_frames=40, size=SOURCE_SIZE)  # mute.mp4's source
    audio = _write_audio_only(tmp_path / "mute.m4a", clip.audio)
    spec = manifest.ClipSpec(folder / "mute.mp4", "anna", "mute", "anger", 1.0, "an angry person", audio=audio)
    source = landmarks.LandmarkSource("sidecar", landmarks.sidecar_path(spec.video))
    info = prepare.prepare_clip(spec, tmp_path, source, prepare.PrepareOptions(size=CROP, min_frames=MIN_FRAMES))
    prepared = prepare.read_clip(prepare.clip_path(tmp_path, "anna/mute"))
    assert info["frames"] == 40 and prepared.audio.shape == (40 * 640,)
    assert np.corrcoef(prepared.audio, clip.audio)[0, 1] > 0.9


def test_a_sidecar_of_another_length_is_reported(folder, tmp_path):
    sidecar = landmarks.write_sidecar(tmp_path / "x.landmarks.npz", np.zeros((30, 72, 2)), "synthetic72")
    spec = manifest.ClipSpec(folder / "anna_happy.mp4", "anna", "x", "happy", 1.0, "")
    with pytest.raises(landmarks.LandmarkError, match="has 30 frames but the video decodes to 40"):
        prepare.prepare_clip(spec, tmp_path, landmarks.LandmarkSource("sidecar", sidecar), prepare.PrepareOptions(size=CROP))


def test_an_unexpected_error_fails_one_video_and_the_batch_goes_on(folder, tmp_path, monkeypatch):
    real = prepare.prepare_clip

    def broken_for_ben(spec, *args, **kwargs):
        if spec.speaker == "ben":
            raise RuntimeError("decoder exploded")
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(prepare, "prepare_clip", broken_for_ben)
    report = prepare.prepare_videos(folder, tmp_path, size=CROP, min_frames=MIN_FRAMES, progress=False)
    (failed,) = report.failed
    assert failed["id"] == "ben/ben_sad" and failed["error"] == "RuntimeError: decoder exploded"
    assert "broken_for_ben" in failed["traceback"]
    assert sorted(e["id"] for e in report.done) == ["anna/anna_happy", "anna/anna_mixed"]
    assert "FAILED" in report.summary() and json.loads((tmp_path / "report.json").read_text())["counts"]["failed"] == 1


def test_rerun_updates_metadata_of_cached_clips_and_refuses_other_settings(folder, tmp_path):
    out = tmp_path / "out"
    prepare.prepare_videos(folder, out, size=CROP, min_frames=MIN_FRAMES, progress=False)
    edited = manifest.read_manifest(folder / "manifest.csv")
    edited.clips[0] = dataclasses.replace(edited.clips[0], split="test")
    report = prepare.prepare_videos(edited, out, size=CROP, min_frames=MIN_FRAMES, progress=False)
    assert report.done == [] and report.cached[0]["metadata_updated"]
    assert prepare.read_clip(prepare.clip_path(out, edited.clips[0].clip_id)).split == "test"
    with pytest.raises(prepare.PrepareSetupError, match="size 32 → 48"):
        prepare.prepare_videos(edited, out, size=48, min_frames=MIN_FRAMES, progress=False)


def test_without_landmark_model_or_sidecars_nothing_is_processed(tmp_path):
    folder = make_video_folder(tmp_path / "videos", sidecars=False)
    out = tmp_path / "out"
    proc = _moee("prepare", "--input", str(folder), "--out", str(out), "--size", str(CROP))
    assert proc.returncode != 0
    assert "no face landmarks for 7 of 7 readable video(s)" in proc.stderr
    assert "--landmark_model face_landmarker.task" in proc.stderr and ".landmarks.npz" in proc.stderr
    assert "Nothing was processed" in proc.stderr and not out.exists()


def test_landmark_model_needs_mediapipe(folder, tmp_path):
    try:
        import mediapipe  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("mediapipe is installed")
    model = tmp_path / "face_landmarker.task"
    model.write_bytes(b"model")
    videos = tmp_path / "videos"
    videos.mkdir()
    shutil.copy(folder / "anna_happy.mp4", videos / "anna_happy.mp4")  # no sidecar: the model is needed
    with pytest.raises(landmarks.LandmarkSetupError, match="pip install mediapipe"):
        landmarks.plan_sources([videos / "anna_happy.mp4"], model)
    with pytest.raises(landmarks.LandmarkSetupError, match="does not exist"):
        landmarks.plan_sources([videos / "anna_happy.mp4"], tmp_path / "missing.task")


def test_bad_sidecar_names_file_and_field(tmp_path):
    path = tmp_path / "x.landmarks.npz"
    np.savez(path, landmarks=np.zeros((4, 72, 2), np.float32), layout=np.asarray("dlib68"))
    with pytest.raises(landmarks.LandmarkError, match=r"x\.landmarks\.npz: field 'layout' is 'dlib68'"):
        landmarks.read_sidecar(path)
    np.savez(path, landmarks=np.zeros((4, 70, 2), np.float32), layout=np.asarray("synthetic72"))
    with pytest.raises(landmarks.LandmarkError, match="field 'landmarks' has shape"):
        landmarks.read_sidecar(path)
