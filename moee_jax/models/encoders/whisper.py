"""Whisper's audio encoder (Radford et al. 2022, "Robust Speech Recognition via Large-Scale Weak
Supervision", §2.2 and Fig. 1), a Flax port of transformers' ``WhisperEncoder``.

Log-mel features ``(B, T, M)`` with ``T = 2 · max_source_positions`` (3000 frames = 30 s for the
released models) → two 1-D convs with GELU (the second with stride 2) → + position table →
pre-LN transformer layers → final LayerNorm → ``(B, T/2, D)``.

Layout: **channels-last** ``(B, frames, mel_bins)``; transformers (and ``WhisperFeatureExtractor``)
use ``(B, mel_bins, frames)``, so transpose their features with ``x.transpose(0, 2, 1)``.

Module names follow transformers' (``conv1``, ``embed_positions``, ``layers_N/self_attn/q_proj``,
``layer_norm``) so its checkpoint keys convert by rule
(:mod:`moee_jax.checkpoint.convert.whisper`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moee_jax.models.encoders.hf import ACTIVATIONS, hf_field
from moee_jax.nn.attention import dot_product_attention
from moee_jax.nn.layers import conv1d, dense, partitioned
from moee_jax.nn.norms import layer_norm

# transformers' ``ACT2FN`` names that Whisper checkpoints use for ``activation_function``.
# Both convs have stride product 2: the encoder sees exactly ``2 · max_source_positions`` frames.
CONV_STRIDE = 2


@dataclasses.dataclass(frozen=True)
class WhisperEncoderConfig:
    """The encoder half of transformers' ``WhisperConfig`` (defaults are transformers' defaults).

    whisper-base: ``d_model=512, encoder_layers=6, encoder_attention_heads=8, encoder_ffn_dim=2048``;
    large-v3 has ``num_mel_bins=128``.
    """

    num_mel_bins: int = 80
    d_model: int = 384
    encoder_layers: int = 4
    encoder_attention_heads: int = 6
    encoder_ffn_dim: int = 1536
    max_source_positions: int = 1500
    activation_function: str = "gelu"

    def __post_init__(self):
        if self.d_model % self.encoder_attention_heads:
            raise ValueError(
                f"WhisperEncoderConfig: d_model {self.d_model} is not divisible by encoder_attention_heads {self.encoder_attention_heads}"
            )
        if self.activation_function not in ACTIVATIONS:
            raise ValueError(
                f"WhisperEncoderConfig: activation_function {self.activation_function!r} is not supported; "
                f"expected one of {sorted(ACTIVATIONS)}"
            )

    @property
    def num_frames(self) -> int:
        """Mel frames the encoder takes: ``2 · max_source_positions`` (3000 for released models)."""
        return CONV_STRIDE * self.max_source_positions

    @classmethod
    def from_hf(cls, config: Any) -> WhisperEncoderConfig:
        """From a transformers ``WhisperConfig`` or its ``config.json`` dict.

        Fields absent from a dict take transformers' defaults, as ``save_pretrained`` omits them.
        """
        fields = {f.name: hf_field(config, f.name, f.default) for f in dataclasses.fields(cls)}
        return cls(**fields)


def whisper_sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
    """Whisper's position table ``(length, channels)``: ``[sin(p·ω_i), cos(p·ω_i)]`` (not interleaved),
    ``ω_i = max_timescale^(−i / (channels/2 − 1))``; what released checkpoints store in
    ``embed_positions``."""
    if channels % 2:
        raise ValueError(f"Whisper positions need an even width, got {channels}")
    increment = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = np.exp(-increment * np.arange(channels // 2, dtype=np.float32))
    scaled = np.arange(length, dtype=np.float32)[:, None] * inv_timescales[None, :]
    return np.concatenate([np.sin(scaled), np.cos(scaled)], axis=1).astype(np.float32)


def _sinusoid_init(key, shape, dtype=jnp.float32):
    del key
    return jnp.asarray(whisper_sinusoids(*shape), dtype)


class WhisperEncoderOutput(NamedTuple):
    """What :class:`WhisperEncoder` returns (``L = max_source_positions``, ``N = encoder_layers``).

    ``hidden_states[i]`` is transformers' ``hidden_states[i]`` with ``output_hidden_states=True``:
    entry 0 the embeddings (conv stem + positions), entries 1..N−1 the layers' outputs — these
    *before* the final LayerNorm — and entry N the last layer's output *after* it, i.e.
    ``last_hidden_state``.
    """

    last_hidden_state: jax.Array  # (B, L, D), after the final LayerNorm
    hidden_states: jax.Array  # (N + 1, B, L, D)


class WhisperAttention(nn.Module):
    """Multi-head self-attention; ``k_proj`` has no bias (as in Whisper), q/v/out do."""

    d_model: int
    heads: int
    implementation: str = "xla"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, length, _ = x.shape
        head_dim = self.d_model // self.heads

        def heads(t: jax.Array) -> jax.Array:
            return nn.with_logical_constraint(t.reshape(b, length, self.heads, head_dim), ("batch", "length", "act_heads", None))

        q = dense(self.d_model, ("embed", "heads"), name="q_proj", dtype=self.dtype)(x)
        k = dense(self.d_model, ("embed", "heads"), use_bias=False, name="k_proj", dtype=self.dtype)(x)
        v = dense(self.d_model, ("embed", "heads"), name="v_proj", dtype=self.dtype)(x)
        # Scales q by head_dim^-0.5 after the projection (bias included), as Whisper does.
        out = dot_product_attention(heads(q), heads(k), heads(v), implementation=self.implementation)
        out = dense(self.d_model, ("heads", "embed"), name="out_proj", dtype=self.dtype)(out.reshape(b, length, -1))
        # Row-parallel output replicated over 'tensor' (see moee_jax.parallel.rules).
        return nn.with_logical_constraint(out, ("batch", "length", "act_embed"))


class WhisperEncoderLayer(nn.Module):
    """Pre-LN block: ``x + attn(LN(x))``, then ``x + fc2(act(fc1(LN(x))))``."""

    config: WhisperEncoderConfig
    implementation: str = "xla"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        h = layer_norm(1e-5, name="self_attn_layer_norm", dtype=self.dtype)(x)
        x = x + WhisperAttention(cfg.d_model, cfg.encoder_attention_heads, self.implementation, self.dtype, name="self_attn")(h)
        h = layer_norm(1e-5, name="final_layer_norm", dtype=self.dtype)(x)
        h = dense(cfg.encoder_ffn_dim, ("embed", "mlp"), name="fc1", dtype=self.dtype)(h)
        h = ACTIVATIONS[cfg.activation_function](h)
        h = dense(cfg.d_model, ("mlp", "embed"), name="fc2", dtype=self.dtype)(h)
        return nn.with_logical_constraint(x + h, ("batch", "length", "act_embed"))


class WhisperEncoder(nn.Module):
    """Whisper's encoder (Radford et al. 2022, §2.2): log-mel ``(B, T, M)`` → :class:`WhisperEncoderOutput`.

    ``T`` must equal ``config.num_frames`` (``2 · max_source_positions``), as in transformers:
    Whisper is trained on 30-s windows only, so pad (or trim) the features to that length;
    anything else raises ``ValueError``. ``implementation`` picks the attention backend
    (:func:`moee_jax.nn.attention.dot_product_attention`).

    ``embed_positions`` is a parameter holding the checkpoint's table (initialised to
    :func:`whisper_sinusoids`); transformers keeps it frozen, so mask it out of the optimizer when
    fine-tuning.
    """

    config: WhisperEncoderConfig
    implementation: str = "xla"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, input_features: jax.Array) -> WhisperEncoderOutput:
        cfg = self.config
        self._check_input(input_features.shape)
        x = nn.gelu(
            conv1d(cfg.d_model, 3, padding=(1, 1), name="conv1", dtype=self.dtype)(input_features.astype(self.dtype)), approximate=False
        )
        x = nn.gelu(conv1d(cfg.d_model, 3, strides=CONV_STRIDE, padding=(1, 1), name="conv2", dtype=self.dtype)(x), approximate=False)
        positions = nn.Embed(
            cfg.max_source_positions,
            cfg.d_model,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            embedding_init=partitioned(_sinusoid_init, (None, "embed")),
            name="embed_positions",
        )(jnp.arange(cfg.max_source_positions))
        x = nn.with_logical_constraint(x + positions[None], ("batch", "length", "act_embed"))
        hidden_states = [x]
        for i in range(cfg.encoder_layers):
            x = WhisperEncoderLayer(cfg, self.implementation, self.dtype, name=f"layers_{i}")(x)
            hidden_states.append(x)
        x = layer_norm(1e-5, name="layer_norm", dtype=self.dtype)(x)
        hidden_states[-1] = x
        return WhisperEncoderOutput(last_hidden_state=x, hidden_states=jnp.stack(hidden_states))

    def _check_input(self, shape: tuple[int, ...]) -> None:
        cfg = self.config
        if len(shape) != 3:
            raise ValueError(f"Whisper encoder input must be (batch, frames, mel_bins), got shape {shape}")
        _, frames, mels = shape
        if frames == cfg.num_frames and mels == cfg.num_mel_bins:
            return
        if frames == cfg.num_mel_bins and mels == cfg.num_frames:
            raise ValueError(
                f"Whisper encoder input {shape} looks channels-first (batch, mel_bins, frames), as transformers "
                f"uses; this port takes (batch, frames, mel_bins): transpose with x.transpose(0, 2, 1)"
            )
        if mels != cfg.num_mel_bins:
            raise ValueError(
                f"Whisper encoder input has {mels} mel bins (last axis of {shape}); the model expects num_mel_bins={cfg.num_mel_bins}"
            )
        raise ValueError(
            f"Whisper encoder expects exactly {cfg.num_frames} mel frames (2 × max_source_positions "
            f"{cfg.max_source_positions}), got {frames} (input shape {shape}); pad or trim the log-mel "
            f"features to {cfg.num_frames} frames, as WhisperFeatureExtractor does"
        )
