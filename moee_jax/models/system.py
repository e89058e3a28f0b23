"""The whole MoEE system, built once from a config: every part, and what is done with them.

Parts (one parameter subtree each)::

    vae            autoencoder (KL or lossless space-to-depth) and its latent statistics
    face_locator   face-region mask → features added after the U-Net's conv_in (Hallo)
    context        learned cross-attention context tokens
    reference_net  ReferenceNet: the reference latent's per-block states (AnimateAnyone / Hallo)
    unet           the video U-Net, its emotion slot the Emotion MoE (MoEE Design 1)
    conditioning   audio projection (Hallo) + Emotion-to-Latents (MoEE Design 2) or DICE-Talk's
                   Gaussian embedder (+ emotion bank)
    discriminator  DICE-Talk's emotion discrimination head (eq. 16), when configured

The flow, shared by training, animation, evaluation and analysis::

    pipeline batch ──encode──▶ (latents, ModelInputs) ──conditions──▶ Conditions ──denoise──▶ prediction
    portrait, speech ──────────▶ ModelInputs (the animator builds them per clip)

:class:`ModelInputs` is the typed contract between data and model: per clip the reference latent,
context, face features, motion latents, audio feature windows and the :class:`EmotionSources`.
:meth:`MoEESystem.conditions` runs ReferenceNet and the conditioning paths once per clip into
:class:`Conditions` — everything each denoiser evaluation reads, the emotion always an
:class:`~moee_jax.models.emotion_moe.EmotionCondition`; :meth:`MoEESystem.denoise` is one U-Net
evaluation (optionally recording the Emotion MoE's gates and every other ``sow``).
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

from moee_jax.models.build import build_backbone
from moee_jax.models.conditioning import AudioConfig, Conditioning, ConditioningOutput, EmotionConfig, EmotionSources
from moee_jax.models.context import ContextTokens
from moee_jax.models.emotion_discriminator import EmotionDiscriminator
from moee_jax.models.emotion_moe import EmotionCondition, EmotionMoE
from moee_jax.models.features import frame_mel, mel_windows, to_unit, upsample
from moee_jax.models.reference import reference_config, reference_features
from moee_jax.models.unet import UNetConfig, VideoUNet
from moee_jax.models.vae import decode_latents, encode_to_latents

PARTS = ("vae", "face_locator", "context", "reference_net", "unet", "conditioning", "discriminator")
LABEL_ONLY = (True, True, False)  # emotion drop flags over (text, speech, label): the label alone


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ModelInputs:
    """Everything one batch of clips is generated from (batch ``B``, ``F`` frames, latents ``h × w × C``).

    ``ref_latents (B, h, w, C)`` the reference image's latent · ``context (B, Lc, D)`` ·
    ``reference_keep (B,)`` bool (False: the reference is dropped, a guidance branch) ·
    ``emotion`` :class:`EmotionSources` · ``audio_windows (B, F, W, layers, D_a)`` per-frame audio
    feature windows (zeros: no audio) · ``motion_latents (B, M, h, w, C)`` the frames before the
    clip · ``face_features (B, F, h, w, C0)`` the face locator's. The last three may be None.
    """

    ref_latents: jax.Array
    context: jax.Array
    reference_keep: jax.Array
    emotion: EmotionSources
    audio_windows: jax.Array | None = None
    motion_latents: jax.Array | None = None
    face_features: jax.Array | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Conditions:
    """:class:`ModelInputs` after ReferenceNet and the conditioning paths: what every denoiser
    evaluation of the clips reads. ``reference`` is ReferenceNet's per-block tree; ``audio
    (B, F, La, D)`` audio tokens; ``emotion`` the :class:`EmotionCondition`. For guidance, the
    dropped alternatives: ``null_audio`` (the tokens of all-zero audio windows, what training's
    dropped audio is) and ``null_emotion`` (null tokens, no palette). ``vq_loss``, ``emotion_mu``,
    ``emotion_sigma``: the conditioning's auxiliary outputs."""

    ref_latents: jax.Array
    context: jax.Array
    reference: dict
    reference_keep: jax.Array
    emotion: EmotionCondition
    audio: jax.Array | None = None
    motion_latents: jax.Array | None = None
    face_features: jax.Array | None = None
    null_audio: jax.Array | None = None
    null_emotion: EmotionCondition | None = None
    vq_loss: jax.Array | None = None
    emotion_mu: jax.Array | None = None
    emotion_sigma: jax.Array | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DenoiserOutput:
    """One U-Net evaluation: ``prediction (B, F, h, w, C)``; ``emotion_logits (B, classes)`` of the
    discriminator (None without one); ``gate_logits``, one ``(B·(M+F), 7)`` array per Emotion MoE
    layer (empty without a gate network); ``intermediates`` every ``sow`` of the U-Net when
    ``capture`` was asked for (else None)."""

    prediction: jax.Array
    emotion_logits: jax.Array | None = None
    gate_logits: tuple = ()
    intermediates: dict | None = None


def _sown(tree, name: str) -> list[jax.Array]:
    """Every value sown under ``name`` anywhere in an intermediates tree, in tree order."""
    out = []
    for key, value in tree.items() if isinstance(tree, dict) else ():
        if key == name:
            out.extend(value)
        else:
            out.extend(_sown(value, name))
    return out


class MoEESystem:
    """Every part of the model, built once from a config (see the module docstring).

    ``config``: a stage config (``configs/training.py``): ``model``, ``video``, ``diffusion``,
    ``data`` (the clip layout: frames, motion frames, audio context, mel bins, mask downsampling).
    """

    def __init__(self, config: ConfigDict):
        self.config = config
        dtype = jnp.dtype(config.dtype)
        backbone = build_backbone(config)
        self.vae, self.face_locator = backbone.vae, backbone.face_locator
        self.emotion = EmotionConfig.from_dict(config.model.emotion.to_dict())
        unet = UNetConfig.from_dict(config.model.unet.to_dict())
        slot = functools.partial(EmotionMoE, heads=self.emotion.moe_heads, variant=self.emotion.moe_variant,
                                 implementation=unet.attention_implementation)  # fmt: skip
        unet = unet.replace(emotion_slot=slot, emotion_dim=self.emotion.token_dim)
        self.unet = VideoUNet(unet, dtype=dtype)
        self.refnet = VideoUNet(reference_config(unet), dtype=dtype)
        self.conditioning = Conditioning(self.emotion, AudioConfig(**config.model.audio.to_dict()), unet.audio_dim, dtype=dtype)
        self.discriminator = (
            EmotionDiscriminator(self.emotion.num_classes, self.emotion.discriminator_hidden, dtype=dtype)
            if self.emotion.discriminator
            else None
        )
        self.context = ContextTokens(int(config.model.context_tokens), unet.cross_attention_dim)
        self.downsample = self.vae.downsample_factor
        data = config.data
        self.clip_frames, self.motion_frames = int(data.num_frames), int(data.motion_frames)
        self.audio_context = int(data.audio_context_frames)
        if int(data.mask_downsample) != self.downsample:
            raise ValueError(
                f"config.data.mask_downsample={data.mask_downsample} must equal the autoencoder's downsampling {self.downsample}"
            )

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(p for p in PARTS if p != "discriminator" or self.discriminator is not None)

    # ---- pixels and features --------------------------------------------------------------------------

    def encode_images(self, params: dict, pixels: jax.Array) -> jax.Array:
        """uint8 images ``(B, [F,] S, S, 3)`` → diffusion latents (no gradient into the autoencoder)."""
        return jax.lax.stop_gradient(encode_to_latents(self.vae, jax.lax.stop_gradient(params["vae"]), to_unit(pixels)))

    def decode(self, params: dict, latents: jax.Array) -> jax.Array:
        """Diffusion latents ``(B, [F,] h, w, C)`` → images in [-1, 1]."""
        return decode_latents(self.vae, jax.lax.stop_gradient(params["vae"]), latents)

    def face_features(self, params: dict, face_mask: jax.Array) -> jax.Array:
        """Face-region masks ``(B, F, m, m)`` at latent resolution → the locator's ``(B, F, h, w, C0)``."""
        return self.face_locator.apply({"params": params["face_locator"]}, upsample(face_mask, self.downsample)[..., None])

    def context_tokens(self, params: dict, batch: int) -> jax.Array:
        return self.context.apply({"params": params["context"]}, batch)

    def audio_windows(self, audio: jax.Array) -> jax.Array:
        """A clip's audio input → per-frame windows: per-frame log-mel of the clip and its context
        ``(B, F + 2c, n)`` → ``(B, F, 2c+1, 1, n)``; encoder windows ``(B, F, 2c+1, layers+1, D)``
        (the pipeline's ``audio_features`` from a feature cache) are windows already."""
        if audio.ndim == 5:
            return audio
        return mel_windows(audio, self.clip_frames, self.audio_context)

    def speech_features(self, audio: jax.Array) -> jax.Array:
        """The speech emotion source of a clip ``(B, F, n)``: the per-frame log-mel of its frames, or
        for encoder windows ``(B, F, 2c+1, layers+1, D)`` each frame's own last-layer state (the
        window centre): what the pipeline's ``speech_features`` of a feature cache are."""
        if audio.ndim == 5:
            return audio[:, :, self.audio_context, -1]
        return frame_mel(audio, self.clip_frames, self.audio_context)

    # ---- the training batch ---------------------------------------------------------------------------

    def encode(self, params: dict, batch: dict, *, drop: bool = True) -> tuple[jax.Array, jax.Array, ModelInputs]:
        """A pipeline batch (:mod:`moee_jax.data.pipeline`) → ``(latents (B, F, h, w, C), frames in
        [-1, 1], ModelInputs)``. ``drop=False`` keeps the reference and audio and takes the emotion
        from the label alone, as ``moee animate --emotion`` does; else the batch's dropout flags and
        emotion modes apply."""
        frames = to_unit(batch["frames"])
        latents = self.encode_images(params, batch["frames"])
        b = frames.shape[0]
        # Cached encoder windows (data.features) when the batch has them, else the log-mel.
        windows = self.audio_windows(batch["audio_features"] if "audio_features" in batch else batch["mel"])
        keep_audio = ~batch["drop_audio"] if drop else jnp.ones((b,), bool)
        inputs = ModelInputs(
            ref_latents=self.encode_images(params, batch["reference"]),
            context=self.context_tokens(params, b),
            reference_keep=~batch["drop_reference"] if drop else jnp.ones((b,), bool),
            emotion=self.batch_emotion(batch, drop=drop),
            audio_windows=windows * keep_audio[:, None, None, None, None].astype(windows.dtype),
            motion_latents=self.encode_images(params, batch["motion_frames"]) if self.motion_frames else None,
            face_features=self.face_features(params, batch["face_mask"]),
        )
        return latents, frames, inputs

    def batch_emotion(self, batch: dict, *, drop: bool = True) -> EmotionSources:
        """The emotion sources of a pipeline batch (see :meth:`encode` for ``drop``)."""
        b = batch["palette"].shape[0]
        if self.emotion.uses_embedder:
            # The emotion comes from the clip itself: the learned gate acts (its loss still sees the palette).
            return EmotionSources.make(
                self.emotion, drop=jnp.zeros((b, 3), bool), palette=batch["palette"], palette_keep=jnp.zeros((b,), bool),
                embedder_audio=self.speech_features(batch["mel"]), expression_frames=to_unit(batch["frames"]),
                mouth_mask=upsample(batch["mouth_mask"], self.downsample),
            )  # fmt: skip
        flags = batch["emotion_drop"] if drop else jnp.broadcast_to(jnp.array(LABEL_ONLY), (b, 3))
        if "speech_features" in batch:  # a feature cache's (wav2vec2), else the log-mel's
            speech = batch["speech_features"]
        else:
            speech = self.speech_features(batch["mel"]) if "mel" in batch else None
        return EmotionSources.make(
            self.emotion, drop=flags, palette=batch["palette"], palette_keep=~flags[:, 2], label=batch["palette"],
            text=batch.get("text_features"), text_mask=batch.get("text_mask"),
            speech=speech, speech_mask=batch.get("speech_mask"),
        )  # fmt: skip

    # ---- one clip at inference ------------------------------------------------------------------------

    def clip_emotion(self, emotion: EmotionSources, audio: jax.Array) -> EmotionSources:
        """Videos' emotion sources on one clip: the clip's speech (:meth:`speech_features` of ``audio``,
        log-mel ``(B, F + 2c, n)`` or encoder windows) filled in where the model takes speech, as
        :meth:`batch_emotion` takes it from a training clip, then checked."""
        per_frame = self.speech_features(audio)
        if self.emotion.uses_embedder:
            if emotion.expression_frames is None:
                emotion = dataclasses.replace(emotion, embedder_audio=per_frame)
        elif "speech" in self.emotion.sources:
            emotion = dataclasses.replace(emotion, speech=per_frame)
        return EmotionSources.make(self.emotion, **{f.name: getattr(emotion, f.name) for f in dataclasses.fields(emotion)})

    def clip_inputs(self, params: dict, emotion: EmotionSources, audio: jax.Array, ref_latents: jax.Array,
                    face_features: jax.Array, motion: jax.Array | None) -> ModelInputs:  # fmt: skip
        """The :class:`ModelInputs` of one clip of ``B`` videos at inference (:meth:`encode` with
        ``drop=False``, from already encoded parts): ``audio`` the clip's log-mel ``(B, F + 2c, n)``
        or encoder windows, ``ref_latents (B, h, w, C)``, ``face_features (B, F, h, w, C0)``,
        ``motion (B, M, h, w, C)`` latents or None."""
        b = ref_latents.shape[0]
        return ModelInputs(
            ref_latents=ref_latents, context=self.context_tokens(params, b), reference_keep=jnp.ones((b,), bool),
            emotion=self.clip_emotion(emotion, audio), audio_windows=self.audio_windows(audio), motion_latents=motion,
            face_features=face_features,
        )  # fmt: skip

    # ---- conditioning and denoising -------------------------------------------------------------------

    def _conditioning(self, params: dict, audio_windows, sources: EmotionSources, *, train: bool, rng=None) -> ConditioningOutput:
        rngs = {} if rng is None else {"sample": rng, "dropout": jax.random.fold_in(rng, 1)}
        return self.conditioning.apply({"params": params["conditioning"]}, audio_windows, sources, train=train, rngs=rngs)

    def conditions(self, params: dict, inputs: ModelInputs, *, train: bool = False, rng: jax.Array | None = None,
                   with_nulls: bool = False) -> Conditions:  # fmt: skip
        """ReferenceNet and the conditioning paths, once per clip. ``rng`` feeds the embedder's
        sampling and dropout (training); ``with_nulls`` adds the dropped alternatives for guidance."""
        reference = reference_features(self.refnet, params["reference_net"], inputs.ref_latents, inputs.context)
        out = self._conditioning(params, inputs.audio_windows, inputs.emotion, train=train, rng=rng)
        null_audio = null_emotion = None
        if with_nulls:
            if inputs.audio_windows is not None:
                null_audio = self._conditioning(params, jnp.zeros_like(inputs.audio_windows), inputs.emotion, train=False).audio
            if not self.emotion.uses_embedder:
                null_emotion = self._conditioning(params, None, inputs.emotion.dropped(), train=False).emotion
        return Conditions(
            ref_latents=inputs.ref_latents, context=inputs.context, reference=reference, reference_keep=inputs.reference_keep,
            emotion=out.emotion, audio=out.audio, motion_latents=inputs.motion_latents, face_features=inputs.face_features,
            null_audio=null_audio, null_emotion=null_emotion, vq_loss=out.vq_loss, emotion_mu=out.emotion_mu,
            emotion_sigma=out.emotion_sigma,
        )  # fmt: skip

    def denoise(self, params: dict, cond: Conditions, noisy: jax.Array, timesteps: jax.Array, *, use_emotion: bool = True,
                capture: bool = False) -> DenoiserOutput:  # fmt: skip
        """One U-Net evaluation of ``noisy (B, F, h, w, C)`` at ``timesteps (B,)``. ``use_emotion=False``
        skips the emotion slot (MoEE's stage 1 trains the backbone without it; the MoE's zero-initialised
        output makes the two agree at the start of stage 2). ``capture`` keeps every ``sow``."""
        kwargs = self._unet_kwargs(cond, use_emotion)
        pred, state = self.unet.apply({"params": params["unet"]}, noisy, timesteps, cond.context, **kwargs, mutable=["intermediates"])
        inter = state.get("intermediates", {})
        logits = None
        if self.discriminator is not None:
            features = inter["mid_features"][0]
            frames = features.shape[0] // noisy.shape[0]
            logits = self.discriminator.apply(
                {"params": params["discriminator"]}, features.reshape((noisy.shape[0], frames) + features.shape[1:])
            )
        return DenoiserOutput(pred, logits, tuple(_sown(inter, "global_gate_logits")), inter if capture else None)

    def _unet_kwargs(self, cond: Conditions, use_emotion: bool = True) -> dict:
        kw = {"reference": cond.reference, "reference_keep": cond.reference_keep, "emotion": cond.emotion if use_emotion else None,
              "motion_frames": cond.motion_latents, "face_locator": cond.face_features, "audio": cond.audio}  # fmt: skip
        if self.unet.config.reference_concat:
            kw["reference_latents"] = cond.ref_latents
        return kw

    # ---- parameters -----------------------------------------------------------------------------------

    def init(self, rng: jax.Array, batch: dict) -> dict:
        """Boxed params of every part (logical axis names kept for sharding) from an example batch."""
        r_model, r_loc, r_ctx, r_vae = jax.random.split(rng, 4)
        b = batch["frames"].shape[0]
        params = {
            "vae": self.vae.init(r_vae, to_unit(batch["frames"][:1, 0]))["params"],
            "face_locator": self.face_locator.init(r_loc, upsample(batch["face_mask"], self.downsample)[..., None])["params"],
            "context": self.context.init(r_ctx, b)["params"],
        }
        latents, _, inputs = self.encode(nn.unbox(params), batch)
        t = jnp.zeros((b,), jnp.int32)
        r_ref, r_unet, r_cond, r_disc, r_sample = jax.random.split(r_model, 5)
        ref_vars = self.refnet.init(r_ref, inputs.ref_latents[:, None], t, inputs.context)
        reference = reference_features(self.refnet, nn.unbox(ref_vars["params"]), inputs.ref_latents, inputs.context)
        rngs = {"params": r_cond, "sample": r_sample, "dropout": r_sample}
        cond_vars = self.conditioning.init(rngs, inputs.audio_windows, inputs.emotion, train=True)
        out = self.conditioning.apply(cond_vars, inputs.audio_windows, inputs.emotion, train=True,
                                      rngs={"sample": r_sample, "dropout": r_sample})  # fmt: skip
        cond = Conditions(inputs.ref_latents, inputs.context, reference, inputs.reference_keep, out.emotion, out.audio,
                          inputs.motion_latents, inputs.face_features)  # fmt: skip
        kwargs = self._unet_kwargs(cond)
        unet_vars = self.unet.init(r_unet, latents, t, inputs.context, **kwargs)
        params.update(reference_net=ref_vars["params"], unet=unet_vars["params"], conditioning=cond_vars["params"])
        if self.discriminator is not None:
            _, inter = self.unet.apply(unet_vars, latents, t, inputs.context, **kwargs, mutable=["intermediates"])
            params["discriminator"] = self.discriminator.init(r_disc, inter["intermediates"]["mid_features"][0])["params"]
        return params
