"""Compound emotions as a mixture of the experts' guided predictions.

MoEE makes a compound emotion from the experts of its basic emotions: "a single emotion activates
only its own expert; a compound emotion is a soft combination of multiple experts" (the palette).
Two places can hold that combination:

* ``gate`` — the palette is the global gate of every Emotion MoE layer, so each layer mixes its
  experts' outputs (``happy:0.5,surprised:0.5`` opens both experts half-way). This is the paper's
  form, and what the model does when a batch row carries the palette.
* ``guidance`` — each basic emotion of the palette gets its own batch row, conditioned exactly as
  training conditioned that emotion (its one-hot label on the label path and the gate), plus one
  row with the emotion dropped; at every sampler step the rows' classifier-free-guided predictions
  are combined and every row continues from the result. With guidance scale ``g`` this is the
  conjunction of composable diffusion (Liu et al. 2022, "Compositional Visual Generation with
  Composable Diffusion Models", the conjunction operator) over the experts,
  ``ε̃ = ε(∅) + g · Σ_i s_i (ε(e_i) − ε(∅))``, with ``s_i = w_i / max_j w_j``: the strongest emotion
  of the palette is guided as strongly as it would be alone, the others in proportion. Every row
  stays in the distribution the experts were trained on, which a half-open gate never was; it costs
  one batch row per emotion, plus one.

On the demo's model, trained only on basic emotions, ``gate`` showed both components of a 50/50
palette in no clip of 8 validation identities, ``guidance`` in 0.38 of them (benchmarks/RESULTS.md,
"A longer stage 2, a 12,000-step reader, and compounds guided per emotion"), hence ``guidance`` is the default (``config.compound_mixing``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from moee_jax.models.conditioning import EmotionSources

MODES = ("guidance", "gate")


@dataclasses.dataclass(frozen=True)
class CompoundRows:
    """Batch rows for ``B`` videos whose compound emotions are split into their components.

    ``emotion``: the ``R`` rows' sources (numpy, batch ``R``); ``video (R,)``: the video each row
    belongs to (index into the ``B`` videos: gather per-video inputs with it); ``output (B,)``: the
    row whose frames are each video's; ``mix (R, R)`` float32: row ``r``'s prediction is
    ``Σ_r' mix[r, r'] · prediction[r']`` — the palette weights of its video's rows, the identity for
    a video that is not a compound.
    """

    emotion: EmotionSources
    video: np.ndarray
    output: np.ndarray
    mix: np.ndarray


def components(sources: EmotionSources) -> list[tuple[int, float]]:
    """``[(emotion index, weight), …]`` of a one-video ``sources`` (batch 1) whose palette is kept and
    mixes two or more emotions; ``[]`` for anything else (a label, speech, text, a dropped emotion,
    or another kind of condition such as the analysis's interpolated sources)."""
    if not isinstance(sources, EmotionSources) or not bool(np.asarray(sources.palette_keep).reshape(-1)[0]):
        return []
    weights = np.asarray(sources.palette, np.float32).reshape(-1)
    parts = [(int(i), float(weights[i])) for i in np.flatnonzero(weights > 0)]
    return parts if len(parts) >= 2 else []


def compound_rows(emotions: Sequence[EmotionSources]) -> CompoundRows | None:
    """Split every compound of ``emotions`` (one :class:`EmotionSources` of batch 1 per video) into
    one row per basic emotion and one with the emotion dropped; None when no video asks for a compound.

    A component row keeps the video's sources with the palette — and the label features, which
    are the same weights — replaced by that emotion's one-hot, as training labels it; its weight in
    the mixture is ``s_i = w_i / max_j w_j``, and the dropped row's ``1 − Σ_i s_i``, so that the rows'
    guided predictions ``ε(∅) + g (ε(e_i) − ε(∅))`` combine into ``ε(∅) + g Σ_i s_i (ε(e_i) − ε(∅))``.
    """
    rows: list[EmotionSources] = []
    video: list[int] = []
    share: list[float] = []
    for b, sources in enumerate(emotions):
        parts = components(sources)
        if not parts:
            rows.append(sources)
            video.append(b)
            share.append(1.0)
            continue
        strongest = max(w for _, w in parts)
        for index, weight in parts:
            one = np.zeros_like(np.asarray(sources.palette, np.float32))
            one[..., index] = 1.0
            label = None if sources.label is None else one.astype(np.asarray(sources.label).dtype)
            rows.append(dataclasses.replace(sources, palette=one, label=label))
            video.append(b)
            share.append(weight / strongest)
        rows.append(sources.dropped())
        video.append(b)
        share.append(1.0 - sum(w / strongest for _, w in parts))
    if len(rows) == len(emotions):
        return None
    video_of = np.asarray(video, np.int32)
    mix = np.where(video_of[:, None] == video_of[None, :], np.asarray(share, np.float32)[None, :], 0.0).astype(np.float32)
    output = np.asarray([video.index(b) for b in range(len(emotions))], np.int32)
    stacked = jax.tree_util.tree_map(lambda *xs: np.concatenate([np.asarray(x) for x in xs]), *rows)
    return CompoundRows(stacked, video_of, output, mix)


def mixed_model_fn(model_fn, mix: jax.Array):
    """``model_fn(x, t)`` → ``(B, ...)`` predictions, wrapped to return ``mix @ predictions`` (``mix
    (B, B)``, :attr:`CompoundRows.mix`): each row gets its video's palette-weighted prediction."""

    def mixed(x, t):
        prediction = model_fn(x, t)
        return jnp.tensordot(mix.astype(prediction.dtype), prediction, axes=1)

    return mixed
