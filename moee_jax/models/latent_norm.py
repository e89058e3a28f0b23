"""The statistics that turn an autoencoder's latents into diffusion latents.

Latent diffusion (Rombach et al. 2022, LDM §4.3.2 and appendix G) runs on latents rescaled to unit
variance: SD1.5 multiplies its VAE's latents by ``0.18215``, the reciprocal of their standard
deviation on SD's training images. That constant belongs to SD's VAE. An autoencoder trained here
has latents of another spread (a from-scratch tiny VAE: std ≈ 0.3, so SD's constant leaves the
diffusion latents at std ≈ 0.06 and the noise schedule's signal-to-noise ratios wrong), so its
statistics are *measured on data* after it is trained, per channel:

    z_diffusion = (z − shift) · scale,   shift = E[z],   scale = 1 / std(z)

:class:`LatentNorm` holds ``shift (C,)`` and ``scale (C,)`` as parameters of the autoencoder (they
travel with its checkpoint); they are never trained by gradient (the ``vae`` stage freezes them)
but set by :func:`measure_latent_norm`. A converted SD VAE gets ``shift = 0``,
``scale = scaling_factor``: exactly SD's latents.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np

from moee_jax.nn.layers import partitioned


class LatentNorm(nn.Module):
    """Per-channel ``(z − shift) · scale`` and its inverse; ``z (..., C)``."""

    channels: int
    scaling_factor: float = 1.0

    def setup(self):
        self.shift = self.param("shift", partitioned(nn.initializers.zeros, (None,)), (self.channels,))
        self.scale = self.param("scale", partitioned(nn.initializers.constant(self.scaling_factor), (None,)), (self.channels,))

    def normalise(self, z: jax.Array) -> jax.Array:
        return (z - self.shift.astype(z.dtype)) * self.scale.astype(z.dtype)

    def denormalise(self, z: jax.Array) -> jax.Array:
        return z / self.scale.astype(z.dtype) + self.shift.astype(z.dtype)


def latent_statistics(latents: np.ndarray | jax.Array) -> tuple[np.ndarray, np.ndarray]:
    """``(mean (C,), std (C,))`` of raw latents ``(..., C)`` over every other axis (float64)."""
    z = np.asarray(latents, np.float64).reshape(-1, np.shape(latents)[-1])
    if z.shape[0] < 2:
        raise ValueError(f"need at least two latent cells to measure their spread, got {z.shape[0]}")
    return z.mean(0), z.std(0)


def measure_latent_norm(raw_latents: np.ndarray | jax.Array, *, per_channel: bool = True, min_std: float = 1e-4) -> dict:
    """The ``{'shift', 'scale'}`` params (float32 ``(C,)``) that give ``raw_latents`` zero mean and
    unit standard deviation (per channel, or one scale over all channels with ``per_channel=False``,
    as SD's single constant). Channels that never vary get ``scale = 1 / min_std``."""
    mean, std = latent_statistics(raw_latents)
    if not per_channel:
        z = np.asarray(raw_latents, np.float64).reshape(-1, mean.size)
        std = np.full_like(std, (z - mean).std())
    return {"shift": mean.astype(np.float32), "scale": (1.0 / np.maximum(std, min_std)).astype(np.float32)}
