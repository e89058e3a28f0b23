"""Emotion-to-Latents (MoEE, Liu et al. 2025, CVPR, arXiv 2501.01808, §Design 2).

Three emotion modalities become one set of emotion latent tokens, the keys/values of the experts
of :class:`~moee_jax.models.emotion_moe.EmotionMoE`:

* text   ``(B, Lt, Dt)`` — T5 encoder features of an emotion description,
* audio  ``(B, La, Da)`` — speech-emotion encoder features (emotion2vec in MoEE),
* label  ``(B, 6)``      — weights over :data:`~moee_jax.emotions.EMOTIONS` (a label or palette,
  :func:`moee_jax.emotions.label_weights`) through the label MLP ``Linear → SiLU → Linear`` to
  one token.

Each modality is mapped by its own linear layer to the common width ``D`` (for the label, the
MLP's last layer is that map); ``num_queries`` learnable query tokens attend to the concatenated
modality tokens (their keys/values) through ``num_layers`` pre-norm blocks of
``cross-attention → self-attention → feed-forward``, each a residual branch, then a final layer
norm: ``→ emotion tokens (B, num_queries, D)``.

Dropping (modality dropout in training, the unconditional branch of classifier-free guidance):
``drop (B, 3)`` bool flags, in the order :data:`MODALITIES`, remove a modality's tokens from the
keys of one sample; a modality not given at all is dropped for every sample. A sample left with
no token to attend to (all modalities dropped, or only padding) gets the learned null tokens
``null_tokens (num_queries, D)``, the same ones :meth:`EmotionToLatents.null` returns for the
unconditional branch at inference.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moee_jax.emotions import NUM_EMOTIONS
from moee_jax.models.transformers import FeedForward
from moee_jax.nn.attention import Attention, dot_product_attention
from moee_jax.nn.layers import dense, partitioned
from moee_jax.nn.norms import layer_norm

MODALITIES = ("text", "audio", "label")


class MaskedCrossAttention(nn.Module):
    """Cross-attention from ``x (B, Lq, C)`` to ``context (B, Lk, Dk)`` whose keys are masked by
    ``mask (B, Lk)`` (True = attend); same parameter layout as :class:`Attention`."""

    heads: int
    head_dim: int
    implementation: str = "xla"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array, mask: jax.Array) -> jax.Array:
        b, lq, c = x.shape
        inner = self.heads * self.head_dim

        def heads(t: jax.Array, name: str) -> jax.Array:  # (B, L, ·) → (B, L, H, Dh)
            t = dense(inner, ("embed", "heads"), use_bias=False, name=name, dtype=self.dtype)(t)
            return t.reshape(t.shape[0], t.shape[1], self.heads, self.head_dim)

        q, k, v = heads(x, "to_q"), heads(context, "to_k"), heads(context, "to_v")
        out = dot_product_attention(q, k, v, mask[:, None, None, :], implementation=self.implementation)
        return dense(c, ("heads", "embed"), name="to_out_0", dtype=self.dtype)(out.reshape(b, lq, inner))


class LatentBlock(nn.Module):
    """Queries ``(B, Q, D)`` ← cross-attn to ``context (B, Lk, D)`` (masked), self-attn, GEGLU FF."""

    dim: int
    heads: int
    implementation: str = "xla"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, q: jax.Array, context: jax.Array, mask: jax.Array) -> jax.Array:
        head_dim = self.dim // self.heads
        ctx = layer_norm(name="norm_context", dtype=self.dtype)(context)
        q = q + MaskedCrossAttention(self.heads, head_dim, self.implementation, self.dtype, name="cross_attn")(
            layer_norm(name="norm1", dtype=self.dtype)(q), ctx, mask
        )
        q = q + Attention(self.heads, head_dim, implementation=self.implementation, dtype=self.dtype, name="self_attn")(
            layer_norm(name="norm2", dtype=self.dtype)(q)
        )
        q = q + FeedForward(self.dim, dtype=self.dtype, name="ff")(layer_norm(name="norm3", dtype=self.dtype)(q))
        return nn.with_logical_constraint(q, ("batch", "length", "act_embed"))


class EmotionToLatents(nn.Module):
    """Text / audio / label features → emotion tokens ``(B, num_queries, dim)``.

    ``text_dim`` / ``audio_dim`` are the widths of the encoder features (None: the module has no
    such branch); ``use_label`` adds the label MLP. The parameter tree holds every declared branch
    whatever subset of inputs a call passes.

    Call: ``text (B, Lt, Dt)``, ``audio (B, La, Da)``, ``label (B, 6)``, any subset but not none;
    ``text_mask (B, Lt)`` / ``audio_mask (B, La)`` bool, False at padded tokens;
    ``drop (B, 3)`` bool, True drops (text, audio, label) for that sample.
    """

    dim: int
    num_queries: int = 16
    num_layers: int = 2
    heads: int = 8
    text_dim: int | None = None
    audio_dim: int | None = None
    use_label: bool = True
    implementation: str = "xla"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        text: jax.Array | None = None,
        audio: jax.Array | None = None,
        label: jax.Array | None = None,
        *,
        text_mask: jax.Array | None = None,
        audio_mask: jax.Array | None = None,
        drop: jax.Array | None = None,
    ) -> jax.Array:
        batch = self._check_inputs(text, audio, label, text_mask, audio_mask, drop)
        keep = jnp.ones((batch, len(MODALITIES)), bool) if drop is None else ~drop.astype(bool)
        tokens, masks = [], []

        # An absent modality enters as one fully masked zero token: its branch's parameters then
        # exist whatever subset a call (init included) passes, at the cost of one ignored key.
        for i, (name, feats, mask, width) in enumerate(
            (("text", text, text_mask, self.text_dim), ("audio", audio, audio_mask, self.audio_dim))
        ):
            if width is None:
                continue
            if feats is None:
                feats, mask = jnp.zeros((batch, 1, width), self.dtype), jnp.zeros((batch, 1), bool)
            elif mask is None:
                mask = jnp.ones(feats.shape[:2], bool)
            tokens.append(dense(self.dim, ("embed", "mlp"), name=f"{name}_proj", dtype=self.dtype)(feats.astype(self.dtype)))
            masks.append(mask.astype(bool) & keep[:, i : i + 1])
        if self.use_label:
            given = label is not None
            weights = label if given else jnp.zeros((batch, NUM_EMOTIONS), self.dtype)
            h = nn.silu(dense(self.dim, ("embed", "mlp"), name="label_fc1", dtype=self.dtype)(weights.astype(self.dtype)))
            tokens.append(dense(self.dim, ("mlp", "embed"), name="label_fc2", dtype=self.dtype)(h)[:, None])
            masks.append(keep[:, 2:3] & given)

        context = jnp.concatenate(tokens, axis=1)  # (B, Lk, D): text, audio, label tokens
        mask = jnp.concatenate(masks, axis=1)  # (B, Lk)
        conditioned = mask.any(axis=1)  # (B,)
        # A sample with no key gets the null tokens below; attending to all its keys meanwhile keeps
        # every attention backend free of NaN (forward and backward) on that row.
        mask = mask | ~conditioned[:, None]

        init = nn.initializers.normal(0.02)
        queries = self.param("queries", partitioned(init, (None, "embed")), (self.num_queries, self.dim))
        null = self.param("null_tokens", partitioned(init, (None, "embed")), (self.num_queries, self.dim))
        q = jnp.broadcast_to(queries.astype(self.dtype), (batch, self.num_queries, self.dim))
        for i in range(self.num_layers):
            q = LatentBlock(self.dim, self.heads, self.implementation, self.dtype, name=f"blocks_{i}")(q, context, mask)
        out = layer_norm(name="norm_out", dtype=self.dtype)(q)
        return jnp.where(conditioned[:, None, None], out, null.astype(out.dtype)[None])

    def null(self, batch: int) -> jax.Array:
        """The learned null tokens ``(batch, num_queries, dim)``: the unconditional emotion.

        ``model.apply(variables, batch, method=EmotionToLatents.null)``.
        """
        null = nn.unbox(self.get_variable("params", "null_tokens"))
        return jnp.broadcast_to(null.astype(self.dtype), (batch, self.num_queries, self.dim))

    def _check_inputs(self, text, audio, label, text_mask, audio_mask, drop) -> int:
        """The batch size, after checking each input against the declared branches."""
        given = {"text": text, "audio": audio, "label": label}
        if all(v is None for v in given.values()):
            raise ValueError(
                "EmotionToLatents needs at least one of text, audio, label; for the unconditional tokens use EmotionToLatents.null(batch)"
            )
        widths = {"text": self.text_dim, "audio": self.audio_dim, "label": NUM_EMOTIONS if self.use_label else None}
        ranks = {"text": 3, "audio": 3, "label": 2}
        batch = next(v.shape[0] for v in given.values() if v is not None)
        for name, v in given.items():
            if v is None:
                continue
            if widths[name] is None:
                raise ValueError(f"{name} features were given but this EmotionToLatents has no {name} branch")
            if v.ndim != ranks[name] or v.shape[0] != batch or v.shape[-1] != widths[name]:
                want = f"(B={batch}, {widths[name]})" if name == "label" else f"(B={batch}, L, {widths[name]})"
                raise ValueError(f"{name} must be {want}, got shape {v.shape}")
        for name, feats, mask in (("text", text, text_mask), ("audio", audio, audio_mask)):
            if mask is not None and (feats is None or mask.shape != feats.shape[:2]):
                want = "no mask (no features were given)" if feats is None else f"shape {feats.shape[:2]}"
                raise ValueError(f"{name}_mask must have {want}, got shape {mask.shape}")
        if drop is not None and drop.shape != (batch, len(MODALITIES)):
            raise ValueError(f"drop must be (B={batch}, {len(MODALITIES)}) flags for {MODALITIES}, got shape {drop.shape}")
        return batch
