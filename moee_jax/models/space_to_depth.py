"""A lossless "autoencoder" for small demos: space-to-depth (pixel unshuffle) and its inverse.

A ``factor × factor`` patch of ``C`` pixel channels becomes one latent cell of ``C · factor²``
channels (Shi et al. 2016's sub-pixel rearrangement, read backwards): ``(B, H, W, C)`` →
``(B, H/f, W/f, C·f²)``. Nothing is learned and nothing is lost, so a generated video is bounded
only by the denoiser, never by the latent round trip — the right choice where an autoencoder
cannot be trained well enough (a CPU demo at 32² pixels), and a measuring stick for one that can.

It has the interface of :class:`~moee_jax.models.vae.AutoencoderKL`: ``encode`` → ``(mean,
logvar)`` with a deterministic posterior (``logvar`` = −30, the KL VAE's floor), ``decode``, and a
:class:`~moee_jax.models.latent_norm.LatentNorm` whose shift and scale are measured on the
training frames (the ``vae`` stage does that and nothing else for this kind).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moee_jax.models.latent_norm import LatentNorm

_LOGVAR_FLOOR = -30.0


def space_to_depth(x: jax.Array, factor: int) -> jax.Array:
    """``(B, H, W, C)`` → ``(B, H/f, W/f, f·f·C)``; channel ``(i·f + j)·C + c`` is pixel ``(i, j)`` of the patch."""
    b, h, w, c = x.shape
    if h % factor or w % factor:
        raise ValueError(f"image {h}×{w} is not divisible by the space-to-depth factor {factor}")
    x = x.reshape(b, h // factor, factor, w // factor, factor, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h // factor, w // factor, factor * factor * c)


def depth_to_space(z: jax.Array, factor: int) -> jax.Array:
    """The inverse of :func:`space_to_depth`: ``(B, h, w, f·f·C)`` → ``(B, h·f, w·f, C)``."""
    b, h, w, k = z.shape
    if k % (factor * factor):
        raise ValueError(f"{k} latent channels are not a multiple of factor² = {factor * factor}")
    c = k // (factor * factor)
    z = z.reshape(b, h, w, factor, factor, c)
    return z.transpose(0, 1, 3, 2, 4, 5).reshape(b, h * factor, w * factor, c)


class SpaceToDepthAutoencoder(nn.Module):
    """Lossless latents: images ``(B, H, W, in_channels)`` ↔ ``(B, H/f, W/f, in_channels·f²)``."""

    factor: int = 2
    in_channels: int = 3

    def setup(self):
        self.latent_norm = LatentNorm(self.latent_channels)

    @property
    def latent_channels(self) -> int:
        return self.in_channels * self.factor * self.factor

    @property
    def downsample_factor(self) -> int:
        return self.factor

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        mean = space_to_depth(x, self.factor)
        return mean, jnp.full_like(mean, _LOGVAR_FLOOR)

    def decode(self, z: jax.Array) -> jax.Array:
        return depth_to_space(z, self.factor)

    def __call__(self, x: jax.Array) -> jax.Array:
        mean, _ = self.encode(x)
        return self.decode(self.latent_norm.denormalise(self.latent_norm.normalise(mean)))
