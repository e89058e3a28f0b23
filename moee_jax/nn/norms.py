"""GroupNorm and LayerNorm with logically-partitioned affine parameters.

Both use the two-pass variance (``use_fast_variance=False``): ``E[x²] − E[x]²`` loses precision on
the large activations of SD U-Nets and breaks fp32 parity with PyTorch.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from moee_jax.nn.layers import partitioned


def group_norm(num_groups: int, epsilon: float, *, name: str, dtype=jnp.float32) -> nn.GroupNorm:
    """GroupNorm over every non-batch axis of a channels-last input.

    For ``(B, H, W, C)`` this is PyTorch's ``GroupNorm`` on ``(B, C, H, W)``; for
    ``(B, F, H, W, C)`` statistics span frames too, as AnimateDiff's temporal modules require.
    """
    return nn.GroupNorm(
        num_groups=num_groups,
        epsilon=epsilon,
        dtype=dtype,
        param_dtype=jnp.float32,
        use_fast_variance=False,
        scale_init=partitioned(nn.initializers.ones_init(), ("norm",)),
        bias_init=partitioned(nn.initializers.zeros_init(), ("norm",)),
        name=name,
    )


def layer_norm(epsilon: float = 1e-5, *, name: str, dtype=jnp.float32) -> nn.LayerNorm:
    """LayerNorm over the last axis."""
    return nn.LayerNorm(
        epsilon=epsilon,
        dtype=dtype,
        param_dtype=jnp.float32,
        use_fast_variance=False,
        scale_init=partitioned(nn.initializers.ones_init(), ("norm",)),
        bias_init=partitioned(nn.initializers.zeros_init(), ("norm",)),
        name=name,
    )
