"""Named device meshes ``('data', 'fsdp', 'tensor')``."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Fill at most one ``-1`` entry so that the product equals ``num_devices``.

    >>> resolve_mesh_shape((-1, 2, 1), 8)
    (4, 2, 1)
    """
    shape = tuple(int(s) for s in shape)
    if sum(s == -1 for s in shape) > 1:
        raise ValueError(f"mesh shape {shape}: at most one axis may be -1")
    known = math.prod(s for s in shape if s != -1)
    if known <= 0 or num_devices % known:
        raise ValueError(f"mesh shape {shape} does not divide the {num_devices} available devices")
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise ValueError(f"mesh shape {shape} uses {math.prod(shape)} devices but {num_devices} are available; use -1 on one axis to fill")
    return shape


def make_mesh(
    shape: Sequence[int] = (-1, 1, 1),
    axis_names: Sequence[str] = MESH_AXES,
    devices: Sequence[jax.Device] | None = None,
) -> jax.sharding.Mesh:
    """A mesh over ``devices`` (default: all) with explicit-sharding-free ``Auto`` axes."""
    devices = list(devices) if devices is not None else jax.devices()
    shape = resolve_mesh_shape(shape, len(devices))
    if devices == jax.devices():
        return jax.make_mesh(shape, tuple(axis_names), axis_types=(jax.sharding.AxisType.Auto,) * len(shape))
    return jax.sharding.Mesh(
        np.asarray(devices).reshape(shape),
        tuple(axis_names),
        axis_types=(jax.sharding.AxisType.Auto,) * len(shape),
    )
