"""Reading transformers configs: field access and activation names shared by the encoder ports."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax

# transformers' activation names (``hidden_act``, ``activation_function``, ``dense_act_fn``).
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": functools.partial(nn.gelu, approximate=False),
    "gelu_new": functools.partial(nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(nn.gelu, approximate=True),
    "relu": nn.relu,
    "silu": nn.silu,
    "swish": nn.silu,
}


def hf_field(config: Any, name: str, default: Any) -> Any:
    """``config.name`` of a transformers config object, or ``config[name]`` of its ``config.json``
    dict; ``default`` when absent (``save_pretrained`` omits fields left at their defaults)."""
    if isinstance(config, Mapping):
        return config.get(name, default)
    return getattr(config, name, default)
