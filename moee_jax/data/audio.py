"""Speech audio: loading, video-frame alignment of encoder features, long-audio chunking.

Pipeline (shapes at each boundary)::

    load_audio(path)                          wave (S,) float32 mono at 16 kHz
    encode_long(encoder, wave, time_axis=1)   hidden states at the encoder rate, e.g. (layers, L, D)
    align_to_frames(h, F, time_axis=1)        (F, layers, D)        one vector per video frame
    frame_windows(aligned, radius=2)          (F, 2r+1, layers, D)  → AudioProjection

Alignment follows Hallo (Xu et al. 2024, "Hallo: Hierarchical Audio-Driven Visual Synthesis for
Portrait Image Animation"): wav2vec2 features are linearly interpolated to one vector per video
frame, all 12 transformer layers kept, and each frame sees the ±2 neighbouring frames. Hallo
resamples the CNN feature sequence *before* the transformer, so its transformer runs at the video
rate; here the encoder runs at its own rate (50 Hz) and its hidden states are resampled, which works
for any encoder and for chunked long audio. Whisper encoders are windowed at their own rate instead
(:func:`whisper_frame_windows`).

Layout convention: encoder features are ``(..., D)`` with time along a caller-stated ``time_axis``
(never guessed: a ``(12, 160, 768)`` stack and a ``(160, 12, 768)`` one are both plausible); every
other non-feature axis is flattened, in order, into the layer axis.
"""

from __future__ import annotations

import math
import os
import pathlib
import warnings
from collections.abc import Callable, Sequence

import librosa
import numpy as np

# wav2vec2 and Whisper encoders both emit 50 positions per second of 16 kHz audio.
ENCODER_RATE = 50.0
SAMPLE_RATE = 16000

# Slack, in video frames, for float error in samples·fps/sr (3.2 s · 25 fps must be 80, not 81).
_FRAME_TOLERANCE = 1e-6


class AudioError(ValueError):
    """An audio file that cannot be used; the message names the file and what to do."""


def load_audio(
    path: str | os.PathLike,
    sr: int = SAMPLE_RATE,
    *,
    require_audible: bool = False,
    silence_threshold_db: float = -60.0,
) -> np.ndarray:
    """Decode ``path`` (WAV, FLAC, OGG, MP3, ...) to a mono float32 wave ``(S,)`` at ``sr`` Hz.

    Channels are averaged; any native rate is resampled (librosa's default soxr resampler).
    Silent audio loads (a silent clip is valid input for animation); ``require_audible=True`` makes
    a clip whose peak is below ``silence_threshold_db`` dBFS an error instead.

    Raises:
      AudioError: the file is missing, empty (0 bytes or 0 samples), not decodable as audio,
        contains non-finite samples, or is silent while ``require_audible`` is set.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise AudioError(f"audio file not found: {path}")
    if not path.is_file():
        raise AudioError(f"audio path is not a file: {path}")
    if path.stat().st_size == 0:
        raise AudioError(f"audio file is empty (0 bytes): {path}")
    try:
        with warnings.catch_warnings():
            # librosa warns when it falls back from libsndfile to audioread; a failure of both is
            # reported below with the file name, and a success needs no warning.
            warnings.filterwarnings("ignore", message="PySoundFile failed", category=UserWarning)
            warnings.filterwarnings("ignore", message=r"librosa\.core\.audio\.__audioread_load", category=FutureWarning)
            wave, native_sr = librosa.load(path, sr=None, mono=True)
    except Exception as e:  # decoders raise anything from RuntimeError to EOFError and struct.error
        if "not finite" in str(e):  # librosa's own check of a decoded buffer: the file is fine, its samples are not
            raise AudioError(f"audio file contains NaN or infinite samples: {path}; re-export it from the source") from None
        raise AudioError(
            f"could not decode audio file {path} ({_describe(e)}). Expected a complete WAV, "
            f"FLAC, OGG or MP3 file (other containers such as M4A need ffmpeg); re-export or convert "
            f"it, e.g. `ffmpeg -i {path.name} -ac 1 -ar {sr} out.wav`."
        ) from e
    if wave.size == 0:
        raise AudioError(f"audio file has no samples (0 s of audio): {path}")
    if not np.isfinite(wave).all():
        raise AudioError(f"audio file contains NaN or infinite samples: {path}")
    if native_sr != sr:
        wave = librosa.resample(wave, orig_sr=native_sr, target_sr=sr)
    wave = np.ascontiguousarray(wave, dtype=np.float32)
    if require_audible and is_silent(wave, silence_threshold_db):
        raise AudioError(
            f"audio file is silent (peak {peak_dbfs(wave):.1f} dBFS, below {silence_threshold_db} dBFS): "
            f"{path}; pass an audible speech clip"
        )
    return wave


def _describe(error: BaseException) -> str:
    """An exception and the ones it was raised while handling (libsndfile's reason sits under audioread's)."""
    reasons = []
    while error is not None:
        reasons.append(f"{type(error).__name__}: {error}" if str(error) else type(error).__name__)
        error = error.__cause__ or error.__context__
    return "; ".join(reasons)


def peak_dbfs(wave: np.ndarray) -> float:
    """Peak level of ``wave (S,)`` in dB relative to full scale 1.0; ``-inf`` for all-zero or empty."""
    peak = float(np.max(np.abs(wave))) if np.size(wave) else 0.0
    return 20.0 * math.log10(peak) if peak > 0 else -math.inf


def is_silent(wave: np.ndarray, threshold_db: float = -60.0) -> bool:
    """True when no sample of ``wave (S,)`` reaches ``threshold_db`` dBFS (−60 dBFS = 0.001).

    A peak test, not voice-activity detection: noise with no speech is not silent.
    """
    return peak_dbfs(wave) < threshold_db


def num_video_frames(num_samples: int, sr: int, fps: float) -> int:
    """Video frames for ``num_samples`` of audio at ``sr`` Hz: ``ceil(num_samples · fps / sr)``.

    Rounding up (as Hallo does) gives every stretch of audio a frame, so the video is never shorter
    than the speech. The ceiling is taken after subtracting 1e-6 frame, so float error in
    ``samples·fps/sr`` cannot add a frame: 3.2 s at 25 fps is exactly 80 frames, 3.2 s plus one
    sample is 81.
    """
    if num_samples < 0 or sr <= 0 or fps <= 0:
        raise ValueError(f"need num_samples >= 0, sr > 0, fps > 0; got {num_samples}, {sr}, {fps}")
    return math.ceil(num_samples * fps / sr - _FRAME_TOLERANCE)


def _time_major(features, time_axis: int) -> np.ndarray:
    """``features (..., D)`` with time on ``time_axis`` → ``(L, layers, D)``."""
    x = np.asarray(features)
    if x.ndim < 2:
        raise ValueError(f"features must have a time and a feature axis, got shape {x.shape}")
    axis = time_axis % x.ndim
    if axis == x.ndim - 1:
        raise ValueError(f"time_axis={time_axis} is the feature axis of features with shape {x.shape}")
    x = np.moveaxis(x, axis, 0)
    return x.reshape(x.shape[0], -1, x.shape[-1])


def align_to_frames(features, num_frames: int, *, time_axis: int) -> np.ndarray:
    """Linearly resample encoder features to one vector per video frame (Hallo, Xu et al. 2024).

    ``features (..., D)``: time along ``time_axis`` (``L`` encoder positions), features last, all
    other axes flattened in order into ``layers`` — e.g. ``(layers, L, D)`` with ``time_axis=1`` or
    ``(L, layers, D)`` with ``time_axis=0``; ``(L, D)`` gives one layer.
    → ``(num_frames, layers, D)``, every layer kept.

    Frame ``i`` samples encoder position ``i · (L − 1) / (num_frames − 1)``: first and last frame
    land on the first and last position (PyTorch ``interpolate(mode="linear",
    align_corners=True)``, Hallo's rule), so nothing is extrapolated and a linear ramp is
    reproduced exactly.
    """
    x = _time_major(features, time_axis)
    length = x.shape[0]
    if length == 0:
        raise ValueError("features have no time steps")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    pos = np.linspace(0.0, length - 1.0, num_frames) if num_frames > 1 else np.zeros(1)
    lo = np.minimum(np.floor(pos).astype(np.int64), length - 1)
    hi = np.minimum(lo + 1, length - 1)
    frac = (pos - lo)[:, None, None]
    out = x[lo] * (1.0 - frac) + x[hi] * frac
    dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.float32
    return out.astype(dtype)


def frame_windows(frame_features, radius: int = 2) -> np.ndarray:
    """Each frame with its ``radius`` neighbours on both sides (Hallo's ±2 window, Xu et al. 2024).

    ``frame_features (F, ...)`` → ``(F, 2·radius + 1, ...)``; window slot ``k`` of frame ``i`` is
    frame ``i + k − radius``, clamped into ``[0, F − 1]`` (edge frames replicate the first / last).
    """
    x = np.asarray(frame_features)
    if x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(f"frame_features must be (F, ...) with F >= 1, got shape {x.shape}")
    return clip_windows(x, 0, x.shape[0], radius)


def clip_windows(frame_features, start: int, num_frames: int, radius: int) -> np.ndarray:
    """The windows of frames ``[start, start + num_frames)`` of a per-frame sequence, by
    :func:`frame_windows`' rule: ``frame_features (T, ...)`` → ``(num_frames, 2·radius + 1, ...)``,
    slot ``k`` of frame ``i`` is frame ``start + i + k − radius`` clamped into ``[0, T − 1]`` (the
    first / last frame replicate past the ends). How a training sample and an animated clip cut
    their audio windows out of a clip's cached or computed encoder features, so both see the same
    windows (``clip_windows(x, 0, T, r) == frame_windows(x, r)``).
    """
    x = np.asarray(frame_features)
    if x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(f"frame_features must be (T, ...) with T >= 1, got shape {x.shape}")
    if radius < 0 or num_frames < 1:
        raise ValueError(f"need radius >= 0 and num_frames >= 1, got {radius}, {num_frames}")
    idx = start + np.arange(num_frames)[:, None] + np.arange(-radius, radius + 1)[None, :]
    return x[np.clip(idx, 0, x.shape[0] - 1)]


def whisper_frame_windows(
    hidden,
    num_frames: int,
    fps: float,
    *,
    time_axis: int,
    radius: int = 2,
    rate: float = ENCODER_RATE,
) -> np.ndarray:
    """Per-frame windows of encoder positions taken at the encoder's own rate (Whisper, 50 Hz).

    ``hidden (..., D)`` with time on ``time_axis`` (e.g. ``(layers, L, D)``, ``time_axis=1``), the
    stitched encoder output of the whole clip (:func:`encode_long` over 30 s Whisper chunks, with the
    padding past the audio trimmed). → ``(num_frames, 2·radius + 1, layers, D)``.

    Frame ``i`` (starting at ``i / fps`` s) is centred on position ``c_i = round(i · rate / fps)``
    and takes positions ``c_i − radius … c_i + radius``, clamped into ``[0, L − 1]``; at 25 fps and
    50 Hz, frame ``i`` covers positions ``2i − radius … 2i + radius``. Unlike
    :func:`align_to_frames` nothing is interpolated, so each slot is a real encoder position.

    Raises:
      ValueError: the features end before the centre of the last frame (audio shorter than video).
    """
    x = _time_major(hidden, time_axis)
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    centres = np.floor(np.arange(num_frames) * (rate / fps) + 0.5).astype(np.int64)
    if centres[-1] > x.shape[0] - 1:
        raise ValueError(
            f"{num_frames} frames at {fps} fps need encoder positions up to {centres[-1]} at {rate} Hz, "
            f"but the features have only {x.shape[0]} ({x.shape[0] / rate:.2f} s)"
        )
    idx = centres[:, None] + np.arange(-radius, radius + 1)[None, :]
    return x[np.clip(idx, 0, x.shape[0] - 1)]


def _hop(sr: int, rate: float) -> int:
    """Samples per encoder position; chunk boundaries must fall on these."""
    hop = sr / rate
    if hop != int(hop):
        raise ValueError(f"sample rate {sr} is not a whole number of samples per encoder position at {rate} Hz")
    return int(hop)


def chunk_waveform(
    wave: np.ndarray,
    sr: int = SAMPLE_RATE,
    *,
    chunk_seconds: float = 30.0,
    overlap_seconds: float = 2.0,
    rate: float = ENCODER_RATE,
) -> list[tuple[int, np.ndarray]]:
    """Split ``wave (S,)`` into overlapping chunks ``[(start_sample, chunk (≤ C,)), ...]``.

    Chunk and overlap lengths are rounded to whole encoder positions (``sr / rate`` samples) so that
    every chunk's positions line up with those of a single pass. Chunk ``k`` starts at
    ``k · (C − overlap)``; the last chunk ends at the end of the wave and may be shorter. A wave of
    at most one chunk is returned whole.
    """
    wave = np.asarray(wave)
    if wave.ndim != 1 or wave.size == 0:
        raise ValueError(f"wave must be a non-empty mono (S,) array, got shape {wave.shape}")
    hop = _hop(sr, rate)
    chunk = round(chunk_seconds * rate) * hop
    overlap = round(overlap_seconds * rate) * hop
    if chunk <= 0 or not 0 <= overlap < chunk:
        raise ValueError(
            f"need 0 <= overlap < chunk after rounding to encoder positions; got chunk {chunk_seconds} s, overlap {overlap_seconds} s"
        )
    chunks, start = [], 0
    while True:
        chunks.append((start, wave[start : start + chunk]))
        if start + chunk >= wave.size:
            return chunks
        start += chunk - overlap


def stitch_chunks(
    chunks: Sequence[tuple[int, np.ndarray]],
    features: Sequence,
    *,
    time_axis: int,
    sr: int = SAMPLE_RATE,
    rate: float = ENCODER_RATE,
) -> np.ndarray:
    """Concatenate per-chunk encoder features into the time-aligned features of the whole wave.

    ``chunks`` from :func:`chunk_waveform`; ``features[k] (..., D)`` the encoder output of chunk
    ``k`` with time on ``time_axis`` (local position ``j`` is global position ``start_k / hop + j``).
    Each overlap is split at its midpoint, so every kept position has at least half the overlap of
    context on both sides. Positions past a chunk's audio (encoders such as Whisper pad to 30 s) are
    dropped: a chunk of ``n`` samples contributes at most ``ceil(n / hop)`` positions.
    → same layout as ``features[k]``, with the time axis covering the whole wave.

    Raises:
      ValueError: a chunk yields too few positions to reach the split point (an encoder that loses
        positions at its edges, like wav2vec2's strided convolutions, needs a non-zero overlap).
    """
    if len(chunks) != len(features) or not chunks:
        raise ValueError(f"got {len(chunks)} chunks and {len(features)} feature arrays; need one per chunk")
    hop = _hop(sr, rate)
    if any(start % hop for start, _ in chunks):
        raise ValueError(f"chunk starts must be multiples of {hop} samples (one encoder position)")
    starts = [start // hop for start, _ in chunks]
    ends = [(start + len(w)) // hop for start, w in chunks]
    # Split point between chunk k-1 and k: the middle of their overlap, in global positions.
    splits = [0] + [(starts[k] + ends[k - 1]) // 2 for k in range(1, len(chunks))]
    parts = []
    for k, ((_start, w), f) in enumerate(zip(chunks, features)):
        f = np.moveaxis(np.asarray(f), time_axis, 0)
        available = min(f.shape[0], math.ceil(len(w) / hop))
        stop = splits[k + 1] - starts[k] if k + 1 < len(chunks) else available
        if stop > available:
            raise ValueError(f"chunk {k} gave {f.shape[0]} encoder positions but stitching needs {stop}; increase overlap_seconds")
        parts.append(f[splits[k] - starts[k] : stop])
    return np.moveaxis(np.concatenate(parts, axis=0), 0, time_axis)


def encode_long(
    encode_fn: Callable[[np.ndarray], np.ndarray],
    wave: np.ndarray,
    sr: int = SAMPLE_RATE,
    *,
    time_axis: int,
    chunk_seconds: float = 30.0,
    overlap_seconds: float = 2.0,
    rate: float = ENCODER_RATE,
) -> np.ndarray:
    """Run ``encode_fn`` over ``wave (S,)`` of any length, one chunk at a time, and stitch.

    ``encode_fn(chunk (n,)) → features (..., D)`` at ``rate`` positions per second with time on
    ``time_axis`` (e.g. all hidden states ``(layers, L, D)``, ``time_axis=1``). Chunks are at most
    ``chunk_seconds`` long (≤ 30 s for Whisper) and overlap by ``overlap_seconds``, giving the
    encoder context across chunk boundaries; see :func:`chunk_waveform` and :func:`stitch_chunks`.
    """
    chunks = chunk_waveform(wave, sr, chunk_seconds=chunk_seconds, overlap_seconds=overlap_seconds, rate=rate)
    features = [encode_fn(w) for _, w in chunks]
    return stitch_chunks(chunks, features, time_axis=time_axis, sr=sr, rate=rate)


def frame_log_mel(audio: np.ndarray, fps: float, bins: int) -> np.ndarray:
    """Log-mel energy per video frame: ``(num_frames, bins)`` float32 for ``audio`` spanning whole frames.

    A 16 kHz mel spectrogram (1024-point FFT, hop = one video frame) gives a column at every frame
    boundary; a frame's feature is the mean of the columns at its two ends, so it is centred on the
    frame. Values are ``(ln(mel + 1e-6) + 6) / 6``, about ``[-1, 1]`` for speech at normal levels.
    """
    import librosa

    hop = int(round(SAMPLE_RATE / fps))
    frames = len(audio) // hop
    mel = librosa.feature.melspectrogram(y=audio, sr=SAMPLE_RATE, n_fft=1024, hop_length=hop, n_mels=bins, center=True)
    mel = 0.5 * (mel[:, :frames] + mel[:, 1 : frames + 1])
    return ((np.log(mel + 1e-6) + 6.0) / 6.0).T.astype(np.float32)


def audio_window(audio: np.ndarray, fps: float, first_frame: int, num_frames: int) -> np.ndarray:
    """Samples of frames ``[first_frame, first_frame + num_frames)``, zero outside the clip."""
    spf = SAMPLE_RATE / fps
    lo = int(round(first_frame * spf))
    length = int(round(num_frames * spf))
    out = np.zeros(length, np.float32)
    a, b = max(lo, 0), min(lo + length, len(audio))
    if b > a:
        out[a - lo : b - lo] = audio[a:b]
    return out
