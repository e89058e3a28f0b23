"""Building parameter trees: example inputs, abstract (shape-only) trees, and initialisation.

Parameter shapes never depend on batch, frame count or resolution, so every tree is built from the
smallest inputs a model accepts. ``abstract_*`` return boxed ``nn.LogicallyPartitioned`` leaves
holding ``ShapeDtypeStruct`` s: that is what sharding rules and converters work from.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moee_jax.models.emotion_moe import EmotionCondition
from moee_jax.models.unet import UNetConfig, VideoUNet


def unet_example_inputs(cfg: UNetConfig, batch: int = 1, frames: int = 1) -> dict:
    """Smallest valid inputs of a :class:`VideoUNet` with this config (keyword arguments)."""
    side = 2 ** (len(cfg.block_out_channels) - 1)
    inputs = {
        "sample": jnp.zeros((batch, frames, side, side, cfg.in_channels)),
        "timesteps": jnp.zeros((batch,), jnp.int32),
        "context": jnp.zeros((batch, 1, cfg.cross_attention_dim)),
    }
    if cfg.audio_dim is not None:
        inputs["audio"] = jnp.zeros((batch, frames, 1, cfg.audio_dim))
    if cfg.emotion_slot is not None or cfg.emotion_time_embedding:
        if cfg.emotion_dim is None:
            raise ValueError("a U-Net with an emotion slot or emotion time embedding needs emotion_dim (the width of the emotion tokens)")
        inputs["emotion"] = EmotionCondition(jnp.zeros((batch, 1, cfg.emotion_dim)))
    if cfg.reference_concat:
        inputs["reference_latents"] = jnp.zeros((batch, side, side, cfg.in_channels))
    return inputs


def abstract_unet_variables(unet: VideoUNet) -> dict:
    """Boxed shape-only variables of ``unet`` (``{'params': ...}``)."""
    return jax.eval_shape(lambda: unet.init(jax.random.key(0), **unet_example_inputs(unet.config)))


def init_unet_params(unet: VideoUNet, rng: jax.Array, *, boxed: bool = False) -> dict:
    """Freshly initialised U-Net params; boxed ones keep their logical axis names."""
    variables = jax.jit(lambda r: unet.init(r, **unet_example_inputs(unet.config)))(rng)
    return variables["params"] if boxed else nn.unbox(variables["params"])
