"""Speech-emotion encoder: a wav2vec 2.0 backbone (Baevski et al. 2020) with a pooled classification
head, a Flax port of transformers' ``Wav2Vec2ForSequenceClassification`` (e.g. SUPERB's emotion
recognition models).

``features = Σ_i softmax(w)_i · hidden_i`` (``use_weighted_layer_sum``, over the N+1 hidden states)
or the backbone's last hidden state; ``pooled = mean over valid frames of projector(features)``;
``logits = classifier(pooled)``.

For MoEE's Emotion-to-Latents (audio branch) the encoder exposes both the frame-level features
``(B, L, D)`` and the pooled embedding ``(B, classifier_proj_size)``. Names mirror transformers'
(``wav2vec2/…``, ``projector``, ``classifier``, ``layer_weights``) so checkpoints convert key by
key; see :func:`moee_jax.checkpoint.convert.wav2vec2.convert_speech_emotion`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from moee_jax.models.encoders.wav2vec2 import Wav2Vec2Config, Wav2Vec2Model
from moee_jax.nn.layers import dense, partitioned


@dataclasses.dataclass(frozen=True)
class SpeechEmotionConfig:
    """Backbone plus the head fields of transformers' ``Wav2Vec2Config`` (defaults are its defaults)."""

    backbone: Wav2Vec2Config = Wav2Vec2Config()
    num_labels: int = 2
    classifier_proj_size: int = 256
    use_weighted_layer_sum: bool = False
    labels: tuple[str, ...] = ()  # class names in logit order (``id2label``), when the checkpoint has them

    def __post_init__(self):
        if self.labels and len(self.labels) != self.num_labels:
            raise ValueError(f"{len(self.labels)} label names for num_labels={self.num_labels}")

    @classmethod
    def from_hf(cls, hf_config: Any) -> SpeechEmotionConfig:
        """Build from a transformers ``Wav2Vec2Config`` of a sequence classifier, or its dict / ``config.json``."""
        d = dict(hf_config) if isinstance(hf_config, Mapping) else hf_config.to_dict()
        id2label = d.get("id2label") or {}
        labels = tuple(str(v) for _, v in sorted(id2label.items(), key=lambda kv: int(kv[0])))
        num_labels = len(labels) if labels else int(d.get("num_labels", cls.num_labels))
        return cls(
            backbone=Wav2Vec2Config.from_hf(d),
            num_labels=num_labels,
            classifier_proj_size=int(d.get("classifier_proj_size", cls.classifier_proj_size)),
            use_weighted_layer_sum=bool(d.get("use_weighted_layer_sum", cls.use_weighted_layer_sum)),
            labels=labels,
        )


class SpeechEmotionOutput(NamedTuple):
    """What :class:`SpeechEmotionEncoder` returns (``L`` frames, ``D = hidden_size``, ``P = classifier_proj_size``)."""

    pooled: jax.Array  # (B, P): mean of projector(features) over valid frames
    logits: jax.Array  # (B, num_labels)
    features: jax.Array  # (B, L, D): the frame-level features the head pools (weighted layer sum or last state)
    hidden_states: jax.Array  # (N + 1, B, L, D): the backbone's hidden states
    frame_mask: jax.Array  # (B, L) bool, True = frame of real audio


class SpeechEmotionEncoder(nn.Module):
    """Waveform ``(B, T)`` [+ sample mask ``(B, T)``] → :class:`SpeechEmotionOutput`."""

    config: SpeechEmotionConfig
    implementation: str = "xla"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, waveform: jax.Array, attention_mask: jax.Array | None = None) -> SpeechEmotionOutput:
        c = self.config
        out = Wav2Vec2Model(c.backbone, self.implementation, dtype=self.dtype, name="wav2vec2")(waveform, attention_mask)
        if c.use_weighted_layer_sum:
            num = c.backbone.num_hidden_layers + 1
            w = self.param("layer_weights", partitioned(nn.initializers.constant(1.0 / num), (None,)), (num,), jnp.float32)
            features = jnp.einsum("n,nbld->bld", jax.nn.softmax(w).astype(out.hidden_states.dtype), out.hidden_states)
        else:
            features = out.last_hidden_state
        projected = dense(c.classifier_proj_size, ("embed", "mlp"), name="projector", dtype=self.dtype)(features)
        valid = out.frame_mask[..., None]
        # A sample without a single valid frame pools to zeros rather than 0/0.
        count = jnp.maximum(jnp.sum(valid, axis=1), 1)
        pooled = jnp.sum(jnp.where(valid, projected, jnp.zeros((), projected.dtype)), axis=1) / count.astype(projected.dtype)
        logits = dense(c.num_labels, ("mlp", None), name="classifier", dtype=self.dtype)(pooled)
        return SpeechEmotionOutput(pooled, logits, features, out.hidden_states, out.frame_mask)
