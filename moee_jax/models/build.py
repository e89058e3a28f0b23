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
from moee_jax.models.space_to_depth import SpaceToDepthAutoencoder
from moee_jax.models.unet import UNetConfig, VideoUNet
from moee_jax.models.vae import AutoencoderKL

AUTOENCODER_KINDS = ("kl", "space_to_depth")

PARTS = ("vae", "unet", "reference_net", "face_locator")


@dataclasses.dataclass(frozen=True)
class Backbone:
    """The modules of the latent video diffusion backbone."""

    vae: AutoencoderKL | SpaceToDepthAutoencoder
    unet: VideoUNet
    refnet: VideoUNet
    face_locator: FaceLocator


def build_autoencoder(vae_config, dtype=jnp.float32) -> AutoencoderKL | SpaceToDepthAutoencoder:
    """The autoencoder of ``config.model.vae``: ``kind="kl"`` (SD's KL VAE, the default) or
    ``kind="space_to_depth"`` (lossless, ``factor``; :mod:`moee_jax.models.space_to_depth`)."""
    fields = dict(vae_config)
    kind = fields.pop("kind", "kl")
    if kind == "kl":
        return AutoencoderKL(**fields, dtype=dtype)
    if kind == "space_to_depth":
        vae = SpaceToDepthAutoencoder(factor=int(fields.get("factor", 2)), in_channels=int(fields.get("in_channels", 3)))
        if int(fields.get("latent_channels", vae.latent_channels)) != vae.latent_channels:
            raise ValueError(
                f"config.model.vae.latent_channels={fields['latent_channels']}, but space-to-depth with factor {vae.factor} makes "
                f"{vae.latent_channels} channels of {vae.in_channels}; set latent_channels={vae.latent_channels}"
            )
        return vae
    raise ValueError(f"config.model.vae.kind={kind!r}; choose one of {AUTOENCODER_KINDS}")


def build_backbone(config: ConfigDict) -> Backbone:
    """Modules for ``config.model`` (see ``configs/backbone.py``) in compute dtype ``config.dtype``."""
    dtype = jnp.dtype(config.dtype)
    unet_cfg = UNetConfig.from_dict(config.model.unet.to_dict())
    vae = build_autoencoder(config.model.vae.to_dict(), dtype)
    if unet_cfg.in_channels != vae.latent_channels:
        raise ValueError(
            f"config.model.unet.in_channels={unet_cfg.in_channels} but the autoencoder makes {vae.latent_channels}-channel "
            "latents; set model.unet.in_channels and out_channels to the latent channels"
        )
    locator_factor = 2 ** (len(config.model.face_locator.channels) - 1)
    if locator_factor != vae.downsample_factor:
        raise ValueError(
            f"config.model.face_locator.channels={tuple(config.model.face_locator.channels)} downsamples "
            f"{locator_factor}× but the autoencoder downsamples {vae.downsample_factor}×; give one more channel "
            "entry than the autoencoder has downsamplings"
        )
    return Backbone(
        vae=vae,
        unet=VideoUNet(unet_cfg, dtype=dtype),
        refnet=VideoUNet(reference_config(unet_cfg), dtype=dtype),
        face_locator=FaceLocator(unet_cfg.block_out_channels[0], tuple(config.model.face_locator.channels), dtype=dtype),
    )


def init_part(backbone: Backbone, part: str, rng: jax.Array) -> dict:
    """Fresh unboxed params of one part in :data:`PARTS`."""
    side = backbone.vae.downsample_factor
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
