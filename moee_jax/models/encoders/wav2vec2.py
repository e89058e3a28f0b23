"""wav2vec 2.0 speech encoder (Baevski et al. 2020, "wav2vec 2.0: A Framework for Self-Supervised
Learning of Speech Representations"), a Flax port of transformers' ``Wav2Vec2Model``.

Raw 16 kHz waveform → a strided 1-D conv feature encoder ``f: X → Z`` (§2, "Feature encoder":
7 temporal conv blocks, GELU, 20 ms frames for the base config) → LayerNorm + linear projection to
the model width → a Transformer context network ``g: Z → C`` (§2, "Contextualized representations
with Transformers") whose relative positions come from a grouped convolution added to its input
(kernel 128, 16 groups, weight-normalised, GELU). Two layouts exist and both are supported:

* ``feat_extract_norm="group"``, ``do_stable_layer_norm=False`` (wav2vec2-base): GroupNorm (one
  group per channel) on the first conv layer only; post-LN Transformer layers, with a LayerNorm
  after adding the positional embedding.
* ``feat_extract_norm="layer"``, ``do_stable_layer_norm=True`` (the "large-lv60" / XLS-R models):
  LayerNorm on every conv layer; pre-LN Transformer layers and a final LayerNorm.

The two flags are independent, as in transformers. The quantiser, adapter, SpecAugment masking,
dropout and LayerDrop are not part of this port: it computes what transformers computes in ``eval()``.

Shapes: waveform ``(B, T)`` (already zero-mean/unit-variance normalised when the checkpoint's
feature extractor has ``do_normalize``), sample mask ``(B, T)`` (1 = real sample); frames
``L = num_frames(config, T)``; outputs ``(B, L, D)`` with ``D = hidden_size``.

Module names mirror transformers' (``feature_extractor/conv_layers_0/conv``,
``encoder/layers_3/attention/q_proj``) so checkpoints convert key by key; see
:mod:`moee_jax.checkpoint.convert.wav2vec2`. The positional conv's weight norm ``w = g·v/‖v‖`` is
folded into one plain kernel at conversion, so fine-tuning trains that kernel directly rather than
the (g, v) pair.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from moee_jax.models.encoders.hf import ACTIVATIONS
from moee_jax.nn.attention import dot_product_attention
from moee_jax.nn.layers import conv1d, dense
from moee_jax.nn.norms import group_norm, layer_norm

# transformers builds the conv feature encoder's LayerNorm / GroupNorm with PyTorch's default eps,
# not ``layer_norm_eps``.
_CONV_NORM_EPS = 1e-5
_SEQUENCE = ("batch", "length", "act_embed")


@dataclasses.dataclass(frozen=True)
class Wav2Vec2Config:
    """The architecture fields of transformers' ``Wav2Vec2Config``; defaults are its (wav2vec2-base) defaults."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    feat_extract_norm: str = "group"
    feat_extract_activation: str = "gelu"
    conv_dim: tuple[int, ...] = (512, 512, 512, 512, 512, 512, 512)
    conv_stride: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
    conv_kernel: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
    conv_bias: bool = False
    num_conv_pos_embeddings: int = 128
    num_conv_pos_embedding_groups: int = 16
    do_stable_layer_norm: bool = False

    def __post_init__(self):
        if self.feat_extract_norm not in ("group", "layer"):
            raise ValueError(f"feat_extract_norm={self.feat_extract_norm!r}: expected 'group' or 'layer'")
        for field in ("hidden_act", "feat_extract_activation"):
            if getattr(self, field) not in ACTIVATIONS:
                raise ValueError(f"{field}={getattr(self, field)!r}: expected one of {sorted(ACTIVATIONS)}")
        if not len(self.conv_dim) == len(self.conv_stride) == len(self.conv_kernel):
            raise ValueError(
                f"conv_dim, conv_stride and conv_kernel must have one entry per conv layer; got lengths "
                f"{len(self.conv_dim)}, {len(self.conv_stride)}, {len(self.conv_kernel)}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}")
        if self.hidden_size % self.num_conv_pos_embedding_groups:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_conv_pos_embedding_groups {self.num_conv_pos_embedding_groups}"
            )

    @classmethod
    def from_hf(cls, hf_config: Any) -> Wav2Vec2Config:
        """Build from a transformers ``Wav2Vec2Config``, or its ``to_dict()`` / parsed ``config.json``.

        Fields absent from a mapping take transformers' defaults (``save_pretrained`` may write only
        the non-default ones). Checkpoints with an adapter (``add_adapter`` or ``adapter_attn_dim``)
        are refused: this port has no adapter, and their outputs would silently differ.
        """
        d = dict(hf_config) if isinstance(hf_config, Mapping) else hf_config.to_dict()
        if d.get("add_adapter") or d.get("adapter_attn_dim") is not None:
            raise ValueError("wav2vec2 config with add_adapter / adapter_attn_dim set: adapters are not supported by the Flax port")
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in d and d[f.name] is not None:
                value = d[f.name]
                kwargs[f.name] = tuple(value) if isinstance(value, list | tuple) else value
        return cls(**kwargs)


def num_frames(config: Wav2Vec2Config, num_samples):
    """Frames the conv feature encoder makes of ``num_samples`` (int or integer array): ``⌊(n − k)/s⌋ + 1`` per layer."""
    for k, s in zip(config.conv_kernel, config.conv_stride):
        num_samples = (num_samples - k) // s + 1
    return num_samples


def min_num_samples(config: Wav2Vec2Config) -> int:
    """The receptive field: the shortest waveform that yields one frame (400 samples for wav2vec2-base)."""
    n = 1
    for k, s in zip(reversed(config.conv_kernel), reversed(config.conv_stride)):
        n = (n - 1) * s + k
    return n


def frame_mask(config: Wav2Vec2Config, sample_mask: jax.Array, length: int) -> jax.Array:
    """Sample mask ``(B, T)`` → frame mask ``(B, L)`` bool: frame ``i`` is valid iff ``i < num_frames(#valid samples)``.

    As transformers' ``_get_feature_vector_attention_mask``: only the count of valid samples matters
    (padding is assumed to be at the end).
    """
    lengths = num_frames(config, jnp.sum(sample_mask.astype(jnp.int32), axis=-1))
    return jnp.arange(length)[None, :] < lengths[:, None]


class Wav2Vec2ConvLayer(nn.Module):
    """One feature-encoder block: conv → optional norm → activation; ``(B, T, C_in)`` → ``(B, T', C_out)``.

    ``norm`` is None (``Wav2Vec2NoLayerNormConvLayer``), ``"group"`` (GroupNorm with one group per
    channel, i.e. per-channel normalisation over time) or ``"layer"`` (LayerNorm over channels).
    """

    features: int
    kernel_size: int
    stride: int
    norm: str | None
    use_bias: bool
    activation: str
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = conv1d(self.features, self.kernel_size, strides=self.stride, use_bias=self.use_bias, name="conv", dtype=self.dtype)(x)
        if self.norm == "group":
            x = group_norm(self.features, _CONV_NORM_EPS, name="layer_norm", dtype=self.dtype)(x)
        elif self.norm == "layer":
            x = layer_norm(_CONV_NORM_EPS, name="layer_norm", dtype=self.dtype)(x)
        return ACTIVATIONS[self.activation](x)


class Wav2Vec2FeatureEncoder(nn.Module):
    """The conv feature encoder ``f: X → Z`` (Baevski et al. 2020, §2); ``(B, T)`` → ``(B, L, conv_dim[-1])``."""

    config: Wav2Vec2Config
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, waveform: jax.Array) -> jax.Array:
        c = self.config
        x = waveform[..., None].astype(self.dtype)
        for i, (features, kernel, stride) in enumerate(zip(c.conv_dim, c.conv_kernel, c.conv_stride)):
            norm = "layer" if c.feat_extract_norm == "layer" else ("group" if i == 0 else None)
            x = Wav2Vec2ConvLayer(
                features, kernel, stride, norm, c.conv_bias, c.feat_extract_activation, dtype=self.dtype, name=f"conv_layers_{i}"
            )(x)
        return x


class Wav2Vec2FeatureProjection(nn.Module):
    """LayerNorm then linear map to the model width; returns ``(projected (B, L, D), normed (B, L, C))``."""

    config: Wav2Vec2Config
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, features: jax.Array) -> tuple[jax.Array, jax.Array]:
        normed = layer_norm(self.config.layer_norm_eps, name="layer_norm", dtype=self.dtype)(features)
        projected = dense(self.config.hidden_size, ("conv_out", "embed"), name="projection", dtype=self.dtype)(normed)
        return nn.with_logical_constraint(projected, _SEQUENCE), normed


class Wav2Vec2PositionalConvEmbedding(nn.Module):
    """Relative positional embedding: ``act(grouped_conv(x))`` with "same" length; ``(B, L, D)`` → ``(B, L, D)``.

    PyTorch pads ``k // 2`` on both sides and, for even ``k``, drops the last output step
    (``Wav2Vec2SamePadLayer``); padding ``(k // 2, k // 2 − 1)`` computes exactly the kept steps.
    The kernel is the effective weight-normalised kernel ``g·v/‖v‖`` (folded at conversion).
    """

    config: Wav2Vec2Config
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.config.num_conv_pos_embeddings
        h = conv1d(
            self.config.hidden_size,
            k,
            padding=(k // 2, k // 2 - (1 - k % 2)),
            groups=self.config.num_conv_pos_embedding_groups,
            name="conv",
            dtype=self.dtype,
        )(x)
        return ACTIVATIONS[self.config.feat_extract_activation](h)


class Wav2Vec2Attention(nn.Module):
    """Multi-head self-attention with biased q/k/v/out projections; ``(B, L, D)`` → ``(B, L, D)``.

    Logits are scaled by ``head_dim ** -0.5``; ``mask`` (B, 1, 1, L) bool hides padded key frames.
    """

    num_heads: int
    implementation: str = "xla"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        b, length, d = x.shape
        head_dim = d // self.num_heads

        def heads(name: str) -> jax.Array:
            t = dense(d, ("embed", "heads"), name=name, dtype=self.dtype)(x)
            return nn.with_logical_constraint(t.reshape(b, length, self.num_heads, head_dim), ("batch", "length", "act_heads", None))

        out = dot_product_attention(heads("q_proj"), heads("k_proj"), heads("v_proj"), mask, implementation=self.implementation)
        out = dense(d, ("heads", "embed"), name="out_proj", dtype=self.dtype)(out.reshape(b, length, d))
        # Row-parallel output: keep the model width replicated (see moee_jax/parallel/rules.py).
        return nn.with_logical_constraint(out, _SEQUENCE)


class Wav2Vec2FeedForward(nn.Module):
    """``output_dense(act(intermediate_dense(x)))``; ``(B, L, D)`` → ``(B, L, D)``."""

    config: Wav2Vec2Config
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = dense(self.config.intermediate_size, ("embed", "mlp"), name="intermediate_dense", dtype=self.dtype)(x)
        h = ACTIVATIONS[self.config.hidden_act](h)
        h = dense(self.config.hidden_size, ("mlp", "embed"), name="output_dense", dtype=self.dtype)(h)
        return nn.with_logical_constraint(h, _SEQUENCE)


class Wav2Vec2EncoderLayer(nn.Module):
    """One Transformer layer of the context network; ``(B, L, D)`` → ``(B, L, D)``.

    Post-LN (``Wav2Vec2EncoderLayer``): ``h = LN(x + Attn(x)); out = LN_f(h + FF(h))``.
    Pre-LN (``Wav2Vec2EncoderLayerStableLayerNorm``): ``h = x + Attn(LN(x)); out = h + FF(LN_f(h))``.
    """

    config: Wav2Vec2Config
    implementation: str = "xla"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        c = self.config
        attention = Wav2Vec2Attention(c.num_attention_heads, self.implementation, dtype=self.dtype, name="attention")
        norm = layer_norm(c.layer_norm_eps, name="layer_norm", dtype=self.dtype)
        feed_forward = Wav2Vec2FeedForward(c, dtype=self.dtype, name="feed_forward")
        final_norm = layer_norm(c.layer_norm_eps, name="final_layer_norm", dtype=self.dtype)
        if c.do_stable_layer_norm:
            h = x + attention(norm(x), mask)
            out = h + feed_forward(final_norm(h))
        else:
            h = norm(x + attention(x, mask))
            out = final_norm(h + feed_forward(h))
        return nn.with_logical_constraint(out, _SEQUENCE)


class Wav2Vec2Encoder(nn.Module):
    """The context network ``g: Z → C`` (Baevski et al. 2020, §2); returns ``(last (B, L, D), hidden (N+1, B, L, D))``.

    ``frames`` (B, L) bool marks real frames (None: all are). Padded frames are zeroed before the
    positional conv and hidden from attention as keys (padded query frames are still computed, as
    in transformers). ``hidden[0]`` is the input of the first layer and ``hidden[i]`` the output of
    layer ``i``, exactly what transformers 5 returns for ``output_hidden_states=True``: with
    ``do_stable_layer_norm`` the final LayerNorm is applied to ``last`` only, so ``hidden[-1]`` is
    the pre-norm output of the last layer (transformers 4.x put the normed state, ``last``, there).
    """

    config: Wav2Vec2Config
    implementation: str = "xla"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, frames: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        c = self.config
        mask = None
        if frames is not None:
            x = jnp.where(frames[..., None], x, jnp.zeros((), x.dtype))
            mask = frames[:, None, None, :]
        x = x + Wav2Vec2PositionalConvEmbedding(c, dtype=self.dtype, name="pos_conv_embed")(x)
        final_norm = layer_norm(c.layer_norm_eps, name="layer_norm", dtype=self.dtype)
        if not c.do_stable_layer_norm:
            x = final_norm(x)
        x = nn.with_logical_constraint(x, _SEQUENCE)
        hidden = [x]
        for i in range(c.num_hidden_layers):
            x = Wav2Vec2EncoderLayer(c, self.implementation, dtype=self.dtype, name=f"layers_{i}")(x, mask)
            hidden.append(x)
        last = final_norm(x) if c.do_stable_layer_norm else x
        return last, jnp.stack(hidden)


class Wav2Vec2Output(NamedTuple):
    """What :class:`Wav2Vec2Model` returns (``L`` frames, ``D = hidden_size``, ``N`` layers)."""

    last_hidden_state: jax.Array  # (B, L, D)
    hidden_states: jax.Array  # (N + 1, B, L, D), as transformers' output_hidden_states=True
    extract_features: jax.Array  # (B, L, conv_dim[-1]): LayerNorm-ed conv features
    frame_mask: jax.Array  # (B, L) bool, True = frame of real audio


class Wav2Vec2Model(nn.Module):
    """wav2vec 2.0 (Baevski et al. 2020): waveform ``(B, T)`` [+ sample mask ``(B, T)``] → :class:`Wav2Vec2Output`.

    transformers' ``Wav2Vec2Model`` in ``eval()`` mode, with every hidden state returned.
    """

    config: Wav2Vec2Config
    implementation: str = "xla"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, waveform: jax.Array, attention_mask: jax.Array | None = None) -> Wav2Vec2Output:
        features = Wav2Vec2FeatureEncoder(self.config, dtype=self.dtype, name="feature_extractor")(waveform)
        b, length = features.shape[:2]
        frames = None if attention_mask is None else frame_mask(self.config, attention_mask, length)
        x, normed = Wav2Vec2FeatureProjection(self.config, dtype=self.dtype, name="feature_projection")(features)
        last, hidden = Wav2Vec2Encoder(self.config, self.implementation, dtype=self.dtype, name="encoder")(x, frames)
        return Wav2Vec2Output(last, hidden, normed, jnp.ones((b, length), bool) if frames is None else frames)
