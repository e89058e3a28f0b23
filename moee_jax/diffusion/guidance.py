"""Nested multi-condition classifier-free guidance.

Classifier-free guidance (Ho & Salimans 2022, eq. 6) extrapolates from an unconditional towards a
conditional prediction. With K ordered conditions (here e.g. reference, audio, emotion) we use the
nested form that InstructPix2Pix (Brooks et al. 2023, eq. 3) uses for two: K + 1 branches, where
branch 0 drops every condition and branch k keeps conditions 0 .. k-1, combined as

    ε̃ = c_0 + Σ_{k=1..K} g_k (c_k − c_{k−1}),   c_0 = unconditional,

so g_k scales what condition k-1 adds on top of the ones before it. All g_k = 1 gives c_K.

All branches run in one batched model call: the branch axis is folded into the batch
*branch-major*, i.e. row ``k * B + b`` holds sample ``b`` under branch ``k``.

The sum telescopes into one weight per branch, ``ε̃ = Σ_k w_k c_k`` with ``w_0 = 1 − g_1``,
``w_k = g_k − g_{k+1}`` and ``w_K = g_K`` (:func:`branch_weights`), so a branch whose weight is 0
need not run at all: with ``g_1 = … = g_{K−1} = 1`` only the last two branches remain (plain CFG on
the last condition), half the work of four branches. :func:`guided_model_fn` leaves such branches
out whenever the scales are known at trace time (Python or NumPy numbers).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

BatchedModelFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def branch_keep_mask(num_conditions: int) -> np.ndarray:
    """Which conditions each branch keeps: bool ``(K + 1, K)``, ``mask[k, j] = j < k`` (row 0 keeps none)."""
    if num_conditions < 1:
        raise ValueError(f"num_conditions={num_conditions}; must be >= 1")
    return np.tril(np.ones((num_conditions + 1, num_conditions), dtype=bool), k=-1)


def combine_nested(branch_outputs: jax.Array, scales: jax.Array | Sequence[float]) -> jax.Array:
    """Combine ``(K + 1, B, ...)`` branch outputs (ordered as :func:`branch_keep_mask`) with ``(K,)`` scales.

    Returns ``(B, ...)``: c_0 + Σ_k g_k (c_k − c_{k−1}).
    """
    scales = jnp.asarray(scales, dtype=branch_outputs.dtype)
    if scales.ndim != 1 or branch_outputs.shape[0] != scales.shape[0] + 1:
        raise ValueError(f"branch_outputs leading axis {branch_outputs.shape[0]} must be len(scales) + 1; scales shape {scales.shape}")
    steps = branch_outputs[1:] - branch_outputs[:-1]
    # An explicit weighted sum rather than tensordot keeps full precision on accelerators' matmul units.
    weights = scales.reshape(scales.shape + (1,) * (steps.ndim - 1))
    return branch_outputs[0] + jnp.sum(weights * steps, axis=0)


def branch_weights(scales: Sequence[float]) -> np.ndarray:
    """``(K + 1,)`` weights ``w`` with ``combine_nested(c, g) = Σ_k w_k c_k`` for scales ``g (K,)``."""
    g = np.asarray(scales, np.float64)
    if g.ndim != 1 or g.size < 1:
        raise ValueError(f"scales shape {g.shape}; must be (K,), one scale per condition")
    return np.concatenate([[1.0 - g[0]], g[:-1] - g[1:], [g[-1]]])


def guided_model_fn(model_fn_batched: BatchedModelFn, scales: jax.Array | Sequence[float]) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """Wrap a branch-batched denoiser into the ``model_fn(x, t)`` that the samplers call.

    ``model_fn_batched(x_branches, t_branches, keep)`` gets ``x_branches`` ``((K+1)·B, ...)`` (``x``
    repeated per branch), ``t_branches`` int32 ``((K+1)·B,)`` and ``keep`` bool ``((K+1)·B, K)``, all
    branch-major (row ``k·B + b`` is sample b under branch k, keeping conditions ``keep[k·B + b]``),
    and returns ``((K+1)·B, ...)``. It is called once per returned ``model_fn`` call. ``scales``:
    ``(K,)`` guidance scales g_1..g_K; it may be a traced array. When the scales are concrete
    numbers, branches of weight 0 (:func:`branch_weights`) are left out of the batch: the model then
    gets ``(n·B, ...)`` rows for the ``n`` branches that count, in the same branch-major order.
    """
    if np.ndim(scales) != 1:
        raise ValueError(f"scales shape {np.shape(scales)}; must be (K,), one scale per condition")
    num_conditions = int(np.shape(scales)[0])
    keep_branches = branch_keep_mask(num_conditions)
    if not isinstance(scales, jax.core.Tracer) and not isinstance(scales, jax.Array):
        weights = branch_weights(scales)
        used = np.flatnonzero(weights != 0.0)
        if len(used) == 0:  # all scales 0 and K = 1 … nothing contributes but the unconditional branch
            used = np.array([0])

        def pruned(x: jax.Array, t: jax.Array) -> jax.Array:
            batch = x.shape[0]
            n = len(used)
            x_branches = jnp.broadcast_to(x, (n, *x.shape)).reshape((n * batch, *x.shape[1:]))
            t_branches = jnp.tile(jnp.broadcast_to(t, (batch,)), n)
            keep = jnp.asarray(np.repeat(keep_branches[used], batch, axis=0))
            out = model_fn_batched(x_branches, t_branches, keep).reshape((n, batch, *x.shape[1:]))
            w = jnp.asarray(weights[used], out.dtype).reshape((n,) + (1,) * (out.ndim - 1))
            return jnp.sum(w * out, axis=0)

        return pruned

    def model_fn(x: jax.Array, t: jax.Array) -> jax.Array:
        batch = x.shape[0]
        num_branches = num_conditions + 1
        x_branches = jnp.broadcast_to(x, (num_branches, *x.shape)).reshape((num_branches * batch, *x.shape[1:]))
        t_branches = jnp.tile(jnp.broadcast_to(t, (batch,)), num_branches)
        keep = jnp.asarray(np.repeat(keep_branches, batch, axis=0))
        out = model_fn_batched(x_branches, t_branches, keep)
        return combine_nested(out.reshape((num_branches, batch, *out.shape[1:])), scales)

    return model_fn
