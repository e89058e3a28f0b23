"""A video in flight: the :class:`Job` the animator prepared (checked inputs, per-video tensors)
and the finished :class:`Animation` (frames, audio and the settings for its sidecar)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from moee_jax.diffusion import DDIMPlan, DPMSolverPlan
from moee_jax.inference.inputs import Portrait, Speech
from moee_jax.inference.long_audio import ClipPlan
from moee_jax.models.conditioning import EmotionSources


@dataclasses.dataclass
class Animation:
    """A generated video.

    frames (T, S, S, 3) uint8 · audio (A,) float32 mono 16 kHz · fps · the portrait it animates ·
    the clip plan · settings (JSON-ready, for the sidecar) · warnings for the user.
    """

    frames: np.ndarray
    audio: np.ndarray
    fps: float
    portrait: Portrait
    plan: ClipPlan
    settings: dict
    warnings: list[str]


@dataclasses.dataclass
class Job:
    """One video's checked inputs and per-video tensors (:meth:`Animator.prepare`).

    mel (K, F + 2c, n_mels) per clip (None for a model that takes encoder features) · emotion: the
    video's :class:`EmotionSources` (batch 1; the per-clip speech is filled in per clip) ·
    plan_arrays: the sampler's plan · scales: CFG scale per condition · key: the noise seed ·
    ref_latents (1, h, w, C) · face_features (1, F, h, w, C0) · audio_features (K, F, 2c+1,
    layers+1, D) per clip for a model trained on a feature cache, else None.
    """

    portrait: Portrait
    speech: Speech
    plan: ClipPlan
    mel: np.ndarray
    emotion: EmotionSources
    plan_arrays: DDIMPlan | DPMSolverPlan
    scales: dict[str, float]
    key: jax.Array
    ref_latents: jax.Array
    face_features: jax.Array
    settings: dict
    warnings: list[str]
    audio_features: np.ndarray | None = None

    def clip_audio(self, k: int) -> np.ndarray:
        """Clip ``k``'s audio input, batch 1: encoder windows ``(1, F, 2c+1, layers+1, D)`` when the
        model takes them, else log-mel ``(1, F + 2c, n_mels)``."""
        return (self.audio_features if self.audio_features is not None else self.mel)[k : k + 1]
