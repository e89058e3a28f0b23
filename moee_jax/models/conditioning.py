"""The conditioning paths: per-clip speech and emotion sources → audio tokens and an emotion condition.

* **Audio** (Hallo §3.3): per-frame feature windows ``(B, F, W, layers, D_a)`` → :class:`AudioProjection`
  → audio tokens ``(B, F, La, D_unet)`` for the U-Net's audio attention.
* **Emotion**, one of
  - **Emotion-to-Latents** (MoEE §Design 2) over any of the label (6 weights), text (T5 features)
    and speech (speech-emotion features) sources, or
  - DICE-Talk's **Gaussian emotion embedder** (§3.1) over a reference clip's expression frames and
    speech, optionally through the **emotion bank** (§3.2),

  → emotion tokens, packed with the palette that sets the Emotion MoE's global gate into an
  :class:`~moee_jax.models.emotion_moe.EmotionCondition`.

The sources arrive typed (:class:`EmotionSources`): which modality each clip keeps (``drop``), the
palette and where it applies (``palette_keep``), and the features. A clip with every modality
dropped gets Emotion-to-Latents' learned null tokens — the unconditional branch of guidance.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from moee_jax.emotions import NUM_EMOTIONS
from moee_jax.models.audio import AudioProjection
from moee_jax.models.config_dict import dataclass_from_dict
from moee_jax.models.emotion_bank import EmotionBank
from moee_jax.models.emotion_embedder import GaussianEmotionEmbedder
from moee_jax.models.emotion_latents import MODALITIES, EmotionToLatents
from moee_jax.models.emotion_moe import EmotionCondition
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

    @property
    def uses_embedder(self) -> bool:
        return self.sources == ("embedder",)

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
@dataclasses.dataclass(frozen=True)
class EmotionSources:
    """The emotion condition of each clip before Emotion-to-Latents or the embedder (batch ``B``).

    ``drop (B, 3)`` bool over (text, speech, label): True removes that modality from the clip
    (all True: the unconditional branch). ``palette (B, 6)`` sets the Emotion MoE's global gate
    where ``palette_keep (B,)`` (a label's one-hot, a compound's mix), the learned gate elsewhere.
    Features, each None where the model has no such source: ``label (B, 6)`` weights,
    ``text (B, Lt, Dt)`` + ``text_mask (B, Lt)``, ``speech (B, Ls, Ds)`` + ``speech_mask``;
    for the embedder ``embedder_audio (B, N, De)``, ``expression_frames (B, N, H, W, 3)`` in
    [-1, 1] and ``mouth_mask (B, N, H, W)``. Build with :meth:`make`, which checks them.
    """

    drop: jax.Array
    palette: jax.Array
    palette_keep: jax.Array
    label: jax.Array | None = None
    text: jax.Array | None = None
    text_mask: jax.Array | None = None
    speech: jax.Array | None = None
    speech_mask: jax.Array | None = None
    embedder_audio: jax.Array | None = None
    expression_frames: jax.Array | None = None
    mouth_mask: jax.Array | None = None

    @classmethod
    def make(cls, config: EmotionConfig, **fields) -> EmotionSources:
        """Sources for a model of emotion ``config``; a feature its sources need but not given (or
        a batch that disagrees) raises ``ValueError`` naming it."""
        out = cls(**fields)
        b = out.drop.shape[0]
        if out.drop.shape != (b, len(MODALITIES)) or out.palette.shape != (b, NUM_EMOTIONS) or out.palette_keep.shape != (b,):
            raise ValueError(
                f"emotion sources: drop must be (B, 3), palette (B, {NUM_EMOTIONS}), palette_keep (B,); got "
                f"{out.drop.shape}, {out.palette.shape}, {out.palette_keep.shape}"
            )
        need = {"label": "label", "text": "text", "speech": "speech"}
        if config.uses_embedder:
            if out.embedder_audio is None and out.expression_frames is None:
                raise ValueError("emotion sources: the embedder needs embedder_audio and/or expression_frames (+ mouth_mask)")
            if out.expression_frames is not None and out.mouth_mask is None:
                raise ValueError("emotion sources: expression_frames need their mouth_mask")
        else:
            for source, name in need.items():
                if source in config.sources and getattr(out, name) is None:
                    raise ValueError(f"emotion sources: the model's {source!r} source needs the {name!r} features; none were given")
        for name in ("label", "text", "speech", "embedder_audio", "expression_frames"):
            value = getattr(out, name)
            if value is not None and value.shape[0] != b:
                raise ValueError(f"emotion sources: {name} has batch {value.shape[0]}, the other inputs {b}")
        return out

    def dropped(self) -> EmotionSources:
        """The same clips with every modality dropped and no palette: the unconditional emotion."""
        return dataclasses.replace(self, drop=jnp.ones_like(self.drop), palette_keep=jnp.zeros_like(self.palette_keep))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ConditioningOutput:
    """U-Net inputs from the conditioning paths, and the auxiliary terms they produce."""

    audio: jax.Array | None
    emotion: EmotionCondition
    vq_loss: jax.Array | None = None
    emotion_mu: jax.Array | None = None
    emotion_sigma: jax.Array | None = None


class Conditioning(nn.Module):
    """``audio_windows (B, F, W, layers, D_a) | None`` + :class:`EmotionSources` → :class:`ConditioningOutput`."""

    emotion: EmotionConfig
    audio: AudioConfig | None
    audio_out_dim: int | None
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, audio_windows: jax.Array | None, sources: EmotionSources, *, train: bool) -> ConditioningOutput:
        e = self.emotion
        audio = None
        if self.audio is not None and audio_windows is not None:
            audio = AudioProjection(
                self.audio.num_tokens, self.audio_out_dim, self.audio.hidden_dim, dtype=self.dtype, name="audio_projection"
            )(audio_windows)
        vq_loss = mu = sigma = None
        if e.uses_embedder:
            prior = GaussianEmotionEmbedder(
                e.embedder_dim, e.embedder_heads, e.embedder_audio_layers, e.embedder_layers,
                visual_channels=e.embedder_visual_channels, dtype=self.dtype, name="embedder",
            )(sources.embedder_audio, sources.expression_frames, sources.mouth_mask, train=train, deterministic=not train)  # fmt: skip
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
                e.token_dim, e.num_tokens, e.latents_layers, e.latents_heads,
                text_dim=e.text_dim if "text" in e.sources else None,
                audio_dim=e.speech_dim if "speech" in e.sources else None,
                use_label="label" in e.sources, dtype=self.dtype, name="latents",
            )(
                text=sources.text if "text" in e.sources else None,
                audio=sources.speech if "speech" in e.sources else None,
                label=sources.label if "label" in e.sources else None,
                text_mask=sources.text_mask, audio_mask=sources.speech_mask, drop=sources.drop,
            )  # fmt: skip
        emotion = EmotionCondition(tokens, sources.palette, sources.palette_keep)
        return ConditioningOutput(audio, emotion, vq_loss, mu, sigma)
