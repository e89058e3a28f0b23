"""``moee animate``: a portrait, a speech clip and an emotion → a talking-head MP4.

::

    animator = Animator.from_run("RUN")                   # RUN/stage2/final + RUN/stage2/config.json
    result = animator.animate("face.png", "speech.wav", parse_emotion("happy:0.6,surprised:0.4"))
    save_animation(result, "out.mp4")                     # + out.json (settings), optional PNG frames

Per video: the portrait is face-cropped (:mod:`.inputs`), VAE-encoded once; the speech is cut into
clips with training-identical audio features (:mod:`.long_audio`). Per clip, one jitted function
runs the conditioning paths (audio projection, Emotion-to-Latents or the embedder), the guided
sampler (:func:`moee_jax.inference.sampling.sample_clip`: ReferenceNet, then every CFG branch in
one U-Net call per step) and the VAE decoder. Every clip of every video has the same shapes, so it
compiles once per Animator and emotion kind.

Emotion conditions (:class:`~moee_jax.inference.inputs.EmotionSpec`), for Emotion-to-Latents models:

* ``label`` / ``palette`` — the weights (one-hot for a label, the mix for a compound) through the
  label MLP, and the same weights as the **global gate** of every Emotion MoE: a label activates its
  own expert, a palette mixes experts (MoEE's palette: compound emotions from single-emotion
  experts). The speech emotion source is dropped: the speech a user gives need not carry the
  emotion asked for, and training conditions label samples the same way
  (:mod:`moee_jax.data.pipeline`, emotion modes). Models with the ``single`` or ``no_global`` MoE
  variant ignore the gate.
* ``text`` — T5 features of the description (``text_encoder`` folder) alone; the learned gate acts.
  Only for models with a ``text`` emotion source.
* ``audio`` — speech only: the clip's speech features alone; the learned gate acts. Only for models
  with a ``speech`` source.

For embedder models (DICE-Talk), ``video`` encodes a reference clip (its face crops and audio) into
one emotion for the whole video; ``audio`` uses the embedder's audio-only mode on each clip's speech.

The unconditional emotion branch of classifier-free guidance is what training's dropped emotion is:
the model's learned null tokens (all modalities dropped) with the learned gate (no palette).

Outputs (:func:`save_animation`) are all-or-nothing: the MP4 (H.264 + AAC, the speech muxed in) and
its JSON settings sidecar are written under temporary names and renamed; PNG frames go to a
temporary folder renamed at the end; on any error nothing is left behind.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import os
import pathlib
import shutil
import tempfile
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict
from PIL import Image

from moee_jax.data.audio import SAMPLE_RATE
from moee_jax.data.face_crop import crop_frame
from moee_jax.data.pipeline import _audio_window, frame_log_mel
from moee_jax.diffusion import SAMPLERS, DDIMPlan, DPMSolverPlan, SamplerConfig, make_plan, make_schedule
from moee_jax.emotions import NUM_EMOTIONS
from moee_jax.inference import inputs as inputs_lib
from moee_jax.inference.inputs import EmotionSpec, InputError, Portrait, Speech
from moee_jax.inference.long_audio import ClipPlan, clip_audio_features, plan_clips, roll_clips
from moee_jax.inference.sampling import CONDITION_ORDER, ClipConditions, sample_clip
from moee_jax.models.audio import AudioProjection
from moee_jax.models.build import build_backbone
from moee_jax.models.moee import EmotionConfig, build_moee_from_config
from moee_jax.models.space_to_depth import SpaceToDepthAutoencoder
from moee_jax.models.vae import decode_latents, encode_to_latents
from moee_jax.train.stages import ContextTokens, frame_mel, mel_windows, upsample

REQUIRED_PARTS = ("vae", "face_locator", "context", "reference_net", "unet", "conditioning")
TEXT_LENGTH = 32  # the training pipeline's default data.text_length


@dataclasses.dataclass
class Animation:
    """A generated video.

    frames (T, S, S, 3) uint8 · audio (A,) float32 mono 16 kHz · fps · the portrait it animates ·
    the clip plan · settings (JSON-ready, for the sidecar) · warnings for the user.
    """

    frames: np.ndarray
    audio: np.ndarray
    fps: float
    portrait: Portrait
    plan: ClipPlan
    settings: dict
    warnings: list[str]


@dataclasses.dataclass
class Job:
    """One video's checked inputs and per-video tensors (:meth:`Animator.prepare`).

    mel (K, F + 2c, n_mels) per clip · emotion_inputs (batch 1, see :meth:`Animator.emotion_inputs`)
    · plan_arrays: the sampler's plan · scales: CFG scale per condition · key: the noise seed ·
    ref_latents (1, h, w, C) · face_features (1, F, h, w, C0).
    """

    portrait: Portrait
    speech: Speech
    plan: ClipPlan
    mel: np.ndarray
    emotion_inputs: dict
    plan_arrays: DDIMPlan | DPMSolverPlan
    scales: dict[str, float]
    key: jax.Array
    ref_latents: jax.Array
    face_features: jax.Array
    settings: dict
    warnings: list[str]


class Animator:
    """A stage-2 model ready to animate portraits; see the module docstring.

    ``config``: the run's resolved config; ``params``: the whole system's parameters (parts
    :data:`REQUIRED_PARTS`); ``text_encoder``: a T5 folder for ``--emotion_text`` (models with a text
    emotion source only).
    """

    def __init__(self, config: ConfigDict, params: dict, *, source: str = "", text_encoder: str | os.PathLike | None = None):
        missing = [p for p in REQUIRED_PARTS if p not in params]
        if missing:
            raise InputError(f"--checkpoint {source}: parameters of {missing} are missing (it holds {sorted(params)})")
        self.config, self.params, self.source = config, params, source
        self.text_encoder_path = text_encoder
        self._text_encoder = None
        self.checkpoint: inputs_lib.RunCheckpoint | None = None
        backbone = build_backbone(config)
        self.vae, self.locator = backbone.vae, backbone.face_locator
        self.model = build_moee_from_config(config)
        self.emotion = EmotionConfig.from_dict(config.model.emotion.to_dict())
        self.context = ContextTokens(int(config.model.context_tokens), int(config.model.unet.cross_attention_dim))
        self.schedule = make_schedule(**config.diffusion.to_dict())
        size = tuple(int(s) for s in config.video.image_size)
        if size[0] != size[1]:
            raise InputError(f"--checkpoint {source}: the model's image size {size} is not square; animation uses square face crops")
        self.size = size[0]
        self.fps = float(config.video.fps)
        data = config.data
        self.clip_frames = int(data.num_frames)
        self.motion_frames = int(data.motion_frames)
        self.context_frames = int(data.audio_context_frames)
        self.mel_bins = int(data.mel_bins)
        self.downsample = int(data.mask_downsample)
        self.text_length = int(data.get("text_length", TEXT_LENGTH))
        if self.mel_bins < 1:
            raise InputError(f"--checkpoint {source}: config.data.mel_bins={self.mel_bins}; the model has no audio features to drive it")
        self._prepare = jax.jit(self._prepare_fn)
        # Guidance scales are static: a branch a scale gives no weight is then left out of the batch.
        self._clip_step = jax.jit(self._clip_step_fn, static_argnames=("scales",))

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, *, text_encoder: str | os.PathLike | None = None) -> Animator:
        """Load ``RUN/stage2/final`` and ``RUN/stage2/config.json`` (``run_dir`` may also be the stage
        or ``final`` directory). Raises :class:`InputError` for a missing, unfinished or wrong-stage run."""
        checkpoint = inputs_lib.resolve_checkpoint(run_dir)
        config = inputs_lib.load_run_config(checkpoint)
        params = _restore_on_one_device(checkpoint.final)
        animator = cls(config, params, source=str(run_dir), text_encoder=text_encoder)
        animator.checkpoint = checkpoint
        return animator

    # ---- the latent space ---------------------------------------------------------------------------------------

    @property
    def lossless_latents(self) -> bool:
        """Whether the autoencoder is lossless (space-to-depth): its round trip is the identity."""
        return isinstance(self.vae, SpaceToDepthAutoencoder)

    def round_trip(self, frames: np.ndarray) -> np.ndarray:
        """Frames ``(N, S, S, 3)`` uint8 through the model's latent encode and decode, as uint8: what
        the latent space keeps of them (the ceiling of any generated video)."""
        if not hasattr(self, "_round_trip"):

            def fn(params, x):
                z = encode_to_latents(self.vae, params, x.astype(jnp.float32) / 127.5 - 1.0)
                y = decode_latents(self.vae, params, z).astype(jnp.float32)
                return jnp.clip(jnp.round((y + 1.0) * 127.5), 0, 255).astype(jnp.uint8)

            self._round_trip = jax.jit(fn)
        return np.asarray(self._round_trip(self.params["vae"], jnp.asarray(frames)))

    # ---- what the model can take ---------------------------------------------------------------------------------

    @property
    def uses_embedder(self) -> bool:
        return self.emotion.sources == ("embedder",)

    def check_emotion(self, spec: EmotionSpec) -> None:
        """Raise :class:`InputError` when this model cannot take ``spec``."""
        flag = _FLAG_OF_KIND[spec.kind]
        if self.uses_embedder:
            if spec.kind not in ("video", "audio"):
                raise InputError(
                    f"{flag}: this model's emotion comes from a reference clip (DICE-Talk embedder, emotion source "
                    "'embedder'); pass --emotion_video ref.mp4 or --emotion_from_audio"
                )
            return
        usable = ", ".join(_FLAG_OF_SOURCE[s] for s in self.emotion.sources if s in _FLAG_OF_SOURCE)
        sources = ", ".join(self.emotion.sources)
        if spec.kind == "video":
            raise InputError(
                "--emotion_video: only models with the DICE-Talk embedder (config.model.emotion.sources=('embedder',)) take a "
                f"reference video; this model's emotion sources are {sources}: use {usable}"
            )
        need = _SOURCE_OF_KIND[spec.kind]
        if need not in self.emotion.sources:
            raise InputError(f"{flag}: this model has no {need!r} emotion source (its sources: {sources}); use {usable}")
        if spec.kind == "text" and self.text_encoder_path is None:
            raise InputError("--emotion_text needs --text_encoder FOLDER: the T5 encoder (transformers folder) the model was trained with")

    # ---- one video -------------------------------------------------------------------------------------------------

    def prepare(
        self,
        image: str | os.PathLike | np.ndarray,
        audio: str | os.PathLike | Speech,
        emotion: EmotionSpec,
        *,
        steps: int | None = None,
        sampler: str | None = None,
        guidance: dict[str, float] | None = None,
        seed: int = 0,
        detect: bool = True,
    ) -> Job:
        """Check and load every input of one video and compute its per-video tensors (reference
        latent, face features, per-clip audio features, emotion inputs); no clip is sampled yet.
        Raises :class:`InputError` for any unusable input. Arguments as :meth:`animate`."""
        self.check_emotion(emotion)
        speech = audio if isinstance(audio, Speech) else inputs_lib.load_speech(audio)
        if isinstance(image, np.ndarray):
            picture, image_name = np.asarray(image, np.uint8), "image"
        else:
            picture, image_name = inputs_lib.load_image(image), str(image)
        portrait = inputs_lib.prepare_portrait(picture, self.size, detect=detect, name=f"--image {image_name}")
        plan = plan_clips(speech.wave.size, self.fps, self.clip_frames, self.motion_frames, self.context_frames)
        emotion_inputs = self.emotion_inputs(emotion, detect=detect)
        sampling = self._sampling(steps, sampler, guidance)
        face_mask = inputs_lib.face_region_mask(self.size, self.downsample)
        face_mask = np.broadcast_to(face_mask, (1, self.clip_frames) + face_mask.shape)
        ref_latents, face_features = self._prepare(self.params, jnp.asarray(portrait.crop[None]), jnp.asarray(face_mask))
        settings = {
            "checkpoint": self.source,
            "step": None if self.checkpoint is None else self.checkpoint.step,
            "image": image_name,
            "audio": str(speech.path),
            "emotion": emotion.describe(),
            "sampler": sampling["name"],
            "steps": sampling["steps"],
            "guidance": sampling["scales"],
            "seed": int(seed),
            "detect_face": bool(detect),
            "crop_box": {"cx": portrait.box[0], "cy": portrait.box[1], "side": portrait.box[2]},
            "fps": self.fps,
            "frames": int(plan.num_frames),
            "audio_seconds": round(speech.seconds, 4),
            "image_size": self.size,
            "clip_frames": plan.clip_frames,
            "motion_frames": plan.motion_frames,
            "clips": plan.num_clips,
        }
        return Job(
            portrait=portrait,
            speech=speech,
            plan=plan,
            mel=clip_audio_features(speech.wave, plan, self.mel_bins),
            emotion_inputs=emotion_inputs,
            plan_arrays=sampling["plan"],
            scales=sampling["scales"],
            key=jax.random.key(seed),
            ref_latents=ref_latents,
            face_features=face_features,
            settings=settings,
            warnings=[*portrait.warnings, *speech.warnings],
        )

    def first_motion(self, job: Job) -> jax.Array | None:
        """Clip 0's motion latents: the reference latent repeated, ``(1, M, h, w, C)`` (None if M = 0)."""
        return jnp.repeat(job.ref_latents[:, None], self.motion_frames, axis=1) if self.motion_frames else None

    def render_clip(self, job: Job, k: int, motion: jax.Array | None) -> tuple[jax.Array, np.ndarray]:
        """Sample and decode clip ``k`` of ``job`` after ``motion (1, M, h, w, C)`` → latents
        ``(1, F, h, w, C)`` (on device) and frames ``(F, S, S, 3)`` uint8. Clip ``k``'s noise is
        ``fold_in(key(seed), k)``, so a clip can be re-rendered with other motion frames."""
        latents, pixels = self._clip_step(
            self.params, job.emotion_inputs, jnp.asarray(job.mel[k : k + 1]), job.ref_latents, job.face_features, motion,
            job.key[None], jnp.int32(k), job.plan_arrays, scales=tuple(sorted(job.scales.items())),
        )  # fmt: skip
        return latents, np.asarray(pixels[0])

    def animate(
        self,
        image: str | os.PathLike | np.ndarray,
        audio: str | os.PathLike | Speech,
        emotion: EmotionSpec,
        *,
        steps: int | None = None,
        sampler: str | None = None,
        guidance: dict[str, float] | None = None,
        seed: int = 0,
        detect: bool = True,
        progress: Callable[[int, int], None] | None = None,
    ) -> Animation:
        """Animate ``image`` (a path or ``(H, W, 3)`` uint8) speaking ``audio`` (a path or loaded
        :class:`Speech`) with ``emotion``.

        ``steps`` / ``sampler`` (``ddim`` | ``dpmpp_2m``) default to the config's; ``guidance`` maps
        ``reference`` / ``audio`` / ``emotion`` to their CFG scales (missing or None: the config's);
        ``detect=False`` takes the image as a face crop. ``progress(done, total)`` is called after
        each clip. → :class:`Animation` with ``frames (T, S, S, 3)`` uint8,
        ``T = num_video_frames(len(audio), 16 kHz, fps)``, and the warnings the user should see (an
        upsampled face crop, silent audio).
        """
        t0 = time.perf_counter()
        job = self.prepare(image, audio, emotion, steps=steps, sampler=sampler, guidance=guidance, seed=seed, detect=detect)
        video = self.render_job(job, progress)
        settings = dict(job.settings, seconds=round(time.perf_counter() - t0, 2), warnings=job.warnings)
        return Animation(video, job.speech.wave, self.fps, job.portrait, job.plan, settings, job.warnings)

    def render_job(self, job: Job, progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """Every clip of a prepared ``job`` in order, motion frames handed from each clip to the next →
        ``(T, S, S, 3)`` uint8; ``progress(done, total)`` after each clip."""
        frames: list[np.ndarray] = []

        def one_clip(k, motion):
            latents, pixels = self.render_clip(job, k, motion)
            frames.append(pixels)
            return latents

        for k, _ in roll_clips(one_clip, self.first_motion(job), job.plan):
            if progress is not None:
                progress(k + 1, job.plan.num_clips)
        return np.concatenate(frames)[: job.plan.num_frames]

    def render_jobs(self, jobs: list[Job], progress: Callable[[int, int], None] | None = None) -> list[np.ndarray]:
        """Several prepared jobs rendered together, one batched sampler call per clip: each video is
        what :meth:`render_job` makes of it (its own noise), up to float rounding. The jobs must have
        the same number of clips, sampler settings and kinds of emotion input (e.g. the clips of one
        evaluation); ``progress(done, total)`` after each clip. → one ``(T_i, S, S, 3)`` uint8 per job."""
        if not jobs:
            return []
        first = jobs[0]
        for job in jobs[1:]:
            if job.plan.num_clips != first.plan.num_clips or sorted(job.emotion_inputs) != sorted(first.emotion_inputs) \
                    or job.scales != first.scales or job.settings["steps"] != first.settings["steps"] \
                    or job.settings["sampler"] != first.settings["sampler"]:  # fmt: skip
                raise ValueError("render_jobs batches jobs with the same clip count, sampler, guidance and emotion-input kinds")
        emotion = {key: jnp.concatenate([jnp.asarray(j.emotion_inputs[key]) for j in jobs]) for key in first.emotion_inputs}
        ref = jnp.concatenate([j.ref_latents for j in jobs])
        faces = jnp.concatenate([j.face_features for j in jobs])
        keys = jnp.stack([j.key for j in jobs])
        motion0 = jnp.repeat(ref[:, None], self.motion_frames, axis=1) if self.motion_frames else None
        frames: list[np.ndarray] = []

        def one_clip(k, motion):
            mel = jnp.asarray(np.stack([j.mel[k] for j in jobs]))
            latents, pixels = self._clip_step(self.params, emotion, mel, ref, faces, motion, keys, jnp.int32(k), first.plan_arrays,
                                              scales=tuple(sorted(first.scales.items())))  # fmt: skip
            frames.append(np.asarray(pixels))
            return latents

        for k, _ in roll_clips(one_clip, motion0, first.plan):
            if progress is not None:
                progress(k + 1, first.plan.num_clips)
        video = np.concatenate(frames, axis=1)  # (B, clips·F, S, S, 3)
        return [video[i, : job.plan.num_frames] for i, job in enumerate(jobs)]

    # ---- conditioning inputs ---------------------------------------------------------------------------------------

    def emotion_inputs(self, spec: EmotionSpec, *, detect: bool = True) -> dict[str, np.ndarray]:
        """The per-video (clip-independent) emotion inputs of the conditioning, batch 1.

        Emotion-to-Latents models: ``emotion_label (1, 6)`` (zeros when the label is dropped),
        ``emotion_drop (1, 3)`` flags over (text, speech, label) — True drops; speech, when kept, is
        each clip's own and added per clip — ``text_features (1, L, D)`` + ``text_mask``, and the
        MoE gate's ``palette (1, 6)`` with ``palette_keep (1,)`` (True for a label or palette). Embedder models: ``expression_frames
        (1, F, S, S, 3)`` in [-1, 1], ``mouth_mask (1, F, S, S)`` and ``embedder_audio (1, F, n_mels)``
        (when the reference clip has sound) for ``video``; nothing for ``audio`` (each clip's speech).
        """
        self.check_emotion(spec)
        if self.uses_embedder:
            return self._reference_clip_inputs(spec.video, detect) if spec.kind == "video" else {}
        weights = np.zeros(NUM_EMOTIONS, np.float32) if spec.weights is None else np.asarray(spec.weights, np.float32)
        keep_label = spec.kind in ("label", "palette")
        keep_text = spec.kind == "text"
        keep_speech = spec.kind == "audio"
        out = {
            "emotion_label": weights[None],
            "emotion_drop": np.array([[not keep_text, not keep_speech, not keep_label]]),
            # The label's weights set the MoE's global gate; without a label the learned gate acts.
            "palette": weights[None],
            "palette_keep": np.array([keep_label]),
        }
        if keep_text:
            out["text_features"], out["text_mask"] = self._encode_text(spec.text)
        return out

    def _encode_text(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        if self._text_encoder is None:
            from moee_jax.models.encoders.pretrained import load_t5_encoder

            try:
                self._text_encoder = load_t5_encoder(self.text_encoder_path)
            except (FileNotFoundError, ValueError) as e:
                raise InputError(f"--text_encoder {self.text_encoder_path}: {e}") from None
        features, mask = self._text_encoder.encode([text], max_length=self.text_length)
        if features.shape[-1] != self.emotion.text_dim:
            raise InputError(
                f"--text_encoder {self.text_encoder_path}: its features are {features.shape[-1]}-wide but the model's text "
                f"branch takes {self.emotion.text_dim}; pass the T5 encoder the model was trained with"
            )
        return features.astype(np.float32), mask

    def _reference_clip_inputs(self, path: pathlib.Path, detect: bool) -> dict[str, np.ndarray]:
        """The embedder's view of a reference clip: the middle ``F`` frames at the model's fps,
        face-cropped with one box (detected on the middle frame), their mouth boxes, and the clip's
        own per-frame log-mel (absent when it has no sound: the embedder's video-only mode)."""
        from moee_jax.data.video_io import VideoError, read_video, resample_indices

        try:
            video, fps, sound = read_video(path)
        except VideoError as e:
            raise InputError(f"--emotion_video {e}") from None
        index = resample_indices(video.shape[0], fps, self.fps)
        f, c = self.clip_frames, self.context_frames
        if index.size < f:
            raise InputError(
                f"--emotion_video {path}: {index.size} frames at {self.fps:g} fps; the embedder needs at least {f} ({f / self.fps:.2f} s)"
            )
        start = (index.size - f) // 2
        middle = video[index[start + f // 2]]
        portrait = inputs_lib.prepare_portrait(middle, self.size, detect=detect, name=f"--emotion_video {path}")
        crops = np.stack([crop_frame(video[i], portrait.box, self.size) for i in index[start : start + f]])
        mouth = inputs_lib.mouth_region_mask(self.size, self.downsample)
        out = {
            "expression_frames": (crops.astype(np.float32) / 127.5 - 1.0)[None],
            "mouth_mask": np.broadcast_to(mouth, (1, f) + mouth.shape).copy(),
        }
        if sound is not None:
            mel = frame_log_mel(_audio_window(sound, self.fps, start - c, f + 2 * c), self.fps, self.mel_bins)
            out["embedder_audio"] = mel[None, c : c + f]
        return out

    def _sampling(self, steps, sampler, guidance) -> dict:
        cfg = SamplerConfig(**self.config.sampler.to_dict())
        if steps is not None:
            if int(steps) < 1:
                raise InputError(f"--steps {steps}: must be at least 1")
            cfg = dataclasses.replace(cfg, num_steps=int(steps))
        if sampler is not None:
            if sampler not in SAMPLERS:
                raise InputError(f"--sampler {sampler!r}: choose one of {SAMPLERS}")
            cfg = dataclasses.replace(cfg, name=sampler, eta=0.0 if sampler == "dpmpp_2m" else cfg.eta)
        try:
            plan = make_plan(cfg, self.schedule)
        except ValueError as e:
            raise InputError(f"--steps / --sampler: {e}") from None
        scales = {name: float(self.config.guidance[name]) for name in CONDITION_ORDER}
        for name, value in (guidance or {}).items():
            if name not in CONDITION_ORDER:
                raise ValueError(f"unknown guidance condition {name!r}; expected one of {CONDITION_ORDER}")
            if value is not None:
                scales[name] = float(value)
        return {"plan": plan, "scales": scales, "name": cfg.name, "steps": cfg.num_steps}

    # ---- jitted pieces ---------------------------------------------------------------------------------------------

    def _prepare_fn(self, params, crop, face_mask):
        """``crop (1, S, S, 3)`` uint8, ``face_mask (1, F, m, m)`` → reference latent ``(1, h, w, C)``
        and face-locator features ``(1, F, h, w, C0)``."""
        ref = encode_to_latents(self.vae, params["vae"], crop.astype(jnp.float32) / 127.5 - 1.0)
        features = self.locator.apply({"params": params["face_locator"]}, upsample(face_mask, self.downsample)[..., None])
        return ref, features

    def clip_conditions(self, params, emotion_inputs: dict, mel, ref_latents, face_features, motion) -> ClipConditions:
        """Everything clip ``mel (1, F + 2c, n)`` is conditioned on (traceable): audio tokens, emotion
        condition (tokens + palette), learned null emotion, null audio tokens (the projection of
        all-zero windows: what training's dropped-audio branch sees), motion latents, face features."""
        f, c = self.clip_frames, self.context_frames
        per_frame = frame_mel(mel, f, c)  # (1, F, n)
        batch = {"audio_windows": mel_windows(mel, f, c), **emotion_inputs}
        null = None
        if self.uses_embedder:
            if "expression_frames" not in emotion_inputs:
                batch["embedder_audio"] = per_frame
        else:
            if "speech" in self.emotion.sources:
                batch["speech_features"] = per_frame
            unconditional = {k: v for k, v in batch.items() if k != "audio_windows"}
            unconditional["emotion_drop"] = jnp.ones_like(batch["emotion_drop"])
            null = self.model.conditioning.apply({"params": params["conditioning"]}, unconditional, train=False).emotion.tokens
        out = self.model.conditioning.apply({"params": params["conditioning"]}, batch, train=False)
        null_audio = None
        if out.audio is not None:
            cfg = self.model.conditioning
            projection = AudioProjection(cfg.audio.num_tokens, cfg.audio_out_dim, cfg.audio.hidden_dim, dtype=cfg.dtype)
            silent = jnp.zeros_like(batch["audio_windows"])
            null_audio = projection.apply({"params": params["conditioning"]["audio_projection"]}, silent)
        return ClipConditions(
            ref_latents=ref_latents,
            context=self.context.apply({"params": params["context"]}, ref_latents.shape[0]),
            audio=out.audio,
            null_audio=null_audio,
            emotion=out.emotion,
            null_emotion=null,
            motion_frames=motion,
            face_locator=face_features,
        )

    def _clip_step_fn(self, params, emotion_inputs, mel, ref_latents, face_features, motion, keys, k, plan, scales: tuple):
        """Clip ``k`` of ``B`` videos at once: conditions → guided sampling → decoding. ``keys (B,)``:
        each video's own noise key, so a video's noise does not depend on what it is batched with.
        → latents ``(B, F, h, w, C)`` and frames ``(B, F, S, S, 3)`` uint8."""
        cond = self.clip_conditions(params, emotion_inputs, mel, ref_latents, face_features, motion)
        split = jax.vmap(lambda key: jax.random.split(jax.random.fold_in(key, k)))(keys)  # (B, 2) keys
        shape = (self.clip_frames,) + ref_latents.shape[1:]
        x_T = jax.vmap(lambda r: jax.random.normal(r, shape, jnp.float32))(split[:, 0]).astype(ref_latents.dtype)
        r_sampler = split[0, 1]
        scales = {name: value for name, value in scales if name in cond.present()}
        latents = sample_clip(
            self.model.unet, params["unet"], self.model.refnet, params["reference_net"], cond, plan, scales, x_T, r_sampler
        )
        images = decode_latents(self.vae, params["vae"], latents).astype(jnp.float32)
        pixels = jnp.clip(jnp.round((images + 1.0) * 127.5), 0, 255).astype(jnp.uint8)
        return latents, pixels


_FLAG_OF_KIND = {"label": "--emotion", "palette": "--emotion", "text": "--emotion_text", "audio": "--emotion_from_audio",
                 "video": "--emotion_video"}  # fmt: skip
_SOURCE_OF_KIND = {"label": "label", "palette": "label", "text": "text", "audio": "speech"}
_FLAG_OF_SOURCE = {"label": "--emotion", "text": "--emotion_text", "speech": "--emotion_from_audio"}


def _restore_on_one_device(final: pathlib.Path) -> dict:
    """Read a params export onto the first local device, whatever mesh it was saved from."""
    import orbax.checkpoint as ocp

    from moee_jax.checkpoint.orbax import restore_params

    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    try:
        with ocp.StandardCheckpointer() as ckptr:
            stored = ckptr.metadata(final.absolute() / "params").item_metadata.tree
        abstract = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), stored)
        return restore_params(final, abstract)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise InputError(f"--checkpoint: cannot read the parameters in {final} ({type(e).__name__}: {e})") from None


# ---- outputs -----------------------------------------------------------------------------------------------------------


def check_outputs(out: str | os.PathLike, frames_dir: str | os.PathLike | None = None) -> None:
    """Refuse, before any work, outputs that could not be written: ``out`` not an ``.mp4`` path or a
    directory, ``frames_dir`` an existing non-empty folder or a file."""
    out = pathlib.Path(out)
    if out.suffix.lower() != ".mp4":
        raise InputError(f"--out {out}: the video is written as MP4; give a path ending in .mp4")
    if out.is_dir():
        raise InputError(f"--out {out}: is a directory; give a file path ending in .mp4")
    if frames_dir is not None:
        d = pathlib.Path(frames_dir)
        if d.exists() and (not d.is_dir() or any(d.iterdir())):
            raise InputError(f"--frames_dir {d}: exists and is not an empty folder; choose a new folder")


def sidecar_path(out: str | os.PathLike) -> pathlib.Path:
    """Where the settings of ``out.mp4`` go: ``out.json``."""
    return pathlib.Path(out).with_suffix(".json")


def save_animation(
    animation: Animation, out: str | os.PathLike, *, frames_dir: str | os.PathLike | None = None, paste: bool = False
) -> dict[str, str]:
    """Write ``out`` (MP4 with the speech muxed in), ``out.json`` (settings) and, with ``frames_dir``,
    one PNG per frame; ``paste=True`` writes the animated face pasted back into the whole photo
    (:func:`~moee_jax.inference.inputs.paste_back`) instead of the square crop. All or nothing.
    → the paths written."""
    from moee_jax.data.video_io import write_video

    out = pathlib.Path(out)
    check_outputs(out, frames_dir)
    frames = animation.frames
    if paste:
        frames = inputs_lib.paste_back(animation.portrait.image, frames, animation.portrait.box)
    settings = dict(animation.settings, output=str(out), paste_back=bool(paste))
    sidecar = sidecar_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    written: list[pathlib.Path] = []
    staging = None
    try:
        if frames_dir is not None:
            target = pathlib.Path(frames_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = pathlib.Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial"))
            os.chmod(staging, 0o777 & ~_umask())
            for i, frame in enumerate(frames):
                Image.fromarray(frame).save(staging / f"{i:06d}.png")
            settings["frames_dir"] = str(target)
        write_video(out, frames, animation.fps, animation.audio, SAMPLE_RATE)
        written.append(out)
        _write_text_atomic(sidecar, json.dumps(settings, indent=2))
        written.append(sidecar)
        if staging is not None:
            if target.exists():
                target.rmdir()  # empty, checked above
            os.replace(staging, target)
            staging = None
            written.append(target)
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        for path in written:
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        raise
    return {"video": str(out), "settings": str(sidecar), **({"frames_dir": str(frames_dir)} if frames_dir is not None else {})}


def animate_to_file(
    animator: Animator,
    image: str | os.PathLike | np.ndarray,
    audio: str | os.PathLike | Speech,
    emotion: EmotionSpec,
    out: str | os.PathLike,
    *,
    frames_dir: str | os.PathLike | None = None,
    paste: bool = False,
    progress: Callable[[int, int], None] | None = None,
    **options,
) -> Animation:
    """Check the outputs, animate (``options``: see :meth:`Animator.animate`) and save
    (:func:`save_animation`): on any error — a bad input, a failed write — no output exists."""
    check_outputs(out, frames_dir)
    animation = animator.animate(image, audio, emotion, progress=progress, **options)
    save_animation(animation, out, frames_dir=frames_dir, paste=paste)
    return animation


def _write_text_atomic(path: pathlib.Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 is for the temporary name only
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---- batch mode --------------------------------------------------------------------------------------------------------

MANIFEST_COLUMNS = ("image", "audio", "emotion", "out")
OPTIONAL_COLUMNS = ("emotion_text", "emotion_video", "seed")
FROM_AUDIO = ("audio", "from_audio")


def read_manifest(path: str | os.PathLike) -> list[dict[str, str]]:
    """Rows of a batch manifest CSV: columns ``image, audio, emotion, out`` (+ optional
    ``emotion_text, emotion_video, seed``). ``emotion`` is a label or palette spec, ``audio`` for the
    emotion of the speech, or empty when ``emotion_text`` / ``emotion_video`` gives it. Relative paths
    are relative to the manifest's folder."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise InputError(f"--batch {path}: manifest file not found")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            missing = [c for c in MANIFEST_COLUMNS if c not in header]
            if missing:
                raise InputError(
                    f"--batch {path}: the header lacks column(s) {missing}; expected {', '.join(MANIFEST_COLUMNS)} "
                    f"(optional: {', '.join(OPTIONAL_COLUMNS)}), got {header}"
                )
            rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    except (UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"--batch {path}: not a readable CSV file ({e})") from None
    if not rows:
        raise InputError(f"--batch {path}: the manifest has no rows")
    return rows


def row_emotion(row: dict[str, str]) -> EmotionSpec:
    """The :class:`EmotionSpec` of one manifest row."""
    emotion = row.get("emotion", "")
    from_audio = emotion.lower() in FROM_AUDIO
    return inputs_lib.parse_emotion(
        emotion if emotion and not from_audio else None,
        emotion_text=row.get("emotion_text") or None,
        emotion_from_audio=from_audio,
        emotion_video=row.get("emotion_video") or None,
    )


def animate_batch(
    animator: Animator,
    manifest: str | os.PathLike,
    *,
    report: str | os.PathLike | None = None,
    on_row: Callable[[int, dict], None] | None = None,
    **options,
) -> dict:
    """Animate every row of ``manifest`` (see :func:`read_manifest`); a bad row is skipped and
    reported, and the run goes on. ``options`` go to :meth:`Animator.animate` (``steps``,
    ``sampler``, ``guidance``, ``seed``, ``detect``) and :func:`save_animation` (``paste``).

    The report (``report``, default ``<manifest>.report.json``) is rewritten after every row, so
    finished work is on record even if the job is killed: ``{"manifest", "rows", "done": [{"line",
    "out", "seconds"}], "failed": [{"line", "error"}]}``. ``on_row(line, entry)`` follows each row.
    → the report.
    """
    manifest = pathlib.Path(manifest)
    rows = read_manifest(manifest)
    report_path = pathlib.Path(report) if report is not None else manifest.with_suffix(".report.json")
    base = manifest.parent
    paste = bool(options.pop("paste", False))
    result: dict = {"manifest": str(manifest), "rows": len(rows), "done": [], "failed": []}
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        t0 = time.perf_counter()
        try:
            if not row.get("image") or not row.get("audio") or not row.get("out"):
                raise InputError("image, audio and out must all be given")
            spec = row_emotion(row)
            if spec.video is not None and not spec.video.is_absolute():
                spec = dataclasses.replace(spec, video=base / spec.video, spec=str(base / spec.video))
            out = _under(base, row["out"])
            kwargs = dict(options)
            if row.get("seed"):
                try:
                    kwargs["seed"] = int(row["seed"])
                except ValueError:
                    raise InputError(f"seed {row['seed']!r} is not an integer") from None
            animation = animate_to_file(animator, _under(base, row["image"]), _under(base, row["audio"]), spec, out, paste=paste, **kwargs)
            entry = {"line": line, "out": str(out), "seconds": round(time.perf_counter() - t0, 2), "warnings": animation.warnings}
            result["done"].append(entry)
        except (InputError, ValueError, OSError, RuntimeError) as e:
            entry = {"line": line, "image": row.get("image", ""), "error": f"{e}"}
            result["failed"].append(entry)
        _write_text_atomic(report_path, json.dumps(result, indent=2))
        if on_row is not None:
            on_row(line, entry)
    result["report"] = str(report_path)
    return result


def _under(base: pathlib.Path, value: str) -> pathlib.Path:
    p = pathlib.Path(value).expanduser()
    return p if p.is_absolute() else base / p
