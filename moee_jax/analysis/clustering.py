"""Clustering strength of emotion latents (DICE-Talk, Tan et al. 2025, arXiv 2504.18087, Table 5).

DICE-Talk defines the clustering strength of an emotion as ``d_cls = d_inter / d_intra`` — higher
is better separated — and reports it for the embedder's prior computed from audio only, video
only and both, "with different emotions of the same identity as categories". The paper gives no
formula for the two distances; here, with Euclidean distances ``‖·‖``:

* ``c_e`` — the centroid (mean) of the latents of emotion ``e``;
* ``d_intra(e) = mean_{i ∈ e} ‖x_i − c_e‖`` — the mean distance of ``e``'s members to their centroid;
* ``d_inter(e) = mean_{e' ≠ e} ‖c_e − c_e'‖`` — the mean distance from ``e``'s centroid to the
  centroid of every other emotion present;
* ``strength(e) = d_inter(e) / d_intra(e)`` (``inf`` when ``d_intra = 0``: every member is at the centroid).

With ``groups`` (the speaker of each row, the paper's protocol) the strength is computed within
each group, over the emotions of that group, and averaged over the groups where it is defined:
an emotion needs at least two members in a group (so that ``d_intra`` measures a spread) and one
other emotion beside it. Without groups the rows of every identity are pooled, so ``d_intra``
also holds the differences between people. An emotion defined nowhere gets NaN.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from moee_jax.analysis.extract import EMBEDDER_MODES, ClipLatents, class_names
from moee_jax.analysis.projection import flatten


def _strength_in(x: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Per-label strength over all rows of one group (see the module docstring)."""
    names = sorted(set(labels.tolist()))
    centroids = {n: x[labels == n].mean(axis=0) for n in names}
    out = {}
    for name in names:
        members = x[labels == name]
        others = [centroids[o] for o in names if o != name]
        if len(members) < 2 or not others:
            continue
        intra = float(np.linalg.norm(members - centroids[name], axis=1).mean())
        inter = float(np.mean([np.linalg.norm(centroids[name] - c) for c in others]))
        out[name] = inter / intra if intra > 0 else math.inf
    return out


def clustering_strength(x: np.ndarray, labels: Sequence, *, groups: Sequence | None = None) -> dict[str, float]:
    """``strength(e)`` for every label ``e`` of ``labels (N,)`` over the latents ``x (N, ...)``
    (rows flattened), within each of ``groups (N,)`` and averaged over them when given."""
    x = flatten(x)
    labels = np.asarray([str(v) for v in labels])
    if x.shape[0] != labels.shape[0]:
        raise ValueError(f"{x.shape[0]} latents but {labels.shape[0]} labels")
    if groups is None:
        per_group = [_strength_in(x, labels)]
    else:
        groups = np.asarray([str(g) for g in groups])
        if groups.shape != labels.shape:
            raise ValueError(f"{labels.shape[0]} labels but {groups.shape[0]} groups")
        per_group = [_strength_in(x[groups == g], labels[groups == g]) for g in sorted(set(groups.tolist()))]
    out = {}
    for name in sorted(set(labels.tolist())):
        values = [s[name] for s in per_group if name in s]
        out[name] = float(np.mean(values)) if values else math.nan
    return out


def clustering_rows(
    features: Mapping[str, np.ndarray], labels: Sequence, classes: Sequence[str], *, groups: Sequence | None = None
) -> dict[str, dict[str, float]]:
    """A table ``row → {class: strength, …, "mean": mean over the classes where it is finite}``,
    one row per entry of ``features`` (name → latents ``(N, ...)``), columns ``classes`` in order."""
    table = {}
    for row, x in features.items():
        strength = clustering_strength(x, labels, groups=groups)
        values = {c: strength.get(c, math.nan) for c in classes}
        finite = [v for v in values.values() if math.isfinite(v)]
        values["mean"] = float(np.mean(finite)) if finite else math.nan
        table[row] = values
    return table


def clustering_table(latents: ClipLatents, *, within_speaker: bool = True, source: str = "embedder") -> dict[str, dict[str, float]]:
    """DICE-Talk Table 5 on ``latents``' basic-emotion rows (compounds left out).

    ``source="embedder"``: rows ``audio``, ``video``, ``both`` — the embedder's ``μ`` from each
    input mode (empty when the run has no embedder). ``source="tokens"``: one row per emotion
    condition of the stage-2 tokens (``tokens: label``, ``tokens: audio``, …). Columns: the
    emotions present (:data:`moee_jax.data.schema.CLASSES` order), then ``mean``.
    """
    basic = latents.select(latents.basic)
    if source == "embedder":
        features = {mode: basic.mu[mode] for mode in EMBEDDER_MODES if mode in basic.mu}
    elif source == "tokens":
        features = {f"tokens: {kind}": t for kind, t in basic.tokens.items()}
    else:
        raise ValueError(f"source={source!r}: expected 'embedder' or 'tokens'")
    return clustering_rows(features, basic.emotion, class_names(basic), groups=basic.speaker if within_speaker else None)


def _cell(v: float) -> str:
    if math.isnan(v):
        return "–"
    return "∞" if math.isinf(v) else f"{v:.2f}"


def clustering_markdown(table: Mapping[str, Mapping[str, float]], *, first_column: str = "input") -> str:
    """A markdown table of :func:`clustering_rows` / :func:`clustering_table` (two decimals, ``–``
    where undefined, ``∞`` where ``d_intra = 0``)."""
    if not table:
        return ""
    columns = list(next(iter(table.values())))
    lines = [
        "| " + " | ".join([first_column, *columns]) + " |",
        "|" + "---|" * (len(columns) + 1),
    ]
    for row, values in table.items():
        lines.append("| " + " | ".join([row, *(_cell(values[c]) for c in columns)]) + " |")
    return "\n".join(lines) + "\n"
