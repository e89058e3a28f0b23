"""The model as the analysis drives it: an :class:`~moee_jax.inference.animate.Animator` with hooks.

:class:`AnalysisAnimator` renders exactly as ``moee animate`` does, and adds

* **latent interpolation of the emotion condition**: emotion inputs of the form
  ``{INTERPOLATE: {"a": inputs_A, "b": inputs_B, "alpha": α}}`` (each ``inputs_X`` as
  :meth:`Animator.emotion_inputs` builds it) make every clip's emotion condition
  ``(1 − α)·C_A + α·C_B`` — tokens, and the palette when both ends have one — with A's and B's
  tokens computed per clip as for a plain render, so ``α = 0`` / ``α = 1`` reproduce them exactly;
* :meth:`clip_tokens` — the emotion tokens of any emotion inputs on one clip;
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
from moee_jax.inference.animate import Animator
from moee_jax.models.emotion_moe import EmotionCondition
from moee_jax.models.reference import reference_features
from moee_jax.models.vae import encode_to_latents
from moee_jax.train.stages import to_unit, upsample

INTERPOLATE = "interpolate"  # emotion-inputs key of a latent pair: {"a": inputs, "b": inputs, "alpha": ()}


class AnalysisAnimator(Animator):
    """See the module docstring. Load with ``AnalysisAnimator.from_run(run_dir)``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._tokens = jax.jit(self._tokens_fn)
        self._gates = jax.jit(self._gate_pass_fn)

    def clip_conditions(self, params, emotion_inputs: dict, mel, ref_latents, face_features, motion):
        if INTERPOLATE not in emotion_inputs:
            return super().clip_conditions(params, emotion_inputs, mel, ref_latents, face_features, motion)
        pair = emotion_inputs[INTERPOLATE]
        a = super().clip_conditions(params, pair["a"], mel, ref_latents, face_features, motion)
        b = super().clip_conditions(params, pair["b"], mel, ref_latents, face_features, motion)
        alpha = pair["alpha"]
        tokens = (1.0 - alpha) * a.emotion.tokens + alpha * b.emotion.tokens
        palette = None
        if a.emotion.palette is not None:
            palette = (1.0 - alpha) * a.emotion.palette + alpha * b.emotion.palette
        # Audio, reference, motion and the null emotion depend on the clip only: A's are B's.
        return dataclasses.replace(a, emotion=EmotionCondition(tokens, palette))

    def clip_tokens(self, emotion_inputs: dict, mel: jax.Array) -> jax.Array:
        """The emotion tokens ``(Ne, D)`` of ``emotion_inputs`` on the clip of per-frame log-mel
        ``mel (1, F + 2c, n_mels)`` (the speech, where a source, is the clip's)."""
        return self._tokens(self.params, emotion_inputs, mel)

    def gate_pass(self, sample: dict, emotion_inputs: dict, noise: jax.Array, timestep: int):
        """One denoiser evaluation of a clip.

        ``sample``: pipeline arrays with a batch axis of 1 — ``frames (1, F, S, S, 3)``, ``reference
        (1, S, S, 3)``, ``motion_frames (1, M, S, S, 3)`` uint8, ``face_mask (1, F, m, m)``, ``mel
        (1, F + 2c, n)``; its latents are noised by ``noise (1, F, h, w, C)`` to ``timestep``.
        → ``(tokens (Ne, D), {layer: {"local_gates": (F, L, 6), "global_gates": (F, 6)}})`` for the
        ``F`` target frames (the motion frames' rows dropped); ``layer`` is the path of the
        transformer block holding the MoE, in U-Net order.
        """
        return self._gates(self.params, sample, emotion_inputs, noise, jnp.int32(timestep))

    def _tokens_fn(self, params, emotion_inputs, mel):
        return self.clip_conditions(params, emotion_inputs, mel, None, None, None).emotion.tokens[0]

    def _gate_pass_fn(self, params, sample, emotion_inputs, noise, timestep):
        vae = params["vae"]
        lat = encode_to_latents(self.vae, vae, to_unit(sample["frames"]))  # (1, F, h, w, C)
        ref = encode_to_latents(self.vae, vae, to_unit(sample["reference"]))  # (1, h, w, C)
        motion = encode_to_latents(self.vae, vae, to_unit(sample["motion_frames"])) if self.motion_frames else None
        face = self.locator.apply({"params": params["face_locator"]}, upsample(sample["face_mask"], self.downsample)[..., None])
        cond = self.clip_conditions(params, emotion_inputs, sample["mel"], ref, face, motion)
        features = reference_features(self.model.refnet, params["reference_net"], ref, cond.context)
        t = jnp.full((1,), timestep, jnp.int32)
        noisy = q_sample(self.schedule, lat, noise, t)
        _, state = self.model.unet.apply(
            {"params": params["unet"]}, noisy, t, cond.context, reference=features, reference_keep=jnp.ones((1,), bool),
            motion_frames=motion, face_locator=face, audio=cond.audio, emotion=cond.emotion, mutable=["intermediates"],
        )  # fmt: skip
        frames, m = lat.shape[1], self.motion_frames
        gates: dict[str, dict] = {}
        # Sown values are tuples (one entry per call; each block runs once) of frame-folded rows.
        for path, value in traverse_util.flatten_dict(state["intermediates"]).items():
            if path[-1] in ("local_gates", "global_gates"):
                layer = "/".join(p for p in path[:-1] if p != "emotion")
                gates.setdefault(layer, {})[path[-1]] = value[0].reshape((m + frames,) + value[0].shape[1:])[m:]
        return cond.emotion.tokens[0], gates
