"""Training objectives, one function per equation.

Diffusion objectives of MoEE (§3.5):

* :func:`latent_loss` — ``L_latent``, the denoising error per latent cell, masked;
* :func:`spatial_loss` — ``L_spatial = w(t)(‖Î − I‖₁ + LPIPS(Î, I))`` on decoded frames,
  :func:`spatial_weight` ``w(t) = cos(tπ / 2T)``.

Emotion objectives of DICE-Talk (Tan et al. 2025, arXiv 2504.18087):

* :func:`info_nce` — the embedder's contrastive loss, eqs. 7–8;
* ``vq_loss`` — the emotion-bank loss, eq. 17, lives beside the bank
  (:func:`moee_jax.models.emotion_bank.vq_loss`), which computes it in its forward pass;
* :func:`emotion_classification_loss` — the emotion discrimination objective, eq. 16, over the
  clips that have a class.

The MoEE gate objective:

* :func:`gate_loss` — teaches each Emotion MoE layer's gate network to predict the palette that
  drives it in training (:mod:`moee_jax.models.emotion_moe`), so it can act where none is given.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

_sg = jax.lax.stop_gradient


def info_nce(embeddings: jax.Array, labels: jax.Array, temperature: float, eps: float = 1e-8) -> jax.Array:
    """Contrastive loss of DICE-Talk eqs. 7–8 over a batch; scalar.

    ``embeddings (B, d)`` are emotion priors ``s``; ``labels (B,)`` int encode the (identity,
    emotion) pair as one integer (or, for HDTF, the source video), so ``s^p`` is a positive of ``s``
    when their labels agree and ``s^n`` a negative when they differ. With ``ζ`` the cosine
    similarity and ``ω(s̃) = exp(ζ(s, s̃)/τ)`` (eq. 7), each (anchor, positive) pair costs

        ``−log( ω(s^p) / (ω(s^p) + Σ_{s^n ∈ S^n} ω(s^n)) )``   (eq. 8)

    — exactly eq. 8: the denominator holds that one positive and the anchor's negatives, never the
    anchor itself nor its other positives (unlike SupCon's ``L_out``, whose denominator is every
    other sample). The loss is the mean over each anchor's positives, then over the anchors that
    have at least one positive; a batch with no positive pair gives 0. The paper's "fixed constant
    added to the similarity" cancels in the ratio; the log-sum-exp form here is already stable.
    """
    z = embeddings.astype(jnp.float32)
    z = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), eps)
    logits = (z @ z.T) / temperature  # (B, B): ζ(s_i, s_j)/τ
    same = labels[:, None] == labels[None, :]
    pos = same & ~jnp.eye(labels.shape[0], dtype=bool)
    # A finite fill (not −inf) keeps anchors without negatives NaN-free in the backward pass.
    lse_neg = jax.nn.logsumexp(jnp.where(same, jnp.finfo(jnp.float32).min, logits), axis=1)  # (B,)
    pair = jnp.logaddexp(logits, lse_neg[:, None]) - logits  # (B, B): eq. 8 for every (i, j)
    n_pos = pos.sum(axis=1)
    per_anchor = jnp.where(pos, pair, 0.0).sum(axis=1) / jnp.maximum(n_pos, 1)
    has_pos = n_pos > 0
    return jnp.where(has_pos, per_anchor, 0.0).sum() / jnp.maximum(has_pos.sum(), 1)


def emotion_classification_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """DICE-Talk eq. 16: cross-entropy ``−Σ_c y_c log p_{t,c}`` averaged over the clips that have a
    class; scalar.

    ``logits (B, num_classes)``, ``labels (B,)`` int; a label of −1 (a compound emotion, which has
    no class) leaves its clip out, and a batch without a labelled clip gives 0. Each batch row
    carries its own sampled timestep ``t``, so the mean is eq. 16's mean over the sampled timesteps.
    """
    labels = labels.astype(jnp.int32)
    valid = labels >= 0
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_p, jnp.maximum(labels, 0)[:, None], axis=-1)[:, 0]
    return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(valid.sum(), 1)


def weighted_mean(err: jax.Array, mask: jax.Array) -> jax.Array:
    """Per-sample mean of ``err (B, …)`` over the cells where ``mask`` (same shape) is on: ``(B,)``."""
    axes = tuple(range(1, err.ndim))
    return jnp.sum(err * mask, axis=axes) / jnp.maximum(jnp.sum(mask, axis=axes), 1e-6)


def latent_loss(prediction: jax.Array, target: jax.Array, mask: jax.Array, weight: jax.Array | None = None) -> jax.Array:
    """MoEE's ``L_latent = E‖ε − ε_θ(z_t, t, c)‖²`` (or the v target) per sample ``(B,)``.

    ``prediction``, ``target (B, F, h, w, C)``; ``mask (B, F, h, w)`` the weight of each latent cell
    (0 on the mouth of a masked noisy sample, MoEE Design 3), normalised by its sum per sample so
    masked cells contribute exactly nothing; ``weight (B,)`` an optional per-sample factor (e.g.
    the min-SNR-γ weight).
    """
    per_sample = weighted_mean(jnp.mean(jnp.square(prediction.astype(jnp.float32) - target), axis=-1), mask)
    return per_sample if weight is None else per_sample * weight


def spatial_weight(t: jax.Array, num_train_timesteps: int) -> jax.Array:
    """MoEE's ``w(t) = cos(t·π / 2T)``: 1 at t = 0, 0 at t = T."""
    return jnp.cos(t.astype(jnp.float32) * math.pi / (2 * num_train_timesteps))


def spatial_loss(
    images: jax.Array,
    truth: jax.Array,
    mask: jax.Array,
    t: jax.Array,
    num_train_timesteps: int,
    perceptual: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
    perceptual_weight: float = 1.0,
) -> tuple[jax.Array, jax.Array | None]:
    """MoEE's ``L_spatial = w(t)·(‖Î − I‖₁ + ‖V(Î) − V(I)‖²)``, averaged over the batch; scalar.

    ``images``, ``truth (B, k, H, W, 3)`` decoded x̂₀ frames and the ground truth in [-1, 1];
    ``mask (B, k, H, W, 1)`` hides the same pixels from both (the masked noisy samples' mouths);
    ``perceptual(a, b) → (N,)`` an LPIPS distance over frames ``(N, H, W, 3)``, or None for L1
    only. → ``(loss, mean perceptual distance or None)``.
    """
    b, k = images.shape[:2]
    per_sample = weighted_mean(jnp.abs(images - truth), jnp.broadcast_to(mask, images.shape))
    distance = None
    if perceptual is not None:
        flat = (-1,) + images.shape[2:]
        d = perceptual((images * mask).reshape(flat), (truth * mask).reshape(flat)).reshape(b, k)
        distance = jnp.mean(d)
        per_sample = per_sample + perceptual_weight * jnp.mean(d, axis=1)
    return jnp.mean(spatial_weight(t, num_train_timesteps) * per_sample), distance


def gate_targets(palette: jax.Array) -> jax.Array:
    """``(B, E)`` palettes → ``(B, E + 1)`` gate targets: the palette and its "none" share ``1 − Σ``."""
    palette = palette.astype(jnp.float32)
    return jnp.concatenate([palette, jnp.clip(1.0 - palette.sum(-1, keepdims=True), 0.0, 1.0)], axis=-1)


def gate_loss(logits: Sequence[jax.Array], palette: jax.Array, weight: jax.Array | None = None) -> jax.Array:
    """Cross-entropy of every MoE layer's global gate against the clip's palette; scalar.

    ``logits``: per layer ``(N, E + 1)`` with ``N = B·F`` frame-folded rows (row ``b·F + f``);
    ``palette (B, E)``; ``weight (B,)`` per clip (e.g. 0 for a compound, whose palette the gate is not
    meant to guess), default 1. The target of every frame of clip ``b`` is
    ``gate_targets(palette)[b]``; the loss is ``−Σ_k target_k · log softmax(logits)_k``,
    averaged over frames, then weighted over clips, then over layers.
    """
    if not logits:
        return jnp.zeros((), jnp.float32)
    target = gate_targets(palette)  # (B, E + 1)
    b = target.shape[0]
    w = jnp.ones((b,), jnp.float32) if weight is None else weight.astype(jnp.float32)
    per_layer = []
    for layer in logits:
        log_p = jax.nn.log_softmax(layer.astype(jnp.float32), axis=-1).reshape(b, -1, target.shape[-1])  # (B, F, E + 1)
        ce = -jnp.sum(target[:, None] * log_p, axis=-1).mean(axis=1)  # (B,)
        per_layer.append(jnp.sum(w * ce) / jnp.maximum(w.sum(), 1e-6))
    return jnp.mean(jnp.stack(per_layer))
