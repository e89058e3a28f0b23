"""The end-to-end backbone demo: reference image → VAE → ReferenceNet → guided video sampling →
VAE decode → PNG frames and a contact sheet.

With no weights it runs on freshly initialised parameters (the frames are then noise-like, but
every stage of the real pipeline runs); with ``--checkpoint`` it uses converted or trained ones.
"""

from __future__ import annotations

import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict
from PIL import Image

from moee_jax.checkpoint.orbax import load_metadata, restore_params
from moee_jax.diffusion import SamplerConfig, make_plan, make_schedule
from moee_jax.inference.sampling import ClipConditions, make_clip_sampler
from moee_jax.models.build import build_backbone, init_backbone_params
from moee_jax.models.vae import decode_latents, encode_to_latents


def synthetic_portrait(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """A simple drawn face (skin ellipse, eyes, mouth) in [-1, 1], (H, W, 3), and its face mask (H, W)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    cy, cx = height / 2, width / 2
    img = np.ones((height, width, 3), np.float32) * np.array([0.2, 0.3, 0.5], np.float32)
    face = ((x - cx) / (0.35 * width)) ** 2 + ((y - cy) / (0.45 * height)) ** 2 < 1
    img[face] = (0.9, 0.7, 0.55)
    for ex in (cx - 0.13 * width, cx + 0.13 * width):
        img[((x - ex) ** 2 + (y - (cy - 0.1 * height)) ** 2) < (0.04 * width) ** 2] = (0.1, 0.1, 0.1)
    mouth = (np.abs(x - cx) < 0.12 * width) & (np.abs(y - (cy + 0.2 * height)) < 0.03 * height)
    img[mouth] = (0.6, 0.1, 0.1)
    return img * 2 - 1, face.astype(np.float32)


def run_demo(config: ConfigDict, out_dir: str | pathlib.Path, checkpoint: str | None = None) -> dict:
    """Generate one clip; writes ``frames/*.png``, ``contact_sheet.png`` and ``summary.json``."""
    out = pathlib.Path(out_dir)
    (out / "frames").mkdir(parents=True, exist_ok=True)
    backbone = build_backbone(config)
    if checkpoint is not None:
        load_metadata(checkpoint)
        params = restore_params(checkpoint)
    else:
        params = init_backbone_params(backbone, config.seed)

    h, w = config.video.image_size
    f, m = config.video.num_frames, config.video.motion_frames
    rng = jax.random.key(config.seed + 1)
    r_ctx, r_audio, r_noise = jax.random.split(rng, 3)
    portrait, face_mask = synthetic_portrait(h, w)
    image = jnp.asarray(portrait)[None]
    face_mask = jnp.broadcast_to(jnp.asarray(face_mask)[None, None, :, :, None], (1, f, h, w, 1))
    face_features = jax.jit(backbone.face_locator.apply)({"params": params["face_locator"]}, face_mask)
    encode = jax.jit(lambda p, x: encode_to_latents(backbone.vae, p, x))
    ref_latents = encode(params["vae"], image)
    ucfg = backbone.unet.config
    cond = ClipConditions(
        ref_latents=ref_latents,
        context=jax.random.normal(r_ctx, (1, config.model.context_tokens, ucfg.cross_attention_dim)),
        audio=None if ucfg.audio_dim is None else jax.random.normal(r_audio, (1, f, 4, ucfg.audio_dim)),
        motion_frames=jnp.repeat(ref_latents[:, None], m, axis=1) if m else None,
        face_locator=face_features,
    )
    schedule = make_schedule(**config.diffusion.to_dict())
    plan = make_plan(SamplerConfig(**config.sampler.to_dict()), schedule)
    scales = {k: float(v) for k, v in config.guidance.items() if k in cond.present()}
    x_T = jax.random.normal(r_noise, (1, f) + ref_latents.shape[1:])

    t0 = time.perf_counter()
    latents = make_clip_sampler(backbone.unet, backbone.refnet)(
        params["unet"], params["reference_net"], cond, plan, scales, x_T
    )
    frames = jax.jit(lambda p, z: decode_latents(backbone.vae, p, z))(params["vae"], latents)
    frames = np.asarray(jax.device_get(frames))[0]
    seconds = time.perf_counter() - t0

    pixels = np.clip((frames + 1) * 127.5, 0, 255).astype(np.uint8)
    for i, frame in enumerate(pixels):
        Image.fromarray(frame).save(out / "frames" / f"{i:04d}.png")
    reference = np.clip((np.asarray(image[0]) + 1) * 127.5, 0, 255).astype(np.uint8)
    Image.fromarray(np.concatenate([reference, *pixels], axis=1)).save(out / "contact_sheet.png")
    summary = {
        "config": config.variant,
        "checkpoint": checkpoint,
        "frames": int(f),
        "motion_frames": int(m),
        "image_size": [int(h), int(w)],
        "sampler": config.sampler.to_dict(),
        "guidance": scales,
        "seconds_sampling_and_decoding_incl_compile": round(seconds, 2),
        "finite": bool(np.isfinite(frames).all()),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
