"""T5's text encoder (Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified
Text-to-Text Transformer", JMLR 21, §2.1), a Flax port of transformers' ``T5EncoderModel``.

Token ids ``(B, L)`` → shared embedding → pre-norm blocks (RMS "T5LayerNorm" without bias;
self-attention *without* ``1/√d`` scaling plus a bucketed relative position bias that only the first
block owns and every block reuses; a ReLU MLP, or the gated-GELU MLP of T5 v1.1 / Flan-T5) → final
norm → ``(B, L, d_model)``. Dropout is omitted: this port is for inference and frozen feature
extraction, where transformers disables it too.

Module names follow transformers' (``shared``, ``encoder/block_N/layer_0/SelfAttention/q``,
``layer_1/DenseReluDense/wi_0``, ``encoder/final_layer_norm``) so its checkpoint keys convert by rule
(:mod:`moee_jax.checkpoint.convert.t5`).
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
from moee_jax.nn.layers import dense, partitioned

# transformers' ``ACT2FN`` names reachable through ``feed_forward_proj`` ("relu", "gated-gelu", ...).


@dataclasses.dataclass(frozen=True)
class T5EncoderConfig:
    """The encoder fields of transformers' ``T5Config`` (defaults are transformers' = t5-small).

    ``feed_forward_proj`` is ``"relu"`` (original T5) or ``"gated-<act>"``; ``"gated-gelu"``
    (T5 v1.1, Flan-T5) means the tanh-approximate GELU (``gelu_new``).
    """

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"

    def __post_init__(self):
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated") or self.dense_act_fn not in ACTIVATIONS:
            raise ValueError(
                f"T5EncoderConfig: feed_forward_proj {self.feed_forward_proj!r} is not supported; expected "
                f"'<act>' or 'gated-<act>' with <act> one of {sorted(ACTIVATIONS)}"
            )

    @property
    def is_gated_act(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def dense_act_fn(self) -> str:
        """The MLP activation's transformers name; ``gated-gelu`` maps to ``gelu_new`` as in transformers."""
        if self.feed_forward_proj == "gated-gelu":
            return "gelu_new"
        return self.feed_forward_proj.split("-")[-1]

    @classmethod
    def from_hf(cls, config: Any) -> T5EncoderConfig:
        """From a transformers ``T5Config`` or its ``config.json`` dict.

        Fields absent from a dict take transformers' defaults, as ``save_pretrained`` omits them.
        """
        fields = {f.name: hf_field(config, f.name, f.default) for f in dataclasses.fields(cls)}
        return cls(**fields)


def relative_position_buckets(
    query_length: int, key_length: int, *, num_buckets: int, max_distance: int, bidirectional: bool = True
) -> np.ndarray:
    """Bucket index of each ``(query, key)`` offset ``key − query``: ``(query_length, key_length)`` int32.

    Raffel et al. 2020, §2.1: half the buckets (per direction, when bidirectional) are exact
    offsets, the rest grow logarithmically up to ``max_distance``, beyond which offsets share the last
    bucket. Computed on the host in float32, as Mesh TensorFlow and transformers do, so the bins at
    exact powers agree with theirs.
    """
    relative = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]
    buckets = np.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative > 0).astype(relative.dtype) * num_buckets
        relative = np.abs(relative)
    else:
        relative = -np.minimum(relative, 0)
    max_exact = num_buckets // 2
    is_small = relative < max_exact
    with np.errstate(divide="ignore"):
        scaled = (
            np.log(relative.astype(np.float32) / np.float32(max_exact))
            / np.float32(math.log(max_distance / max_exact))
            * np.float32(num_buckets - max_exact)
        )
    large = max_exact + np.where(is_small, 0, scaled).astype(relative.dtype)
    large = np.minimum(large, num_buckets - 1)
    return (buckets + np.where(is_small, relative, large)).astype(np.int32)


class T5EncoderOutput(NamedTuple):
    """What :class:`T5Encoder` returns (``N = num_layers``).

    ``hidden_states[i]`` is transformers' ``hidden_states[i]`` with ``output_hidden_states=True``:
    entry 0 the token embeddings, entries 1..N−1 the blocks' outputs — these *before* the final
    norm — and entry N the last block's output *after* ``final_layer_norm``, i.e.
    ``last_hidden_state``.
    """

    last_hidden_state: jax.Array  # (B, L, d_model), after the final norm
    hidden_states: jax.Array  # (N + 1, B, L, d_model)


class T5LayerNorm(nn.Module):
    """RMS norm ``w · x / √(mean(x²) + ε)`` (no mean subtraction, no bias); statistics in fp32."""

    epsilon: float = 1e-6
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", partitioned(nn.initializers.ones_init(), ("norm",)), (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        return (scale * (x32 * jax.lax.rsqrt(variance + self.epsilon))).astype(self.dtype)


class T5Attention(nn.Module):
    """Unscaled multi-head self-attention ``softmax(q kᵀ + bias + mask) v``.

    With ``has_relative_attention_bias`` it owns the ``(num_buckets, heads)`` table and computes the
    position bias ``(1, H, L, L)``; otherwise it uses the ``position_bias`` it is given. Returns the
    output ``(B, L, d_model)`` and the bias, for the next block.
    """

    config: T5EncoderConfig
    has_relative_attention_bias: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None, position_bias: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        b, length, _ = x.shape
        inner = cfg.num_heads * cfg.d_kv

        def proj(name: str) -> jax.Array:
            t = dense(inner, ("embed", "heads"), use_bias=False, name=name, dtype=self.dtype)(x)
            return nn.with_logical_constraint(t.reshape(b, length, cfg.num_heads, cfg.d_kv), ("batch", "length", "act_heads", None))

        q, k, v = proj("q"), proj("k"), proj("v")
        if self.has_relative_attention_bias:
            table = nn.Embed(
                cfg.relative_attention_num_buckets,
                cfg.num_heads,
                param_dtype=jnp.float32,
                embedding_init=partitioned(nn.initializers.normal(cfg.d_model**-0.5), (None, "heads")),
                name="relative_attention_bias",
            )
            buckets = relative_position_buckets(
                length,
                length,
                num_buckets=cfg.relative_attention_num_buckets,
                max_distance=cfg.relative_attention_max_distance,
            )
            position_bias = table(jnp.asarray(buckets)).transpose(2, 0, 1)[None]
        elif position_bias is None:
            raise ValueError("a T5Attention without relative_attention_bias needs the first block's position_bias")
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) + position_bias
        if mask is not None:
            logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, length, inner)
        out = dense(cfg.d_model, ("heads", "embed"), use_bias=False, name="o", dtype=self.dtype)(out)
        # Row-parallel output replicated over 'tensor' (see moee_jax.parallel.rules).
        return nn.with_logical_constraint(out, ("batch", "length", "act_embed")), position_bias


class T5LayerSelfAttention(nn.Module):
    """``x + SelfAttention(layer_norm(x))``."""

    config: T5EncoderConfig
    has_relative_attention_bias: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask, position_bias):
        h = T5LayerNorm(self.config.layer_norm_epsilon, self.dtype, name="layer_norm")(x)
        h, position_bias = T5Attention(self.config, self.has_relative_attention_bias, self.dtype, name="SelfAttention")(
            h, mask, position_bias
        )
        return x + h, position_bias


class T5DenseReluDense(nn.Module):
    """``wo(act(wi(x)))``, or gated ``wo(act(wi_0(x)) · wi_1(x))``; no biases."""

    config: T5EncoderConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        act = ACTIVATIONS[cfg.dense_act_fn]

        def wi(name: str) -> jax.Array:
            return dense(cfg.d_ff, ("embed", "mlp"), use_bias=False, name=name, dtype=self.dtype)(x)

        h = act(wi("wi_0")) * wi("wi_1") if cfg.is_gated_act else act(wi("wi"))
        out = dense(cfg.d_model, ("mlp", "embed"), use_bias=False, name="wo", dtype=self.dtype)(h)
        return nn.with_logical_constraint(out, ("batch", "length", "act_embed"))


class T5LayerFF(nn.Module):
    """``x + DenseReluDense(layer_norm(x))``."""

    config: T5EncoderConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = T5LayerNorm(self.config.layer_norm_epsilon, self.dtype, name="layer_norm")(x)
        return x + T5DenseReluDense(self.config, self.dtype, name="DenseReluDense")(h)


class T5Block(nn.Module):
    """One encoder block: children ``layer_0`` (self-attention) and ``layer_1`` (feed-forward)."""

    config: T5EncoderConfig
    has_relative_attention_bias: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask, position_bias):
        x, position_bias = T5LayerSelfAttention(self.config, self.has_relative_attention_bias, self.dtype, name="layer_0")(
            x, mask, position_bias
        )
        x = T5LayerFF(self.config, self.dtype, name="layer_1")(x)
        return nn.with_logical_constraint(x, ("batch", "length", "act_embed")), position_bias


class T5Stack(nn.Module):
    """The encoder stack over embeddings ``(B, L, d_model)``: ``block_N`` then ``final_layer_norm``."""

    config: T5EncoderConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> T5EncoderOutput:
        hidden_states = [x]
        position_bias = None
        for i in range(self.config.num_layers):
            x, position_bias = T5Block(self.config, i == 0, self.dtype, name=f"block_{i}")(x, mask, position_bias)
            hidden_states.append(x)
        x = T5LayerNorm(self.config.layer_norm_epsilon, self.dtype, name="final_layer_norm")(x)
        hidden_states[-1] = x
        return T5EncoderOutput(last_hidden_state=x, hidden_states=jnp.stack(hidden_states))


class T5Encoder(nn.Module):
    """T5's encoder (Raffel et al. 2020, §2.1): token ids ``(B, L)`` → :class:`T5EncoderOutput`.

    ``attention_mask`` ``(B, L)`` (1 / True = token, 0 / False = padding) keeps padded *keys*
    out of every softmax, as transformers does; padded positions still get outputs (as in transformers),
    which carry no meaning. Without a mask every position attends everywhere.
    """

    config: T5EncoderConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> T5EncoderOutput:
        cfg = self.config
        if input_ids.ndim != 2:
            raise ValueError(f"T5 encoder input_ids must be (batch, length), got shape {input_ids.shape}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"T5 encoder attention_mask shape {attention_mask.shape} differs from input_ids shape {input_ids.shape}")
        x = nn.Embed(
            cfg.vocab_size,
            cfg.d_model,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            embedding_init=partitioned(nn.initializers.normal(1.0), (None, "embed")),
            name="shared",
        )(input_ids)
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        mask = None if attention_mask is None else attention_mask.astype(bool)[:, None, None, :]
        return T5Stack(cfg, self.dtype, name="encoder")(x, mask)
