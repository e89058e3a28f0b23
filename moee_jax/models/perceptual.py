"""LPIPS-VGG, the perceptual term of MoEE's spatial loss ``L_spatial = w(t)(||I_p − I_GT||_1 + perceptual)``.

LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric",
eq. 1): ``d(x, y) = Σ_l 1/(H_l W_l) Σ_{h,w} Σ_c w_lc (x̂^l_hwc − ŷ^l_hwc)²``, where ``x̂^l`` are the
activations of tap ``l`` of ImageNet VGG16 unit-normalised over channels, and ``w_l ≥ 0`` is a learnt
per-channel weight (the paper's ``||w_l ⊙ ·||²`` with ``w_l`` squared into it; a 1×1 conv without
bias, here ``lin{l}``, as in the released weights).

Taps are relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 of torchvision's ``vgg16().features``; its
conv layers keep their indices as names (``features_0`` … ``features_28``) so weights convert by rule.
Layout is channels-last throughout: images ``(B, H, W, 3)`` in ``[-1, 1]``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moee_jax.nn.layers import Dtype, conv

# Conv widths of VGG16's five stages; each stage ends in a tap, and all but the last in a 2×2 max-pool.
VGG16_STAGES: tuple[tuple[int, ...], ...] = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
# LPIPS v0.1's ScalingLayer: maps [-1, 1] images onto the ImageNet normalisation VGG was trained with.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10


def vgg16_conv_indices() -> tuple[tuple[int, ...], ...]:
    """Per stage, the indices of its convs in torchvision's ``vgg16().features`` (conv, ReLU, …, pool)."""
    out, i = [], 0
    for widths in VGG16_STAGES:
        out.append(tuple(range(i, i + 2 * len(widths), 2)))
        i += 2 * len(widths) + 1
    return tuple(out)


def unit_normalize(f: jax.Array, eps: float = NORM_EPS) -> jax.Array:
    """``f / (||f||₂ + eps)`` over the channel axis of ``(..., C)`` (LPIPS' ``normalize_tensor``).

    The norm's gradient is taken as 0 where all channels are 0 (a dead ReLU column), where ``√``
    would give ``inf · 0 = nan``; the forward value is unchanged.
    """
    sq = jnp.sum(jnp.square(f), axis=-1, keepdims=True)
    positive = sq > 0
    norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
    return f / (norm + eps)


class VGG16Features(nn.Module):
    """VGG16's convolutional trunk up to relu5_3 (Simonyan & Zisserman 2015, configuration D).

    ``(B, H, W, 3)`` ImageNet-normalised images → the five taps relu1_2 ``(B, H, W, 64)``,
    relu2_2 ``(B, H/2, W/2, 128)``, relu3_3 ``(B, H/4, W/4, 256)``, relu4_3 ``(B, H/8, W/8, 512)``,
    relu5_3 ``(B, H/16, W/16, 512)`` (sizes floored, as torch's ``MaxPool2d(2, 2)``).
    """

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> list[jax.Array]:
        taps = []
        for stage, (widths, indices) in enumerate(zip(VGG16_STAGES, vgg16_conv_indices())):
            if stage:
                x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
            for width, index in zip(widths, indices):
                x = nn.relu(conv(width, 3, name=f"features_{index}", dtype=self.dtype)(x))
            taps.append(x)
        return taps


class LPIPS(nn.Module):
    """LPIPS-VGG distance (Zhang et al. 2018, eq. 1) between images ``x`` and ``y``.

    ``x, y: (B, H, W, 3)`` in ``[-1, 1]`` (H, W ≥ 16) → ``(B,)`` float32 distances. Both images go
    through VGG as one batch of ``2B``. The per-tap terms ``(B,)`` are sown to ``intermediates``
    as ``per_tap`` (five entries, relu1_2 first); they sum to the result.

    ``dtype`` is VGG's compute dtype; normalisation, differences and the ``lin`` layers run in float32.
    """

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        if x.shape != y.shape or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"LPIPS takes two (B, H, W, 3) images of one shape; got {x.shape} and {y.shape}")
        batch = x.shape[0]
        images = (jnp.concatenate([x, y]).astype(jnp.float32) - jnp.asarray(SHIFT)) / jnp.asarray(SCALE)
        taps = VGG16Features(dtype=self.dtype, name="net")(images.astype(self.dtype))
        distance = jnp.zeros((batch,), jnp.float32)
        for level, tap in enumerate(taps):
            tap = unit_normalize(tap.astype(jnp.float32))
            diff = jnp.square(tap[:batch] - tap[batch:])  # (B, h, w, C)
            weighted = conv(1, 1, padding=0, use_bias=False, name=f"lin{level}")(diff)  # (B, h, w, 1)
            term = jnp.mean(weighted, axis=(1, 2, 3))
            self.sow("intermediates", "per_tap", term)
            distance = distance + term
        return distance
