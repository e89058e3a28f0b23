"""Scaled dot-product attention: one function, pluggable kernels, and the multi-head module.

``softmax(q kᵀ / √d) v`` (Vaswani et al. 2017, eq. 1). Backends:

* ``"xla"``    — plain einsums with an fp32 softmax; runs everywhere, the parity reference.
* ``"cudnn"``  — ``jax.nn.dot_product_attention(implementation="cudnn")``: fused flash attention
  on NVIDIA GPUs; needs fp16/bf16 inputs.
* ``"pallas"`` — the Pallas TPU flash-attention kernel shipped with JAX.
* ``"blockwise"`` — memory-efficient flash-style attention in pure JAX (Rabe & Staats 2021,
  "Self-attention Does Not Need O(n²) Memory"; Dao et al. 2022, FlashAttention, Alg. 1–2, with the
  FlashAttention-2 backward of Dao 2023). Runs everywhere, any head dim and dtype: the fallback
  where cuDNN refuses (head dim > 128, e.g. SD1.5's 160, or fp32), and on CPU much less memory
  traffic than ``"xla"`` for long sequences. See :func:`blockwise_attention`.

Shapes: ``q (B, Lq, H, D)``, ``k, v (B, Lk, H, D)``, boolean ``mask`` broadcastable to
``(B, H, Lq, Lk)`` with ``True`` = may attend. Output ``(B, Lq, H, D)``.

Fully masked query rows (no key may be attended): ``"blockwise"`` returns zeros for them (and zero
gradients). ``"xla"`` fills masked logits with the most negative finite float, so such a row gets
the *uniform* average of all values, as diffusers' additive-mask attention does; the two agree on
every row that can attend to at least one key. Our models never build fully masked rows (a
sample's own tokens are always kept).
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from moee_jax.nn.layers import dense

IMPLEMENTATIONS = ("xla", "cudnn", "pallas", "blockwise")

# Default blocks of the "blockwise" implementation, chosen by measurement on CPU (see
# benchmarks/RESULTS.md); a query block × key block of logits per (batch, head) is the working set.
BLOCK_Q = 512
BLOCK_K = 512


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None = None,
    *,
    implementation: str = "xla",
    block_q: int = BLOCK_Q,
    block_k: int = BLOCK_K,
) -> jax.Array:
    """Multi-head attention core; see the module docstring for shapes and backends.

    ``block_q`` / ``block_k`` are the query / key block sizes of ``implementation="blockwise"``
    (ignored by the others).
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r}: expected one of {IMPLEMENTATIONS}")
    scale = 1.0 / math.sqrt(q.shape[-1])
    if implementation == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="cudnn")
    if implementation == "pallas":
        return _pallas_tpu_attention(q, k, v, mask, scale)
    if implementation == "blockwise":
        return blockwise_attention(q, k, v, mask, block_q=block_q, block_k=block_k)
    # Scaling q (B·Lq·H·D values) rather than the logits (B·H·Lq·Lk) keeps XLA from materialising
    # a second logits-sized tensor.
    logits = jnp.einsum("bqhd,bkhd->bhqk", q * jnp.asarray(scale, q.dtype), k, preferred_element_type=jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def _pallas_tpu_attention(q, k, v, mask, scale):
    if jax.default_backend() != "tpu":
        raise ValueError(
            f"attention implementation 'pallas' runs on TPU only (backend is {jax.default_backend()!r}); "
            "use 'xla' or, on NVIDIA GPUs, 'cudnn'"
        )
    from jax.experimental.pallas.ops.tpu.flash_attention import flash_attention

    bias = None
    if mask is not None:
        bias = jnp.broadcast_to(
            jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min), (q.shape[0], q.shape[2], q.shape[1], k.shape[1])
        )
    out = flash_attention(
        q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), ab=bias, sm_scale=scale
    )
    return out.transpose(0, 2, 1, 3)


def repeat_to_batch(t: jax.Array, batch: int) -> jax.Array:
    """Repeat a per-clip tensor ``(B, ...)`` to the frame-folded batch ``(B·F, ...)`` (index ``b·F + f``)."""
    if t.shape[0] == batch:
        return t
    if batch % t.shape[0]:
        raise ValueError(f"cannot broadcast a batch of {t.shape[0]} over a folded batch of {batch}")
    return jnp.repeat(t, batch // t.shape[0], axis=0)


class Attention(nn.Module):
    """Multi-head attention with q/k/v/out projections (diffusers ``Attention`` parameter layout).

    ``context=None`` gives self-attention. ``extra_kv`` (B_r, Lr, C) is appended to the
    keys/values after the plain ones: ReferenceNet features join the self-attention this way
    (Hallo / AnimateAnyone "spatial attention"), and ``extra_kv_keep`` (B_r,) bool drops them per
    sample, which is how classifier-free guidance's reference-free branch is formed.

    ``context`` and ``extra_kv`` may carry one entry per *clip* while ``x`` is frame-folded
    (``B·F`` rows): they are projected once per clip and only then repeated over frames, since
    projection commutes with repetition.
    """

    heads: int
    head_dim: int
    out_features: int | None = None
    qkv_bias: bool = False
    zero_init_out: bool = False
    implementation: str = "xla"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        context: jax.Array | None = None,
        *,
        extra_kv: jax.Array | None = None,
        extra_kv_keep: jax.Array | None = None,
    ) -> jax.Array:
        b, lq, c = x.shape
        inner = self.heads * self.head_dim
        proj = lambda name: dense(inner, ("embed", "heads"), use_bias=self.qkv_bias, name=name, dtype=self.dtype)  # noqa: E731
        to_q, to_k, to_v = proj("to_q"), proj("to_k"), proj("to_v")
        kv_in = x if context is None else context
        k = repeat_to_batch(to_k(kv_in), b)
        v = repeat_to_batch(to_v(kv_in), b)
        mask = None
        if extra_kv is not None:
            k = jnp.concatenate([k, repeat_to_batch(to_k(extra_kv), b)], axis=1)
            v = jnp.concatenate([v, repeat_to_batch(to_v(extra_kv), b)], axis=1)
            if extra_kv_keep is not None:
                keep = repeat_to_batch(extra_kv_keep.astype(bool), b)
                own = jnp.ones((b, k.shape[1] - extra_kv.shape[1]), bool)
                ext = jnp.broadcast_to(keep[:, None], (b, extra_kv.shape[1]))
                mask = jnp.concatenate([own, ext], axis=1)[:, None, None, :]
        split = lambda t: nn.with_logical_constraint(  # noqa: E731
            t.reshape(t.shape[0], t.shape[1], self.heads, self.head_dim), ("batch", "length", "act_heads", None)
        )
        out = dot_product_attention(split(to_q(x)), split(k), split(v), mask, implementation=self.implementation)
        out = out.reshape(b, lq, inner)
        # Row-parallel output: constrain to act_embed (tensor-replicated). Leaving the sharding to
        # propagation lets XLA's SPMD dot handler mis-order the batch for a ('data','fsdp') batch
        # with a P('tensor','fsdp') kernel (see parallel/rules.py).
        return nn.with_logical_constraint(dense(
            self.out_features or c, ("heads", "embed"), zero_init=self.zero_init_out, name="to_out_0", dtype=self.dtype
        )(out), ("batch", "length", "act_embed"))
