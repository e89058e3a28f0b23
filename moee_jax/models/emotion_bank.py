"""DICE-Talk's emotion bank: correlation-enhanced emotion conditioning (arXiv 2504.18087, §3.2).

A learnable codebook ``C ∈ R^{K×d}`` refines the emotion prior ``s (B, d)`` of the embedder before
it conditions the U-Net:

* training (eqs. 9–11): retrieve the nearest code ``s* = C_k``, ``k = argmin_i ‖s − C_i‖²``, and
  aggregate it by cross-attention ``E_S = CA(W_Q s, W_K s*, W_V s*)``. The retrieval is
  straight-through (van den Oord et al. 2017): ``s* = s + sg[C_k − s]`` has the value ``C_k`` and
  the gradient of ``s``, so the codebook learns only from ``L_vq`` (eq. 17,
  :func:`vq_loss`);
* inference (eqs. 12–13): retrieval is skipped and ``s`` attends over the whole bank,
  ``E_S = softmax(q Kᵀ/√d_h) V`` with ``q = W_Q s``, ``K = W_K C``, ``V = W_V C``, ``d_h`` the head
  width — the standard cross-attention scaling; the paper names no other temperature.

With a single retrieved key, eq. 11's softmax is identically 1 and ``E_S = W_V s*``: as the paper
writes training, ``W_Q`` and ``W_K`` receive no gradient and only ``W_V`` and the codebook are
trained for the inference-time attention of eq. 13. This module implements the equations as
written.

``E_S`` (``heads·d_h`` wide) becomes the U-Net's emotion tokens ``(B, num_tokens, out_features)``
through one linear layer to ``num_tokens·out_features`` reshaped — the paper injects ``E_s``
through an emotion cross-attention (eq. 14) and does not fix the token count; several tokens give
that attention more than one key.
"""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from moee_jax.nn.attention import dot_product_attention
from moee_jax.nn.layers import dense, partitioned

_sg = jax.lax.stop_gradient

# Logical axis of the codebook's rows. Not in the rules table, so it is replicated (flax maps an
# unlisted name to no mesh axis); the bank is small.
CODEBOOK_AXES = ("codebook", "embed")


@flax.struct.dataclass
class BankOutput:
    """Emotion-bank result.

    ``tokens (B, num_tokens, out_features)`` for the U-Net's emotion slot; ``emotion (B, heads·d_h)``
    the aggregated feature ``E_S`` of eq. 11 / 13; ``index (B,)`` the nearest code (eq. 9, also
    reported at inference); in training only, ``quantized (B, d)`` the straight-through ``s*`` and
    ``vq_loss`` the scalar ``L_vq`` of eq. 17 (both None at inference).
    """

    tokens: jax.Array
    emotion: jax.Array
    index: jax.Array
    quantized: jax.Array | None = None
    vq_loss: jax.Array | None = None


def vq_loss(s: jax.Array, code: jax.Array, beta: float) -> jax.Array:
    """DICE-Talk eq. 17: ``‖sg[s] − C_k‖² + β‖s − sg[C_k]‖²``; scalar.

    ``s`` and its retrieved code ``C_k`` are ``(..., d)``; squared norms are summed over ``d`` and
    averaged over the leading (batch) axes. The first term moves only the code toward the input,
    the second (commitment, weight ``beta``) only the input toward the code.
    """
    s = s.astype(jnp.float32)
    code = code.astype(jnp.float32)
    codebook_term = jnp.sum(jnp.square(_sg(s) - code), axis=-1)
    commitment_term = jnp.sum(jnp.square(s - _sg(code)), axis=-1)
    return jnp.mean(codebook_term + beta * commitment_term)


def nearest_code(s: jax.Array, codebook: jax.Array) -> jax.Array:
    """Eq. 9: ``argmin_i ‖s − C_i‖²`` for ``s (B, d)``, ``codebook (K, d)`` → ``(B,)`` int32."""
    s = s.astype(jnp.float32)
    codebook = codebook.astype(jnp.float32)
    # ‖s‖² is the same for every code, so it is left out of the comparison.
    dist = jnp.sum(jnp.square(codebook), axis=-1)[None, :] - 2.0 * s @ codebook.T
    return jnp.argmin(dist, axis=-1).astype(jnp.int32)


def quantize(s: jax.Array, codebook: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Straight-through retrieval: ``(s*, k, C_k)`` with ``s* = s + sg[C_k − s]``.

    ``s*`` equals ``C_k`` in value; its Jacobian w.r.t. ``s`` is the identity and w.r.t. the
    codebook zero. ``C_k (B, d)`` is returned with its gradient path to the codebook, for ``L_vq``.
    """
    k = nearest_code(jax.lax.stop_gradient(s), codebook)
    code = jnp.take(codebook, k, axis=0).astype(s.dtype)
    return s + jax.lax.stop_gradient(code - s), k, code


class EmotionBank(nn.Module):
    """DICE-Talk eqs. 9–13 and 17: ``s (B, d)`` → :class:`BankOutput`; see the module docstring.

    ``train=True`` retrieves the nearest code (straight-through) and computes ``L_vq`` with
    commitment weight ``beta``; ``train=False`` attends over all ``num_codes`` codes.
    """

    num_codes: int = 64
    heads: int = 1
    num_tokens: int = 4
    out_features: int = 768
    beta: float = 0.25
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, s: jax.Array, *, train: bool) -> BankOutput:
        b, d = s.shape
        if d % self.heads:
            raise ValueError(f"emotion prior width {d} is not divisible by heads={self.heads}")
        head_dim = d // self.heads
        codebook = self.param("codebook", partitioned(nn.initializers.normal(1.0), CODEBOOK_AXES), (self.num_codes, d))
        proj = lambda name: dense(d, ("embed", "heads"), use_bias=False, name=name, dtype=self.dtype)  # noqa: E731
        to_q, to_k, to_v = proj("to_q"), proj("to_k"), proj("to_v")
        split = lambda t: t.reshape(t.shape[0], t.shape[1], self.heads, head_dim)  # noqa: E731

        q = split(to_q(s.astype(self.dtype))[:, None])  # (B, 1, H, d_h)
        if train:
            s_star, index, code = quantize(s, codebook)  # eq. 9
            kv = s_star.astype(self.dtype)[:, None]  # (B, 1, d): one key per sample, eqs. 10–11
            k, v = to_k(kv), to_v(kv)
            loss = vq_loss(s, code, self.beta)  # eq. 17
        else:
            index = nearest_code(s, codebook)
            # Eqs. 12–13: the bank is projected once and shared by every sample.
            bank = codebook.astype(self.dtype)
            k = jnp.broadcast_to(to_k(bank), (b, self.num_codes, d))
            v = jnp.broadcast_to(to_v(bank), (b, self.num_codes, d))
            s_star = loss = None
        emotion = dot_product_attention(q, split(k), split(v)).reshape(b, d)  # (B, H·d_h)

        tokens = dense(self.num_tokens * self.out_features, ("heads", "embed"), name="proj_tokens", dtype=self.dtype)(emotion)
        tokens = nn.with_logical_constraint(tokens.reshape(b, self.num_tokens, self.out_features), ("batch", "length", "act_embed"))
        return BankOutput(tokens=tokens, emotion=emotion, index=index, quantized=s_star, vq_loss=loss)
