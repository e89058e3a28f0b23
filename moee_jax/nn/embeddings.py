"""Timestep and position embeddings."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moee_jax.nn.layers import dense


def timestep_embedding(
    t: jax.Array, dim: int, *, flip_sin_to_cos: bool = True, freq_shift: float = 0.0, max_period: float = 10000.0
) -> jax.Array:
    """Sinusoidal timestep features (DDPM, Ho et al. 2020, §3.4; diffusers' ``get_timestep_embedding``).

    ``t`` (B,) → (B, dim): ``[sin(t·ω_i), cos(t·ω_i)]`` with ``ω_i = max_period^(−i/(half − shift))``;
    SD U-Nets flip to ``[cos, sin]``.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """MLP over sinusoidal features: ``linear_2(silu(linear_1(x)))``."""

    features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = dense(self.features, ("embed", "mlp"), name="linear_1", dtype=self.dtype)(x)
        x = dense(self.features, ("mlp", "embed"), name="linear_2", dtype=self.dtype)(nn.silu(x))
        # Row-parallel output replicated over 'tensor' (see moee_jax.parallel.rules).
        return nn.with_logical_constraint(x, ("batch", "act_embed"))


def sinusoidal_positions(length: int, dim: int) -> np.ndarray:
    """Transformer positions (Vaswani et al. 2017, §3.5), interleaved sin/cos: (length, dim).

    ``pe[p, 2i] = sin(p / 10000^(2i/dim))``, ``pe[p, 2i+1] = cos(...)`` — the table AnimateDiff's
    motion modules add over frames.
    """
    position = np.arange(length, dtype=np.float32)[:, None]
    div = np.exp(np.arange(0, dim, 2, dtype=np.float32) * (-math.log(10000.0) / dim))
    pe = np.zeros((length, dim), np.float32)
    pe[:, 0::2] = np.sin(position * div)
    pe[:, 1::2] = np.cos(position * div)
    return pe
