"""The ``synthetic_talking_faces`` TFDS builder: splits, held-out identities and compounds, exact records."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from moee_jax.data import pipeline as P
from moee_jax.data import schema

REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def splits(synthetic_tfds):
    data_dir, name = synthetic_tfds
    return {split: P.open_source(data_dir, name, split) for split in ("train", "test")}


def _all(source, key):
    return [source[i][key] for i in range(len(source))]


def test_split_sizes_follow_the_config(splits):
    from moee_jax.data.builders.synthetic_talking_faces import SyntheticTalkingFaces, clip_specs

    config = SyntheticTalkingFaces.builder_configs["tiny"]
    assert len(splits["train"]) == len(clip_specs(config, "train")) == 6 * (6 * 2 + 1)
    assert len(splits["test"]) == len(clip_specs(config, "test")) == 2 * (7 + 4)


def test_test_identities_are_held_out_and_compounds_only_in_test(splits):
    train_speakers, test_speakers = set(_all(splits["train"], "speaker")), set(_all(splits["test"], "speaker"))
    assert train_speakers and test_speakers and not train_speakers & test_speakers
    train_emotions = {e.decode() for e in _all(splits["train"], "emotion")}
    test_emotions = {e.decode() for e in _all(splits["test"], "emotion")}
    assert train_emotions == set(schema.CLASSES)
    compounds = {"happily_surprised", "angrily_disgusted", "sadly_fearful", "fearfully_surprised"}
    assert compounds <= test_emotions and not compounds & train_emotions
    assert set(_all(splits["test"], "emotion_class")) == set(range(7)) | {-1}


def test_records_are_exactly_the_generator_output(splits):
    from moee_jax.data.builders.synthetic_talking_faces import SyntheticTalkingFaces, clip_specs, render_record

    config = SyntheticTalkingFaces.builder_configs["tiny"]
    by_id = {splits["test"][i]["id"].decode(): splits["test"][i] for i in range(len(splits["test"]))}
    spec = clip_specs(config, "test")[9]  # a compound of the first held-out identity
    want = render_record(spec, config)
    got = by_id[want["id"]]
    np.testing.assert_array_equal(schema.decode_frames(got["frames"]), schema.decode_frames(want["frames"]))
    for key in ("audio", "landmarks", "action_units", "identity", "palette"):
        np.testing.assert_array_equal(got[key], want[key])
    assert got["text"].decode() == want["text"] and got["emotion_class"] == -1


def test_a_share_of_emotional_training_clips_has_a_neutral_voice(splits):
    from moee_jax.data.builders.synthetic_talking_faces import SyntheticTalkingFaces, clip_specs

    config = SyntheticTalkingFaces.builder_configs["tiny"]
    train = clip_specs(config, "train")
    emotional = [s for s in train if s.emotion != "neutral"]
    neutral_voice = [s for s in emotional if s.speech_emotion == "neutral"]
    assert 0.3 < len(neutral_voice) / len(emotional) < 0.7  # neutral_voice_p = 0.5
    assert all(s.speech_emotion is None for s in clip_specs(config, "test"))  # held out: voice matches face
    stored = {r["id"].decode(): r["speech_emotion"].decode() for r in (splits["train"][i] for i in range(len(splits["train"])))}
    for spec in train:
        key = f"id{spec.identity:04d}/{spec.emotion}_{spec.intensity:.2f}_{spec.seed:010d}"
        assert stored[key] == (spec.speech_emotion or spec.emotion)


def test_another_share_speaks_with_the_voice_of_another_class_and_the_shares_do_not_overlap():
    import dataclasses

    from moee_jax.data.builders.synthetic_talking_faces import SyntheticTalkingFaces, clip_specs

    tiny = SyntheticTalkingFaces.builder_configs["tiny"]
    config = dataclasses.replace(tiny, train_identities=40, neutral_voice_p=0.3, other_voice_p=0.5)
    train = clip_specs(config, "train")
    emotional = [s for s in train if s.emotion != "neutral"]
    voices = [s.speech_emotion for s in emotional]
    assert 0.22 < voices.count("neutral") / len(voices) < 0.38 + 0.5 / 6  # 0.3, plus the other draws that land on neutral
    others = [s for s in emotional if s.speech_emotion not in (None, "neutral")]
    assert all(s.speech_emotion != s.emotion for s in others)
    assert 0.35 < (len(others) + voices.count("neutral")) / len(voices) - 0.3 < 0.65
    assert len({s.speech_emotion for s in others}) == 6  # every other emotion's voice occurs
    assert all(s.speech_emotion is None for s in train if s.emotion == "neutral")
    # Without the new share, the clips (and their voices) are those of before.
    assert clip_specs(dataclasses.replace(tiny, other_voice_p=0.0), "train") == clip_specs(tiny, "train")
    with pytest.raises(ValueError, match="other_voice_p"):
        clip_specs(dataclasses.replace(tiny, other_voice_p=0.6), "train")


def test_a_labelled_request_has_an_exact_ground_truth_saying_the_neutral_clips_words(splits):
    from moee_jax.data import synthetic
    from moee_jax.data.builders.synthetic_talking_faces import parse_clip_id, speech_matched_clip

    test = [splits["test"][i] for i in range(len(splits["test"]))]
    speaker = test[0]["speaker"]
    clips = {r["emotion"].decode(): r for r in test if r["speaker"] == speaker}
    neutral = clips["neutral"]
    # Asking for the neutral clip itself redraws it exactly, and so does an emotional clip with its own voice.
    again = speech_matched_clip(neutral, "neutral", 0.0)
    np.testing.assert_array_equal(again.frames, schema.decode_frames(neutral["frames"]))
    own = speech_matched_clip(clips["sadness"], "sadness")
    np.testing.assert_array_equal(own.frames, schema.decode_frames(clips["sadness"]["frames"]))
    # Sadness asked of the neutral clip: its audio sample for sample, sadness's AUs, the neutral jaw.
    sad = speech_matched_clip(neutral, "sadness")
    np.testing.assert_array_equal(sad.audio, neutral["audio"])
    static = synthetic.EMOTION_AUS["sadness"]
    np.testing.assert_allclose(np.delete(sad.action_units, 10, axis=1), np.broadcast_to(np.delete(static, 10), (len(sad.frames), 10)))
    np.testing.assert_allclose(sad.action_units[:, 10], again.action_units[:, 10])
    assert not np.allclose(sad.action_units[:, 10], clips["sadness"]["action_units"][:, 10])  # the sad voice's jaw differs
    compound = speech_matched_clip(neutral, "happy:0.5,surprised:0.5")
    np.testing.assert_array_equal(compound.audio, neutral["audio"])
    # A record this builder did not write, or whose audio it cannot redraw, has no such truth.
    assert speech_matched_clip(dict(neutral, id=b"clip_7"), "sadness") is None
    assert speech_matched_clip(dict(neutral, audio=neutral["audio"] * 0.5), "sadness") is None
    older = {k: v for k, v in neutral.items() if k != "speech_emotion"}  # written before the feature: the face's voice
    np.testing.assert_array_equal(speech_matched_clip(older, "sadness").audio, neutral["audio"])
    assert parse_clip_id(neutral["id"].decode())[0] == int(speaker.decode()[2:])
    with pytest.raises(ValueError, match="clip_7"):
        parse_clip_id("clip_7")


def test_readable_by_grain_in_a_process_that_never_imports_tensorflow(synthetic_tfds):
    data_dir, name = synthetic_tfds
    script = textwrap.dedent("""
        import sys, grain
        import tensorflow_datasets as tfds
        source = tfds.data_source(sys.argv[2], split="test", data_dir=sys.argv[1])
        loader = grain.DataLoader(data_source=source, sampler=grain.samplers.IndexSampler(len(source), num_epochs=1),
                                  operations=[grain.transforms.Batch(2)])
        batches = list(loader)
        assert sum(len(b["id"]) for b in batches) == len(source)
        assert "tensorflow" not in sys.modules, "tensorflow was imported"
        print("ok", len(source))
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", script, data_dir, name], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["ok", "22"]
