"""DICE-Talk's emotion discrimination head (arXiv 2504.18087, §3.3, eq. 16).

Intermediate U-Net features ``f_t`` at the sampled timestep are pooled to a vector
``v_t = ϕ(f_t)`` and classified by an MLP ``ψ``; ``p_t = softmax(ψ(v_t))`` is trained with the
cross-entropy of eq. 16 (:func:`moee_jax.train.losses.emotion_classification_loss`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moee_jax.nn.layers import dense


class EmotionDiscriminator(nn.Module):
    """U-Net features ``(B, ..., C)`` → emotion logits ``(B, num_classes)``.

    ``ϕ`` is adaptive average pooling to one value per channel: the mean over every axis but batch
    and channel (frames and space of ``(B, F, H, W, C)``, tokens of ``(B, L, C)``). ``ψ`` is a
    two-layer SiLU MLP. ``num_classes`` defaults to 7: the six basic emotions and neutral.
    """

    num_classes: int = 7
    hidden: int = 512
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        v = jnp.mean(features.astype(jnp.float32), axis=tuple(range(1, features.ndim - 1))).astype(self.dtype)
        h = nn.silu(dense(self.hidden, ("embed", "mlp"), name="fc_in", dtype=self.dtype)(v))
        return dense(self.num_classes, ("mlp", None), name="fc_out", dtype=self.dtype)(h)
