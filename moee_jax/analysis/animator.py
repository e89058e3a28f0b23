"""The model as the analysis drives it: an :class:`~moee_jax.inference.animator.Animator` with hooks.

:class:`AnalysisAnimator` renders exactly as ``moee animate`` does, and adds

* **latent interpolation of the emotion condition**: a job whose emotion is an
  :class:`InterpolatedEmotion` (two videos' :class:`~moee_jax.models.conditioning.EmotionSources`
  and ``α``) makes every clip's emotion condition ``(1 − α)·C_A + α·C_B`` — tokens, and the
  palette that sets the Emotion MoE's gate — with A's and B's conditions computed per clip as for a
  plain render, so ``α = 0`` / ``α = 1`` reproduce them exactly;
* :meth:`clip_tokens` — the emotion tokens of any emotion sources on one clip;
* :meth:`gate_pass` — one denoiser evaluation of a clip's own noised latents with the Emotion
  MoE's gates (and every other ``sow``) recorded.

Both are jitted once per instance, like the Animator's own steps.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import traverse_util

from moee_jax.diffusion.schedules import q_sample
from moee_jax.inference.animator import Animator
from moee_jax.models.conditioning import EmotionSources
from moee_jax.models.emotion_moe import EmotionCondition
from moee_jax.models.system import Conditions
from moee_jax.xla_options import compiler_options


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class InterpolatedEmotion:
    """The emotion ``(1 − alpha)·A + alpha·B`` of a video: ``a``, ``b`` its two endpoints' sources."""

    a: EmotionSources
    b: EmotionSources
    alpha: jax.Array


class AnalysisAnimator(Animator):
    """See the module docstring. Load with ``AnalysisAnimator.from_run(run_dir)``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._tokens = jax.jit(self._tokens_fn, compiler_options=compiler_options())
        self._gates = jax.jit(self._gate_pass_fn, compiler_options=compiler_options())

    def clip_conditions(self, params, emotion, mel, ref_latents, face_features, motion) -> Conditions:
        if not isinstance(emotion, InterpolatedEmotion):
            return super().clip_conditions(params, emotion, mel, ref_latents, face_features, motion)
        a = super().clip_conditions(params, emotion.a, mel, ref_latents, face_features, motion)
        b = super().clip_conditions(params, emotion.b, mel, ref_latents, face_features, motion)
        alpha = emotion.alpha
        mix = (1.0 - alpha) * a.emotion.palette + alpha * b.emotion.palette
        tokens = (1.0 - alpha) * a.emotion.tokens + alpha * b.emotion.tokens
        # Audio, reference, motion and the null emotion depend on the clip only: A's are B's.
        return dataclasses.replace(a, emotion=EmotionCondition(tokens, mix, a.emotion.palette_keep))

    def clip_tokens(self, emotion: EmotionSources, mel: jax.Array) -> jax.Array:
        """The emotion tokens ``(Ne, D)`` of ``emotion`` (batch 1) on the clip of per-frame log-mel
        ``mel (1, F + 2c, n_mels)`` (the speech, where a source, is the clip's)."""
        return self._tokens(self.params, emotion, mel)

    def gate_pass(self, sample: dict, emotion: EmotionSources, noise: jax.Array, timestep: int):
        """One denoiser evaluation of a clip.

        ``sample``: pipeline arrays with a batch axis of 1 — ``frames (1, F, S, S, 3)``, ``reference
        (1, S, S, 3)``, ``motion_frames (1, M, S, S, 3)`` uint8, ``face_mask (1, F, m, m)``, ``mel
        (1, F + 2c, n)``; its latents are noised by ``noise (1, F, h, w, C)`` to ``timestep``.
        → ``(tokens (Ne, D), {layer: {"local_gates": (F, L, 6), "global_gates": (F, 6)}})`` for the
        ``F`` target frames (the motion frames' rows dropped); ``layer`` is the path of the
        transformer block holding the MoE, in U-Net order.
        """
        return self._gates(self.params, sample, emotion, noise, jnp.int32(timestep))

    def _tokens_fn(self, params, emotion, mel):
        sources = self.system.clip_emotion(emotion, mel)
        return self.system.conditioning.apply({"params": params["conditioning"]}, None, sources, train=False).emotion.tokens[0]

    def _gate_pass_fn(self, params, sample, emotion, noise, timestep):
        system = self.system
        lat = system.encode_images(params, sample["frames"])  # (1, F, h, w, C)
        ref = system.encode_images(params, sample["reference"])  # (1, h, w, C)
        motion = system.encode_images(params, sample["motion_frames"]) if self.motion_frames else None
        face = system.face_features(params, sample["face_mask"])
        cond = system.conditions(params, system.clip_inputs(params, emotion, sample["mel"], ref, face, motion))
        t = jnp.full((1,), timestep, jnp.int32)
        out = system.denoise(params, cond, q_sample(self.schedule, lat, noise, t), t, capture=True)
        frames, m = lat.shape[1], self.motion_frames
        gates: dict[str, dict] = {}
        # Sown values are tuples (one entry per call; each block runs once) of frame-folded rows.
        for path, value in traverse_util.flatten_dict(out.intermediates).items():
            if path[-1] in ("local_gates", "global_gates"):
                layer = "/".join(p for p in path[:-1] if p != "emotion")
                gates.setdefault(layer, {})[path[-1]] = value[0].reshape((m + frames,) + value[0].shape[1:])[m:]
        return cond.emotion.tokens[0], gates
