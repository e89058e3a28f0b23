"""Building the backbone's modules from a config, and initialising their parameters."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

from moee_jax.models.face_locator import FaceLocator
from moee_jax.models.init import init_unet_params
from moee_jax.models.reference import reference_config
from moee_jax.models.unet import UNetConfig, VideoUNet
from moee_jax.models.vae import AutoencoderKL

PARTS = ("vae", "unet", "reference_net", "face_locator")


@dataclasses.dataclass(frozen=True)
class Backbone:
    """The modules of the latent video diffusion backbone."""

    vae: AutoencoderKL
    unet: VideoUNet
    refnet: VideoUNet
    face_locator: FaceLocator


def build_backbone(config: ConfigDict) -> Backbone:
    """Modules for ``config.model`` (see ``configs/backbone.py``) in compute dtype ``config.dtype``."""
    dtype = jnp.dtype(config.dtype)
    unet_cfg = UNetConfig.from_dict(config.model.unet.to_dict())
    vae = AutoencoderKL(**config.model.vae.to_dict(), dtype=dtype)
    if 2 ** (len(config.model.face_locator.channels) - 1) != 2 ** (len(vae.block_out_channels) - 1):
        raise ValueError(
            f"config.model.face_locator.channels={tuple(config.model.face_locator.channels)} downsamples "
            f"{2 ** (len(config.model.face_locator.channels) - 1)}× but the VAE downsamples "
            f"{2 ** (len(vae.block_out_channels) - 1)}×; give one more channel entry than the VAE has downsamplings"
        )
    return Backbone(
        vae=vae,
        unet=VideoUNet(unet_cfg, dtype=dtype),
        refnet=VideoUNet(reference_config(unet_cfg), dtype=dtype),
        face_locator=FaceLocator(unet_cfg.block_out_channels[0], tuple(config.model.face_locator.channels), dtype=dtype),
    )


def init_part(backbone: Backbone, part: str, rng: jax.Array) -> dict:
    """Fresh unboxed params of one part in :data:`PARTS`."""
    side = 2 ** (len(backbone.vae.block_out_channels) - 1)
    if part == "vae":
        variables = jax.jit(lambda r: backbone.vae.init(r, jnp.zeros((1, side, side, backbone.vae.in_channels))))(rng)
    elif part == "face_locator":
        variables = jax.jit(lambda r: backbone.face_locator.init(r, jnp.zeros((1, 1, side, side, 1))))(rng)
    elif part == "unet":
        return init_unet_params(backbone.unet, rng)
    elif part == "reference_net":
        return init_unet_params(backbone.refnet, rng)
    else:
        raise ValueError(f"unknown backbone part {part!r}; expected one of {PARTS}")
    return nn.unbox(variables["params"])


def part_rng(seed: int, part: str) -> jax.Array:
    """The init key of one part: the same part gets the same values however the others are made."""
    return jax.random.fold_in(jax.random.key(seed), PARTS.index(part))


def init_backbone_params(backbone: Backbone, seed: int) -> dict:
    """Fresh params ``{'vae', 'unet', 'reference_net', 'face_locator'}`` (unboxed)."""
    return {part: init_part(backbone, part, part_rng(seed, part)) for part in PARTS}
