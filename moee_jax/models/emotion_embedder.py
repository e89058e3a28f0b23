"""DICE-Talk's disentangled (Gaussian) emotion embedder (Tan et al. 2025, arXiv 2504.18087, §3.1).

An emotion reference clip of ``N`` frames — mouth-masked face crops and audio-encoder features
aligned to the frames — becomes a Gaussian emotion prior ``N(μ_s, σ_s²)`` in ``R^d`` (eqs. 2–6):

* visual expression features ``s_β (B, N, d)``: a small per-frame conv encoder
  (:class:`VisualExpressionEncoder`; the paper follows StyleTalk and encodes 3DMM expression
  coefficients, here the mouth-masked crops themselves are encoded);
* audio features ``s_α (B, N, d)``: a linear map of precomputed Whisper / wav2vec2 hidden states
  followed by learnable transformer layers (:class:`AudioEmotionEncoder`);
* per layer (eqs. 2–3) ``ŝ_α = s_α + λ·CA(W_Q s_α, W_K s_β, W_V s_β)``, the output feeding the next
  layer;
* attention pooling (eqs. 4–5) with ``w = softmax_N(W_s ŝ_α)``: ``μ_s = Σ_n w_n ŝ_α,n`` and
  ``σ_s² = Σ_n w_n (ŝ_α,n − μ_s)²``;
* reparameterised sample (eq. 6) ``s = μ_s + σ_s·ε``, ``ε ~ N(0, I)`` from the ``"sample"`` rng.

The embedder is trained on its own with the InfoNCE loss of eqs. 7–8
(:func:`moee_jax.train.losses.info_nce`) on the samples ``s``.

**λ (eq. 3).** The paper lists ``W_Q, W_K, W_V`` and ``W_s`` as trainable and gives λ neither a
value nor a training rule, so λ is a fixed hyper-parameter here (``cross_attention_scale``).

**Modality dropout** (§3.1 "random dropout trick", §4.1: "randomly dropout expression coefficients
or audios, but they will not be zeroed out simultaneously"). In training each sample drops its
audio with probability ``p_audio_drop``, its video with probability ``p_video_drop``, never both
(:func:`modality_keep_masks`). The paper's operation is *setting the dropped features to zero*:

* dropped audio: ``s_α = 0`` (after the audio transformer, where the paper defines ``s_α``). The
  cross-attention queries ``W_Q·0 = 0`` are then uniform over frames, so every frame receives the
  same visual summary: ``μ_s`` is a mean of visual values and ``σ_s² = 0`` exactly, i.e. ``σ_s``
  collapses to ``√eps`` — a video-only prior is (almost) a point. The paper does not use the visual
  stream as queries when audio is absent, so neither does this module.
* dropped video: the cross-attention term is multiplied by 0, so ``ŝ_α = s_α`` in every layer.
  (Zeroing ``s_β`` alone would leave the output-projection bias of the attention; gating the term
  is what "the visual stream contributes nothing" means.)

At inference the same semantics give the three modes the analysis compares (DICE-Talk Table 5):
``audio_features`` only (video absent ⇒ no cross-attention), ``frames`` only (audio absent ⇒
``s_α = 0``) or both. A module applied in training to the dropped-audio case therefore equals the
video-only inference mode, and likewise for dropped video. Initialise with both modalities so that
every parameter exists.
"""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from moee_jax.models.frames import fold_frames, unfold_frames
from moee_jax.nn.attention import Attention
from moee_jax.nn.layers import conv, dense
from moee_jax.nn.norms import layer_norm

_ACT = ("batch", "length", "act_embed")


@flax.struct.dataclass
class EmotionPrior:
    """The Gaussian emotion prior of one clip per row: ``mu``, ``sigma`` and ``sample``, each ``(B, d)``.

    ``sample`` is ``mu + sigma·ε`` (eq. 6), or ``mu`` itself when the embedder ran deterministically.
    """

    mu: jax.Array
    sigma: jax.Array
    sample: jax.Array


def modality_keep_masks(rng: jax.Array, batch: int, p_audio_drop: float, p_video_drop: float) -> tuple[jax.Array, jax.Array]:
    """Per-sample modality dropout: ``(keep_audio, keep_video)``, each bool ``(batch,)``.

    Each sample draws one of {keep both, drop audio, drop video} with probabilities
    ``(1 − p_a − p_v, p_a, p_v)``, so the marginal drop rates are exactly ``p_audio_drop`` and
    ``p_video_drop`` and both modalities are never dropped together (DICE-Talk §4.1).
    """
    if min(p_audio_drop, p_video_drop) < 0 or p_audio_drop + p_video_drop > 1:
        raise ValueError(
            f"modality dropout p_audio_drop={p_audio_drop}, p_video_drop={p_video_drop}: "
            "expected non-negative probabilities with a sum of at most 1 (never both dropped)"
        )
    u = jax.random.uniform(rng, (batch,))
    keep_audio = u >= p_audio_drop
    keep_video = (u < p_audio_drop) | (u >= p_audio_drop + p_video_drop)
    return keep_audio, keep_video


class VisualExpressionEncoder(nn.Module):
    """Mouth-masked face crops ``(B, N, H, W, 3)`` in [-1, 1] → visual expression features ``s_β (B, N, dim)``.

    ``mouth_mask (B, N, H, W)`` in [0, 1] blends the mouth region to 0, which is mid-grey in
    [-1, 1], so lip shape (driven by the speech, not the emotion) does not reach the features.
    Each frame is encoded on its own: stride-2 convs, a spatial mean, and a linear map to ``dim``.
    """

    dim: int
    channels: tuple[int, ...] = (32, 64, 128)
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, frames: jax.Array, mouth_mask: jax.Array | None = None) -> jax.Array:
        n = frames.shape[1]
        x = frames.astype(self.dtype)
        if mouth_mask is not None:
            x = x * (1.0 - mouth_mask.astype(self.dtype)[..., None])
        h = fold_frames(x)  # (B·N, H, W, 3)
        for i, c in enumerate(self.channels):
            h = nn.silu(conv(c, 3, strides=2, name=f"conv_{i}", dtype=self.dtype)(h))
        h = jnp.mean(h, axis=(1, 2))  # (B·N, C)
        s_beta = dense(self.dim, ("embed", "mlp"), name="proj", dtype=self.dtype)(h)
        return nn.with_logical_constraint(unfold_frames(s_beta, n), _ACT)


class AudioTransformerLayer(nn.Module):
    """Pre-LayerNorm transformer layer over the frame axis: self-attention, then a GELU MLP."""

    dim: int
    heads: int
    mlp_ratio: int = 4
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = layer_norm(name="norm_attn", dtype=self.dtype)(x)
        x = x + Attention(self.heads, self.dim // self.heads, name="attn", dtype=self.dtype)(h)
        h = layer_norm(name="norm_mlp", dtype=self.dtype)(x)
        h = nn.gelu(dense(self.dim * self.mlp_ratio, ("embed", "mlp"), name="mlp_in", dtype=self.dtype)(h), approximate=False)
        h = dense(self.dim, ("mlp", "embed"), name="mlp_out", dtype=self.dtype)(h)
        return x + nn.with_logical_constraint(h, _ACT)


class AudioEmotionEncoder(nn.Module):
    """Audio-encoder features ``(B, N, D_audio)`` → audio features ``s_α (B, N, dim)``.

    DICE-Talk stacks learnable transformer layers on a frozen Whisper-Tiny; the frozen encoder runs
    outside this module (its features are an input). No positional embedding is added: the encoder
    hidden states already carry position, and the pooling of eqs. 4–5 is order-free.
    """

    dim: int
    heads: int
    num_layers: int = 2
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, audio_features: jax.Array) -> jax.Array:
        h = dense(self.dim, ("embed", "mlp"), name="proj_in", dtype=self.dtype)(audio_features.astype(self.dtype))
        h = nn.with_logical_constraint(h, _ACT)
        for i in range(self.num_layers):
            h = AudioTransformerLayer(self.dim, self.heads, name=f"layers_{i}", dtype=self.dtype)(h)
        return layer_norm(name="norm_out", dtype=self.dtype)(h)


class GaussianEmotionEmbedder(nn.Module):
    """DICE-Talk eqs. 2–6: an emotion reference clip → :class:`EmotionPrior` ``(B, dim)``.

    Inputs (either modality may be None at inference, not both): ``audio_features (B, N, D_audio)``
    aligned to the ``N`` frames, ``frames (B, N, H, W, 3)`` in [-1, 1] with ``mouth_mask
    (B, N, H, W)`` in [0, 1]. See the module docstring for the modality semantics.

    ``train=True`` applies modality dropout (rng stream ``"dropout"``) when both modalities are
    given. ``deterministic=True`` returns ``sample = mu``; otherwise ``ε`` comes from the rng stream
    ``"sample"``. ``σ_s = sqrt(σ_s² + eps)``, so it is positive even where eq. 5 gives 0. The
    pooling weights ``softmax(W_s ŝ_α) (B, N)`` are sown as ``intermediates/pool_weights`` for
    analysis (which frames carry the emotion).
    """

    dim: int = 128
    heads: int = 4
    num_audio_layers: int = 2
    num_layers: int = 2
    cross_attention_scale: float = 1.0  # λ of eq. 3
    visual_channels: tuple[int, ...] = (32, 64, 128)
    p_audio_drop: float = 0.2
    p_video_drop: float = 0.2
    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        audio_features: jax.Array | None = None,
        frames: jax.Array | None = None,
        mouth_mask: jax.Array | None = None,
        *,
        train: bool = False,
        deterministic: bool = False,
    ) -> EmotionPrior:
        if audio_features is None and frames is None:
            raise ValueError("GaussianEmotionEmbedder needs audio_features, frames, or both; got neither")
        s_beta = None
        if frames is not None:
            s_beta = VisualExpressionEncoder(self.dim, self.visual_channels, name="visual", dtype=self.dtype)(frames, mouth_mask)
        if audio_features is not None:
            s_alpha = AudioEmotionEncoder(self.dim, self.heads, self.num_audio_layers, name="audio", dtype=self.dtype)(audio_features)
        else:
            s_alpha = jnp.zeros(s_beta.shape, self.dtype)  # absent audio is zeroed audio, as in training
        b = s_alpha.shape[0]

        keep_video = jnp.ones((b,), bool)
        if train and audio_features is not None and frames is not None:
            keep_audio, keep_video = modality_keep_masks(self.make_rng("dropout"), b, self.p_audio_drop, self.p_video_drop)
            s_alpha = s_alpha * keep_audio[:, None, None].astype(s_alpha.dtype)

        if s_beta is not None:
            gate = self.cross_attention_scale * keep_video[:, None, None].astype(s_alpha.dtype)
            for i in range(self.num_layers):
                ca = Attention(self.heads, self.dim // self.heads, name=f"cross_attn_{i}", dtype=self.dtype)(s_alpha, s_beta)
                s_alpha = s_alpha + gate * ca  # eq. 3

        # Eqs. 4–5 in fp32: softmax over frames of W_s ŝ_α, then the weighted mean and variance.
        s_hat = s_alpha.astype(jnp.float32)
        logits = dense(1, ("embed", None), use_bias=False, name="pool", dtype=self.dtype)(s_alpha)[..., 0]
        w = jax.nn.softmax(logits.astype(jnp.float32), axis=1)  # (B, N)
        self.sow("intermediates", "pool_weights", w)
        mu = jnp.einsum("bn,bnd->bd", w, s_hat)
        var = jnp.einsum("bn,bnd->bd", w, jnp.square(s_hat - mu[:, None]))
        sigma = jnp.sqrt(var + self.eps)
        if deterministic:
            sample = mu
        else:
            sample = mu + sigma * jax.random.normal(self.make_rng("sample"), mu.shape, mu.dtype)  # eq. 6
        return EmotionPrior(mu=mu, sigma=sigma, sample=sample)
