"""Encoders load from a local transformers folder with transformers' own preprocessing, and an
audio file becomes per-video-frame feature windows."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from moee_jax.checkpoint.pretrained import load_t5_encoder, load_wav2vec2
from moee_jax.data.audio import AudioError
from moee_jax.data.audio_features import audio_frame_windows
from tests.reference_models import randomize, rel_err

# Strides multiply to 320: 50 positions per second, as in released wav2vec2 models.
W2V = dict(
    hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
    conv_dim=(8, 8, 8, 8), conv_kernel=(10, 8, 8, 8), conv_stride=(5, 4, 4, 4),
    num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2,
)


@pytest.fixture(scope="module")
def wav2vec2_folder(torch, tmp_path_factory):
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    folder = tmp_path_factory.mktemp("w2v")
    model = randomize(torch, Wav2Vec2Model(Wav2Vec2Config(**W2V)), seed=11)
    model.save_pretrained(folder, safe_serialization=True)
    Wav2Vec2FeatureExtractor(do_normalize=True).save_pretrained(folder)
    return folder, model


@pytest.fixture(scope="module")
def bundle(wav2vec2_folder):
    return load_wav2vec2(wav2vec2_folder[0])


def test_wav2vec2_bundle_preprocesses_like_transformers(torch, wav2vec2_folder, bundle):
    from transformers import Wav2Vec2FeatureExtractor

    wave = (0.3 * np.sin(np.linspace(0, 400, 8000)) + 0.1).astype(np.float32)  # offset: normalisation matters
    ours = bundle.hidden_states(wave)
    fe = Wav2Vec2FeatureExtractor.from_pretrained(wav2vec2_folder[0])
    with torch.no_grad():
        ref = wav2vec2_folder[1](torch.from_numpy(fe(wave, sampling_rate=16000, return_tensors="np")["input_values"]), output_hidden_states=True)
    assert ours.shape[0] == W2V["num_hidden_layers"] + 1
    assert rel_err(ours[-1], ref.hidden_states[-1][0].numpy()) < 1e-4


def test_a_3_2_second_clip_gives_80_frames_of_windows(bundle, tmp_path):
    sr = 48000
    t = np.arange(int(3.2 * sr)) / sr
    stereo = np.stack([0.3 * np.sin(2 * np.pi * 220 * t), 0.2 * np.sin(2 * np.pi * 330 * t)], axis=1)
    sf.write(tmp_path / "speech.flac", stereo, sr)
    windows = audio_frame_windows(tmp_path / "speech.flac", bundle, fps=25, radius=2)
    assert windows.shape == (80, 5, W2V["num_hidden_layers"] + 1, W2V["hidden_size"])
    assert np.isfinite(windows).all()


def test_long_audio_is_encoded_in_chunks_seamlessly(bundle):
    wave = np.random.default_rng(0).standard_normal(16000 * 5).astype(np.float32) * 0.1
    whole = audio_frame_windows(wave, bundle, chunk_seconds=30)
    chunked = audio_frame_windows(wave, bundle, chunk_seconds=2.0, overlap_seconds=1.0)
    assert whole.shape == chunked.shape == (125, 5, 3, 16)
    # Chunk edges see less context than one pass; away from them the features agree closely.
    assert rel_err(chunked, whole) < 0.2


def test_corrupt_audio_file_is_named(bundle, tmp_path):
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF\x00\x00garbage" * 10)
    with pytest.raises(AudioError, match="broken.wav"):
        audio_frame_windows(bad, bundle)


def test_t5_bundle_tokenizes_and_encodes_from_a_local_folder(torch, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    words = ["<pad>", "</s>", "<unk>", "a", "sadly", "surprised", "person", "speaking", "happy"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    tok.save_pretrained(tmp_path)
    cfg = T5Config(vocab_size=len(words), d_model=16, d_kv=4, num_heads=4, d_ff=24, num_layers=2, relative_attention_num_buckets=8)
    model = randomize(torch, T5EncoderModel(cfg), seed=12)
    model.save_pretrained(tmp_path, safe_serialization=True)
    bundle = load_t5_encoder(tmp_path)
    feats, mask = bundle.encode(["a sadly surprised person speaking", "happy"], max_length=8)
    assert feats.shape == (2, 8, 16) and mask.sum(axis=1).tolist() == [5, 1]
    ids = tok(["a sadly surprised person speaking", "happy"], padding="max_length", max_length=8, return_tensors="pt")
    with torch.no_grad():
        ref = model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).last_hidden_state.numpy()
    assert rel_err(feats[mask], ref[mask]) < 1e-4


def test_missing_model_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_wav2vec2(tmp_path / "nowhere")
