"""Pipeline arrays as the model takes them: pixels in [-1, 1], masks at pixel size, log-mel windows.

The training pipeline (:mod:`moee_jax.data.pipeline`) and the animator hand the model uint8 frames,
latent-resolution masks and per-frame log-mel energies; these are the only conversions between
their layout and the model's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def to_unit(pixels: jax.Array, dtype=jnp.float32) -> jax.Array:
    """uint8 ``[0, 255]`` → ``[-1, 1]``."""
    return pixels.astype(dtype) / 127.5 - 1.0


def to_uint8(images: jax.Array) -> jax.Array:
    """``[-1, 1]`` → uint8 ``[0, 255]`` (rounded, clipped)."""
    return jnp.clip(jnp.round((images.astype(jnp.float32) + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def upsample(mask: jax.Array, factor: int) -> jax.Array:
    """Nearest upsampling of the last two axes by ``factor``."""
    return jnp.repeat(jnp.repeat(mask, factor, axis=-2), factor, axis=-1)


def mel_windows(mel: jax.Array, num_frames: int, context: int) -> jax.Array:
    """``mel (B, F + 2c, n)`` → Hallo-style windows ``(B, F, 2c + 1, 1, n)`` centred on each frame."""
    windows = jnp.stack([mel[:, k : k + num_frames] for k in range(2 * context + 1)], axis=2)
    return windows[:, :, :, None, :]


def frame_mel(mel: jax.Array, num_frames: int, context: int) -> jax.Array:
    """The per-frame mel of the target frames ``(B, F, n)`` (drops the context frames)."""
    return mel[:, context : context + num_frames]


def embedder_inputs(batch: dict, num_frames: int, context: int, downsample: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A pipeline batch as DICE-Talk's embedder takes a clip: ``(audio (B, F, n_mels) per-frame
    log-mel, frames (B, F, H, W, 3) in [-1, 1], mouth mask (B, F, H, W) at pixel size)``."""
    return frame_mel(batch["mel"], num_frames, context), to_unit(batch["frames"]), upsample(batch["mouth_mask"], downsample)
