"""The animator: a trained model ready to turn a portrait, a speech clip and an emotion into frames.

::

    animator = Animator.from_run("RUN")                   # RUN/stage2/final + RUN/stage2/config.json
    result = animator.animate("face.png", "speech.wav", parse_emotion("happy:0.6,surprised:0.4"))
    save_animation(result, "out.mp4")                     # moee_jax.inference.outputs

Per video (:meth:`Animator.prepare`): the portrait is face-cropped (:mod:`.inputs`) and encoded
once; the speech is cut into clips with training-identical audio features (:mod:`.long_audio`); the
emotion becomes typed :class:`~moee_jax.models.conditioning.EmotionSources`. Per clip, one jitted
function builds the clip's :class:`~moee_jax.models.system.ModelInputs`, runs the system's
conditioning (ReferenceNet and the conditioning paths, once per clip), the guided sampler
(:func:`moee_jax.inference.sampling.sample_clip`: every CFG branch in one U-Net call per step) and
the decoder. Every clip of every video has the same shapes, so it compiles once per Animator,
emotion kind and batch size; :meth:`Animator.render_jobs` renders several videos in one batch.

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
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from moee_jax.checkpoint.run import RunCheckpoint, load_run_config, resolve_checkpoint, restore_final
from moee_jax.data.audio import audio_window, frame_log_mel
from moee_jax.data.face_crop import crop_frame
from moee_jax.diffusion import SAMPLERS, DDIMPlan, DPMSolverPlan, SamplerConfig, make_plan, make_schedule
from moee_jax.emotions import NUM_EMOTIONS
from moee_jax.inference import inputs as inputs_lib
from moee_jax.inference.inputs import EmotionSpec, InputError, Portrait, Speech
from moee_jax.inference.long_audio import ClipPlan, clip_audio_features, plan_clips, roll_clips
from moee_jax.inference.sampling import CONDITION_ORDER, sample_clip
from moee_jax.models.conditioning import EmotionSources
from moee_jax.models.features import to_uint8
from moee_jax.models.space_to_depth import SpaceToDepthAutoencoder
from moee_jax.models.system import Conditions, ModelInputs, MoEESystem

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

    mel (K, F + 2c, n_mels) per clip · emotion: the video's :class:`EmotionSources` (batch 1; the
    per-clip speech is filled in per clip) · plan_arrays: the sampler's plan · scales: CFG scale per
    condition · key: the noise seed · ref_latents (1, h, w, C) · face_features (1, F, h, w, C0).
    """

    portrait: Portrait
    speech: Speech
    plan: ClipPlan
    mel: np.ndarray
    emotion: EmotionSources
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
        self.checkpoint: RunCheckpoint | None = None
        self.system = MoEESystem(config)
        self.emotion = self.system.emotion
        self.schedule = make_schedule(**config.diffusion.to_dict())
        size = tuple(int(s) for s in config.video.image_size)
        if size[0] != size[1]:
            raise InputError(f"--checkpoint {source}: the model's image size {size} is not square; animation uses square face crops")
        self.size = size[0]
        self.fps = float(config.video.fps)
        data = config.data
        self.clip_frames = self.system.clip_frames
        self.motion_frames = self.system.motion_frames
        self.context_frames = self.system.audio_context
        self.mel_bins = int(data.mel_bins)
        self.downsample = self.system.downsample
        self.text_length = int(data.get("text_length", TEXT_LENGTH))
        if self.mel_bins < 1:
            raise InputError(f"--checkpoint {source}: config.data.mel_bins={self.mel_bins}; the model has no audio features to drive it")
        self._prepare = jax.jit(self._prepare_fn)
        # Guidance scales are static: a branch a scale gives no weight is then left out of the batch.
        self._clip_step = jax.jit(self._clip_step_fn, static_argnames=("scales",))

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, *, text_encoder: str | os.PathLike | None = None) -> Animator:
        """Load ``RUN/stage2/final`` and ``RUN/stage2/config.json`` (``run_dir`` may also be the stage
        or ``final`` directory). Raises :class:`~moee_jax.checkpoint.run.RunError` for a missing,
        unfinished or wrong-stage run."""
        checkpoint = resolve_checkpoint(run_dir)
        animator = cls(load_run_config(checkpoint), restore_final(checkpoint.final), source=str(run_dir), text_encoder=text_encoder)
        animator.checkpoint = checkpoint
        return animator

    # ---- the latent space ---------------------------------------------------------------------------------------

    @property
    def lossless_latents(self) -> bool:
        """Whether the autoencoder is lossless (space-to-depth): its round trip is the identity."""
        return isinstance(self.system.vae, SpaceToDepthAutoencoder)

    def round_trip(self, frames: np.ndarray) -> np.ndarray:
        """Frames ``(N, S, S, 3)`` uint8 through the model's latent encode and decode, as uint8: what
        the latent space keeps of them (the ceiling of any generated video)."""
        if not hasattr(self, "_round_trip"):
            self._round_trip = jax.jit(lambda params, x: to_uint8(self.system.decode(params, self.system.encode_images(params, x))))
        return np.asarray(self._round_trip(self.params, jnp.asarray(frames)))

    # ---- what the model can take ---------------------------------------------------------------------------------

    @property
    def uses_embedder(self) -> bool:
        return self.emotion.uses_embedder

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
        latent, face features, per-clip audio features, emotion sources); no clip is sampled yet.
        Raises :class:`InputError` for any unusable input. Arguments as :meth:`animate`."""
        self.check_emotion(emotion)
        speech = audio if isinstance(audio, Speech) else inputs_lib.load_speech(audio)
        if isinstance(image, np.ndarray):
            picture, image_name = np.asarray(image, np.uint8), "image"
        else:
            picture, image_name = inputs_lib.load_image(image), str(image)
        portrait = inputs_lib.prepare_portrait(picture, self.size, detect=detect, name=f"--image {image_name}")
        plan = plan_clips(speech.wave.size, self.fps, self.clip_frames, self.motion_frames, self.context_frames)
        sources = self.emotion_sources(emotion, detect=detect)
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
            portrait=portrait, speech=speech, plan=plan, mel=clip_audio_features(speech.wave, plan, self.mel_bins), emotion=sources,
            plan_arrays=sampling["plan"], scales=sampling["scales"], key=jax.random.key(seed), ref_latents=ref_latents,
            face_features=face_features, settings=settings, warnings=[*portrait.warnings, *speech.warnings],
        )  # fmt: skip

    def first_motion(self, job: Job) -> jax.Array | None:
        """Clip 0's motion latents: the reference latent repeated, ``(1, M, h, w, C)`` (None if M = 0)."""
        return jnp.repeat(job.ref_latents[:, None], self.motion_frames, axis=1) if self.motion_frames else None

    def render_clip(self, job: Job, k: int, motion: jax.Array | None) -> tuple[jax.Array, np.ndarray]:
        """Sample and decode clip ``k`` of ``job`` after ``motion (1, M, h, w, C)`` → latents
        ``(1, F, h, w, C)`` (on device) and frames ``(F, S, S, 3)`` uint8. Clip ``k``'s noise is
        ``fold_in(key(seed), k)``, so a clip can be re-rendered with other motion frames."""
        latents, pixels = self._clip_step(
            self.params, job.emotion, jnp.asarray(job.mel[k : k + 1]), job.ref_latents, job.face_features, motion,
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
            if job.plan.num_clips != first.plan.num_clips or job.scales != first.scales \
                    or jax.tree_util.tree_structure(job.emotion) != jax.tree_util.tree_structure(first.emotion) \
                    or (job.settings["steps"], job.settings["sampler"]) != (first.settings["steps"], first.settings["sampler"]):  # fmt: skip
                raise ValueError("render_jobs batches jobs with the same clip count, sampler, guidance and emotion-input kinds")
        emotion = jax.tree_util.tree_map(lambda *xs: jnp.concatenate([jnp.asarray(x) for x in xs]), *[j.emotion for j in jobs])
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

    def emotion_sources(self, spec: EmotionSpec, *, detect: bool = True) -> EmotionSources:
        """The video's emotion sources (batch 1); per-clip speech is added per clip.

        Emotion-to-Latents models: ``label (1, 6)`` (zeros when the label is dropped), ``drop (1, 3)``
        over (text, speech, label) — one kept — ``text (1, L, D)`` + ``text_mask``, and the MoE
        gate's ``palette (1, 6)`` with ``palette_keep (1,)`` (True for a label or palette). Embedder
        models: ``expression_frames (1, F, S, S, 3)`` in [-1, 1], ``mouth_mask (1, F, S, S)`` and
        ``embedder_audio (1, F, n_mels)`` (when the reference clip has sound) for ``video``; for
        ``audio`` each clip's speech.
        """
        self.check_emotion(spec)
        weights = np.zeros(NUM_EMOTIONS, np.float32) if spec.weights is None else np.asarray(spec.weights, np.float32)
        if self.uses_embedder:
            extra = self._reference_clip_inputs(spec.video, detect) if spec.kind == "video" else {}
            return EmotionSources(drop=np.zeros((1, 3), bool), palette=weights[None], palette_keep=np.zeros((1,), bool), **extra)
        keep_label = spec.kind in ("label", "palette")
        keep_text = spec.kind == "text"
        keep_speech = spec.kind == "audio"
        text = mask = None
        if keep_text:
            text, mask = self._encode_text(spec.text)
        return EmotionSources(
            drop=np.array([[not keep_text, not keep_speech, not keep_label]]),
            # The label's weights set the MoE's global gate; without a label the learned gate acts.
            palette=weights[None], palette_keep=np.array([keep_label]),
            label=weights[None] if "label" in self.emotion.sources else None, text=text, text_mask=mask,
        )  # fmt: skip

    def _encode_text(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        if self._text_encoder is None:
            from moee_jax.checkpoint.pretrained import load_t5_encoder

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
            mel = frame_log_mel(audio_window(sound, self.fps, start - c, f + 2 * c), self.fps, self.mel_bins)
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
        return self.system.encode_images(params, crop), self.system.face_features(params, face_mask)

    def clip_emotion(self, emotion: EmotionSources, mel: jax.Array) -> EmotionSources:
        """The videos' emotion sources on one clip: the clip's speech (per-frame log-mel of
        ``mel (B, F + 2c, n)``) filled in where the model takes speech, then checked."""
        per_frame = self.system.speech_features(mel)
        if self.uses_embedder:
            if emotion.expression_frames is None:
                emotion = dataclasses.replace(emotion, embedder_audio=per_frame)
        elif "speech" in self.emotion.sources:
            emotion = dataclasses.replace(emotion, speech=per_frame)
        return EmotionSources.make(self.emotion, **{f.name: getattr(emotion, f.name) for f in dataclasses.fields(emotion)})

    def clip_inputs(self, params, emotion: EmotionSources, mel, ref_latents, face_features, motion) -> ModelInputs:
        """The :class:`ModelInputs` of one clip of ``B`` videos (traceable): its audio windows from
        ``mel (B, F + 2c, n)`` and :meth:`clip_emotion`."""
        b = ref_latents.shape[0]
        return ModelInputs(
            ref_latents=ref_latents, context=self.system.context_tokens(params, b), reference_keep=jnp.ones((b,), bool),
            emotion=self.clip_emotion(emotion, mel), audio_windows=self.system.audio_windows(mel), motion_latents=motion,
            face_features=face_features,
        )  # fmt: skip

    def clip_conditions(self, params, emotion: EmotionSources, mel, ref_latents, face_features, motion) -> Conditions:
        """Everything clip ``mel`` is conditioned on, guidance's dropped alternatives included."""
        inputs = self.clip_inputs(params, emotion, mel, ref_latents, face_features, motion)
        return self.system.conditions(params, inputs, with_nulls=True)

    def _clip_step_fn(self, params, emotion, mel, ref_latents, face_features, motion, keys, k, plan, scales: tuple):
        """Clip ``k`` of ``B`` videos at once: conditions → guided sampling → decoding. ``keys (B,)``:
        each video's own noise key, so a video's noise does not depend on what it is batched with.
        → latents ``(B, F, h, w, C)`` and frames ``(B, F, S, S, 3)`` uint8."""
        cond = self.clip_conditions(params, emotion, mel, ref_latents, face_features, motion)
        split = jax.vmap(lambda key: jax.random.split(jax.random.fold_in(key, k)))(keys)  # (B, 2) keys
        shape = (self.clip_frames,) + ref_latents.shape[1:]
        x_T = jax.vmap(lambda r: jax.random.normal(r, shape, jnp.float32))(split[:, 0]).astype(ref_latents.dtype)

        def denoise(c, x, t):
            return self.system.denoise(params, c, x, t).prediction

        latents = sample_clip(denoise, cond, plan, dict(scales), x_T, split[0, 1])
        return latents, to_uint8(self.system.decode(params, latents))


_FLAG_OF_KIND = {"label": "--emotion", "palette": "--emotion", "text": "--emotion_text", "audio": "--emotion_from_audio",
                 "video": "--emotion_video"}  # fmt: skip
_SOURCE_OF_KIND = {"label": "label", "palette": "label", "text": "text", "audio": "speech"}
_FLAG_OF_SOURCE = {"label": "--emotion", "text": "--emotion_text", "speech": "--emotion_from_audio"}
