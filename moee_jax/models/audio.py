"""Audio projection: per-frame windows of encoder features → audio tokens for the U-Net.

Hallo (Xu et al. 2024, audio embedding) flattens each frame's window of wav2vec2 features (5 frames × 12
layers × 768) and maps it with a three-layer MLP to 32 context tokens of width 768, normalised by a
LayerNorm; the U-Net's audio cross-attention attends to those tokens per frame.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from moee_jax.models.frames import fold_frames, unfold_frames
from moee_jax.nn.layers import dense
from moee_jax.nn.norms import layer_norm


class AudioProjection(nn.Module):
    """``windows (B, F, W, layers, D_in)`` → ``tokens (B, F, num_tokens, out_dim)``.

    Per frame: flatten ``W × layers × D_in`` (window-major, Hallo's order, so its ``proj1`` weights
    map one to one) → ``proj1 → act → proj2 → act → proj3`` to ``num_tokens · out_dim`` → reshape
    to tokens → LayerNorm over ``out_dim``. Any ``F`` works: frames are independent.

    ``activation`` defaults to SiLU; Hallo's released ``AudioProjModel`` uses ReLU, so pass
    ``nn.relu`` when running converted Hallo weights.
    """

    num_tokens: int = 32
    out_dim: int = 768
    hidden_dim: int = 512
    activation: Callable[[jax.Array], jax.Array] = nn.silu
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, windows: jax.Array) -> jax.Array:
        if windows.ndim != 5:
            raise ValueError(f"windows must be (B, F, W, layers, D), got shape {windows.shape}")
        frames = windows.shape[1]
        x = fold_frames(windows.astype(self.dtype))
        x = x.reshape(x.shape[0], -1)
        x = self.activation(dense(self.hidden_dim, ("embed", "mlp"), name="proj1", dtype=self.dtype)(x))
        x = dense(self.hidden_dim, ("mlp", "embed"), name="proj2", dtype=self.dtype)(x)
        # Row-parallel output replicated over 'tensor' (see moee_jax.parallel.rules).
        x = self.activation(nn.with_logical_constraint(x, ("batch", "act_embed")))
        x = dense(self.num_tokens * self.out_dim, ("embed", "mlp"), name="proj3", dtype=self.dtype)(x)
        x = layer_norm(name="norm", dtype=self.dtype)(x.reshape(x.shape[0], self.num_tokens, self.out_dim))
        return nn.with_logical_constraint(unfold_frames(x, frames), ("batch", "frames", "length", "act_embed"))
