"""Building the backbone's modules from a config, and initialising their parameters."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

from moee_jax.models.init import init_unet_params
from moee_jax.models.reference import reference_config
from moee_jax.models.unet import UNetConfig, VideoUNet
from moee_jax.models.vae import AutoencoderKL


@dataclasses.dataclass(frozen=True)
class Backbone:
    """The modules of the latent video diffusion backbone."""

    vae: AutoencoderKL
    unet: VideoUNet
    refnet: VideoUNet


def build_backbone(config: ConfigDict) -> Backbone:
    """Modules for ``config.model`` (see ``configs/backbone.py``) in compute dtype ``config.dtype``."""
    dtype = jnp.dtype(config.dtype)
    unet_cfg = UNetConfig.from_dict(config.model.unet.to_dict())
    vae = AutoencoderKL(**config.model.vae.to_dict(), dtype=dtype)
    return Backbone(vae=vae, unet=VideoUNet(unet_cfg, dtype=dtype), refnet=VideoUNet(reference_config(unet_cfg), dtype=dtype))


def init_backbone_params(backbone: Backbone, rng: jax.Array) -> dict:
    """Fresh params ``{'vae', 'unet', 'reference_net'}`` (unboxed)."""
    r_vae, r_unet, r_ref = jax.random.split(rng, 3)
    side = 2 ** (len(backbone.vae.block_out_channels) - 1)
    vae = jax.jit(lambda r: backbone.vae.init(r, jnp.zeros((1, side, side, backbone.vae.in_channels))))(r_vae)
    return {
        "vae": nn.unbox(vae["params"]),
        "unet": init_unet_params(backbone.unet, r_unet),
        "reference_net": init_unet_params(backbone.refnet, r_ref),
    }
