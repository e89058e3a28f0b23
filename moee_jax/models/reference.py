"""ReferenceNet (Hu et al. 2024, AnimateAnyone §3.2; Hallo §3.2).

A copy of the spatial U-Net, run once per clip at ``t = 0`` on the reference image's latent. Each
spatial transformer block hands its normalised pre-self-attention states ``(B, h_l·w_l, C_l)`` to
the same block of the denoising U-Net, which appends them to its self-attention keys/values
(repeated over frames). Features depend on the reference only, never on the noisy latents or the
timestep, so a sampler computes them once before its loop.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moee_jax.models.transformers import REFERENCE_COLLECTION
from moee_jax.models.unet import UNetConfig, VideoUNet


def reference_config(unet: UNetConfig) -> UNetConfig:
    """ReferenceNet topology: the denoiser's spatial U-Net without motion, audio and emotion parts."""
    return unet.replace(
        motion_modules=False, audio_dim=None, emotion_slot=None, emotion_dim=None, emotion_time_embedding=False, reference_concat=False
    )


def reference_net(unet: UNetConfig, dtype=jnp.float32) -> VideoUNet:
    return VideoUNet(reference_config(unet), dtype=dtype)


def reference_features(refnet: VideoUNet, params, ref_latents: jax.Array, context: jax.Array) -> dict:
    """Per-block reference states.

    ``ref_latents (B, h, w, C_lat)``, ``context (B, Lc, D)`` → a tree mirroring the U-Net's module
    tree whose leaves ``.../transformer_blocks_k/self_attn_states`` are ``(B, h_l·w_l, C_l)``.
    """
    b = ref_latents.shape[0]
    _, state = refnet.apply(
        {"params": params},
        ref_latents[:, None],
        jnp.zeros((b,), jnp.int32),
        context,
        collect_reference=True,
        mutable=[REFERENCE_COLLECTION],
    )
    # ``sow`` stores a tuple per call; each block is called once per forward.
    return jax.tree_util.tree_map(lambda t: t[0], state[REFERENCE_COLLECTION], is_leaf=lambda t: isinstance(t, tuple))
