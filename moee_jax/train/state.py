"""The train state: everything a resumed run needs to continue bit-for-bit."""

from __future__ import annotations

from typing import Any

import jax
from flax import struct


@struct.dataclass
class TrainState:
    """``trainable`` / ``frozen``: the parameter split of the stage (nested dicts);
    ``opt_state`` and ``ema`` cover ``trainable`` only; ``rng`` is raw key data ``(2,)`` uint32 (the
    step's key is ``fold_in(rng, step)``); ``bad_steps`` counts consecutive non-finite steps (their
    updates are skipped), ``skipped`` all of them."""

    step: jax.Array
    trainable: dict
    frozen: dict
    opt_state: Any
    ema: dict | None
    rng: jax.Array
    bad_steps: jax.Array
    skipped: jax.Array
