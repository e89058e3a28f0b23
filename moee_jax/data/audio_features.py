"""Audio file → per-video-frame feature windows for the U-Net's audio attention (Hallo §3.3).

``load_audio`` (mono, 16 kHz) → the encoder's hidden states over chunks of any length
(``encode_long``) → all layers interpolated to one vector per video frame (``align_to_frames``,
:func:`audio_frame_features`) → a ±``radius`` window per frame (``frame_windows``) →
``(F, 2·radius + 1, layers, D)``. The feature cache (:mod:`moee_jax.data.feature_cache`) stores the
per-frame features of every training clip made by the same :func:`audio_frame_features`, so
training and animation see the same features.
"""

from __future__ import annotations

import pathlib

import numpy as np

from moee_jax.checkpoint.pretrained import Wav2Vec2Bundle
from moee_jax.data.audio import SAMPLE_RATE, align_to_frames, encode_long, frame_windows, load_audio, num_video_frames


def audio_frame_features(
    audio: str | pathlib.Path | np.ndarray,
    encoder: Wav2Vec2Bundle,
    *,
    fps: float = 25.0,
    num_frames: int | None = None,
    chunk_seconds: float = 30.0,
    overlap_seconds: float = 2.0,
    require_audible: bool = False,
) -> np.ndarray:
    """All wav2vec2 hidden states, one vector per video frame: ``(F, layers + 1, D)`` float32.

    ``audio`` is a file (any format ``load_audio`` reads; errors name the file) or a 16 kHz mono
    waveform. ``F = num_frames``, or ``num_video_frames(samples, 16 kHz, fps)`` when None (3.2 s at
    25 fps → 80 frames); a stored clip passes its own frame count.
    """
    wave = audio if isinstance(audio, np.ndarray) else load_audio(audio, require_audible=require_audible)
    frames = num_video_frames(len(wave), SAMPLE_RATE, fps) if num_frames is None else int(num_frames)
    hidden = encode_long(
        encoder.hidden_states,
        wave,
        SAMPLE_RATE,
        time_axis=1,
        chunk_seconds=chunk_seconds,
        overlap_seconds=overlap_seconds,
        rate=encoder.rate,
    )
    return align_to_frames(hidden, frames, time_axis=1).astype(np.float32)


def audio_frame_windows(
    audio: str | pathlib.Path | np.ndarray,
    encoder: Wav2Vec2Bundle,
    *,
    fps: float = 25.0,
    radius: int = 2,
    chunk_seconds: float = 30.0,
    overlap_seconds: float = 2.0,
    require_audible: bool = False,
) -> np.ndarray:
    """Per-frame windows of all wav2vec2 hidden states: ``(F, 2·radius + 1, layers + 1, D)``.

    ``audio`` is a file (any format ``load_audio`` reads; errors name the file) or a 16 kHz mono
    waveform. ``F = num_video_frames(samples, 16 kHz, fps)``: 3.2 s at 25 fps → 80 frames.
    """
    features = audio_frame_features(
        audio, encoder, fps=fps, chunk_seconds=chunk_seconds, overlap_seconds=overlap_seconds, require_audible=require_audible
    )
    return frame_windows(features, radius)
