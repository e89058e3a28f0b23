"""The one table mapping logical axis names to mesh axes.

Every parameter in the project is created with ``nn.with_logical_partitioning`` and a tuple of
the logical names below; activations are constrained with ``nn.with_logical_constraint`` at block
boundaries. Changing how a model is sharded means changing this table, never model code.

Logical names
-------------
Parameters:
  ``conv_height``, ``conv_width``  spatial taps of a conv kernel (never sharded)
  ``conv_in``, ``conv_out``        conv input / output channels
  ``embed``                        model width on the input side of a dense layer
  ``mlp``                          hidden width of a feed-forward / projection output
  ``heads``                        fused (heads × head_dim) width of q/k/v projections
  ``norm``                         scale / bias of a normalisation layer
  ``expert``                       the stacked-expert axis of mixture-of-experts modules
  ``codebook``                     the code axis of the emotion bank
Activations:
  ``batch``, ``frames``, ``length``, ``act_embed``, ``act_heads``, ``height``, ``width``

Row-parallel outputs (``to_out_0``, ``net_2``, ``proj_out``: kernels ``(heads|mlp, embed)`` →
``P('tensor', 'fsdp')``) are constrained to ``("batch", "length", "act_embed")`` in model code.
Without that, propagation shards their output width on ``tensor``, and XLA's SPMD dot handler
(Shardy and GSPMD alike, jaxlib 0.10.2) miscompiles ``x[B@(data,fsdp), K@tensor] @
w[K@tensor, N@fsdp] -> y[B@(data,fsdp), N@tensor]`` when data and fsdp are both > 1: it
collective-permutes x between devices (d, f) <-> (f, d) and never permutes back, swapping the
samples of devices whose data and fsdp indices differ. Keep ``act_embed`` unsharded (None).
The backward pass hits the same miscompile in other dot patterns when the batch is ordered
``('data', 'fsdp')``; ordered ``('fsdp', 'data')`` (fsdp-major) forward and backward match the
single-device result, so ``batch`` maps to ``('fsdp', 'data')``. Build batch shardings from this
table (:func:`moee_jax.parallel.sharding.logical_sharding`), never by hand.
The codebook axis of the emotion bank is replicated (``codebook``: None).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import flax.linen as nn

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

# FSDP shards the input side of every weight, tensor parallelism the output side (Megatron-style
# column split for q/k/v and the MLP's first layer). A mesh axis may appear at most once per
# PartitionSpec; flax drops a repeated mapping, so ordering here matters.
DEFAULT_RULES: Rules = (
    # parameters
    ("conv_height", None),
    ("conv_width", None),
    ("conv_in", "fsdp"),
    ("conv_out", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("norm", None),
    ("expert", None),
    ("codebook", None),
    # activations
    # fsdp-major: see the module docstring for why the order matters.
    ("batch", ("fsdp", "data")),
    ("frames", None),
    ("length", None),
    ("height", None),
    ("width", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
)


@contextlib.contextmanager
def logical_rules(rules: Sequence[tuple[str, str | tuple[str, ...] | None]] | None = None) -> Iterator[None]:
    """Context in which ``nn.with_logical_constraint`` / spec look-ups use ``rules``."""
    with nn.logical_axis_rules(tuple(rules) if rules is not None else DEFAULT_RULES):
        yield


def rules_from_config(config) -> Rules:
    """The rules of a config: ``config.sharding_rules`` (pairs of logical name and mesh axis, or a
    tuple of mesh axes, or None) where given, else :data:`DEFAULT_RULES`."""
    given = config.get("sharding_rules") if hasattr(config, "get") else None
    if not given:
        return DEFAULT_RULES
    rules = []
    for i, pair in enumerate(given):
        if len(pair) != 2 or not isinstance(pair[0], str):
            raise ValueError(f"config.sharding_rules[{i}] = {pair!r}: expected (logical_name, mesh_axis | (mesh_axes…) | None)")
        axis = tuple(pair[1]) if isinstance(pair[1], (list, tuple)) else pair[1]
        rules.append((pair[0], axis))
    return tuple(rules)
