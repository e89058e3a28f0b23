"""The pretrained encoders wired in: a feature cache built once beside the dataset, training on its
wav2vec2 and T5 features, and animation computing the same features from the speech and the text.

The encoders are tiny random transformers models saved locally (nothing is downloaded); the data is
the tiny synthetic dataset.
"""

from __future__ import annotations

import json
import pickle

import grain
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from moee_jax.data import feature_cache as FC
from moee_jax.data import pipeline as P
from moee_jax.data.audio import SAMPLE_RATE
from tests.reference_models import randomize

# Strides multiply to 320: 50 positions per second, as in released wav2vec2 models.
W2V = dict(
    hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
    conv_dim=(8, 8, 8, 8), conv_kernel=(10, 8, 8, 8), conv_stride=(5, 4, 4, 4),
    num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2,
)  # fmt: skip
WORDS = ["<pad>", "</s>", "<unk>", "a", "person", "speaking", "happy", "happily", "sad", "sadly", "angry", "angrily",
         "fearful", "surprised", "disgusted", "neutral", "calm"]  # fmt: skip
T5 = dict(vocab_size=len(WORDS), d_model=12, d_kv=4, num_heads=2, d_ff=16, num_layers=1, relative_attention_num_buckets=8)
NEW_KEYS = {"audio_features", "speech_features", "speech_mask", "text_features", "text_mask"}
NO_SHARDING = grain.sharding.NoSharding()


# ---- fixtures --------------------------------------------------------------------------------------------


def _wav2vec2(torch, folder, seed, **overrides):
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    model = randomize(torch, Wav2Vec2Model(Wav2Vec2Config(**(W2V | overrides))), seed=seed)
    model.save_pretrained(folder, safe_serialization=True)
    Wav2Vec2FeatureExtractor(do_normalize=True).save_pretrained(folder)
    return folder


def _t5(torch, folder, seed):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>").save_pretrained(folder)
    randomize(torch, T5EncoderModel(T5Config(**T5)), seed=seed).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def encoders(torch, tmp_path_factory):
    """Tiny random wav2vec2 and T5 folders (``save_pretrained`` layout, safetensors), and a second
    wav2vec2 of another width."""
    root = tmp_path_factory.mktemp("encoders")
    return {
        "audio": str(_wav2vec2(torch, root / "w2v", 11)),
        "text": str(_t5(torch, root / "t5", 12)),
        "other_audio": str(_wav2vec2(torch, root / "w2v_wide", 13, hidden_size=24)),
    }


@pytest.fixture(scope="module")
def cache(synthetic_tfds, encoders, tmp_path_factory):
    """The feature cache of the tiny synthetic dataset's train split."""
    data_dir, name = synthetic_tfds
    folder = tmp_path_factory.mktemp("cache") / "features"
    FC.build_feature_cache(data_dir, name, "train", folder, audio_encoder=encoders["audio"], text_encoder=encoders["text"], text_length=8)
    return folder


@pytest.fixture(scope="module")
def source(synthetic_tfds):
    return P.open_source(*synthetic_tfds, "train")


def _batches(source, n, **overrides):
    cfg = P.PipelineConfig(**{"num_frames": 8, "motion_frames": 0, "batch_size": 4, "audio_context_frames": 3, **overrides})
    it = iter(P.make_pipeline(source, cfg, shard_options=NO_SHARDING))
    return [next(it) for _ in range(n)]


# ---- the cache and the pipeline ------------------------------------------------------------------------------


def test_cache_holds_every_record_s_per_frame_hidden_states_and_text_features(cache, encoders, source):
    from moee_jax.checkpoint.pretrained import load_t5_encoder, load_wav2vec2
    from moee_jax.data.audio_features import audio_frame_features

    manifest = json.loads((cache / "features.json").read_text())
    assert manifest["splits"] == {"train": {"file": "train.npz", "num_records": len(source)}}
    assert (manifest["audio_encoder"]["layers"], manifest["audio_encoder"]["dim"]) == (W2V["num_hidden_layers"] + 1, 16)
    assert manifest["text_encoder"]["dim"] == T5["d_model"] and manifest["text_length"] == 8
    record = source[3]
    rid, n = record["id"].decode(), len(record["frames"])
    stored = np.load(cache / "train.npz")
    expected = audio_frame_features(np.asarray(record["audio"]), load_wav2vec2(encoders["audio"]), num_frames=n)
    np.testing.assert_array_equal(stored[f"{rid}/audio"], expected)
    assert stored[f"{rid}/audio"].shape == (n, 3, 16)
    text, mask = load_t5_encoder(encoders["text"]).encode([record["text"].decode()], max_length=8)
    np.testing.assert_array_equal(stored[f"{rid}/text"], text[0])
    np.testing.assert_array_equal(stored[f"{rid}/text_mask"], mask[0])


def test_feature_window_slot_k_is_the_cached_frame_s_minus_c_plus_k(cache, source):
    c, f = 3, 8
    batches = _batches(source, 4, features=str(cache), audio_context_frames=c)
    stored = np.load(cache / "train.npz")
    starts = []
    for b in batches:
        assert b["audio_features"].shape == (4, f, 2 * c + 1, 3, 16) and b["speech_features"].shape == (4, f, 16)
        assert b["text_features"].shape == (4, 8, T5["d_model"]) and b["text_mask"].dtype == np.bool_
        for j in range(4):
            rid = source[int(b["clip_key"][j])]["id"].decode()
            frames, s = stored[f"{rid}/audio"], int(b["start"][j])
            starts.append(s)
            for i in range(f):
                for k in range(2 * c + 1):  # edge frames replicate past the clip's ends, as frame_windows does
                    np.testing.assert_array_equal(b["audio_features"][j, i, k], frames[np.clip(s + i - c + k, 0, len(frames) - 1)])
            np.testing.assert_array_equal(b["speech_features"][j], frames[s : s + f, -1])
            assert b["speech_mask"][j].all()
            np.testing.assert_array_equal(b["text_features"][j], stored[f"{rid}/text"])
    assert min(starts) < c  # windows reaching past the start of a clip were among them


def test_a_window_at_either_end_of_a_clip_replicates_the_edge_frame(cache, source):
    features = FC.FeatureCache(cache)
    record = source[0]
    rid, n = record["id"].decode(), len(record["frames"])
    frames = np.load(cache / "train.npz")[f"{rid}/audio"]
    first = features.clip(rid, 0, 4, 2, n)["audio_features"]
    last = features.clip(rid, n - 4, 4, 2, n)["audio_features"]
    np.testing.assert_array_equal(first[0, :3], np.stack([frames[0]] * 3))
    np.testing.assert_array_equal(last[-1, 2:], np.stack([frames[-1]] * 3))
    # An opened cache pickles without its open files (grain's worker processes) and reads the same.
    again = pickle.loads(pickle.dumps(features))
    np.testing.assert_array_equal(again.clip(rid, 0, 4, 2, n)["audio_features"], first)


def test_without_a_cache_samples_are_unchanged_and_a_cache_only_adds_its_keys(cache, source):
    settings = dict(drop_audio_p=0.3, emotion_speech_p=0.3, noisy_p=0.2, reference_other_p=0.3, motion_frames=2)
    plain = _batches(source, 3, **settings)
    again = _batches(source, 3, **settings, features="")
    cached = _batches(source, 3, **settings, features=str(cache))
    for a, b, withc in zip(plain, again, cached):
        assert not NEW_KEYS & set(a) and set(withc) == set(a) | NEW_KEYS
        for key in a:  # bit for bit: the same seed draws the same samples, with or without the cache
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
            np.testing.assert_array_equal(a[key], withc[key], err_msg=key)


def test_a_cache_refuses_other_encoders_naming_the_file_and_field(cache, encoders, synthetic_tfds):
    data_dir, name = synthetic_tfds
    with pytest.raises(FC.FeatureCacheError, match=r"features\.json: field audio_encoder\.config_hash .*w2v_wide"):
        FC.build_feature_cache(data_dir, name, "test", cache, audio_encoder=encoders["other_audio"], text_encoder=encoders["text"],
                               text_length=8)  # fmt: skip
    with pytest.raises(FC.FeatureCacheError, match=r"features\.json: field text_encoder is .*has none"):
        FC.build_feature_cache(data_dir, name, "test", cache, audio_encoder=encoders["audio"], text_length=8)
    with pytest.raises(FC.FeatureCacheError, match=r"features\.json: field text_length is 8"):
        FC.build_feature_cache(data_dir, name, "test", cache, audio_encoder=encoders["audio"], text_encoder=encoders["text"])
    assert sorted(p.name for p in cache.iterdir()) == ["features.json", "train.npz"]  # nothing written


def test_training_config_must_take_the_cache_s_widths(cache, synthetic_tfds):
    config = _stage_config("stage1", synthetic_tfds[0], cache)
    assert FC.check_training_config(config, num_records=None)["audio_encoder"]["dim"] == 16
    for field, value, match in [
        ("speech_dim", 32, r"features\.json: the speech emotion features are 16 wide .*speech_dim=32"),
        ("text_dim", 16, r"features\.json: field text_encoder\.dim is 12 but model\.emotion\.text_dim=16"),
    ]:
        bad = _stage_config("stage1", synthetic_tfds[0], cache)
        bad.model.emotion[field] = value
        with pytest.raises(FC.FeatureCacheError, match=match):
            FC.check_training_config(bad)
    with pytest.raises(FC.FeatureCacheError, match=r"num_records is \d+ but the dataset's split has 3"):
        FC.check_training_config(config, num_records=3)
    no_cache = _stage_config("stage1", synthetic_tfds[0], "")
    no_cache.model.emotion.sources = ("label", "text", "speech")
    with pytest.raises(FC.FeatureCacheError, match="sources has 'text' but data.features is empty"):
        FC.check_training_config(no_cache)


def test_animation_refuses_audio_encoders_that_do_not_fit_the_model(cache, encoders, synthetic_tfds, tmp_path):
    from moee_jax.inference.encoders import ModelEncoders
    from moee_jax.inference.inputs import InputError

    config = _stage_config("stage2", synthetic_tfds[0], cache)
    manifest, where = FC.read_manifest(cache), str(cache / "features.json")
    # The recorded encoders are found without flags when this machine has them.
    found = ModelEncoders.of_model(config, manifest, where)
    assert found.audio_folder == manifest["audio_encoder"]["folder"] and found.text_folder == manifest["text_encoder"]["folder"]
    assert found.text_length == 8
    wide = ModelEncoders.of_model(config, manifest, where, audio_encoder=encoders["other_audio"])
    with pytest.raises(
        InputError, match=r"--audio_encoder .*w2v_wide: windows of 5 frames × 3 hidden states × width 24 make 360 .* takes 240"
    ):
        wide.load_audio(window=5, projection_inputs=240, speech_dim=16)
    with pytest.raises(InputError, match=r"--audio_encoder .*w2v_wide: its features are 24 wide .* takes 16"):
        wide.load_audio(window=5, projection_inputs=None, speech_dim=16)
    # The same widths from another encoder config are refused by the recorded config hash.
    forged = dict(manifest, audio_encoder=dict(manifest["audio_encoder"], config_hash="0" * 16))
    with pytest.raises(InputError, match=r"features\.json: field audio_encoder\.config_hash is '0000.* has '"):
        ModelEncoders.of_model(config, forged, where, audio_encoder=encoders["audio"]).load_audio(
            window=5, projection_inputs=240, speech_dim=16
        )
    moved = dict(manifest, audio_encoder=dict(manifest["audio_encoder"], folder=str(tmp_path / "gone")))
    with pytest.raises(InputError, match=r"trained on wav2vec2 features .*gone, not on this machine\); pass --audio_encoder"):
        ModelEncoders.of_model(config, moved, where).load_audio(window=5, projection_inputs=240, speech_dim=16)
    # A model trained on log-mel audio (a text-only cache, or none) takes no audio encoder.
    text_only = dict(manifest, audio_encoder=None)
    with pytest.raises(InputError, match=r"--audio_encoder .*field audio_encoder is null: the model takes log-mel audio"):
        ModelEncoders.of_model(config, text_only, where, audio_encoder=encoders["audio"])
    config.data.features = ""
    with pytest.raises(InputError, match="trained on log-mel audio, not on encoder features"):
        ModelEncoders.of_model(config, None, audio_encoder=encoders["audio"])


def test_a_stage_does_not_continue_from_one_trained_on_other_audio_features(cache, synthetic_tfds, tmp_path):
    import shutil

    from moee_jax.train.trainer import TrainingError
    from tests.train_helpers import single_device_trainer, stage_config

    run = tmp_path / "run"
    (run / "stage1" / "final" / "params").mkdir(parents=True)  # a finished stage 1 trained on the cache
    shutil.copy(cache / "features.json", run / "stage1" / "features.json")
    trainer = single_device_trainer(stage_config("stage2", synthetic_tfds[0], steps=1, batch_size=2), run)
    with pytest.raises(TrainingError, match=r"stage1/features\.json: field audio_encoder is .*w2v but this stage \(log-mel audio"):
        trainer.init_state()


# ---- training and animation (minutes of CPU: `make test-slow`) ---------------------------------------------------


def _stage_config(stage, data_dir, cache, **train):
    from tests.train_helpers import stage_config

    c = stage_config(stage, data_dir, steps=1, batch_size=2, **train)
    c.checkpoint.every_steps = 100
    if not cache:  # log-mel audio, as the stage configs train by default
        return c
    c.data.features = str(cache)
    c.data.emotion_text_p = 0.3
    c.model.emotion.sources = ("label", "text", "speech")
    c.model.emotion.speech_dim = 16
    c.model.emotion.text_dim = T5["d_model"]
    return c


def _train_both_stages(data_dir, cache, run):
    from tests.train_helpers import single_device_trainer

    for stage in ("stage1", "stage2"):
        result = single_device_trainer(_stage_config(stage, data_dir, cache), run).run()
        assert result.final_step == 1 and np.isfinite(list(result.losses.values())).all()
    return run


@pytest.fixture(scope="module")
def encoder_run(synthetic_tfds, cache, tmp_path_factory):
    """Stage 1 and stage 2, one step each, on the cache's wav2vec2 and T5 features."""
    return _train_both_stages(synthetic_tfds[0], cache, tmp_path_factory.mktemp("encoder_run"))


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    from moee_jax.data.synthetic import generate_clip

    d = tmp_path_factory.mktemp("media")
    clip = generate_clip(1, "happy", num_frames=10, size=64)  # 0.4 s: 10 frames, 3 clips of 4
    Image.fromarray(clip.frames[0]).save(d / "face.png")
    sf.write(d / "speech.wav", np.asarray(clip.audio, np.float32), SAMPLE_RATE)
    return d


def _animate(animator, media, out, spec):
    from moee_jax.data.video_io import read_video
    from moee_jax.inference.outputs import animate_to_file

    animation = animate_to_file(animator, media / "face.png", media / "speech.wav", spec, out, steps=2, detect=False)
    frames, fps, sound = read_video(out)
    assert frames.shape[0] == animation.frames.shape[0] == 10 and fps == 25 and sound is not None
    return animation


@pytest.mark.slow
def test_wav2vec2_and_t5_features_train_both_stages_and_animate_an_emotion_text(encoder_run, cache, encoders, media, tmp_path):
    from moee_jax.inference.animator import Animator
    from moee_jax.inference.inputs import parse_emotion

    recorded = json.loads((cache / "features.json").read_text())
    for stage in ("stage1", "stage2"):  # the run remembers the features it was trained on
        assert json.loads((encoder_run / stage / "features.json").read_text()) == recorded
    animator = Animator.from_run(encoder_run, audio_encoder=encoders["audio"], text_encoder=encoders["text"])
    out = tmp_path / "text.mp4"
    _animate(animator, media, out, parse_emotion(emotion_text="a happily surprised person"))
    assert json.loads(out.with_suffix(".json").read_text())["audio_features"] == f"wav2vec2 {encoders['audio']}"
    # The emotion from the speech takes wav2vec2's last layer, as training did; a label drops the text.
    _animate(animator, media, tmp_path / "speech.mp4", parse_emotion(emotion_from_audio=True))
    _animate(animator, media, tmp_path / "label.mp4", parse_emotion("happy"))


@pytest.mark.slow
def test_animation_cuts_the_speech_as_training_cut_its_clips(encoder_run, cache, source):
    from moee_jax.inference.animator import Animator
    from moee_jax.inference.long_audio import clip_feature_windows, plan_clips

    animator = Animator.from_run(encoder_run)  # the recorded encoder folders, found without flags
    features = FC.FeatureCache(cache)
    record = source[5]
    rid, wave, n = record["id"].decode(), np.asarray(record["audio"], np.float32), len(record["frames"])
    plan = plan_clips(wave.size, 25.0, 4, 2, 2)
    assert plan.num_frames == n
    windows = clip_feature_windows(animator._audio_features(wave, n), plan)
    for k in range(plan.num_clips):
        if plan.clip_start(k) + 4 <= n:
            np.testing.assert_array_equal(windows[k], features.clip(rid, plan.clip_start(k), 4, 2, n)["audio_features"])


@pytest.mark.slow
def test_log_mel_trains_both_stages_and_animates_without_a_cache(synthetic_tfds, media, tmp_path):
    from moee_jax.inference.animator import Animator
    from moee_jax.inference.inputs import parse_emotion

    run = _train_both_stages(synthetic_tfds[0], "", tmp_path / "run")
    assert not (run / "stage2" / "features.json").exists()
    animation = _animate(Animator.from_run(run), media, tmp_path / "mel.mp4", parse_emotion("happy:0.6,surprised:0.4"))
    assert animation.settings["audio_features"] == "log-mel"


@pytest.mark.slow
def test_cli_builds_the_feature_cache_of_a_split(synthetic_tfds, encoders, tmp_path):
    import subprocess
    import sys

    data_dir, name = synthetic_tfds
    out = tmp_path / "features"
    cmd = [sys.executable, "-m", "moee_jax.cli", "features", f"--data_dir={data_dir}", f"--dataset={name}", "--splits=test",
           f"--audio-encoder={encoders['audio']}", f"--out={out}"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"--config.data.features={out}" in done.stdout
    manifest = json.loads((out / "features.json").read_text())
    assert list(manifest["splits"]) == ["test"] and manifest["text_encoder"] is None
    # Other encoders into the same folder: refused, naming the file and the field.
    bad = subprocess.run(
        cmd[:-2] + [f"--audio-encoder={encoders['other_audio']}", f"--out={out}"], capture_output=True, text=True, timeout=900
    )
    assert bad.returncode != 0 and "features.json: field audio_encoder.config_hash" in bad.stderr
