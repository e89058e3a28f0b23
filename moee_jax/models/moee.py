"""The full MoEE model: backbone + every conditioning path, as one set of parameter trees.

Parts (each its own Flax module and parameter subtree):
  ``reference_net``  ReferenceNet (spatial U-Net at t = 0 on the reference latent)
  ``unet``           the video U-Net whose emotion slot is the Emotion MoE (MoEE Design 1)
  ``conditioning``   audio projection (Hallo) and the emotion source: Emotion-to-Latents over
                     label / text / speech features (MoEE Design 2), or DICE-Talk's Gaussian
                     embedder over a reference clip, optionally through the emotion bank
  ``discriminator``  DICE-Talk's emotion discrimination head on the U-Net bottleneck (eq. 16)

Batch keys (per clip, batch B; all features precomputed by the frozen encoders):
  ref_latents (B, h, w, C) · context (B, Lc, D_ctx)
  audio_windows (B, F, W, layers, D_a)                      → audio tokens
  audio_mask (B, F, h, w)                                    region gate (optional)
  emotion_label (B, 6) · text_features (B, Lt, D_t) [+ text_mask] · speech_features (B, Ls, D_s)
  [+ speech_mask] · emotion_drop (B, 3)                      Emotion-to-Latents inputs
  embedder_audio (B, N, D_e) · expression_frames (B, N, H, W, 3) · mouth_mask (B, N, H, W)
  palette (B, 6) [+ palette_keep (B,)]                      the Emotion MoE's global gate where kept
                                                             (the label's palette in training, a
                                                             compound at inference)
  motion_frames (B, M, h, w, C) · face_locator (B, F, h, w, C0)   optional backbone inputs
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from moee_jax.models.audio import AudioProjection
from moee_jax.models.config_dict import dataclass_from_dict
from moee_jax.models.emotion_bank import EmotionBank
from moee_jax.models.emotion_discriminator import EmotionDiscriminator
from moee_jax.models.emotion_embedder import GaussianEmotionEmbedder
from moee_jax.models.emotion_latents import EmotionToLatents
from moee_jax.models.emotion_moe import EmotionCondition, EmotionMoE
from moee_jax.models.reference import reference_config, reference_features
from moee_jax.models.unet import UNetConfig, VideoUNet
from moee_jax.nn.layers import dense

LATENT_SOURCES = ("label", "text", "speech")
EMOTION_SOURCES = LATENT_SOURCES + ("embedder",)


@dataclasses.dataclass(frozen=True)
class EmotionConfig:
    """Which emotion conditioning the model has and its sizes.

    ``sources``: a subset of ``("label", "text", "speech")`` for Emotion-to-Latents, or
    ``("embedder",)`` for the Gaussian embedder (then ``bank`` chooses whether its sample goes
    through the emotion bank). ``moe_variant``: "moe" | "single" | "no_global" | "no_local".
    """

    sources: tuple[str, ...] = ("label",)
    token_dim: int = 768
    num_tokens: int = 16
    moe_variant: str = "moe"
    moe_heads: int = 8
    latents_layers: int = 2
    latents_heads: int = 8
    text_dim: int | None = None
    speech_dim: int | None = None
    embedder_dim: int = 128
    embedder_heads: int = 4
    embedder_audio_layers: int = 2
    embedder_layers: int = 2
    embedder_visual_channels: tuple[int, ...] = (32, 64, 128)
    bank: bool = False
    bank_size: int = 64
    bank_beta: float = 0.25
    discriminator: bool = False
    num_classes: int = 7
    discriminator_hidden: int = 512

    def __post_init__(self):
        unknown = [s for s in self.sources if s not in EMOTION_SOURCES]
        if unknown or not self.sources:
            raise ValueError(f"emotion sources {self.sources}: choose a non-empty subset of {LATENT_SOURCES} or ('embedder',)")
        if "embedder" in self.sources and len(self.sources) > 1:
            raise ValueError("the 'embedder' emotion source stands alone; do not combine it with label/text/speech")
        if "text" in self.sources and self.text_dim is None:
            raise ValueError("emotion source 'text' needs text_dim (the T5 encoder width)")
        if "speech" in self.sources and self.speech_dim is None:
            raise ValueError("emotion source 'speech' needs speech_dim (the speech-emotion encoder width)")
        if self.bank and "embedder" not in self.sources:
            raise ValueError("the emotion bank stores embedder samples: use sources=('embedder',) with bank=True")

    @classmethod
    def from_dict(cls, d) -> EmotionConfig:
        """From a ``ConfigDict``/mapping, turning lists into tuples; unknown keys are an error."""
        return dataclass_from_dict(cls, d, "emotion config")


@dataclasses.dataclass(frozen=True)
class AudioConfig:
    """Audio-window projection (Hallo): windows ``(B, F, W, layers, D)`` → ``num_tokens`` tokens."""

    num_tokens: int = 32
    hidden_dim: int = 512


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ConditioningOutput:
    """U-Net inputs from the conditioning paths, and the auxiliary terms they produce."""

    audio: jax.Array | None
    emotion: EmotionCondition
    vq_loss: jax.Array | None = None
    emotion_mu: jax.Array | None = None
    emotion_sigma: jax.Array | None = None


class Conditioning(nn.Module):
    """Batch features → :class:`ConditioningOutput` (audio tokens and emotion condition)."""

    emotion: EmotionConfig
    audio: AudioConfig | None
    audio_out_dim: int | None
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, batch: dict, *, train: bool) -> ConditioningOutput:
        e = self.emotion
        audio = None
        if self.audio is not None and batch.get("audio_windows") is not None:
            audio = AudioProjection(
                self.audio.num_tokens, self.audio_out_dim, self.audio.hidden_dim, dtype=self.dtype, name="audio_projection"
            )(batch["audio_windows"])
        vq_loss = mu = sigma = None
        if e.sources == ("embedder",):
            prior = GaussianEmotionEmbedder(
                e.embedder_dim,
                e.embedder_heads,
                e.embedder_audio_layers,
                e.embedder_layers,
                visual_channels=e.embedder_visual_channels,
                dtype=self.dtype,
                name="embedder",
            )(batch.get("embedder_audio"), batch.get("expression_frames"), batch.get("mouth_mask"), train=train, deterministic=not train)
            mu, sigma = prior.mu, prior.sigma
            if e.bank:
                out = EmotionBank(e.bank_size, 1, e.num_tokens, e.token_dim, e.bank_beta, dtype=self.dtype, name="bank")(
                    prior.sample, train=train
                )
                tokens, vq_loss = out.tokens, out.vq_loss
            else:
                tokens = dense(e.num_tokens * e.token_dim, ("embed", "mlp"), name="embedder_tokens", dtype=self.dtype)(prior.sample)
                tokens = tokens.reshape(tokens.shape[0], e.num_tokens, e.token_dim)
        else:
            tokens = EmotionToLatents(
                e.token_dim,
                e.num_tokens,
                e.latents_layers,
                e.latents_heads,
                text_dim=e.text_dim if "text" in e.sources else None,
                audio_dim=e.speech_dim if "speech" in e.sources else None,
                use_label="label" in e.sources,
                dtype=self.dtype,
                name="latents",
            )(
                text=batch.get("text_features") if "text" in e.sources else None,
                audio=batch.get("speech_features") if "speech" in e.sources else None,
                label=batch.get("emotion_label") if "label" in e.sources else None,
                text_mask=batch.get("text_mask"),
                audio_mask=batch.get("speech_mask"),
                drop=batch.get("emotion_drop"),
            )
        emotion = EmotionCondition(tokens, batch.get("palette"), batch.get("palette_keep"))
        return ConditioningOutput(audio, emotion, vq_loss, mu, sigma)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class MoEEOutput:
    """Denoiser prediction ``(B, F, h, w, C)`` and the auxiliary outputs of the conditioning paths:
    discriminator logits, the bank's VQ loss, the embedder's μ/σ, and the Emotion MoE layers' gate
    logits (a tuple, one ``(B·(M+F), 7)`` array per layer; empty without a gate network)."""

    prediction: jax.Array
    emotion_logits: jax.Array | None
    vq_loss: jax.Array | None
    emotion_mu: jax.Array | None
    emotion_sigma: jax.Array | None
    gate_logits: tuple = ()


@dataclasses.dataclass(frozen=True)
class MoEE:
    """Modules of the full model; parameters live in ``{'reference_net', 'unet', 'conditioning',
    'discriminator'?}``. Build with :func:`build_moee`."""

    unet: VideoUNet
    refnet: VideoUNet
    conditioning: Conditioning
    discriminator: EmotionDiscriminator | None

    def init(self, rng: jax.Array, batch: dict, noisy: jax.Array, timesteps: jax.Array) -> dict:
        """Boxed params of every part (logical axis names kept for sharding)."""
        r_ref, r_unet, r_cond, r_disc, r_sample = jax.random.split(rng, 5)
        ref_vars = self.refnet.init(r_ref, batch["ref_latents"][:, None], timesteps, batch["context"])
        feats = reference_features(self.refnet, nn.unbox(ref_vars["params"]), batch["ref_latents"], batch["context"])
        cond_rngs = {"params": r_cond, "sample": r_sample, "dropout": r_sample}
        cond_vars = self.conditioning.init(cond_rngs, batch, train=True)
        cond = self.conditioning.apply(cond_vars, batch, train=True, rngs={"sample": r_sample, "dropout": r_sample})
        unet_vars = self.unet.init(r_unet, noisy, timesteps, batch["context"], **_unet_kwargs(batch, cond, feats, self.unet.config.reference_concat))
        params = {"reference_net": ref_vars["params"], "unet": unet_vars["params"], "conditioning": cond_vars["params"]}
        if self.discriminator is not None:
            _, inter = self.unet.apply(
                unet_vars, noisy, timesteps, batch["context"], **_unet_kwargs(batch, cond, feats, self.unet.config.reference_concat), mutable=["intermediates"]
            )
            params["discriminator"] = self.discriminator.init(r_disc, inter["intermediates"]["mid_features"][0])["params"]
        return params

    def __call__(
        self,
        params: dict,
        batch: dict,
        noisy: jax.Array,
        timesteps: jax.Array,
        *,
        train: bool,
        rng: jax.Array | None = None,
        use_emotion: bool = True,
    ) -> MoEEOutput:
        """One denoiser evaluation. ``rng`` feeds the embedder's sampling and modality dropout
        (training); ``noisy (B, F, h, w, C)``, ``timesteps (B,)``. ``use_emotion=False`` skips the
        emotion slot (stage 1 trains the backbone without it; the MoE's zero-initialised output
        makes the two agree at the start of stage 2)."""
        feats = reference_features(self.refnet, params["reference_net"], batch["ref_latents"], batch["context"])
        rngs = {} if rng is None else {"sample": rng, "dropout": jax.random.fold_in(rng, 1)}
        cond = self.conditioning.apply({"params": params["conditioning"]}, batch, train=train, rngs=rngs)
        kwargs = _unet_kwargs(batch, cond, feats, self.unet.config.reference_concat)
        if not use_emotion:
            kwargs["emotion"] = None
        logits = None
        pred, inter = self.unet.apply(
            {"params": params["unet"]}, noisy, timesteps, batch["context"], **kwargs, mutable=["intermediates"]
        )
        inter = inter.get("intermediates", {})
        if self.discriminator is not None:
            features = inter["mid_features"][0]
            frames = features.shape[0] // noisy.shape[0]
            logits = self.discriminator.apply(
                {"params": params["discriminator"]}, features.reshape((noisy.shape[0], frames) + features.shape[1:])
            )
        gate_logits = tuple(_sown(inter, "global_gate_logits"))
        return MoEEOutput(pred, logits, cond.vq_loss, cond.emotion_mu, cond.emotion_sigma, gate_logits)


def _sown(tree, name: str) -> list[jax.Array]:
    """Every value sown under ``name`` anywhere in an intermediates tree, in tree order."""
    out = []
    for key, value in (tree.items() if isinstance(tree, dict) else ()):
        if key == name:
            out.extend(value)
        else:
            out.extend(_sown(value, name))
    return out


def _unet_kwargs(batch: dict, cond: ConditioningOutput, feats: dict, reference_concat: bool = False) -> dict:
    kw = {"reference": feats, "emotion": cond.emotion}
    if reference_concat:
        kw["reference_latents"] = batch["ref_latents"]
    for key in ("reference_keep", "motion_frames", "face_locator", "audio_mask"):
        if batch.get(key) is not None:
            kw[key] = batch[key]
    if cond.audio is not None:
        kw["audio"] = cond.audio
    return kw


def build_moee_from_config(config) -> MoEE:
    """:func:`build_moee` from ``config.model`` (``configs/backbone.py``: unet, emotion, audio)."""
    return build_moee(
        UNetConfig.from_dict(config.model.unet.to_dict()),
        EmotionConfig.from_dict(config.model.emotion.to_dict()),
        AudioConfig(**config.model.audio.to_dict()),
        dtype=jnp.dtype(config.dtype),
    )


def build_moee(unet: UNetConfig, emotion: EmotionConfig, audio: AudioConfig | None = AudioConfig(), dtype=jnp.float32) -> MoEE:
    """The modules of MoEE: ``unet`` gets the Emotion MoE in its emotion slot."""
    slot = functools.partial(EmotionMoE, heads=emotion.moe_heads, variant=emotion.moe_variant, implementation=unet.attention_implementation)
    unet = unet.replace(emotion_slot=slot, emotion_dim=emotion.token_dim)
    return MoEE(
        unet=VideoUNet(unet, dtype=dtype),
        refnet=VideoUNet(reference_config(unet), dtype=dtype),
        conditioning=Conditioning(emotion, audio, unet.audio_dim if audio is not None else None, dtype=dtype),
        discriminator=EmotionDiscriminator(emotion.num_classes, emotion.discriminator_hidden, dtype=dtype)
        if emotion.discriminator
        else None,
    )
