"""Training objectives.

Emotion objectives of DICE-Talk (Tan et al. 2025, arXiv 2504.18087):

* :func:`info_nce` — the embedder's contrastive loss, eqs. 7–8;
* :func:`vq_loss` — the emotion-bank loss, eq. 17;
* :func:`emotion_classification_loss` — the emotion discrimination objective, eq. 16.

The MoEE gate objective:

* :func:`gate_loss` — teaches each Emotion MoE layer's gate network to predict the palette that
  drives it in training (:mod:`moee_jax.models.emotion_moe`), so it can act where none is given.
"""

from __future__ import annotations

from collections.abc import Sequence

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


def vq_loss(s: jax.Array, code: jax.Array, beta: float) -> jax.Array:
    """DICE-Talk eq. 17: ``‖sg[s] − C_k‖² + β‖s − sg[C_k]‖²``; scalar.

    ``s`` and its retrieved code ``C_k`` are ``(..., d)``; squared norms are summed over ``d`` and
    averaged over the leading (batch) axes. The first term moves only the code toward the input,
    the second (commitment, weight ``beta``) only the input toward the code.
    """
    s = s.astype(jnp.float32)
    code = code.astype(jnp.float32)
    codebook_term = jnp.sum(jnp.square(_sg(s) - code), axis=-1)
    commitment_term = jnp.sum(jnp.square(s - _sg(code)), axis=-1)
    return jnp.mean(codebook_term + beta * commitment_term)


def emotion_classification_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """DICE-Talk eq. 16: cross-entropy ``−Σ_c y_c log p_{t,c}`` averaged over the batch; scalar.

    ``logits (B, num_classes)``, ``labels (B,)`` int. Each batch row carries its own sampled
    timestep ``t``, so the batch mean is eq. 16's mean over the ``T`` sampled timesteps.
    """
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(log_p, labels[:, None].astype(jnp.int32), axis=-1))


def gate_targets(palette: jax.Array) -> jax.Array:
    """``(B, E)`` palettes → ``(B, E + 1)`` gate targets: the palette and its "none" share ``1 − Σ``."""
    palette = palette.astype(jnp.float32)
    return jnp.concatenate([palette, jnp.clip(1.0 - palette.sum(-1, keepdims=True), 0.0, 1.0)], axis=-1)


def gate_loss(logits: Sequence[jax.Array], palette: jax.Array, weight: jax.Array | None = None) -> jax.Array:
    """Cross-entropy of every MoE layer's global gate against the clip's palette; scalar.

    ``logits``: per layer ``(N, E + 1)`` with ``N = B·F`` frame-folded rows (row ``b·F + f``);
    ``palette (B, E)``; ``weight (B,)`` per clip (e.g. 0 for a compound, whose palette the gate is not
    meant to guess), default 1. The target of every frame of clip ``b`` is
    :func:`gate_targets`\ ``(palette)[b]``; the loss is ``−Σ_k target_k · log softmax(logits)_k``,
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
