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
import numpy as np

from moee_jax.nn.layers import dense

IMPLEMENTATIONS = ("xla", "cudnn", "pallas", "blockwise")

# Default blocks of the "blockwise" implementation, chosen by measurement of the mid U-Net step on a
# 2-core CPU (see benchmarks/RESULTS.md): 1024×128 beat 512×512, 256×128 and 128×128 there. The
# working set is one (B, H, block_q, block_k) fp32 logits block. Not tuned for GPU.
BLOCK_Q = 1024
BLOCK_K = 128


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


def blockwise_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None = None,
    *,
    block_q: int = BLOCK_Q,
    block_k: int = BLOCK_K,
) -> jax.Array:
    """Flash-style attention in pure JAX: ``softmax(q kᵀ / √d) v`` without the (Lq, Lk) matrix.

    Forward (Dao et al. 2022, FlashAttention, Alg. 1; Rabe & Staats 2021): for each query block,
    loop over key/value blocks keeping a running row max ``m``, normaliser ``l`` and unnormalised
    output in fp32 ("online softmax", Milakov & Gimelshein 2018). A ``jax.custom_vjp`` saves only
    the output ``O`` and the per-row logsumexp; the backward (Dao 2023, FlashAttention-2, Alg. 2)
    recomputes ``P = exp(S − lse)`` block by block with ``Dᵢ = rowsum(dO ∘ O)`` and
    ``dS = P ∘ (dP − D)``. Peak extra memory is one ``(B, H, block_q, block_k)`` block instead of
    several ``(B, H, Lq, Lk)`` tensors, and the loops are ``lax.scan``/``lax.map`` so the program
    does not grow with the length.

    Same shapes and mask convention as :func:`dot_product_attention`. Lengths need not be multiples
    of the blocks (padded internally; padded keys are masked). Inputs may be bf16: logits,
    softmax statistics and accumulators are fp32, the output has the input dtype. Fully masked
    query rows give zeros.
    """
    b, lq, h, d = q.shape
    lk = k.shape[1]
    scale = 1.0 / math.sqrt(d)
    if mask is not None:
        mask = jnp.asarray(mask, bool)
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)  # (Bm, Hm, Lqm, Lkm), size-1 = broadcast
    # Same rounding as the xla path: scale q in its own dtype before QKᵀ.
    q = q * jnp.asarray(scale, q.dtype)
    # No plain-path shortcut for short key sequences (Lk ≤ block_k): measured on CPU it was not
    # faster (e.g. 1024 queries × 77 context tokens: 2.4 ms fwd+bwd against 1.6 ms for one block
    # of this kernel), and one code path keeps the fully-masked-row semantics uniform.
    bq, nq = _blocks(lq, block_q)
    bk, nk = _blocks(lk, block_k)
    lqp, lkp = bq * nq, bk * nk
    # (B, L, H, D) → (B, H, L, D): every block op is then a batched (B·H) matmul.
    qt, kt, vt = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
    qt = _pad_axis(qt, 2, lqp)
    kt, vt = _pad_axis(kt, 2, lkp), _pad_axis(vt, 2, lkp)
    if lkp != lk:  # padded keys must never be attended
        if mask is None:
            mask = jnp.ones((1, 1, 1, lk), bool)
        if mask.shape[3] == 1:
            mask = jnp.broadcast_to(mask, mask.shape[:3] + (lk,))
        mask = _pad_axis(mask, 3, lkp, False)
    if mask is not None and mask.shape[2] != 1:
        mask = _pad_axis(mask, 2, lqp, True)  # padded query rows are discarded anyway
    out = _flash(bq, bk, mask is not None)(qt, kt, vt, mask)
    return out[:, :, :lq].transpose(0, 2, 1, 3)


def _blocks(length: int, block: int) -> tuple[int, int]:
    """``(size, count)`` of equal blocks covering ``length`` with the least padding (size ≤ block)."""
    n = -(-length // block)
    even = -(-length // n)  # balanced: 1100 with block 512 → 3 × 368, not 3 × 512 (436 padded)
    return min(block, -(-even // 8) * 8), n  # rounded up to 8 (vector lanes)


def _pad_axis(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
    if x.shape[axis] == size:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


def _slice(x: jax.Array, axis: int, start, size: int) -> jax.Array:
    """Block of ``x`` along ``axis``, or ``x`` itself where that axis is broadcast (size 1)."""
    return x if x.shape[axis] == 1 else jax.lax.dynamic_slice_in_dim(x, start, size, axis)


def _unblock(x: jax.Array) -> jax.Array:
    """``(n, B, H, blk, ...)`` stacked by a loop → ``(B, H, n·blk, ...)``."""
    n, b, h, blk = x.shape[:4]
    return jnp.moveaxis(x, 0, 2).reshape((b, h, n * blk) + x.shape[4:])


@functools.cache
def _flash(bq: int, bk: int, has_mask: bool):
    """The custom-VJP kernel on ``(B, H, L, D)`` inputs (q pre-scaled, lengths multiples of the blocks)."""
    f32 = jnp.float32

    def logits(qi, kj, mask, i, j):
        s = jnp.einsum("bhqd,bhkd->bhqk", qi, kj, preferred_element_type=f32)
        if has_mask:
            s = jnp.where(_slice(_slice(mask, 2, i * bq, bq), 3, j * bk, bk), s, -jnp.inf)
        return s

    def forward(q, k, v, mask):
        nq, nk = q.shape[2] // bq, k.shape[2] // bk

        def q_block(i):
            qi = jax.lax.dynamic_slice_in_dim(q, i * bq, bq, 2)

            def kv_step(carry, j):
                acc, m, l = carry
                kj = jax.lax.dynamic_slice_in_dim(k, j * bk, bk, 2)
                vj = jax.lax.dynamic_slice_in_dim(v, j * bk, bk, 2)
                s = logits(qi, kj, mask, i, j)
                m_new = jnp.maximum(m, s.max(-1))
                # A row with no unmasked key so far has m = −inf; shift by 0 there so that
                # exp(−inf − (−inf)) never produces NaN (its p and alpha are then exactly 0).
                m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new) if has_mask else m_new
                p = jnp.exp(s - m_safe[..., None])
                alpha = jnp.exp(m - m_safe)  # rescales what was accumulated under the old max
                l = alpha * l + p.sum(-1)
                acc = alpha[..., None] * acc + jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), vj, preferred_element_type=f32)
                return (acc, m_new, l), None

            shape = qi.shape[:3]
            init = (jnp.zeros(qi.shape, f32), jnp.full(shape, -jnp.inf, f32), jnp.zeros(shape, f32))
            (acc, m, l), _ = jax.lax.scan(kv_step, init, jnp.arange(nk))
            seen = l > 0  # False only for fully masked rows
            out = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0)
            # lse = +inf on fully masked rows makes the backward's exp(s − lse) exactly 0 there.
            lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf)
            return out.astype(q.dtype), lse

        out, lse = jax.lax.map(q_block, jnp.arange(nq))
        return _unblock(out), _unblock(lse)

    @jax.custom_vjp
    def flash(q, k, v, mask):
        return forward(q, k, v, mask)[0]

    def flash_fwd(q, k, v, mask):
        out, lse = forward(q, k, v, mask)
        return out, (q, k, v, mask, out, lse)  # O(L) residuals: no (Lq, Lk) tensor is saved

    def logits_t(kj, qi, mask_t, i, j):
        """``Sᵀ`` of block (i, j): (B, H, bk, bq), keys major."""
        s = jnp.einsum("bhkd,bhqd->bhkq", kj, qi, preferred_element_type=f32)
        if has_mask:
            s = jnp.where(_slice(_slice(mask_t, 2, j * bk, bk), 3, i * bq, bq), s, -jnp.inf)
        return s

    def flash_bwd(res, d_out):
        q, k, v, mask, out, lse = res
        nq, nk = q.shape[2] // bq, k.shape[2] // bk
        delta = jnp.sum(d_out.astype(f32) * out.astype(f32), axis=-1)  # D = rowsum(dO ∘ O)
        mask_t = None if mask is None else jnp.swapaxes(mask, 2, 3)

        # FlashAttention-2 order: outer loop over key blocks (dK_j, dV_j stay in registers/cache),
        # inner loop over query blocks; each inner step also yields its share of dQ_i.
        # The blocks are built transposed, keys major: Pᵀ (B, H, bk, bq). Then dV = Pᵀ dO and
        # dK = dSᵀ Q contract over the minor axis of their left operand, and dQᵀ = Kᵀ dSᵀ over the
        # major axis of both; on CPU the q-major layout's dV and dK (contracting the major axis of
        # P) fall back to a generic dot several times slower (benchmarks/RESULTS.md).
        def kv_block(d_q_t, j):
            kj = jax.lax.dynamic_slice_in_dim(k, j * bk, bk, 2)
            vj = jax.lax.dynamic_slice_in_dim(v, j * bk, bk, 2)

            def q_step(carry, i):
                d_k, d_v = carry
                qi = jax.lax.dynamic_slice_in_dim(q, i * bq, bq, 2)
                d_oi = jax.lax.dynamic_slice_in_dim(d_out, i * bq, bq, 2)
                lse_i = jax.lax.dynamic_slice_in_dim(lse, i * bq, bq, 2)
                delta_i = jax.lax.dynamic_slice_in_dim(delta, i * bq, bq, 2)
                p_t = jnp.exp(logits_t(kj, qi, mask_t, i, j) - lse_i[:, :, None, :])  # recomputed, not stored
                d_v = d_v + jnp.einsum("bhkq,bhqd->bhkd", p_t.astype(d_out.dtype), d_oi, preferred_element_type=f32)
                d_p_t = jnp.einsum("bhkd,bhqd->bhkq", vj, d_oi, preferred_element_type=f32)
                d_s_t = p_t * (d_p_t - delta_i[:, :, None, :])
                d_k = d_k + jnp.einsum("bhkq,bhqd->bhkd", d_s_t.astype(q.dtype), qi, preferred_element_type=f32)
                d_qi_t = jnp.einsum("bhkd,bhkq->bhdq", kj, d_s_t.astype(k.dtype), preferred_element_type=f32)
                return (d_k, d_v), d_qi_t

            init = (jnp.zeros(kj.shape, f32), jnp.zeros(vj.shape, f32))
            (d_k, d_v), d_q_parts = jax.lax.scan(q_step, init, jnp.arange(nq))
            n, b, h, dd, blk = d_q_parts.shape  # (nq, B, H, D, bq) → (B, H, D, Lq)
            return d_q_t + jnp.moveaxis(d_q_parts, 0, 3).reshape(b, h, dd, n * blk), (d_k, d_v)

        d_q_t, (d_k, d_v) = jax.lax.scan(kv_block, jnp.zeros(q.shape[:2] + q.shape[3:] + q.shape[2:3], f32), jnp.arange(nk))
        # The barrier keeps XLA from folding the transpose back into the dot when a loop has one
        # trip and is removed (the folded form is the slow one).
        d_q = jnp.swapaxes(jax.lax.optimization_barrier(d_q_t), 2, 3)
        d_mask = None if mask is None else np.zeros(mask.shape, jax.dtypes.float0)
        return d_q.astype(q.dtype), _unblock(d_k).astype(k.dtype), _unblock(d_v).astype(v.dtype), d_mask

    flash.defvjp(flash_fwd, flash_bwd)
    return flash


def _pallas_tpu_attention(q, k, v, mask, scale):
    if jax.default_backend() != "tpu":
        raise ValueError(
            f"attention implementation 'pallas' runs on TPU only (backend is {jax.default_backend()!r}); "
            "use 'xla' or, on NVIDIA GPUs, 'cudnn'"
        )
    from jax.experimental.pallas.ops.tpu.flash_attention import flash_attention

    bias = None
    if mask is not None:
        bias = jnp.broadcast_to(jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min), (q.shape[0], q.shape[2], q.shape[1], k.shape[1]))
    out = flash_attention(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), ab=bias, sm_scale=scale)
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
        return nn.with_logical_constraint(
            dense(self.out_features or c, ("heads", "embed"), zero_init=self.zero_init_out, name="to_out_0", dtype=self.dtype)(out),
            ("batch", "length", "act_embed"),
        )
