"""Trainable / frozen parameter split by path patterns (the stage's freezing rule).

A parameter's *path* is its nested-dict keys joined by ``/``, e.g.
``unet/down_0/attentions_0/transformer_blocks_0/emotion/experts/to_q/kernel``. A stage names its
trainable parameters with regular expressions (``re.search`` on the path) and, optionally, the
exceptions among them; everything else is frozen. Frozen parameters are passed through the step
untouched — they get no gradient, no optimizer state and no EMA, so they stay bit-identical.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from flax import traverse_util


def path_str(path: Sequence[str]) -> str:
    return "/".join(str(p) for p in path)


def is_trainable(path: str, trainable: Sequence[str], frozen: Sequence[str] = ()) -> bool:
    """Whether ``path`` matches a ``trainable`` pattern and no ``frozen`` pattern."""
    return any(re.search(p, path) for p in trainable) and not any(re.search(p, path) for p in frozen)


def split_params(params: dict, trainable: Sequence[str], frozen: Sequence[str] = ()) -> tuple[dict, dict]:
    """``params`` → ``(trainable subtree, frozen subtree)``, both nested dicts (leaves may be boxed).

    Raises ``ValueError`` naming the patterns when they match nothing (no patterns at all is a
    stage with nothing to train, e.g. the space-to-depth autoencoder's).
    """
    flat = traverse_util.flatten_dict(params)
    train, keep = {}, {}
    for path, leaf in flat.items():
        (train if is_trainable(path_str(path), trainable, frozen) else keep)[path] = leaf
    if not train and trainable:
        raise ValueError(
            f"no parameter matches the trainable patterns {list(trainable)} (minus {list(frozen)}); "
            f"top-level parts are {sorted({p[0] for p in flat})}"
        )
    return traverse_util.unflatten_dict(train), traverse_util.unflatten_dict(keep)


def merge_params(trainable: dict, frozen: dict) -> dict:
    """The inverse of :func:`split_params`."""
    flat = traverse_util.flatten_dict(frozen)
    flat.update(traverse_util.flatten_dict(trainable))
    return traverse_util.unflatten_dict(flat)


def count(tree: dict) -> int:
    """Number of scalar parameters in a (possibly boxed or abstract) tree."""
    import math

    import flax.linen as nn
    import jax

    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(nn.unbox(tree)))
