"""``moee convert``: real SD1.5 / AnimateDiff weights → one Orbax parameter checkpoint.

The denoising U-Net takes the SD U-Net (plus motion weights when given); ReferenceNet starts from
the same SD U-Net weights (AnimateAnyone / Hallo initialise it so); the VAE from SD's VAE. Modules
no source has are initialised from ``config.seed`` and listed in the checkpoint's metadata.
"""

from __future__ import annotations

import pathlib

from ml_collections import ConfigDict

from moee_jax.checkpoint.convert.unet import convert_unet
from moee_jax.checkpoint.convert.vae import convert_vae
from moee_jax.checkpoint.orbax import save_params
from moee_jax.models.build import build_backbone, init_part, part_rng


def convert_backbone(
    config: ConfigDict,
    out: str | pathlib.Path,
    *,
    unet: str | pathlib.Path,
    vae: str | pathlib.Path | None = None,
    motion_adapter: str | pathlib.Path | None = None,
    allow_pickle: bool = False,
) -> dict:
    """Convert, validate and save; returns the metadata written beside the params."""
    if (pathlib.Path(out) / "params").exists():
        raise FileExistsError(f"{out} already holds a checkpoint; choose a new --out directory")
    backbone = build_backbone(config)

    def fresh(part):
        return lambda: init_part(backbone, part, part_rng(config.seed, part))

    denoiser = convert_unet(unet, backbone.unet, motion_adapter=motion_adapter, init_params=fresh("unet"), allow_pickle=allow_pickle)
    reference = convert_unet(unet, backbone.refnet, init_params=fresh("reference_net"), allow_pickle=allow_pickle)
    params = {"unet": denoiser.params, "reference_net": reference.params, "face_locator": fresh("face_locator")()}
    initialised = {
        "unet": denoiser.initialised,
        "reference_net": reference.initialised,
        "face_locator": ["(all: SD has no face locator)"],
        "vae": [],
    }
    if vae is not None:
        params["vae"] = convert_vae(vae, backbone.vae, allow_pickle=allow_pickle)
    else:
        params["vae"] = fresh("vae")()
        initialised["vae"] = ["(all: no --vae given)"]
    metadata = {
        "kind": "backbone_params",
        "config": config.to_dict(),
        "sources": {
            "unet": str(unet),
            "vae": None if vae is None else str(vae),
            "motion_adapter": None if motion_adapter is None else str(motion_adapter),
        },
        "initialised": initialised,
    }
    save_params(out, params, metadata)
    return metadata
