"""Audio loading, frame alignment, windowing, long-audio chunking, and the audio projection."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile as sf

from moee_jax.data import audio as A
from moee_jax.models.audio import AudioProjection

SR = 16000
LAYERS, DIM = 3, 4


def _tone(seconds: float, sr: int, freq: float = 220.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(round(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


# --- frame counts, alignment, windows ------------------------------------------------------------


def test_a_3p2_second_clip_at_25_fps_has_80_frames():
    assert A.num_video_frames(51200, SR, 25) == 80


def test_frame_count_is_exact_for_whole_frames_and_rounds_partial_frames_up():
    for seconds, fps in [(0.7, 30), (1.1, 25), (3.3, 30), (12.0, 29.97), (60.0, 25)]:
        n = round(seconds * SR)
        assert A.num_video_frames(n, SR, fps) == math.ceil(round(n * fps / SR, 6))
    assert A.num_video_frames(51201, SR, 25) == 81
    assert A.num_video_frames(0, SR, 25) == 0


def test_aligned_features_have_one_vector_per_frame_for_every_layer():
    hidden = np.random.default_rng(0).standard_normal((LAYERS, 160, DIM)).astype(np.float32)  # 3.2 s at 50 Hz
    aligned = A.align_to_frames(hidden, 80, time_axis=1)
    assert aligned.shape == (80, LAYERS, DIM) and aligned.dtype == np.float32
    time_major = A.align_to_frames(np.moveaxis(hidden, 1, 0), 80, time_axis=0)
    np.testing.assert_array_equal(aligned, time_major)


def test_interpolating_a_linear_ramp_is_exact():
    length, frames = 161, 80
    slope = np.arange(1, LAYERS * DIM + 1, dtype=np.float64).reshape(LAYERS, DIM)
    ramp = 3.0 + np.arange(length)[:, None, None] * slope  # (L, layers, D)
    aligned = A.align_to_frames(ramp, frames, time_axis=0)
    expected = 3.0 + (np.arange(frames) * (length - 1) / (frames - 1))[:, None, None] * slope
    np.testing.assert_allclose(aligned, expected, rtol=1e-12)


def test_alignment_keeps_first_and_last_encoder_positions():
    hidden = np.random.default_rng(1).standard_normal((50, LAYERS, DIM))
    aligned = A.align_to_frames(hidden, 7, time_axis=0)
    np.testing.assert_allclose(aligned[0], hidden[0])
    np.testing.assert_allclose(aligned[-1], hidden[-1])


def test_frame_windows_have_shape_frames_window_layers_dim():
    aligned = np.zeros((80, LAYERS, DIM), np.float32)
    assert A.frame_windows(aligned, radius=2).shape == (80, 5, LAYERS, DIM)


def test_frame_windows_replicate_edge_frames():
    frames = np.arange(6, dtype=np.float32)[:, None, None] * np.ones((1, LAYERS, DIM), np.float32)
    win = A.frame_windows(frames, radius=2)[..., 0, 0]
    np.testing.assert_array_equal(win[0], [0, 0, 0, 1, 2])
    np.testing.assert_array_equal(win[3], [1, 2, 3, 4, 5])
    np.testing.assert_array_equal(win[5], [3, 4, 5, 5, 5])


def test_whisper_windows_take_encoder_positions_around_each_frame():
    positions = np.arange(160, dtype=np.float32)  # 3.2 s at 50 Hz
    hidden = np.broadcast_to(positions[None, :, None], (LAYERS, 160, DIM))
    win = A.whisper_frame_windows(hidden, 80, 25, time_axis=1, radius=2)
    assert win.shape == (80, 5, LAYERS, DIM)
    np.testing.assert_array_equal(win[10, :, 0, 0], [18, 19, 20, 21, 22])  # frame 10 starts at 0.4 s = position 20
    np.testing.assert_array_equal(win[0, :, 0, 0], [0, 0, 0, 1, 2])
    np.testing.assert_array_equal(win[79, :, 0, 0], [156, 157, 158, 159, 159])


def test_whisper_windows_refuse_features_shorter_than_the_video():
    with pytest.raises(ValueError, match="only 100"):
        A.whisper_frame_windows(np.zeros((LAYERS, 100, DIM)), 80, 25, time_axis=1)


# --- loading -------------------------------------------------------------------------------------


def test_stereo_48k_wav_loads_as_mono_16k_of_the_right_length(tmp_path):
    left, right = _tone(3.2, 48000, amp=0.5), _tone(3.2, 48000, amp=0.3)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), 48000)
    wave = A.load_audio(path)
    assert wave.shape == (51200,) and wave.dtype == np.float32
    assert _rms(wave[1000:-1000]) == pytest.approx(0.4 / math.sqrt(2), rel=0.02)  # mean of the channels


def test_flac_loads(tmp_path):
    path = tmp_path / "tone.flac"
    sf.write(path, _tone(1.0, 22050), 22050)
    wave = A.load_audio(path)
    assert wave.shape == (16000,)
    assert _rms(wave[500:-500]) == pytest.approx(0.5 / math.sqrt(2), rel=0.02)


def test_mp3_loads(tmp_path):
    if "MP3" not in sf.available_formats():
        pytest.skip("this libsndfile has no MP3 support, so the test cannot write an MP3")
    path = tmp_path / "tone.mp3"
    sf.write(path, _tone(2.0, 44100), 44100)
    wave = A.load_audio(path)
    assert abs(wave.shape[0] - 32000) < 0.05 * 32000  # MP3 frames pad the ends
    assert not A.is_silent(wave)


def test_missing_file_raises_naming_it(tmp_path):
    path = tmp_path / "nope.wav"
    with pytest.raises(A.AudioError, match="not found") as err:
        A.load_audio(path)
    assert str(path) in str(err.value)


def test_zero_byte_file_raises_naming_it(tmp_path):
    path = tmp_path / "empty.wav"
    path.touch()
    with pytest.raises(A.AudioError, match="empty") as err:
        A.load_audio(path)
    assert str(path) in str(err.value)


def test_file_with_zero_samples_raises_naming_it(tmp_path):
    path = tmp_path / "header_only.wav"
    sf.write(path, np.zeros(0, np.float32), SR)
    with pytest.raises(A.AudioError, match="no samples") as err:
        A.load_audio(path)
    assert str(path) in str(err.value)


def test_corrupt_file_raises_naming_it(tmp_path):
    path = tmp_path / "corrupt.wav"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(A.AudioError, match="could not decode") as err:
        A.load_audio(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("channels", [1, 2])
def test_nan_samples_are_named_as_such_not_as_an_undecodable_file(tmp_path, channels):
    wave = np.full((1600, channels), 0.1, np.float32)
    wave[100] = np.nan
    path = tmp_path / "nan.wav"
    sf.write(path, wave, 16000, subtype="FLOAT")
    with pytest.raises(A.AudioError, match="NaN or infinite") as err:
        A.load_audio(path)
    assert str(path) in str(err.value) and "ffmpeg" not in str(err.value)


def test_silent_audio_loads_and_is_reported_silent(tmp_path):
    path = tmp_path / "silence.wav"
    sf.write(path, np.zeros(SR, np.float32), SR)
    wave = A.load_audio(path)
    assert wave.shape == (SR,)
    assert A.is_silent(wave)
    assert not A.is_silent(_tone(0.1, SR))


def test_require_audible_rejects_silent_audio_naming_the_file(tmp_path):
    path = tmp_path / "silence.wav"
    sf.write(path, np.zeros(SR, np.float32), SR)
    with pytest.raises(A.AudioError, match="silent") as err:
        A.load_audio(path, require_audible=True)
    assert str(path) in str(err.value)


# --- long audio ----------------------------------------------------------------------------------

HOP = SR // 50


def _energy_encoder(wave: np.ndarray) -> np.ndarray:
    """Fake encoder: per-20 ms energy and mean at 50 Hz as (layers=2, L=ceil(S/320), D=3)."""
    n = math.ceil(wave.size / HOP)
    frames = np.pad(wave, (0, n * HOP - wave.size)).reshape(n, HOP).astype(np.float64)
    feats = np.stack([np.mean(frames**2, axis=1), np.mean(frames, axis=1)])  # (2, L)
    return np.repeat(feats[:, :, None], 3, axis=2) * np.arange(1, 4)


def _conv_encoder(wave: np.ndarray) -> np.ndarray:
    """Fake wav2vec2-like encoder: 400-sample windows every 320 samples (loses edge positions), (L, 2, 3)."""
    n = (wave.size - 400) // HOP + 1
    windows = np.stack([wave[j * HOP : j * HOP + 400] for j in range(n)]).astype(np.float64)
    feats = np.stack([np.mean(windows**2, axis=1), np.max(windows, axis=1)], axis=1)  # (L, 2)
    return np.repeat(feats[:, :, None], 3, axis=2)


def test_chunked_encoding_equals_one_pass():
    wave = np.random.default_rng(0).standard_normal(75 * SR + 123).astype(np.float32)
    chunks = A.chunk_waveform(wave, SR, chunk_seconds=30.0, overlap_seconds=2.0)
    assert len(chunks) == 3
    stitched = A.encode_long(_energy_encoder, wave, SR, time_axis=1)
    one_pass = _energy_encoder(wave)
    assert stitched.shape == one_pass.shape
    np.testing.assert_allclose(stitched, one_pass, rtol=1e-12)


def test_chunked_encoding_equals_one_pass_for_an_encoder_that_loses_edge_positions():
    wave = np.random.default_rng(1).standard_normal(21 * SR + 77).astype(np.float32)
    stitched = A.encode_long(_conv_encoder, wave, SR, time_axis=0, chunk_seconds=5.0, overlap_seconds=0.5)
    one_pass = _conv_encoder(wave)
    assert stitched.shape == one_pass.shape
    np.testing.assert_allclose(stitched, one_pass, rtol=1e-12)


def test_stitching_without_overlap_refuses_an_encoder_that_loses_edge_positions():
    wave = np.random.default_rng(2).standard_normal(12 * SR).astype(np.float32)
    with pytest.raises(ValueError, match="increase overlap_seconds"):
        A.encode_long(_conv_encoder, wave, SR, time_axis=0, chunk_seconds=5.0, overlap_seconds=0.0)


def test_short_audio_is_one_chunk():
    wave = _tone(3.2, SR)
    assert [start for start, _ in A.chunk_waveform(wave, SR)] == [0]
    np.testing.assert_array_equal(A.encode_long(_energy_encoder, wave, SR, time_axis=1), _energy_encoder(wave))


# --- audio projection ----------------------------------------------------------------------------


def _projection() -> AudioProjection:
    return AudioProjection(num_tokens=4, out_dim=16, hidden_dim=8)


def test_audio_projection_gives_tokens_per_frame():
    model = _projection()
    windows = jnp.ones((2, 3, 5, LAYERS, DIM))
    variables = model.init(jax.random.key(0), windows)
    tokens = model.apply(variables, windows)
    assert tokens.shape == (2, 3, 4, 16)
    np.testing.assert_allclose(tokens.mean(axis=-1), 0.0, atol=1e-5)  # LayerNorm, zero bias at init


def test_audio_projection_works_for_any_number_of_frames():
    model = _projection()
    variables = model.init(jax.random.key(0), jnp.ones((1, 3, 5, LAYERS, DIM)))
    windows = jax.random.normal(jax.random.key(1), (1, 7, 5, LAYERS, DIM))
    tokens = model.apply(variables, windows)
    assert tokens.shape == (1, 7, 4, 16)
    np.testing.assert_allclose(model.apply(variables, windows[:, 2:3]), tokens[:, 2:3], rtol=1e-5, atol=1e-6)


def test_every_audio_projection_param_carries_logical_axes():
    variables = _projection().init(jax.random.key(0), jnp.ones((1, 2, 5, LAYERS, DIM)))
    leaves = jax.tree.leaves(variables["params"], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(leaf, nn.LogicallyPartitioned) for leaf in leaves)
    specs = nn.get_partition_spec(variables)["params"]
    assert tuple(specs["proj1"]["kernel"]) == ("embed", "mlp")
    assert tuple(specs["norm"]["scale"]) == ("norm",)
