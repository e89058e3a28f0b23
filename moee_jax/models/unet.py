"""The video denoising U-Net: SD1.5 topology with reference, audio, emotion and motion parts.

Per resolution level (Rombach et al. 2022, LDM; SD1.5 layout of diffusers ``UNet2DConditionModel``):
``ResNet → Transformer2D (self-attn ⊕ reference K/V, cross-attn, audio cross-attn, emotion slot,
FF) → TemporalTransformer`` (AnimateDiff motion module). Spatial layers run on frames folded into
the batch (:mod:`moee_jax.models.frames`), temporal layers on the unfolded video.

Boundary shapes (channels last):
  sample         (B, F, h, w, C_lat)     noisy latents of the frames to denoise
  timesteps      (B,)                    int or float diffusion time
  context        (B, Lc, D_ctx)          identity / image tokens for cross-attention
  motion_frames  (B, M, h, w, C_lat)     clean latents of the previous clip's last frames,
                                         prepended along time (they share the clip's timestep
                                         embedding, get no audio, and reach the clip only through
                                         temporal attention); only the F frames are returned
  reference      ReferenceNet tree       per-block ``(B, h_l·w_l, C_l)`` states (see reference.py)
  reference_keep (B,) bool               False drops the reference for that clip (CFG branch)
  audio          (B, F, La, D_audio)     per-frame audio tokens
  audio_mask     (B, F, h, w)            region gate of the audio attention (full / face / lip)
  emotion        EmotionCondition        tokens (B, Le, D_emo) [+ palette] for the emotion slot
                                         (skipped when None)
  face_locator   (B, F, h, w, C_0)       face-locator features added after ``conv_in``
  reference_latents (B, h, w, C_lat)     with ``reference_concat``: the reference latent, joined to
                                         every frame's input channels (zeros where
                                         ``reference_keep`` is False), as image-to-video models
                                         (Stable Video Diffusion) condition on their first frame
  → output       (B, F, h, w, C_out)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import jax.numpy as jnp

from moee_jax.models.config_dict import dataclass_from_dict
from moee_jax.models.frames import fold_frames, unfold_frames
from moee_jax.models.transformers import TemporalTransformer, Transformer2D, child, maybe_remat
from moee_jax.nn.embeddings import TimestepEmbedding, timestep_embedding
from moee_jax.nn.layers import conv, dense
from moee_jax.nn.norms import group_norm
from moee_jax.nn.resnet import ResnetBlock2D
from moee_jax.nn.sampling import Downsample2D, Upsample2D

if TYPE_CHECKING:  # the slot's condition type; the U-Net itself only passes it through
    from moee_jax.models.emotion_moe import EmotionCondition


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Topology of the video U-Net. Defaults are SD1.5 (diffusers' ``attention_head_dim=8`` there
    means eight heads per block, which is what ``num_attention_heads`` holds here)."""

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_attention: tuple[bool, ...] = (True, True, True, False)
    layers_per_block: int = 2
    num_attention_heads: int | tuple[int, ...] = 8
    transformer_layers_per_block: int = 1
    cross_attention_dim: int = 768
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    use_linear_projection: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    # video / conditioning parts; None or False disables the part
    motion_modules: bool = True
    motion_num_attention_heads: int = 8
    motion_transformer_layers: int = 1
    motion_max_seq_length: int = 32
    motion_norm_num_groups: int = 32
    motion_mid_block: bool = True
    audio_dim: int | None = 768
    # Also join the reference latent to every frame's input channels (conv_in takes 2 × in_channels):
    # pixel-aligned identity for small models, beside ReferenceNet's attention.
    reference_concat: bool = False
    # The emotion slot: a module factory ``slot(name=...)`` called as ``slot(x, emotion)`` inside every
    # spatial transformer block; ``emotion_dim`` is the width of its tokens.
    emotion_slot: Callable[..., nn.Module] | None = None
    emotion_dim: int | None = None
    # Also add the emotion to the timestep embedding (the mean emotion token through a zero-initialised
    # MLP, :class:`EmotionTimeEmbedding`), so every ResNet at every resolution sees it: the class
    # conditioning of ADM / diffusers' ``class_embed_type="projection"``, for small models whose
    # attention (and so the emotion slot) sits only at the coarsest levels.
    emotion_time_embedding: bool = False
    attention_implementation: str = "xla"
    # Rematerialisation of every spatial / temporal transformer block and ResNet in training:
    # "none" | "full" (recompute all) | "dots" (keep matmul outputs) — see transformers.REMAT_POLICIES.
    remat: str = "none"

    @classmethod
    def from_dict(cls, d) -> UNetConfig:
        """From a ``ConfigDict``/mapping, turning lists into tuples; unknown keys are an error."""
        return dataclass_from_dict(cls, d, "U-Net config")

    def heads(self, level: int) -> int:
        h = self.num_attention_heads
        return h[level] if isinstance(h, Sequence) else h

    def replace(self, **kw) -> UNetConfig:
        return dataclasses.replace(self, **kw)


class EmotionTimeEmbedding(nn.Module):
    """Emotion tokens ``(B, Le, De)`` → ``(B, D_temb)``, added to the timestep embedding.

    ``MLP(mean_l tokens)`` with a zero-initialised output layer, so a U-Net given this part starts
    as the U-Net without it. Its parameters live under ``unet/emotion/`` and so count among the
    emotion parts (``moee_jax.train.stages.EMOTION_PARTS``): frozen in the paper's stage 1, trained
    in stage 2. Compounds reach it as the tokens of their palette; a dropped emotion as the null tokens.
    """

    features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        h = jnp.mean(tokens.astype(jnp.float32), axis=1).astype(self.dtype)
        h = nn.silu(dense(self.features, ("embed", "mlp"), name="linear_1", dtype=self.dtype)(h))
        return dense(self.features, ("mlp", "embed"), name="linear_2", zero_init=True, dtype=self.dtype)(h)


class _Level(nn.Module):
    """The shared body of one down / mid / up level: (ResNet, Transformer2D?, motion?) × n."""

    cfg: UNetConfig
    channels: int
    level: int
    attention: bool
    num_frames: int
    dtype: jnp.dtype

    def resnet(self, i):
        block = maybe_remat(ResnetBlock2D, self.cfg.remat)
        return block(self.channels, self.cfg.norm_num_groups, self.cfg.norm_eps, dtype=self.dtype, name=f"resnets_{i}")

    def transformer(self, i):
        c = self.cfg
        return Transformer2D(
            self.channels,
            c.heads(self.level),
            c.cross_attention_dim,
            num_layers=c.transformer_layers_per_block,
            groups=c.norm_num_groups,
            use_linear_projection=c.use_linear_projection,
            audio_dim=c.audio_dim,
            emotion_slot=c.emotion_slot,
            implementation=c.attention_implementation,
            remat=c.remat,
            dtype=self.dtype,
            name=f"attentions_{i}",
        )

    def motion(self, i):
        c = self.cfg
        return TemporalTransformer(
            self.channels,
            c.motion_num_attention_heads,
            self.num_frames,
            num_layers=c.motion_transformer_layers,
            groups=c.motion_norm_num_groups,
            max_frames=c.motion_max_seq_length,
            implementation=c.attention_implementation,
            remat=c.remat,
            dtype=self.dtype,
            name=f"motion_modules_{i}",
        )

    def attend(self, i, h, cond):
        if self.attention:
            h = self.transformer(i)(h, cond["context"], reference=child(cond["reference"], f"attentions_{i}"), **cond["kw"])
        if self.cfg.motion_modules:
            h = self.motion(i)(h)
        return nn.with_logical_constraint(h, ("batch", "height", "width", "act_embed"))


class DownLevel(_Level):
    """Down level ``i``: returns the output and the skip states it contributes."""

    last: bool = False

    @nn.compact
    def __call__(self, h, temb, cond):
        skips = []
        for i in range(self.cfg.layers_per_block):
            h = self.attend(i, self.resnet(i)(h, temb), cond)
            skips.append(h)
        if not self.last:
            h = Downsample2D(self.channels, dtype=self.dtype, name="downsamplers_0")(h)
            skips.append(h)
        return h, skips


class MidLevel(_Level):
    """``ResNet → Transformer2D → motion → ResNet`` (diffusers' ``UNetMidBlockCrossAttnMotion`` order)."""

    @nn.compact
    def __call__(self, h, temb, cond):
        h = self.resnet(0)(h, temb)
        h = self.transformer(0)(h, cond["context"], reference=child(cond["reference"], "attentions_0"), **cond["kw"])
        if self.cfg.motion_modules and self.cfg.motion_mid_block:
            h = self.motion(0)(h)
        return self.resnet(1)(h, temb)


class UpLevel(_Level):
    """Up level: each ResNet takes the running state concatenated with one skip state."""

    last: bool = False

    @nn.compact
    def __call__(self, h, skips, temb, cond):
        """``skips``: this level's ``layers_per_block + 1`` skip states, deepest last."""
        for i, skip in enumerate(reversed(skips)):
            h = jnp.concatenate([h, skip], axis=-1)
            h = self.attend(i, self.resnet(i)(h, temb), cond)
        if not self.last:
            h = Upsample2D(self.channels, dtype=self.dtype, name="upsamplers_0")(h)
        return h


class VideoUNet(nn.Module):
    """Denoising U-Net over video latents; see the module docstring for the argument shapes.

    Also serves as ReferenceNet (``collect_reference=True``, one frame, no motion/audio parts):
    see :mod:`moee_jax.models.reference`.
    """

    config: UNetConfig = UNetConfig()
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array,
        context: jax.Array,
        *,
        motion_frames: jax.Array | None = None,
        reference: dict | None = None,
        reference_keep: jax.Array | None = None,
        audio: jax.Array | None = None,
        audio_mask: jax.Array | None = None,
        emotion: EmotionCondition | None = None,
        face_locator: jax.Array | None = None,
        reference_latents: jax.Array | None = None,
        collect_reference: bool = False,
    ) -> jax.Array:
        cfg = self.config
        b, f, h, w, _ = sample.shape
        self._check_inputs(sample, timesteps, context, audio, emotion)
        m = 0 if motion_frames is None else motion_frames.shape[1]
        x = sample if m == 0 else jnp.concatenate([motion_frames.astype(sample.dtype), sample], axis=1)
        frames = f + m
        if cfg.reference_concat:
            if reference_latents is None or reference_latents.shape != (b, h, w, cfg.in_channels):
                got = None if reference_latents is None else reference_latents.shape
                raise ValueError(f"reference_concat needs reference_latents (B={b}, {h}, {w}, {cfg.in_channels}), got {got}")
            ref = reference_latents.astype(x.dtype)
            if reference_keep is not None:
                ref = ref * reference_keep.astype(x.dtype)[:, None, None, None]
            x = jnp.concatenate([x, jnp.broadcast_to(ref[:, None], x.shape[:-1] + (ref.shape[-1],))], axis=-1)

        temb = timestep_embedding(
            jnp.broadcast_to(timesteps, (b,)), cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift
        )
        temb = TimestepEmbedding(4 * cfg.block_out_channels[0], dtype=self.dtype, name="time_embedding")(temb.astype(self.dtype))
        if cfg.emotion_time_embedding and emotion is not None:
            temb = temb + EmotionTimeEmbedding(temb.shape[-1], dtype=self.dtype, name="emotion")(emotion.tokens)
        temb = jnp.repeat(temb, frames, axis=0)

        kw = {"collect_reference": collect_reference, "emotion": emotion}
        if reference is not None:
            kw["reference_keep"] = reference_keep
        if cfg.audio_dim is not None:
            kw["audio"], kw["audio_mask"] = self._audio_inputs(audio, audio_mask, b, f, m, h, w, sample.dtype)
        cond = {"context": context, "reference": reference, "kw": kw}

        x = fold_frames(x.astype(self.dtype))
        x = conv(cfg.block_out_channels[0], 3, name="conv_in", dtype=self.dtype)(x)
        if face_locator is not None:
            pad = jnp.zeros((b, m) + face_locator.shape[2:], face_locator.dtype)
            x = x + fold_frames(jnp.concatenate([pad, face_locator], axis=1)).astype(x.dtype)

        skips = [x]
        levels = len(cfg.block_out_channels)
        for i, ch in enumerate(cfg.block_out_channels):
            x, s = DownLevel(cfg, ch, i, cfg.down_attention[i], frames, self.dtype, last=i == levels - 1, name=f"down_blocks_{i}")(
                x, temb, self._level_cond(cond, f"down_blocks_{i}", x)
            )
            skips += s
        x = MidLevel(cfg, cfg.block_out_channels[-1], levels - 1, True, frames, self.dtype, name="mid_block")(
            x, temb, self._level_cond(cond, "mid_block", x)
        )
        # Bottleneck features (B·(M+F), h', w', C) for the emotion discriminator (DICE-Talk eq. 16);
        # recorded only when the caller makes "intermediates" mutable.
        self.sow("intermediates", "mid_features", x)
        for i, ch in enumerate(reversed(cfg.block_out_channels)):
            level = levels - 1 - i
            n = cfg.layers_per_block + 1
            skips, level_skips = skips[:-n], skips[-n:]
            x = UpLevel(cfg, ch, level, cfg.down_attention[level], frames, self.dtype, last=i == levels - 1, name=f"up_blocks_{i}")(
                x, level_skips, temb, self._level_cond(cond, f"up_blocks_{i}", x)
            )

        x = nn.silu(group_norm(cfg.norm_num_groups, cfg.norm_eps, name="conv_norm_out", dtype=self.dtype)(x))
        x = conv(cfg.out_channels, 3, name="conv_out", dtype=self.dtype)(x)
        return unfold_frames(x, frames)[:, m:].astype(sample.dtype)

    def _level_cond(self, cond, name, x):
        """Conditioning for one level: its reference subtree and the audio mask at its resolution."""
        kw = dict(cond["kw"])
        if kw.get("audio_mask") is not None:
            mask = kw["audio_mask"]
            if mask.shape[1:3] != x.shape[1:3]:
                mask = jax.image.resize(mask, (mask.shape[0],) + x.shape[1:3], "linear")
            kw["audio_mask"] = mask
        return {"context": cond["context"], "reference": child(cond["reference"], name), "kw": kw}

    def _audio_inputs(self, audio, audio_mask, b, f, m, h, w, dtype):
        """Frame-folded audio tokens and gate; motion frames get zero tokens and a zero gate."""
        if audio is None:
            return None, None
        gate = jnp.ones((b, f, h, w), dtype) if audio_mask is None else audio_mask.astype(dtype)
        if m:
            audio = jnp.concatenate([jnp.zeros((b, m) + audio.shape[2:], audio.dtype), audio], axis=1)
            gate = jnp.concatenate([jnp.zeros((b, m, h, w), dtype), gate], axis=1)
        return fold_frames(audio), fold_frames(gate)

    def _check_inputs(self, sample, timesteps, context, audio, emotion):
        cfg = self.config
        if sample.ndim != 5:
            raise ValueError(f"sample must be (B, F, h, w, C) video latents, got shape {sample.shape}")
        b, f, h, w, c = sample.shape
        if c != cfg.in_channels:
            raise ValueError(f"sample has {c} channels, the U-Net expects in_channels={cfg.in_channels}")
        factor = 2 ** (len(cfg.block_out_channels) - 1)
        if h % factor or w % factor:
            raise ValueError(
                f"latent size {h}×{w} must be divisible by {factor} (the U-Net downsamples "
                f"{len(cfg.block_out_channels) - 1} times); image sides must be multiples of {8 * factor} pixels"
            )
        if context.ndim != 3 or context.shape[0] != b or context.shape[-1] != cfg.cross_attention_dim:
            raise ValueError(f"context must be (B={b}, L, {cfg.cross_attention_dim}) tokens, got shape {context.shape}")
        if emotion is not None:
            if cfg.emotion_slot is None and not cfg.emotion_time_embedding:
                raise ValueError(
                    "emotion tokens were given but this U-Net has no emotion slot (emotion_slot=None) nor emotion time embedding"
                )
            tokens = emotion.tokens
            if tokens.ndim != 3 or tokens.shape[0] != b or (cfg.emotion_dim and tokens.shape[-1] != cfg.emotion_dim):
                raise ValueError(f"emotion must be (B={b}, Le, {cfg.emotion_dim}) tokens, got shape {tokens.shape}")
        if audio is not None:
            if cfg.audio_dim is None:
                raise ValueError("audio tokens were given but this U-Net has no audio attention (audio_dim=None)")
            if audio.ndim != 4 or audio.shape[:2] != (b, f) or audio.shape[-1] != cfg.audio_dim:
                raise ValueError(f"audio must be (B={b}, F={f}, La, {cfg.audio_dim}) tokens, got shape {audio.shape}")
