"""From logically-annotated parameter trees to ``NamedSharding`` s, and sharded initialisation.

The pattern (maxtext / maxdiffusion): build the state abstractly with ``jax.eval_shape``, turn
its logical axis names into ``PartitionSpec`` s with the rules table, and let ``jax.jit`` create
every parameter directly on its shard (``out_shardings``), so no host ever holds a full copy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from moee_jax.parallel.rules import DEFAULT_RULES


def _fit_to_shape(spec: PartitionSpec, shape: Sequence[int], mesh: jax.sharding.Mesh) -> PartitionSpec:
    """Replicate any dimension that its mesh axes do not divide (e.g. RGB's 3 input channels)."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else (axes or ())
        size = 1
        for a in names:
            size *= mesh.shape[a]
        out.append(axes if size > 1 and dim % size == 0 else None)
    return PartitionSpec(*out)


def logical_sharding(mesh: jax.sharding.Mesh, axes: Sequence[str | None], rules=DEFAULT_RULES) -> NamedSharding:
    """``NamedSharding`` of an array whose dimensions have logical names ``axes`` (e.g. a batch:
    ``("batch",)``; trailing dimensions are replicated)."""
    return NamedSharding(mesh, nn.logical_to_mesh_axes(tuple(axes), rules))


def logical_partition_specs(boxed_tree, rules=DEFAULT_RULES) -> object:
    """``PartitionSpec`` per leaf from the logical names of a boxed tree (unannotated → replicated)."""
    logical = nn.get_partition_spec(boxed_tree)
    return nn.logical_to_mesh(logical, rules)


def tree_shardings(boxed_tree, mesh: jax.sharding.Mesh, rules=DEFAULT_RULES):
    """``NamedSharding`` per leaf of an (abstract) boxed tree, fitted to each leaf's shape."""
    specs = logical_partition_specs(boxed_tree, rules)
    shapes = nn.unbox(boxed_tree)
    return jax.tree_util.tree_map(
        lambda spec, leaf: NamedSharding(mesh, _fit_to_shape(spec, leaf.shape, mesh)),
        specs,
        shapes,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def sharded_init(
    init_fn: Callable[[jax.Array], object], rng: jax.Array, mesh: jax.sharding.Mesh, rules=DEFAULT_RULES
) -> tuple[object, object]:
    """Run ``init_fn(rng)`` (returning a boxed tree) with every leaf created on its shard.

    Returns ``(unboxed tree, its shardings)``.
    """
    abstract = jax.eval_shape(init_fn, rng)
    shardings = tree_shardings(abstract, mesh, rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        tree = jax.jit(lambda r: nn.unbox(init_fn(r)), out_shardings=shardings)(rng)
    return tree, shardings


def batch_shardings(mesh, example: dict) -> dict:
    """Every array of a batch sharded over its leading (batch) axis."""
    return {k: logical_sharding(mesh, ("batch",) + (None,) * (np.ndim(v) - 1)) for k, v in example.items()}


def to_global(batch: dict, shardings: dict) -> dict:
    """Per-process NumPy batch → global ``jax.Array``\\ s (this process's rows on its devices)."""
    return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v)) for k, v in batch.items()}
