"""ResNet block of SD U-Nets and VAEs (diffusers ``ResnetBlock2D`` layout)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moee_jax.nn.layers import conv, dense
from moee_jax.nn.norms import group_norm


class ResnetBlock2D(nn.Module):
    """``h = conv2(drop(silu(norm2(conv1(silu(norm1(x))) + W·silu(temb))))); out = shortcut(x) + h``.

    ``x`` (N, H, W, C_in), ``temb`` (N, T) or None → (N, H, W, out_channels).
    """

    out_channels: int
    groups: int = 32
    eps: float = 1e-5
    dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None, *, deterministic: bool = True) -> jax.Array:
        h = nn.silu(group_norm(self.groups, self.eps, name="norm1", dtype=self.dtype)(x))
        h = conv(self.out_channels, 3, name="conv1", dtype=self.dtype)(h)
        if temb is not None:
            t = dense(self.out_channels, ("embed", "mlp"), name="time_emb_proj", dtype=self.dtype)(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = nn.silu(group_norm(self.groups, self.eps, name="norm2", dtype=self.dtype)(h))
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        h = conv(self.out_channels, 3, name="conv2", dtype=self.dtype)(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, name="conv_shortcut", dtype=self.dtype)(x)
        return x + h
