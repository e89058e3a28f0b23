"""Face locator (Hallo §3.2): a small conv net turning a face-region mask into U-Net features.

Its output is added to the U-Net's ``conv_in`` features so the generated motion stays inside the
face region. The last conv is zero-initialised, so a fresh locator changes nothing.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moee_jax.models.frames import fold_frames, unfold_frames
from moee_jax.nn.layers import conv


class FaceLocator(nn.Module):
    """``mask (B, F, H, W, C_in)`` at pixel resolution → ``(B, F, H/8, W/8, out_channels)``.

    ``channels`` has one entry per resolution; each step after the first halves the size, so
    ``len(channels) - 1`` must be 3 for SD's 8× latent downsampling.
    """

    out_channels: int = 320
    channels: tuple[int, ...] = (16, 32, 64, 128)
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, mask: jax.Array) -> jax.Array:
        f = mask.shape[1]
        h = nn.silu(conv(self.channels[0], 3, name="conv_in", dtype=self.dtype)(fold_frames(mask.astype(self.dtype))))
        for i, (c_in, c_out) in enumerate(zip(self.channels[:-1], self.channels[1:])):
            h = nn.silu(conv(c_in, 3, name=f"blocks_{2 * i}", dtype=self.dtype)(h))
            h = nn.silu(conv(c_out, 3, strides=2, name=f"blocks_{2 * i + 1}", dtype=self.dtype)(h))
        h = conv(self.out_channels, 3, zero_init=True, name="conv_out", dtype=self.dtype)(h)
        return unfold_frames(h, f)
