"""The U-Net's cross-attention context: learned tokens shared by every clip."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moee_jax.nn.layers import partitioned


class ContextTokens(nn.Module):
    """Learned cross-attention context ``(B, Lc, D)`` shared by every clip.

    The U-Net's cross-attention (SD's text slot) carries no per-clip information here: identity
    comes through the reference attention, speech through the audio attention and emotion through
    the Emotion MoE; these tokens are the learned "empty prompt" of that slot.
    """

    num_tokens: int
    dim: int

    @nn.compact
    def __call__(self, batch: int) -> jax.Array:
        tokens = self.param("tokens", partitioned(nn.initializers.normal(0.02), (None, "embed")), (self.num_tokens, self.dim))
        return jnp.broadcast_to(tokens, (batch,) + tokens.shape)
