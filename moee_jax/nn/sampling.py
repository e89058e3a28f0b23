"""2× spatial down- and up-sampling (diffusers ``Downsample2D`` / ``Upsample2D`` layouts)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moee_jax.nn.layers import conv


class Downsample2D(nn.Module):
    """Stride-2 3×3 conv. ``asymmetric_pad`` pads (0, 1) bottom/right as SD's VAE encoder does."""

    out_channels: int
    asymmetric_pad: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        padding = ((0, 1), (0, 1)) if self.asymmetric_pad else ((1, 1), (1, 1))
        return conv(self.out_channels, 3, strides=2, padding=padding, name="conv", dtype=self.dtype)(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2× upsampling followed by a 3×3 conv: (N, H, W, C) → (N, 2H, 2W, out)."""

    out_channels: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return conv(self.out_channels, 3, name="conv", dtype=self.dtype)(x)
