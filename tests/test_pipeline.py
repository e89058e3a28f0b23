"""The grain training pipeline over a TFDS ArrayRecord dataset: what a training sample is."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import grain
import numpy as np
import pytest

from moee_jax.data import pipeline as P
from moee_jax.data import schema

REPO = pathlib.Path(__file__).resolve().parent.parent
NO_SHARDING = grain.sharding.NoSharding()


@pytest.fixture(scope="module")
def source(synthetic_tfds):
    data_dir, name = synthetic_tfds
    return P.open_source(data_dir, name, "train")


def _batches(source, n, **overrides):
    cfg = P.PipelineConfig(**{"num_frames": 8, "motion_frames": 2, "batch_size": 4, **overrides})
    it = iter(P.make_pipeline(source, cfg, shard_options=NO_SHARDING))
    return [next(it) for _ in range(n)]


def _concat(batches):
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def test_sample_shapes_and_dtypes(source):
    (b,) = _batches(source, 1, audio_context_frames=2)
    S, m = 64, 8
    expected = {
        "frames": ((4, 8, S, S, 3), np.uint8), "motion_frames": ((4, 2, S, S, 3), np.uint8),
        "reference": ((4, S, S, 3), np.uint8), "audio": ((4, 12 * 640), np.float32),
        "face_mask": ((4, 8, m, m), np.float32), "lip_mask": ((4, 8, m, m), np.float32),
        "mouth_mask": ((4, 8, m, m), np.float32), "loss_mask": ((4, 8, m, m), np.float32),
        "palette": ((4, 6), np.float32), "emotion_class": ((4,), np.int32), "intensity": ((4,), np.float32),
        "noisy": ((4,), np.bool_), "drop_reference": ((4,), np.bool_), "drop_audio": ((4,), np.bool_),
        "drop_emotion": ((4,), np.bool_), "action_units": ((4, 8, 11), np.float32),
        "has_action_units": ((4,), np.bool_), "clip_key": ((4,), np.int64), "start": ((4,), np.int32),
        "reference_index": ((4,), np.int32), "mel": ((4, 12, 32), np.float32),
        "emotion_drop": ((4, 3), np.bool_), "motion_is_reference": ((4,), np.bool_), "reference_clip": ((4,), np.int64),
        "motion_clip": ((4,), np.int64),
    }  # fmt: skip
    assert {k: (v.shape, v.dtype) for k, v in b.items()} == expected
    assert (b["lip_mask"] <= b["face_mask"] + 1e-6).all() and b["face_mask"].max() > 0.5


def test_frames_audio_and_landmark_masks_come_from_the_chosen_window(source):
    b = _concat(_batches(source, 2, audio_context_frames=2))
    for i in range(len(b["clip_key"])):
        record = source[int(b["clip_key"][i])]
        s, r = int(b["start"][i]), int(b["reference_index"][i])
        np.testing.assert_array_equal(b["frames"][i], schema.decode_frames(record["frames"], range(s, s + 8)))
        np.testing.assert_array_equal(b["motion_frames"][i], schema.decode_frames(record["frames"], range(s - 2, s)))
        np.testing.assert_array_equal(b["reference"][i], schema.decode_frames(record["frames"], [r])[0])
        np.testing.assert_array_equal(b["action_units"][i], record["action_units"][s : s + 8])
        audio, lo = record["audio"], (s - 2) * 640
        want = np.zeros(12 * 640, np.float32)
        a, e = max(lo, 0), min(lo + 12 * 640, len(audio))
        want[a - lo : e - lo] = audio[a:e]
        np.testing.assert_array_equal(b["audio"][i], want)


def test_framing_face_mask_is_the_animators_mask_in_every_frame(source):
    """Train as you infer: with ``face_mask="framing"`` the face locator sees, in every sample and
    frame, exactly the mask the animator gives a portrait (no landmarks there), not the frame's own
    face outline and jaw."""
    from moee_jax.inference.inputs import face_region_mask

    (framing,) = _batches(source, 1, face_mask="framing", mask_downsample=8)
    (landmarks,) = _batches(source, 1, face_mask="landmarks", mask_downsample=8)
    want = face_region_mask(64, 8)
    assert want.shape == (8, 8) and 0 < want.sum() < 64
    np.testing.assert_array_equal(framing["face_mask"], np.broadcast_to(want, framing["face_mask"].shape))
    # The landmark hull follows each frame; the loss weights and lip masks still come from landmarks.
    assert not np.array_equal(landmarks["face_mask"], framing["face_mask"])
    np.testing.assert_array_equal(framing["lip_mask"], landmarks["lip_mask"])


def test_stage1_reference_frame_is_at_least_n_frames_from_the_window(source):
    n = 6
    b = _concat(_batches(source, 10, reference_min_distance=n))
    window_lo, window_hi = b["start"] - 2, b["start"] + 8 - 1
    distance = np.maximum(window_lo - b["reference_index"], b["reference_index"] - window_hi)
    assert distance.min() >= n
    assert len(np.unique(b["reference_index"])) > 5  # drawn, not fixed


def _speaker(source, key) -> str:
    return source[int(key)]["speaker"].decode()


def test_reference_from_the_neutral_clip_of_the_same_identity(source):
    b = _concat(_batches(source, 6, reference_neutral_p=1.0))
    for key, ref, cls in zip(b["clip_key"], b["reference_clip"], b["emotion_class"]):
        assert _speaker(source, ref) == _speaker(source, key)
        assert source[int(ref)]["emotion"].decode() == schema.NEUTRAL
        if cls != schema.CLASSES.index(schema.NEUTRAL):
            assert ref != key  # an emotional target never sees its own clip as the reference
    frames = [schema.decode_frames(source[int(r)]["frames"], [int(i)])[0] for r, i in zip(b["reference_clip"], b["reference_index"])]
    np.testing.assert_array_equal(b["reference"], np.stack(frames))


def test_reference_from_another_clip_of_the_same_identity(source):
    b = _concat(_batches(source, 6, reference_other_p=1.0))
    assert np.all(b["reference_clip"] != b["clip_key"])
    assert all(_speaker(source, r) == _speaker(source, k) for r, k in zip(b["reference_clip"], b["clip_key"]))


def test_motion_frames_repeat_the_reference_at_their_rate(source):
    b = _concat(_batches(source, 12, motion_as_reference_p=0.5))
    flagged = b["motion_is_reference"]
    assert 0.25 < flagged.mean() < 0.75
    for i in np.flatnonzero(flagged):
        assert all((b["motion_frames"][i, j] == b["reference"][i]).all() for j in range(2))
    for i in np.flatnonzero(~flagged):
        record = source[int(b["clip_key"][i])]
        s = int(b["start"][i])
        np.testing.assert_array_equal(b["motion_frames"][i], schema.decode_frames(record["frames"], range(s - 2, s)))


def test_motion_frames_from_another_expression_of_the_same_identity_at_their_rate(source):
    b = _concat(_batches(source, 12, motion_as_reference_p=0.3, motion_other_p=0.4))
    other = b["motion_clip"] != b["clip_key"]
    assert not (other & b["motion_is_reference"]).any()
    assert 0.15 < other.mean() < 0.65 and b["motion_is_reference"].any() and (~other & ~b["motion_is_reference"]).any()
    for i in np.flatnonzero(other):
        key, motion = int(b["clip_key"][i]), int(b["motion_clip"][i])
        assert _speaker(source, motion) == _speaker(source, key)
        assert source[motion]["emotion_class"] != source[key]["emotion_class"]
        clip = schema.decode_frames(source[motion]["frames"], range(len(source[motion]["frames"])))
        starts = [t for t in range(len(clip) - 1) if (clip[t : t + 2] == b["motion_frames"][i]).all()]
        assert starts, "the motion frames are two consecutive frames of the other clip"
    assert not (b["motion_clip"][~other] != b["clip_key"][~other]).any()


def test_emotion_modes_keep_exactly_one_modality_unless_the_emotion_is_dropped(source):
    b = _concat(_batches(source, 16, emotion_speech_p=0.3, drop_emotion_p=0.2))
    drop, dropped = b["emotion_drop"], b["drop_emotion"]
    np.testing.assert_array_equal(drop[dropped], True)  # (text, speech, label) all dropped
    kept = drop[~dropped]
    assert np.all((~kept).sum(1) == 1) and not np.any(~kept[:, 0])  # one of speech / label, never text (p = 0)
    voice_matches = np.array([source[int(k)]["speech_emotion"] == source[int(k)]["emotion"] for k in b["clip_key"][~dropped]])
    speech_share = (~kept[voice_matches, 1]).mean()  # speech is a source only where the voice matches
    assert 0.1 < speech_share < 0.55
    assert 0.05 < dropped.mean() < 0.4


def test_speech_is_the_emotion_source_only_where_the_voice_expresses_the_emotion(source):
    b = _concat(_batches(source, 8, emotion_speech_p=1.0))
    voices = [source[int(k)]["speech_emotion"] == source[int(k)]["emotion"] for k in b["clip_key"]]
    kept_speech = ~b["emotion_drop"][:, 1]
    assert any(voices) and not all(voices)  # the tiny data has both kinds of clip
    np.testing.assert_array_equal(kept_speech, voices)  # a neutral voice under an emotional face: the label


def test_class_balanced_sampling_draws_every_class_about_equally(source):
    b = _concat(_batches(source, 24, class_balanced=True))
    counts = np.bincount(b["emotion_class"], minlength=len(schema.CLASSES))
    assert counts.min() >= 4  # 96 samples over 7 classes: about 14 each; neutral is 1 clip in 13 of the data


def test_clips_too_short_for_the_reference_distance_are_reported(source):
    with pytest.raises(ValueError, match="reference"):
        _batches(source, 1, num_frames=16, reference_min_distance=40)


def test_masked_noisy_sampling_rate_is_p_and_noisy_samples_hide_the_mouth(source):
    p = 0.3
    b = _concat(_batches(source, 60, noisy_p=p))  # 240 samples
    rate, sigma = b["noisy"].mean(), np.sqrt(p * (1 - p) / len(b["noisy"]))
    assert abs(rate - p) < 4 * sigma, rate
    noisy, clean = b["noisy"], ~b["noisy"]
    mouth = b["mouth_mask"] > 0
    assert mouth[noisy].any(axis=(1, 2, 3)).all()  # every noisy frame has a mouth box
    assert (b["loss_mask"][noisy][mouth[noisy]] == 0).all()  # exactly zero over the mouth
    assert (b["loss_mask"][noisy][~mouth[noisy]] == 1).all()  # and untouched elsewhere
    assert (b["loss_mask"][clean] == 1).all()
    # Class-balanced targets: every class shows up, none dominates.
    counts = np.bincount(b["emotion_class"] + 1, minlength=8)[1:]
    assert (counts > 0).all() and counts.max() < 3 * counts.min()


def test_mouth_box_covers_every_lip_landmark(source):
    b = _concat(_batches(source, 4, noisy_p=1.0))
    lips = schema.layout_groups("synthetic72")["lips"]
    for i in range(len(b["clip_key"])):
        lm = source[int(b["clip_key"][i])]["landmarks"][b["start"][i] : b["start"][i] + 8][:, list(lips)]
        cells = np.clip((lm // 8).astype(int), 0, 7)
        for f in range(8):
            assert (b["loss_mask"][i, f, cells[f, :, 1], cells[f, :, 0]] == 0).all()


def test_region_weighted_loss_mask_weights_face_and_lips_and_still_hides_noisy_mouths(source):
    b = _concat(_batches(source, 6, face_loss_weight=3.0, lip_loss_weight=5.0, noisy_p=0.5))
    face, lip, w = b["face_mask"], b["lip_mask"], b["loss_mask"]
    expected = (1 - face) + 3.0 * (face - lip) + 5.0 * lip  # Hallo's nested regions
    clean, noisy = ~b["noisy"], b["noisy"]
    np.testing.assert_allclose(w[clean], expected[clean], rtol=1e-6)
    assert w[clean].max() > 4.0 and w[clean].min() == 1.0  # lips weigh most, background stays 1
    mouth = b["mouth_mask"] > 0
    assert (w[noisy][mouth[noisy]] == 0).all()
    np.testing.assert_allclose(w[noisy][~mouth[noisy]], expected[noisy][~mouth[noisy]], rtol=1e-6)


def test_condition_dropout_flags(source):
    b = _concat(_batches(source, 50, drop_audio_p=0.5, drop_all_p=0.2))
    assert not (b["drop_reference"] & ~b["drop_audio"]).any()  # reference only dropped with all
    all_three = b["drop_reference"] & b["drop_audio"] & b["drop_emotion"]
    assert (b["drop_reference"] == all_three).all()
    assert abs(all_three.mean() - 0.2) < 0.1 and abs(b["drop_audio"].mean() - 0.6) < 0.1


def test_same_seed_same_batches_different_seed_different(source):
    a, b = _batches(source, 3, seed=7, noisy_p=0.5), _batches(source, 3, seed=7, noisy_p=0.5)
    c = _batches(source, 3, seed=8, noisy_p=0.5)
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert any((x["clip_key"] != z["clip_key"]).any() for x, z in zip(a, c))


def test_worker_processes_give_the_same_samples(source):
    # With workers, grain batches within each worker: compare per sample (batch size 1).
    a = _batches(source, 6, seed=3, batch_size=1)
    b = _batches(source, 6, seed=3, batch_size=1, worker_count=2)
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_restored_iterator_state_continues_the_same_sequence(source, tmp_path):
    import orbax.checkpoint as ocp

    cfg = P.PipelineConfig(num_frames=8, motion_frames=2, batch_size=2, seed=5, noisy_p=0.3)
    it = iter(P.make_pipeline(source, cfg, shard_options=NO_SHARDING))
    for _ in range(3):
        next(it)
    state = it.get_state()
    with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",)) as manager:
        manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        manager.wait_until_finished()
    expected = [next(it) for _ in range(3)]

    fresh = iter(P.make_pipeline(source, cfg, shard_options=NO_SHARDING))
    with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",)) as manager:
        manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    assert fresh.get_state() == state
    for want in expected:
        got = next(fresh)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="noisy_p"):
        P.PipelineConfig(noisy_p=1.5)
    with pytest.raises(ValueError, match="motion_as_reference_p \\+ data.motion_other_p"):
        P.PipelineConfig(motion_as_reference_p=0.8, motion_other_p=0.3)
    with pytest.raises(ValueError, match="face_loss_weight"):
        P.PipelineConfig(face_loss_weight=-1.0)
    with pytest.raises(ValueError, match="data.face_mask must be one of"):
        P.PipelineConfig(face_mask="hull")
    with pytest.raises(ValueError, match="unknown data pipeline field"):
        P.PipelineConfig.from_dict({"num_frame": 3})


def test_missing_dataset_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="moee prepare"):
        P.open_source(tmp_path, "synthetic_talking_faces/tiny", "train")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_WORKER = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
    from moee_jax.data import pipeline as P
    source = P.open_source(sys.argv[3], sys.argv[4], "train")
    cfg = P.PipelineConfig(num_frames=8, motion_frames=2, batch_size=4, noisy_p=0.5, seed=1)
    pipe = P.make_pipeline(source, cfg)  # default: ShardByJaxProcess
    it = iter(pipe)
    keys = sorted({int(k) for _ in range(8) for k in next(it)["clip_key"]})
    print(json.dumps({"process": jax.process_index(), "range": list(pipe.key_range), "keys": keys,
                      "tensorflow": "tensorflow" in sys.modules}))
    jax.distributed.shutdown()
""")


def test_two_jax_processes_read_disjoint_shards_without_tensorflow(synthetic_tfds):
    data_dir, name = synthetic_tfds
    address = f"127.0.0.1:{_free_port()}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen([sys.executable, "-c", _WORKER, address, str(i), data_dir, name],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
        for i in range(2)
    ]  # fmt: skip
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    outs.sort(key=lambda o: o["process"])
    (lo0, hi0), (lo1, hi1) = outs[0]["range"], outs[1]["range"]
    assert hi0 <= lo1 and lo0 == 0  # contiguous, disjoint ranges
    assert all(lo0 <= k < hi0 for k in outs[0]["keys"]) and all(lo1 <= k < hi1 for k in outs[1]["keys"])
    assert not set(outs[0]["keys"]) & set(outs[1]["keys"])
    assert not outs[0]["tensorflow"] and not outs[1]["tensorflow"]
