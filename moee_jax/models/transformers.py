"""Spatial and temporal transformer modules of the video U-Net.

* :class:`Transformer2D` — SD's spatial transformer (diffusers ``Transformer2DModel``) whose blocks
  add Hallo-style reference attention, an audio cross-attention slot and an emotion slot.
* :class:`TemporalTransformer` — AnimateDiff's motion module (Guo et al. 2024, §4.2; diffusers
  ``AnimateDiffTransformer3D``): attention over frames at every spatial position.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moee_jax.models.frames import fold_frames, unfold_frames
from moee_jax.nn.attention import Attention
from moee_jax.nn.embeddings import sinusoidal_positions
from moee_jax.nn.layers import conv, dense
from moee_jax.nn.norms import group_norm, layer_norm

if TYPE_CHECKING:  # the slot's condition type; the blocks only pass it through
    from moee_jax.models.emotion_moe import EmotionCondition

# Collection into which ReferenceNet writes each block's normalised pre-self-attention states.
REFERENCE_COLLECTION = "reference"


def child(tree: dict | None, name: str) -> Any:
    """``tree[name]`` or None: walks the reference-feature tree alongside the module tree."""
    return None if tree is None else tree.get(name)


class GEGLU(nn.Module):
    """``a · gelu(b)`` with ``[a, b] = proj(x)`` (Shazeer 2020)."""

    inner: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        a, gate = jnp.split(dense(2 * self.inner, ("embed", "mlp"), name="proj", dtype=self.dtype)(x), 2, axis=-1)
        return a * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """GEGLU MLP with 4× expansion; children ``net_0`` (GEGLU) and ``net_2`` (out) as in diffusers."""

    dim: int
    mult: int = 4
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = GEGLU(self.dim * self.mult, dtype=self.dtype, name="net_0")(x)
        return nn.with_logical_constraint(
            dense(self.dim, ("mlp", "embed"), name="net_2", dtype=self.dtype)(h), ("batch", "length", "act_embed")
        )


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute everything in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs, recompute the rest
}


def maybe_remat(module_cls, remat: str):
    """``module_cls`` itself, or its rematerialised version (``nn.remat`` with the named policy)."""
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat={remat!r}; choose one of {tuple(REMAT_POLICIES)}")
    if remat == "none":
        return module_cls
    return nn.remat(module_cls, policy=REMAT_POLICIES[remat], prevent_cse=True)


class SpatialTransformerBlock(nn.Module):
    """One spatial transformer block over a frame-folded token sequence ``x (N, L, C)``.

    In order, each a residual branch:
      1. self-attention; its K/V extended by ReferenceNet states of the same block (per clip,
         ``reference (B, Lr, C)``, dropped per clip where ``reference_keep`` is False);
      2. cross-attention to context tokens ``context (B, Lc, Dc)`` (identity / image tokens);
      3. audio cross-attention to per-frame tokens ``audio (N, La, Da)``, output gated by
         ``audio_mask (N, L, 1)``, zero-initialised out-projection (Hallo's audio attention);
         skipped when no audio is given;
      4. the emotion slot, a module ``emotion_slot(x, emotion)`` with ``emotion`` an
         :class:`~moee_jax.models.emotion_moe.EmotionCondition` (tokens ``(B, Le, De)``),
         skipped when no emotion is given;
      5. GEGLU feed-forward.
    With ``collect_reference`` the normalised input of (1) is sown into the ``reference``
    collection: that is what ReferenceNet hands to the denoising U-Net.
    """

    dim: int
    heads: int
    cross_attention_dim: int
    audio_dim: int | None = None
    emotion_slot: Callable[..., nn.Module] | None = None
    implementation: str = "xla"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        context: jax.Array,
        *,
        reference: dict | None = None,
        reference_keep: jax.Array | None = None,
        audio: jax.Array | None = None,
        audio_mask: jax.Array | None = None,
        emotion: EmotionCondition | None = None,
        collect_reference: bool = False,
    ) -> jax.Array:
        head_dim = self.dim // self.heads
        attn = lambda name, **kw: Attention(  # noqa: E731
            self.heads, head_dim, implementation=self.implementation, dtype=self.dtype, name=name, **kw
        )
        h = layer_norm(name="norm1", dtype=self.dtype)(x)
        if collect_reference:
            self.sow(REFERENCE_COLLECTION, "self_attn_states", h)
        ref = child(reference, "self_attn_states")
        x = x + attn("attn1")(h, extra_kv=ref, extra_kv_keep=reference_keep if ref is not None else None)
        x = x + attn("attn2")(layer_norm(name="norm2", dtype=self.dtype)(x), context)
        if self.audio_dim is not None and audio is not None:
            a = attn("audio_attn", zero_init_out=True)(layer_norm(name="norm_audio", dtype=self.dtype)(x), audio)
            x = x + (a if audio_mask is None else a * audio_mask.astype(a.dtype))
        if self.emotion_slot is not None and emotion is not None:
            x = self.emotion_slot(name="emotion")(x, emotion)
        x = x + FeedForward(self.dim, dtype=self.dtype, name="ff")(layer_norm(name="norm3", dtype=self.dtype)(x))
        return nn.with_logical_constraint(x, ("batch", "length", "act_embed"))


class Transformer2D(nn.Module):
    """SD spatial transformer: GroupNorm → proj_in → blocks → proj_out, plus the input (residual).

    ``x (N, H, W, C)`` → same. ``proj_in``/``proj_out`` are 1×1 convs (SD1.5) or dense layers
    (``use_linear_projection``, SD2). ``audio_mask (N, H, W)`` gates audio attention per pixel.
    """

    channels: int
    heads: int
    cross_attention_dim: int
    num_layers: int = 1
    groups: int = 32
    use_linear_projection: bool = False
    audio_dim: int | None = None
    emotion_slot: Callable[..., nn.Module] | None = None
    implementation: str = "xla"
    remat: str = "none"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array, *, reference: dict | None = None, audio_mask=None, **kw):
        n, hgt, wid, c = x.shape
        h = group_norm(self.groups, 1e-6, name="norm", dtype=self.dtype)(x)
        if self.use_linear_projection:
            h = dense(self.channels, ("embed", "mlp"), name="proj_in", dtype=self.dtype)(h.reshape(n, hgt * wid, c))
        else:
            h = conv(self.channels, 1, name="proj_in", dtype=self.dtype)(h).reshape(n, hgt * wid, self.channels)
        mask = None if audio_mask is None else audio_mask.reshape(n, hgt * wid, 1)
        # A rematerialised block takes only array arguments: ReferenceNet's sowing pass is never remat'ed.
        collect = bool(kw.pop("collect_reference", False))
        block_cls = SpatialTransformerBlock if collect else maybe_remat(SpatialTransformerBlock, self.remat)
        if collect:
            kw["collect_reference"] = True
        for i in range(self.num_layers):
            h = block_cls(
                self.channels,
                self.heads,
                self.cross_attention_dim,
                audio_dim=self.audio_dim,
                emotion_slot=self.emotion_slot,
                implementation=self.implementation,
                dtype=self.dtype,
                name=f"transformer_blocks_{i}",
            )(h, context, reference=child(reference, f"transformer_blocks_{i}"), audio_mask=mask, **kw)
        if self.use_linear_projection:
            h = nn.with_logical_constraint(
                dense(c, ("mlp", "embed"), name="proj_out", dtype=self.dtype)(h), ("batch", "length", "act_embed")
            ).reshape(n, hgt, wid, c)
        else:
            h = conv(c, 1, name="proj_out", dtype=self.dtype)(h.reshape(n, hgt, wid, self.channels))
        return h + x


class TemporalTransformerBlock(nn.Module):
    """AnimateDiff temporal block: two self-attentions over frames (positions added to each
    normalised input) and a GEGLU feed-forward. ``x (N, F, C)`` with N = B·H·W."""

    dim: int
    heads: int
    max_frames: int = 32
    implementation: str = "xla"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pe = jnp.asarray(sinusoidal_positions(self.max_frames, self.dim)[: x.shape[1]], self.dtype)
        for i in (1, 2):
            h = layer_norm(name=f"norm{i}", dtype=self.dtype)(x) + pe
            x = x + Attention(self.heads, self.dim // self.heads, implementation=self.implementation, dtype=self.dtype, name=f"attn{i}")(h)
        return x + FeedForward(self.dim, dtype=self.dtype, name="ff")(layer_norm(name="norm3", dtype=self.dtype)(x))


class TemporalTransformer(nn.Module):
    """AnimateDiff motion module over a frame-folded ``x (B·F, H, W, C)`` → same.

    GroupNorm statistics span frames; each spatial position becomes a sequence of F tokens.
    ``proj_out`` is zero-initialised so a fresh module is the identity (AnimateDiff §4.2).
    """

    channels: int
    heads: int
    num_frames: int
    num_layers: int = 1
    groups: int = 32
    max_frames: int = 32
    implementation: str = "xla"
    remat: str = "none"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.num_frames > self.max_frames:
            raise ValueError(
                f"temporal attention covers at most {self.max_frames} frames (motion_max_seq_length) "
                f"but got {self.num_frames}, motion frames included; generate in shorter clips"
            )
        v = unfold_frames(x, self.num_frames)
        b, f, hgt, wid, c = v.shape
        h = group_norm(self.groups, 1e-6, name="norm", dtype=self.dtype)(v)
        h = h.transpose(0, 2, 3, 1, 4).reshape(b * hgt * wid, f, c)
        h = dense(c, ("embed", "mlp"), name="proj_in", dtype=self.dtype)(h)
        for i in range(self.num_layers):
            h = maybe_remat(TemporalTransformerBlock, self.remat)(
                c, self.heads, self.max_frames, self.implementation, self.dtype, name=f"transformer_blocks_{i}"
            )(h)
        h = dense(c, ("mlp", "embed"), zero_init=True, name="proj_out", dtype=self.dtype)(h)
        h = nn.with_logical_constraint(h, ("batch", "length", "act_embed"))
        h = h.reshape(b, hgt, wid, f, c).transpose(0, 3, 1, 2, 4)
        return fold_frames(h) + x
