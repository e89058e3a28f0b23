"""Sampling the latents of one clip: a ``lax.scan`` sampler whose every step evaluates all
classifier-free-guidance branches in one denoiser call.

The clip's :class:`~moee_jax.models.system.Conditions` come in computed (ReferenceNet and the
conditioning paths ran once, before the loop). Conditions are guided in the fixed order
``reference → audio → emotion`` (nested CFG, :mod:`moee_jax.diffusion.guidance`); absent conditions
(no audio) are left out of the nesting. A dropped condition is what training saw when it dropped
it: reference — masked out of the self-attention K/V (and zeroed where the reference latent is also
concatenated); audio — the tokens of all-zero audio windows (``null_audio``); emotion — the
model's learned null tokens with no palette on the Emotion MoE's gate (``null_emotion``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from moee_jax.diffusion import SAMPLERS, SamplerConfig, make_plan
from moee_jax.diffusion.guidance import guided_model_fn
from moee_jax.diffusion.samplers import DDIMPlan, DPMSolverPlan, run_sampler
from moee_jax.inference.compounds import mixed_model_fn
from moee_jax.inference.inputs import InputError
from moee_jax.models.emotion_moe import EmotionCondition
from moee_jax.models.system import Conditions

CONDITION_ORDER = ("reference", "audio", "emotion")

Denoiser = Callable[[Conditions, jax.Array, jax.Array], jax.Array]  # (conditions, x, t) → prediction


def sampling_settings(config, schedule, *, steps: int | None = None, sampler: str | None = None,
                      guidance: dict[str, float | None] | None = None) -> dict:  # fmt: skip
    """A user's sampler choices over the config's (``config.sampler``, ``config.guidance``) →
    ``{"plan": DDIMPlan | DPMSolverPlan, "scales": {condition: CFG scale}, "name", "steps"}``.
    ``guidance`` maps ``reference`` / ``audio`` / ``emotion`` to a scale (None: the config's).
    Raises :class:`InputError` naming the flag for an unusable value."""
    cfg = SamplerConfig(**config.sampler.to_dict())
    if steps is not None:
        if int(steps) < 1:
            raise InputError(f"--steps {steps}: must be at least 1")
        cfg = dataclasses.replace(cfg, num_steps=int(steps))
    if sampler is not None:
        if sampler not in SAMPLERS:
            raise InputError(f"--sampler {sampler!r}: choose one of {SAMPLERS}")
        cfg = dataclasses.replace(cfg, name=sampler, eta=0.0 if sampler == "dpmpp_2m" else cfg.eta)
    try:
        plan = make_plan(cfg, schedule)
    except ValueError as e:
        raise InputError(f"--steps / --sampler: {e}") from None
    scales = {name: float(config.guidance[name]) for name in CONDITION_ORDER}
    for name, value in (guidance or {}).items():
        if name not in CONDITION_ORDER:
            raise ValueError(f"unknown guidance condition {name!r}; expected one of {CONDITION_ORDER}")
        if value is not None:
            if not math.isfinite(float(value)) or float(value) < 0:
                raise InputError(f"--cfg_{name} {value}: a guidance scale must be a finite number >= 0 (1 = no guidance)")
            scales[name] = float(value)
    return {"plan": plan, "scales": scales, "name": cfg.name, "steps": cfg.num_steps}


def present(cond: Conditions) -> tuple[str, ...]:
    """Guided conditions present, in :data:`CONDITION_ORDER`."""
    have = {"reference": True, "audio": cond.audio is not None, "emotion": True}
    return tuple(name for name in CONDITION_ORDER if have[name])


def _tile(x, n: int):
    """Per-clip tensor (or tree) → branch-major batch ``(n·B, ...)`` (row ``k·B + b``)."""
    return jax.tree_util.tree_map(lambda a: jnp.concatenate([a] * n, axis=0), x)


def branch_conditions(cond: Conditions, names: tuple[str, ...], keep: jax.Array) -> Conditions:
    """The conditions of ``n`` guidance branches at once: ``keep ((n·B), K)`` bool over ``names``,
    branch-major; every per-clip input tiled ``n`` times and each dropped condition replaced by its
    null alternative."""
    n = keep.shape[0] // cond.ref_latents.shape[0]
    flags = {name: keep[:, i] for i, name in enumerate(names)}
    per_clip = dataclasses.replace(cond, null_audio=None, null_emotion=None, vq_loss=None, emotion_mu=None, emotion_sigma=None)
    tiled = _tile(per_clip, n)
    audio = tiled.audio
    if audio is not None:
        null = jnp.zeros_like(audio) if cond.null_audio is None else _tile(cond.null_audio, n)
        audio = jnp.where(flags["audio"][:, None, None, None], audio, null)
    e = tiled.emotion
    null = cond.null_emotion
    null_tokens = jnp.zeros_like(e.tokens) if null is None else _tile(null.tokens, n)
    kept = flags["emotion"]
    tokens = jnp.where(kept[:, None, None], e.tokens, null_tokens)
    palette_keep = None
    if e.palette is not None:  # the palette sets the gate where the emotion is kept; the dropped branch has none
        palette_keep = kept if e.palette_keep is None else kept & e.palette_keep
    return dataclasses.replace(tiled, audio=audio, emotion=EmotionCondition(tokens, e.palette, palette_keep),
                               reference_keep=tiled.reference_keep & flags["reference"])  # fmt: skip


def sample_clip(
    denoise: Denoiser,
    cond: Conditions,
    plan: DDIMPlan | DPMSolverPlan,
    scales: dict[str, float],
    x_T: jax.Array,
    rng: jax.Array | None = None,
    mix: jax.Array | None = None,
) -> jax.Array:
    """Denoise ``x_T (B, F, h, w, C)`` into clip latents of the same shape under ``cond``.

    ``scales`` maps each present condition to its guidance scale. Python-number scales are known
    at trace time, so branches they give no weight are not run
    (:func:`~moee_jax.diffusion.guidance.branch_weights`); traced scales run every branch.
    ``mix (B, B)``: every step, each row's guided prediction is replaced by ``mix @ predictions``
    (the rows of a compound emotion share their palette-weighted prediction,
    :mod:`moee_jax.inference.compounds`); rows mixed together must start from the same ``x_T`` and
    then stay equal (deterministic samplers, η = 0).
    """
    names = present(cond)
    missing = [name for name in names if name not in scales]
    if missing:
        raise ValueError(f"guidance scales missing for condition(s) {missing}; given {sorted(scales)}")
    values = [scales[n] for n in names]
    if all(isinstance(v, (int, float)) for v in values):
        scale_vector = np.asarray(values, np.float32)
    else:
        scale_vector = jnp.stack([jnp.asarray(v, jnp.float32) for v in values])

    def batched(x, t, keep):
        return denoise(branch_conditions(cond, names, keep), x, t)

    guided = guided_model_fn(batched, scale_vector)
    return run_sampler(plan, guided if mix is None else mixed_model_fn(guided, mix), x_T, rng)
