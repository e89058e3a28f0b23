"""Sampling the latents of one clip: ReferenceNet once, then a ``lax.scan`` sampler whose every
step evaluates all classifier-free-guidance branches in one U-Net call.

Conditions are guided in the fixed order ``reference → audio → emotion`` (nested CFG,
:mod:`moee_jax.diffusion.guidance`); absent conditions (no audio, no emotion tokens) are left out
of the nesting. A dropped condition is what training saw when it dropped it: reference — masked
out of the self-attention K/V; audio — the tokens of all-zero audio windows (``null_audio``; zero
tokens when not given); emotion — the model's learned null tokens (``null_emotion``; zero tokens
when not given) and no palette on the Emotion MoE's gate (its gate network acts).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from moee_jax.diffusion.guidance import guided_model_fn
from moee_jax.diffusion.samplers import DDIMPlan, DPMSolverPlan, run_sampler
from moee_jax.models.emotion_moe import EmotionCondition
from moee_jax.models.reference import reference_features
from moee_jax.models.unet import VideoUNet

CONDITION_ORDER = ("reference", "audio", "emotion")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ClipConditions:
    """Everything a clip is conditioned on (per clip, batch B).

    ref_latents (B, h, w, C) · context (B, Lc, D) · audio (B, F, La, Da) · audio_mask (B, F, h, w)
    · null_audio (B, F, La, Da) · emotion (B, Le, De) tokens or an EmotionCondition (tokens + palette)
    · null_emotion (B, Le, De) · motion_frames (B, M, h, w, C)
    · face_locator (B, F, h, w, C0). All but the first two may be None.
    """

    ref_latents: jax.Array
    context: jax.Array
    audio: jax.Array | None = None
    audio_mask: jax.Array | None = None
    null_audio: jax.Array | None = None
    emotion: jax.Array | None = None
    null_emotion: jax.Array | None = None
    motion_frames: jax.Array | None = None
    face_locator: jax.Array | None = None

    def present(self) -> tuple[str, ...]:
        """Guided conditions present, in :data:`CONDITION_ORDER`."""
        have = {"reference": True, "audio": self.audio is not None, "emotion": self.emotion is not None}
        return tuple(name for name in CONDITION_ORDER if have[name])


def _tile(x: jax.Array | None, n: int) -> jax.Array | None:
    """Per-clip tensor → branch-major batch ``(n·B, ...)`` (row ``k·B + b``)."""
    return None if x is None else jnp.concatenate([x] * n, axis=0)


def branch_denoiser(
    unet: VideoUNet, params, cond: ClipConditions, features: dict, names: tuple[str, ...]
) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
    """The ``model_fn_batched(x, t, keep)`` of :func:`guided_model_fn` for these conditions (as many
    branches as ``x`` has rows per clip: all of them, or those :func:`guided_model_fn` kept)."""

    def fn(x, t, keep):
        n = x.shape[0] // cond.ref_latents.shape[0]
        tiled_features = jax.tree_util.tree_map(lambda f: _tile(f, n), features)
        context = _tile(cond.context, n)
        flags = {name: keep[:, i] for i, name in enumerate(names)}
        kw = {}
        if cond.audio is not None:
            audio = _tile(cond.audio, n)
            null_audio = jnp.zeros_like(audio) if cond.null_audio is None else _tile(cond.null_audio, n)
            kw["audio"] = jnp.where(flags["audio"][:, None, None, None], audio, null_audio)
            kw["audio_mask"] = _tile(cond.audio_mask, n)
        if cond.emotion is not None:
            tokens = getattr(cond.emotion, "tokens", cond.emotion)
            null = jnp.zeros_like(tokens) if cond.null_emotion is None else cond.null_emotion
            tokens = jnp.where(flags["emotion"][:, None, None], _tile(tokens, n), _tile(null, n))
            if isinstance(cond.emotion, EmotionCondition):
                # The palette sets the gate where the emotion is kept; the dropped branch has none.
                e = cond.emotion
                keep = flags["emotion"]
                if e.palette is not None and e.palette_keep is not None:
                    keep = keep & _tile(e.palette_keep, n)
                kw["emotion"] = EmotionCondition(tokens, _tile(e.palette, n), None if e.palette is None else keep)
            else:
                kw["emotion"] = tokens
        if unet.config.reference_concat:
            kw["reference_latents"] = _tile(cond.ref_latents, n)
        return unet.apply(
            {"params": params},
            x,
            t,
            context,
            reference=tiled_features,
            reference_keep=flags["reference"],
            motion_frames=_tile(cond.motion_frames, n),
            face_locator=_tile(cond.face_locator, n),
            **kw,
        )

    return fn


def sample_clip(
    unet: VideoUNet,
    params,
    refnet: VideoUNet,
    ref_params,
    cond: ClipConditions,
    plan: DDIMPlan | DPMSolverPlan,
    scales: dict[str, float],
    x_T: jax.Array,
    rng: jax.Array | None = None,
) -> jax.Array:
    """Denoise ``x_T (B, F, h, w, C)`` into clip latents of the same shape.

    ``scales`` maps each present condition to its guidance scale. ReferenceNet runs here, once,
    outside the sampler's loop. Jit with ``unet``, ``refnet`` static (see :func:`make_clip_sampler`).
    Python-number scales are known at trace time, so branches they give no weight are not run
    (:func:`~moee_jax.diffusion.guidance.branch_weights`); traced scales run every branch.
    """
    names = cond.present()
    missing = [name for name in names if name not in scales]
    if missing:
        raise ValueError(f"guidance scales missing for condition(s) {missing}; given {sorted(scales)}")
    features = reference_features(refnet, ref_params, cond.ref_latents, cond.context)
    values = [scales[n] for n in names]
    if all(isinstance(v, (int, float)) for v in values):
        scale_vector = np.asarray(values, np.float32)
    else:
        scale_vector = jnp.stack([jnp.asarray(v, jnp.float32) for v in values])
    model_fn = guided_model_fn(branch_denoiser(unet, params, cond, features, names), scale_vector)
    return run_sampler(plan, model_fn, x_T, rng)


def make_clip_sampler(unet: VideoUNet, refnet: VideoUNet):
    """``jax.jit`` of :func:`sample_clip` for these modules:
    ``f(params, ref_params, cond, plan, scales, x_T, rng) -> latents``."""

    def f(params, ref_params, cond, plan, scales, x_T, rng=None):
        return sample_clip(unet, params, refnet, ref_params, cond, plan, scales, x_T, rng)

    return jax.jit(f)
