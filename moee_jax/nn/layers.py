"""Dense and conv layers whose parameters carry logical axis names.

Every parameter of the project is created through these helpers (or with an explicit
``nn.with_logical_partitioning``), so the rules table in :mod:`moee_jax.parallel.rules` alone
decides how a model is sharded.

Layout is channels-last: images ``(B, H, W, C)``; conv kernels ``(kh, kw, C_in, C_out)``;
dense kernels ``(C_in, C_out)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

Dtype = jnp.dtype | type

_default_kernel_init = nn.initializers.lecun_normal()


def partitioned(init, axes: Sequence[str | None]):
    """``init`` wrapped so the created param is boxed with logical ``axes``."""
    return nn.with_logical_partitioning(init, tuple(axes))


def dense(
    features: int,
    axes: tuple[str, str] = ("embed", "mlp"),
    *,
    name: str,
    use_bias: bool = True,
    zero_init: bool = False,
    dtype: Dtype = jnp.float32,
) -> nn.Dense:
    """A ``nn.Dense`` with logically-partitioned kernel ``axes`` and bias ``axes[1]``.

    ``zero_init`` zeroes kernel and bias, for output projections of residual branches that
    must start as the identity (AnimateDiff motion modules, audio attention).
    """
    init = nn.initializers.zeros_init() if zero_init else _default_kernel_init
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=partitioned(init, axes),
        bias_init=partitioned(nn.initializers.zeros_init(), (axes[1],)),
        name=name,
    )


def conv(
    features: int,
    kernel_size: int = 3,
    *,
    name: str,
    strides: int = 1,
    padding: int | str | Sequence[tuple[int, int]] = "SAME_1",
    zero_init: bool = False,
    use_bias: bool = True,
    dtype: Dtype = jnp.float32,
) -> nn.Conv:
    """A 2-D ``nn.Conv`` over ``(B, H, W, C)`` with kernel axes (conv_height, conv_width, conv_in, conv_out).

    ``padding="SAME_1"`` means symmetric padding of ``kernel_size // 2`` (PyTorch's
    ``padding=k//2``), which for stride 2 differs from XLA's ``SAME``.
    """
    if padding == "SAME_1":
        p = kernel_size // 2
        padding = ((p, p), (p, p))
    elif isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    init = nn.initializers.zeros_init() if zero_init else _default_kernel_init
    return nn.Conv(
        features,
        kernel_size=(kernel_size, kernel_size),
        strides=(strides, strides),
        padding=padding,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=partitioned(init, ("conv_height", "conv_width", "conv_in", "conv_out")),
        bias_init=partitioned(nn.initializers.zeros_init(), ("conv_out",)),
        name=name,
    )


def conv1d(
    features: int,
    kernel_size: int,
    *,
    name: str,
    strides: int = 1,
    padding: tuple[int, int] = (0, 0),
    groups: int = 1,
    use_bias: bool = True,
    dtype: jnp.dtype = jnp.float32,
) -> nn.Conv:
    """A 1-D ``nn.Conv`` over ``(B, L, C)`` with kernel axes (conv_width, conv_in, conv_out).

    Kernel ``(k, C_in / groups, C_out)``: PyTorch's grouped ``Conv1d`` weight ``(C_out, C_in / groups, k)``
    transposed, with the same channel-to-group assignment.
    """
    return nn.Conv(
        features,
        kernel_size=(kernel_size,),
        strides=(strides,),
        padding=(padding,),
        feature_group_count=groups,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=partitioned(_default_kernel_init, ("conv_width", "conv_in", "conv_out")),
        bias_init=partitioned(nn.initializers.zeros_init(), ("conv_out",)),
        name=name,
    )
