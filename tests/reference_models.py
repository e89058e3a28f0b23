"""Tiny random PyTorch reference models (diffusers), built offline and saved as safetensors.

Every parameter, norms and biases included, is drawn at random: zero biases and unit norm scales
would hide conversion bugs that parity tests exist to catch.
"""

from __future__ import annotations

import numpy as np

TINY_UNET = dict(
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=2,
    attention_head_dim=4,  # diffusers' SD naming: this is the number of heads
    cross_attention_dim=16,
    norm_num_groups=8,
    sample_size=8,
    in_channels=4,
    out_channels=4,
)

TINY_MOTION = dict(
    block_out_channels=(32, 64),
    motion_layers_per_block=2,
    motion_num_attention_heads=4,
    motion_norm_num_groups=8,
    motion_max_seq_length=32,
)


def randomize(torch, model, seed: int = 0, std: float = 0.1):
    """Overwrite every floating parameter with N(0, std²) (norm scales with 1 + N(0, std²))."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * std
            p.copy_(1.0 + noise if name.endswith("norm.weight") or ".norm" in name and name.endswith("weight") else noise)
    return model.eval()


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def ours_unet_config(**overrides):
    """Our U-Net config matching :data:`TINY_UNET` (video / conditioning parts off unless overridden)."""
    from moee_jax.models.unet import UNetConfig

    base = dict(
        block_out_channels=TINY_UNET["block_out_channels"],
        down_attention=(True, False),
        layers_per_block=TINY_UNET["layers_per_block"],
        num_attention_heads=TINY_UNET["attention_head_dim"],
        cross_attention_dim=TINY_UNET["cross_attention_dim"],
        norm_num_groups=TINY_UNET["norm_num_groups"],
        motion_modules=False,
        motion_num_attention_heads=TINY_MOTION["motion_num_attention_heads"],
        motion_norm_num_groups=TINY_MOTION["motion_norm_num_groups"],
        audio_dim=None,
    )
    base.update(overrides)
    return UNetConfig(**base)
