"""Matplotlib figures of the analysis (each function returns a ``Figure``; :func:`save` writes it).

Nothing here computes an analysis: the numbers come from :mod:`.extract`, :mod:`.projection`,
:mod:`.clustering`, :mod:`.gates` and :mod:`.interpolation`.
"""

from __future__ import annotations

import math
import os
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np

from moee_jax.analysis import gates as gates_lib
from moee_jax.analysis import projection as projection_lib
from moee_jax.analysis.extract import ClipLatents
from moee_jax.analysis.interpolation import Interpolation, frame_strip
from moee_jax.data.schema import CLASSES
from moee_jax.emotions import EMOTIONS

_COLOURS = dict(zip(CLASSES, ("#e6a700", "#1f5fbf", "#d62728", "#2ca02c", "#8c4fbf", "#ff7f0e", "#7f7f7f")))


def subplots(*args, **kwargs):
    """``matplotlib.pyplot.subplots`` (imported on first use)."""
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save(fig, out_dir: str | os.PathLike, name: str, *, dpi: int = 150) -> pathlib.Path:
    """``fig`` → ``out_dir/name.png`` (folders made as needed) → the path."""
    path = pathlib.Path(out_dir) / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def projection(coords: np.ndarray, latents: ClipLatents, *, title: str = "", ax=None):
    """Scatter of ``coords (N, 2)`` (a PCA or t-SNE of ``latents``' rows): basic emotions as
    coloured dots, compounds as labelled black stars between them."""
    if ax is None:
        fig, ax = subplots(figsize=(5.5, 4.5))
    else:
        fig = ax.figure
    coords = np.asarray(coords)
    for name in CLASSES:
        rows = latents.emotion == name
        if rows.any():
            ax.scatter(coords[rows, 0], coords[rows, 1], s=18, color=_COLOURS[name], label=name, alpha=0.85)
    compound = ~latents.basic
    if compound.any():
        ax.scatter(coords[compound, 0], coords[compound, 1], s=70, marker="*", color="black", label="compound")
        for name in sorted(set(latents.emotion[compound].tolist())):
            centre = coords[latents.emotion == name].mean(axis=0)
            ax.annotate(name, centre, fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=7, loc="best", markerscale=0.8)
    return fig


def projections(latents: ClipLatents, sets: Mapping[str, np.ndarray], method: str = "pca"):
    """One :func:`projection` panel per latent set of ``sets`` (name → ``(N, ...)`` rows of
    ``latents``), projected by ``method``: ``pca`` or ``tsne`` (:mod:`moee_jax.analysis.projection`)."""
    project = {"pca": projection_lib.pca, "tsne": projection_lib.tsne}[method]
    fig, axes = subplots(1, len(sets), figsize=(5.5 * len(sets), 4.5), squeeze=False)
    for ax, (title, x) in zip(axes[0], sets.items()):
        projection(project(x), latents, title=f"{method.upper()}: {title}", ax=ax)
    fig.tight_layout()
    return fig


def explained_variance(curves: Mapping[str, np.ndarray], *, thresholds: Sequence[float] = (0.8, 0.9, 0.95)):
    """EMOPortraits Fig. 3 in kind: per-component explained variance (left, log scale) and its
    cumulative sum with the ``thresholds`` marked (right), one line per latent set."""
    fig, (left, right) = subplots(1, 2, figsize=(10, 3.8))
    for name, explained in curves.items():
        k = np.arange(1, len(explained) + 1)
        left.plot(k, np.maximum(explained, 1e-12), marker=".", label=name)
        right.plot(k, np.cumsum(explained), marker=".", label=name)
    for tau in thresholds:
        right.axhline(tau, color="grey", lw=0.6, ls=":")
    left.set_yscale("log")
    left.set_xlabel("principal component")
    left.set_ylabel("explained variance ratio")
    right.set_xlabel("number of components")
    right.set_ylabel("cumulative explained variance")
    right.set_ylim(0, 1.02)
    left.legend(fontsize=8)
    fig.tight_layout()
    return fig


def clustering_bars(table: Mapping[str, Mapping[str, float]], *, title: str = "clustering strength d_inter / d_intra"):
    """Grouped bars of a clustering table (:func:`moee_jax.analysis.clustering.clustering_table`):
    one group per emotion (and the mean), one bar per row (audio / video / both)."""
    fig, ax = subplots(figsize=(max(6, 1.1 * len(next(iter(table.values()), {})) + 2), 3.8))
    if not table:
        ax.set_title("no clustering rows (no embedder in this run)")
        return fig
    columns = list(next(iter(table.values())))
    width = 0.8 / len(table)
    for i, (row, values) in enumerate(table.items()):
        heights = [values[c] if math.isfinite(values[c]) else 0.0 for c in columns]
        ax.bar(np.arange(len(columns)) + (i - (len(table) - 1) / 2) * width, heights, width, label=row)
    ax.set_xticks(np.arange(len(columns)), columns, rotation=30, ha="right")
    ax.set_ylabel("d_inter / d_intra")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def global_gates(names: Sequence[str], matrix: np.ndarray, *, title: str = "mean global gate g per clip emotion"):
    """Heat map of :func:`moee_jax.analysis.gates.global_gate_matrix`: rows = clip emotions,
    columns = experts, each cell annotated."""
    fig, ax = subplots(figsize=(6.5, 0.45 * len(names) + 1.8))
    image = ax.imshow(matrix, cmap="viridis", vmin=0.0, aspect="auto")
    ax.set_xticks(np.arange(len(EMOTIONS)), [f"E_{e[:5]}" for e in EMOTIONS], rotation=30, ha="right")
    ax.set_yticks(np.arange(len(names)), names)
    for (r, c), v in np.ndenumerate(matrix):
        ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < matrix.max() * 0.6 else "black")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.04)
    fig.tight_layout()
    return fig


def gate_overlays(latents: ClipLatents, *, emotions: Sequence[str] | None = None, layers: Sequence[str] | None = None,
                  alpha: float = 0.55):  # fmt: skip
    """Local gates on the face: rows = clip emotions, columns = experts. Each cell is the emotion's
    mean local gate map of that expert (averaged over ``layers``) over the face of its first clip;
    one colour scale for the whole figure."""
    order = [e for e in (emotions or CLASSES) if e in set(latents.emotion.tolist())]
    names, maps = gates_lib.mean_maps(latents, order, layers)
    lo, hi = float(maps.min()), float(maps.max())
    fig, axes = subplots(len(names), len(EMOTIONS) + 1, figsize=(1.3 * (len(EMOTIONS) + 1), 1.35 * len(names)), squeeze=False)
    for r, name in enumerate(names):
        face = latents.frames[np.nonzero(latents.emotion == name)[0][0]]
        axes[r, 0].imshow(face)
        axes[r, 0].set_ylabel(name, fontsize=8)
        for c in range(len(EMOTIONS)):
            axes[r, c + 1].imshow(gates_lib.overlay(face, maps[r, ..., c], alpha=alpha, vmin=lo, vmax=hi))
    for c, expert in enumerate(("face", *EMOTIONS)):
        axes[0, c].set_title(expert if c == 0 else f"E_{expert[:5]}", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"local gate s per expert (t = {latents.timestep}; colour range {lo:.2f}–{hi:.2f})", fontsize=9)
    fig.tight_layout()
    return fig


def layer_maps(latents: ClipLatents, row: int = 0, *, alpha: float = 0.55):
    """The local gate maps of one clip (``row``), layer by layer: rows = U-Net layers, columns = experts."""
    layers = latents.layers
    fig, axes = subplots(len(layers), len(EMOTIONS), figsize=(1.3 * len(EMOTIONS), 1.35 * len(layers)), squeeze=False)
    face = latents.frames[row]
    for r, layer in enumerate(layers):
        maps = latents.local_gates[layer][row]
        for c in range(len(EMOTIONS)):
            axes[r, c].imshow(gates_lib.overlay(face, maps[..., c], alpha=alpha, vmin=0.0, vmax=1.0))
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
        axes[r, 0].set_ylabel(layer.replace("/transformer_blocks_0", "").replace("/", "\n"), fontsize=6)
    for c, e in enumerate(EMOTIONS):
        axes[0, c].set_title(f"E_{e[:5]}", fontsize=8)
    fig.suptitle(f"{latents.clip_id[row]} ({latents.emotion[row]}): local gates per layer, scale 0–1", fontsize=9)
    fig.tight_layout()
    return fig


def strip(interp: Interpolation, *, columns: int = 6):
    """:func:`moee_jax.analysis.interpolation.frame_strip` with the ``α`` of each row."""
    image = frame_strip(interp, columns)
    k, s = len(interp.alphas), interp.frames.shape[2]
    fig, ax = subplots(figsize=(1.1 * min(columns, interp.frames.shape[1]) + 1, 1.1 * k + 0.6))
    ax.imshow(image)
    ax.set_yticks(np.arange(k) * s + s / 2, [f"α={a:.2f}" for a in interp.alphas], fontsize=8)
    ax.set_xticks([])
    ax.set_title(f"{interp.mode}: {interp.endpoints[0]} → {interp.endpoints[1]}", fontsize=9)
    fig.tight_layout()
    return fig
