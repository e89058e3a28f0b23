"""The one place where video frames are folded into and out of the batch.

Spatial layers see ``(B·F, H, W, C)``; temporal layers see ``(B, F, H, W, C)``. Row ``b·F + f``
of the folded batch is frame ``f`` of clip ``b``; per-clip tensors are repeated over frames with
:func:`moee_jax.nn.attention.repeat_to_batch`, which uses the same order.
"""

from __future__ import annotations

import jax


def fold_frames(x: jax.Array) -> jax.Array:
    """``(B, F, ...)`` → ``(B·F, ...)``."""
    return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def unfold_frames(x: jax.Array, num_frames: int) -> jax.Array:
    """``(B·F, ...)`` → ``(B, F, ...)``."""
    if x.shape[0] % num_frames:
        raise ValueError(f"folded batch {x.shape[0]} is not a multiple of num_frames={num_frames}")
    return x.reshape((x.shape[0] // num_frames, num_frames) + x.shape[1:])
