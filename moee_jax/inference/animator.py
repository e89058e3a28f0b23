"""The animator: a trained model ready to turn a portrait, a speech clip and an emotion into frames.

::

    animator = Animator.from_run("RUN")                   # RUN/stage2/final + RUN/stage2/config.json
    result = animator.animate("face.png", "speech.wav", parse_emotion("happy:0.6,surprised:0.4"))
    save_animation(result, "out.mp4")                     # moee_jax.inference.outputs

Per video (:meth:`Animator.prepare`): the portrait is face-cropped (:mod:`.inputs`) and encoded
once; the speech is cut into clips with training-identical audio features (:mod:`.long_audio`:
log-mel, or for a model trained on a feature cache the same wav2vec2 windows, the encoders found by
:mod:`.encoders`); the emotion becomes typed :class:`~moee_jax.models.conditioning.EmotionSources`. Per clip, one jitted
function builds the clip's :class:`~moee_jax.models.system.ModelInputs`, runs the system's
conditioning (ReferenceNet and the conditioning paths, once per clip), the guided sampler
(:func:`moee_jax.inference.sampling.sample_clip`: every CFG branch in one U-Net call per step) and
the decoder. Every clip of every video has the same shapes, so it compiles once per Animator,
emotion kind and batch size; :meth:`Animator.render_jobs` renders several videos in one batch.

Emotion requests (:class:`~moee_jax.inference.inputs.EmotionSpec`: a label, a compound palette, a
text, the speech itself or a reference clip) are checked and turned into emotion sources by
:mod:`.emotion_inputs`.

The unconditional emotion branch of classifier-free guidance is what training's dropped emotion is:
the model's learned null tokens (all modalities dropped) with the learned gate (no palette).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from moee_jax.checkpoint.run import RunCheckpoint, load_run_config, resolve_checkpoint, restore_final
from moee_jax.data.feature_cache import MANIFEST, read_run_manifest
from moee_jax.diffusion import make_schedule
from moee_jax.inference import inputs as inputs_lib
from moee_jax.inference.compounds import MODES as COMPOUND_MODES
from moee_jax.inference.compounds import CompoundRows, compound_rows
from moee_jax.inference.compounds import components as compound_components
from moee_jax.inference.emotion_inputs import EmotionInputs
from moee_jax.inference.encoders import ModelEncoders, projection_inputs
from moee_jax.inference.inputs import EmotionSpec, InputError, Speech
from moee_jax.inference.job import Animation, Job
from moee_jax.inference.long_audio import MOTION_SOURCES, clip_audio_features, clip_feature_windows, plan_clips, roll_clips
from moee_jax.inference.sampling import sample_clip, sampling_settings
from moee_jax.models.conditioning import EmotionSources
from moee_jax.models.features import to_uint8
from moee_jax.models.space_to_depth import SpaceToDepthAutoencoder
from moee_jax.models.system import Conditions, MoEESystem
from moee_jax.xla_options import compiler_options

REQUIRED_PARTS = ("vae", "face_locator", "context", "reference_net", "unet", "conditioning")
TEXT_LENGTH = 32  # the training pipeline's default data.text_length


class Animator:
    """A stage-2 model ready to animate portraits; see the module docstring.

    ``config``: the run's resolved config; ``params``: the whole system's parameters (parts
    :data:`REQUIRED_PARTS`); ``text_encoder``: a T5 folder for ``--emotion_text`` (models with a text
    emotion source only); ``audio_encoder``: the wav2vec2 folder of a model trained on a feature cache;
    ``features``: the ``features.json`` the model was trained with (read from ``features_path``; see
    :mod:`.encoders`, which also says where encoders not given are looked for).
    """

    def __init__(self, config: ConfigDict, params: dict, *, source: str = "", text_encoder: str | os.PathLike | None = None,
                 audio_encoder: str | os.PathLike | None = None, features: dict | None = None, features_path: str = ""):  # fmt: skip
        missing = [p for p in REQUIRED_PARTS if p not in params]
        if missing:
            raise InputError(f"--checkpoint {source}: parameters of {missing} are missing (it holds {sorted(params)})")
        self.config, self.params, self.source = config, params, source
        self.encoders = ModelEncoders.of_model(config, features, features_path, audio_encoder=audio_encoder,
                                               text_encoder=text_encoder, source=source)  # fmt: skip
        self._audio_encoder = None
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
        self.text_length = int(self.encoders.text_length or data.get("text_length", TEXT_LENGTH))
        if self.encoders.audio is None and self.mel_bins < 1:
            raise InputError(f"--checkpoint {source}: config.data.mel_bins={self.mel_bins}; the model has no audio features to drive it")
        if self.encoders.audio is not None and self.emotion.uses_embedder:
            raise InputError(
                f"--checkpoint {source}: an emotion-embedder model trained on wav2vec2 audio features cannot be animated yet "
                "(its embedder takes log-mel, its audio projection wav2vec2 windows)"
            )
        self.emotion_inputs = EmotionInputs(self.emotion, self.encoders, size=self.size, downsample=self.downsample, fps=self.fps,
                                            clip_frames=self.clip_frames, context_frames=self.context_frames,
                                            mel_bins=self.mel_bins, text_length=self.text_length)  # fmt: skip
        self.compound_mixing = str(config.get("compound_mixing", "guidance"))
        if self.compound_mixing not in COMPOUND_MODES:
            raise InputError(f"--checkpoint {source}: config.compound_mixing={self.compound_mixing!r}; choose one of {COMPOUND_MODES}")
        self._prepare = jax.jit(self._prepare_fn, compiler_options=compiler_options())
        # Guidance scales are static: a branch a scale gives no weight is then left out of the batch.
        self._clip_step = jax.jit(self._clip_step_fn, static_argnames=("scales",), compiler_options=compiler_options())

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, *, text_encoder: str | os.PathLike | None = None,
                 audio_encoder: str | os.PathLike | None = None) -> Animator:  # fmt: skip
        """Load ``RUN/stage2/final``, ``RUN/stage2/config.json`` and, for a model trained on a feature
        cache, ``RUN/stage2/features.json`` (``run_dir`` may also be the stage or ``final`` directory).
        Raises :class:`~moee_jax.checkpoint.run.RunError` for a missing, unfinished or wrong-stage run."""
        checkpoint = resolve_checkpoint(run_dir)
        features = read_run_manifest(checkpoint.config.parent)
        animator = cls(load_run_config(checkpoint), restore_final(checkpoint.final), source=str(run_dir), text_encoder=text_encoder,
                       audio_encoder=audio_encoder, features=features, features_path=str(checkpoint.config.parent / MANIFEST))  # fmt: skip
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
            self._round_trip = jax.jit(lambda params, x: to_uint8(self.system.decode(params, self.system.encode_images(params, x))),
                                       compiler_options=compiler_options())
        return np.asarray(self._round_trip(self.params, jnp.asarray(frames)))

    # ---- what the model can take ---------------------------------------------------------------------------------

    @property
    def uses_embedder(self) -> bool:
        return self.emotion.uses_embedder

    def check_emotion(self, spec: EmotionSpec) -> None:
        """Raise :class:`InputError` when this model cannot take ``spec`` (:meth:`.EmotionInputs.check`)."""
        self.emotion_inputs.check(spec)

    def emotion_sources(self, spec: EmotionSpec, *, detect: bool = True) -> EmotionSources:
        """The video's emotion sources, batch 1 (:meth:`.EmotionInputs.sources`); per-clip speech is
        added per clip by :meth:`.MoEESystem.clip_emotion`."""
        return self.emotion_inputs.sources(spec, detect=detect)

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
        motion: str = "chain",
    ) -> Job:
        """Check and load every input of one video and compute its per-video tensors (reference
        latent, face features, per-clip audio features, emotion sources); no clip is sampled yet.
        Raises :class:`InputError` for any unusable input. Arguments as :meth:`animate` describes."""
        self.check_emotion(emotion)
        if motion not in MOTION_SOURCES:
            raise InputError(f"--motion {motion!r}: choose one of {MOTION_SOURCES}")
        sampling = sampling_settings(self.config, self.schedule, steps=steps, sampler=sampler, guidance=guidance)
        speech = inputs_lib.video_speech(audio, self.fps)
        portrait, image_name = inputs_lib.video_portrait(image, self.size, detect=detect)
        plan = plan_clips(speech.wave.size, self.fps, self.clip_frames, self.motion_frames, self.context_frames)
        sources = self.emotion_sources(emotion, detect=detect)
        mel = windows = None  # the clips' audio inputs, before anything is compiled (encoder checks fail fast)
        if self.encoders.audio is None:
            mel = clip_audio_features(speech.wave, plan, self.mel_bins)
        else:
            windows = clip_feature_windows(self._audio_features(speech.wave, plan.num_frames), plan)
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
            "motion": motion,
            "audio_features": "log-mel" if self.encoders.audio is None else f"wav2vec2 {self.encoders.audio_folder}",
        }
        if compound_components(sources):
            settings["compound_mixing"] = self.compound_mixing
        return Job(
            portrait=portrait, speech=speech, plan=plan, mel=mel, emotion=sources,
            plan_arrays=sampling["plan"], scales=sampling["scales"], key=jax.random.key(seed), ref_latents=ref_latents,
            face_features=face_features, settings=settings, warnings=[*portrait.warnings, *speech.warnings], audio_features=windows,
        )  # fmt: skip

    def compound_rows(self, emotions: list[EmotionSources]) -> CompoundRows | None:
        """The batch rows of videos with these emotions when compounds mix the experts' predictions
        (``compound_mixing == "guidance"``, :mod:`.compounds`); None when the rows are the videos."""
        return compound_rows(emotions) if self.compound_mixing == "guidance" else None

    def first_motion(self, job: Job) -> jax.Array | None:
        """Clip 0's motion latents: the reference latent repeated, ``(1, M, h, w, C)`` (None if M = 0)."""
        return jnp.repeat(job.ref_latents[:, None], self.motion_frames, axis=1) if self.motion_frames else None

    def render_clip(self, job: Job, k: int, motion: jax.Array | None) -> tuple[jax.Array, np.ndarray]:
        """Sample and decode clip ``k`` of ``job`` after ``motion (1, M, h, w, C)`` → latents
        ``(1, F, h, w, C)`` (on device) and frames ``(F, S, S, 3)`` uint8. Clip ``k``'s noise is
        ``fold_in(key(seed), k)``, so a clip can be re-rendered with other motion frames."""
        latents, pixels = self._clip_step(self.params, job.emotion, jnp.asarray(job.clip_audio(k)), job.ref_latents, job.face_features,
                                          motion, job.key[None], jnp.int32(k), job.plan_arrays, scales=tuple(sorted(job.scales.items())))  # fmt: skip
        return latents, np.asarray(pixels[0])

    def compiled_programs(self) -> int:
        """How many programs the model's jitted preparation and clip step hold (a request whose
        shapes were seen before adds none)."""
        return int(self._prepare._cache_size() + self._clip_step._cache_size())

    def animate(
        self,
        image: str | os.PathLike | np.ndarray,
        audio: str | os.PathLike | Speech,
        emotion: EmotionSpec,
        *,
        progress: Callable[[int, int], None] | None = None,
        **options,
    ) -> Animation:
        """Animate ``image`` (a path or ``(H, W, 3)`` uint8) speaking ``audio`` (a path or loaded
        :class:`Speech`) with ``emotion``.

        ``options`` are :meth:`prepare`'s: ``steps`` / ``sampler`` (``ddim`` | ``dpmpp_2m``) default to the config's; ``guidance`` maps
        ``reference`` / ``audio`` / ``emotion`` to their CFG scales (missing or None: the config's);
        ``motion`` where clips after the first take their motion frames (``chain``: the last generated
        ones, the default; ``reference``: the portrait repeated, as clip 0; :mod:`.long_audio`);
        ``detect=False`` takes the image as a face crop. ``progress(done, total)`` is called after
        each clip. ``settings["seconds"]`` is the whole call's time, ``settings["sampling_seconds"]``
        the clip loop's (:meth:`render_job`). → :class:`Animation` with ``frames (T, S, S, 3)`` uint8,
        ``T = num_video_frames(len(audio), 16 kHz, fps)``, and the warnings the user should see (an
        upsampled face crop, silent audio).
        """
        t0 = time.perf_counter()
        job = self.prepare(image, audio, emotion, **options)
        t1 = time.perf_counter()
        video = self.render_job(job, progress)
        t2 = time.perf_counter()
        settings = dict(job.settings, seconds=round(t2 - t0, 2), sampling_seconds=round(t2 - t1, 3), warnings=job.warnings)
        return Animation(video, job.speech.wave, self.fps, job.portrait, job.plan, settings, job.warnings)

    def render_job(self, job: Job, progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """Every clip of a prepared ``job`` in order, motion frames handed from each clip to the next
        (clip 0's are the reference latent repeated, and so are every clip's with ``motion="reference"``; clip ``k``'s noise is ``fold_in(key(seed), k)``)
        → ``(T, S, S, 3)`` uint8; ``progress(done, total)`` after each clip. A batch of one of
        :meth:`render_jobs`."""
        return self.render_jobs([job], progress)[0]

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
                    or (job.settings["steps"], job.settings["sampler"], job.settings["motion"]) \
                    != (first.settings["steps"], first.settings["sampler"], first.settings["motion"]):  # fmt: skip
                raise ValueError(
                    "render_jobs batches jobs with the same clip count, sampler, guidance, motion source and emotion-input kinds"
                )
        rows = self.compound_rows([j.emotion for j in jobs])
        video = np.arange(len(jobs)) if rows is None else rows.video  # the job of each batch row
        if rows is None:  # one job's leaves as they are (an analysis pair may hold unbatched leaves)
            emotion = jax.tree_util.tree_map(lambda *xs: xs[0] if len(xs) == 1 else jnp.concatenate([jnp.asarray(x) for x in xs]),
                                             *[j.emotion for j in jobs])  # fmt: skip
        else:
            emotion = jax.tree_util.tree_map(jnp.asarray, rows.emotion)
        mix = None if rows is None else jnp.asarray(rows.mix)
        ref = jnp.concatenate([j.ref_latents for j in jobs])[video]
        faces = jnp.concatenate([j.face_features for j in jobs])[video]
        keys = jnp.stack([j.key for j in jobs])[video]  # a compound's rows share its noise
        motion0 = jnp.repeat(ref[:, None], self.motion_frames, axis=1) if self.motion_frames else None
        frames: list[np.ndarray] = []

        def one_clip(k, motion):
            audio = jnp.asarray(np.concatenate([j.clip_audio(k) for j in jobs])[video])
            latents, pixels = self._clip_step(self.params, emotion, audio, ref, faces, motion, keys, jnp.int32(k), first.plan_arrays,
                                              scales=tuple(sorted(first.scales.items())), mix=mix)  # fmt: skip
            pixels = np.asarray(pixels)
            frames.append(pixels if rows is None else pixels[rows.output])
            return latents

        for k, _ in roll_clips(one_clip, motion0, first.plan, motion=first.settings["motion"]):
            if progress is not None:
                progress(k + 1, first.plan.num_clips)
        video = np.concatenate(frames, axis=1)  # (B, clips·F, S, S, 3)
        return [video[i, : job.plan.num_frames] for i, job in enumerate(jobs)]

    # ---- conditioning inputs ---------------------------------------------------------------------------------------

    def _audio_features(self, wave: np.ndarray, num_frames: int) -> np.ndarray:
        """The speech's per-frame wav2vec2 features ``(T, layers + 1, D)``, as the feature cache made
        them for the training clips (:func:`~moee_jax.data.audio_features.audio_frame_features`)."""
        from moee_jax.data.audio_features import audio_frame_features

        if self._audio_encoder is None:
            speech_dim = self.emotion.speech_dim if "speech" in self.emotion.sources else None
            self._audio_encoder = self.encoders.load_audio(
                window=2 * self.context_frames + 1, projection_inputs=projection_inputs(self.params), speech_dim=speech_dim
            )
        return audio_frame_features(wave, self._audio_encoder, fps=self.fps, num_frames=num_frames)

    # ---- jitted pieces ---------------------------------------------------------------------------------------------

    def _prepare_fn(self, params, crop, face_mask):
        """``crop (1, S, S, 3)`` uint8, ``face_mask (1, F, m, m)`` → reference latent ``(1, h, w, C)``
        and face-locator features ``(1, F, h, w, C0)``."""
        return self.system.encode_images(params, crop), self.system.face_features(params, face_mask)

    def clip_conditions(self, params, emotion: EmotionSources, audio, ref_latents, face_features, motion) -> Conditions:
        """Everything the clip of ``audio`` is conditioned on (:meth:`.MoEESystem.clip_inputs`),
        guidance's dropped alternatives included."""
        inputs = self.system.clip_inputs(params, emotion, audio, ref_latents, face_features, motion)
        return self.system.conditions(params, inputs, with_nulls=True)

    def _clip_step_fn(self, params, emotion, audio, ref_latents, face_features, motion, keys, k, plan, scales: tuple, mix=None):
        """Clip ``k`` of ``B`` videos at once: conditions → guided sampling → decoding. ``keys (B,)``:
        each video's own noise key, so a video's noise does not depend on what it is batched with;
        ``mix (B, B)``: rows whose predictions are mixed (compound emotions, :mod:`.compounds`).
        → latents ``(B, F, h, w, C)`` and frames ``(B, F, S, S, 3)`` uint8."""
        cond = self.clip_conditions(params, emotion, audio, ref_latents, face_features, motion)
        split = jax.vmap(lambda key: jax.random.split(jax.random.fold_in(key, k)))(keys)  # (B, 2) keys
        shape = (self.clip_frames,) + ref_latents.shape[1:]
        x_T = jax.vmap(lambda r: jax.random.normal(r, shape, jnp.float32))(split[:, 0]).astype(ref_latents.dtype)

        def denoise(c, x, t):
            return self.system.denoise(params, c, x, t).prediction

        latents = sample_clip(denoise, cond, plan, dict(scales), x_T, split[0, 1], mix=mix)
        return latents, to_uint8(self.system.decode(params, latents))
