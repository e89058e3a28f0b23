"""Speech of any length → a sequence of fixed-shape clips, generated one after another.

The model generates ``F`` frames at a time, conditioned on ``M`` motion frames (clean latents of the
frames just before the clip). A long video is a chain of clips::

    clip 0     motion = the reference latent repeated M times     frames [0, F)
    clip k     motion = the last M latents generated so far        frames [kF, (k + 1)F)

so every clip continues from what the previous one ended with (the hand-over is what keeps the
video free of seams). ``motion="reference"`` gives every clip clip 0's motion frames instead: no
clip sees generated frames, so an expression cannot drift along the chain, at the price of a seam
where each clip starts again from the portrait (:data:`MOTION_SOURCES`). ``T = num_video_frames(len(audio), 16 kHz, fps)`` frames are wanted; the last
clip is filled up with silence to ``F`` frames and the surplus frames are dropped, so the video has
exactly ``T`` frames (30 s at 25 fps: 750).

Audio features are made exactly as the training pipeline made them
(:mod:`moee_jax.data.pipeline`): for clip ``k``, the speech of frames ``[kF − c, kF + F + c)`` (``c``
= ``audio_context_frames``) — taken from the neighbouring audio, with zeros only before the start
and after the end of the recording, as training windows were zero only outside their record —
turned into per-frame log-mel energies by :func:`moee_jax.data.audio.frame_log_mel`:
``(F + 2c, n_mels)`` per clip. A model trained on a feature cache (:mod:`moee_jax.data.feature_cache`)
takes encoder windows instead: the whole speech's per-frame encoder features ``(T, layers + 1, D)``
are cut per clip by the rule training samples were cut by (:func:`moee_jax.data.audio.clip_windows`:
frames past the ends of the speech replicate its first / last frame) → ``(F, 2c + 1, layers + 1, D)``
per clip.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from moee_jax.data.audio import SAMPLE_RATE, audio_window, clip_windows, frame_log_mel, num_video_frames

# Where clip k > 0 takes its motion frames from: the last ones generated ("chain"), or clip 0's, the
# reference repeated ("reference"). See the module docstring.
MOTION_SOURCES = ("chain", "reference")


@dataclasses.dataclass(frozen=True)
class ClipPlan:
    """How a video of ``num_frames`` frames is cut into clips of ``clip_frames`` (F) frames, each
    conditioned on ``motion_frames`` (M) frames before it and ``context_frames`` (c) frames of audio
    context on each side."""

    num_frames: int
    clip_frames: int
    motion_frames: int
    context_frames: int
    fps: float

    @property
    def num_clips(self) -> int:
        return math.ceil(self.num_frames / self.clip_frames)

    @property
    def padded_frames(self) -> int:
        """Frames generated: whole clips, ``num_clips · F ≥ num_frames``."""
        return self.num_clips * self.clip_frames

    def clip_start(self, k: int) -> int:
        """First output frame of clip ``k``."""
        return k * self.clip_frames

    def boundaries(self) -> list[int]:
        """Output frames that start a clip after the first (where a seam would show): ``[F, 2F, …] < T``."""
        return [self.clip_start(k) for k in range(1, self.num_clips) if self.clip_start(k) < self.num_frames]


def plan_clips(num_samples: int, fps: float, clip_frames: int, motion_frames: int, context_frames: int) -> ClipPlan:
    """The :class:`ClipPlan` for ``num_samples`` of 16 kHz audio at ``fps``."""
    if clip_frames < 1 or motion_frames < 0 or context_frames < 0:
        raise ValueError(
            f"need clip_frames >= 1, motion_frames >= 0, context_frames >= 0; got {clip_frames}, {motion_frames}, {context_frames}"
        )
    frames = num_video_frames(num_samples, SAMPLE_RATE, fps)
    if frames < 1:
        raise ValueError("the audio is shorter than one video frame")
    return ClipPlan(frames, clip_frames, motion_frames, context_frames, float(fps))


def clip_audio_features(audio: np.ndarray, plan: ClipPlan, mel_bins: int) -> np.ndarray:
    """Per-clip log-mel features ``(num_clips, F + 2c, mel_bins)`` float32 of ``audio (A,)`` at 16 kHz
    (the training pipeline's ``mel`` of each clip's window; see the module docstring)."""
    audio = np.asarray(audio, np.float32).reshape(-1)
    f, c = plan.clip_frames, plan.context_frames
    windows = (audio_window(audio, plan.fps, plan.clip_start(k) - c, f + 2 * c) for k in range(plan.num_clips))
    return np.stack([frame_log_mel(w, plan.fps, mel_bins) for w in windows])


def clip_feature_windows(frame_features: np.ndarray, plan: ClipPlan) -> np.ndarray:
    """Per-clip encoder windows ``(num_clips, F, 2c + 1, layers + 1, D)`` of the speech's per-frame
    features ``(T, layers + 1, D)`` (``T = plan.num_frames``; see the module docstring): clip ``k``
    is what a training sample of frames ``[kF, kF + F)`` takes from a cached clip."""
    features = np.asarray(frame_features)
    if features.shape[0] != plan.num_frames:
        raise ValueError(f"{features.shape[0]} frames of audio features for a plan of {plan.num_frames} frames")
    f, c = plan.clip_frames, plan.context_frames
    return np.stack([clip_windows(features, plan.clip_start(k), f, c) for k in range(plan.num_clips)])


def roll_clips(
    sample_clip: Callable[[int, jax.Array | None], jax.Array],
    first_motion: jax.Array | None,
    plan: ClipPlan,
    motion: str = "chain",
) -> Iterator[tuple[int, jax.Array]]:
    """Generate the clips in order, handing motion frames from each clip to the next.

    ``sample_clip(k, motion)`` gets the motion latents ``(B, M, h, w, C)`` (None when ``M = 0``) and
    returns the clip's latents ``(B, F, h, w, C)``; ``first_motion`` is clip 0's (the reference
    latent repeated). Yields ``(k, latents)``. With ``M > F`` the motion frames span several clips.
    ``motion="reference"``: every clip gets ``first_motion`` (:data:`MOTION_SOURCES`). Arrays stay on
    their device.
    """
    if motion not in MOTION_SOURCES:
        raise ValueError(f"motion={motion!r}: choose one of {MOTION_SOURCES}")
    m = plan.motion_frames
    frames = first_motion if m else None
    for k in range(plan.num_clips):
        latents = sample_clip(k, frames)
        yield k, latents
        if m and motion == "chain":
            frames = jnp.concatenate([frames, latents], axis=1)[:, -m:]
