"""Which expert fires where: the Emotion MoE's gates (MoEE §Design 1) summarised and drawn on faces.

The MoE of every spatial transformer block has a local gate ``s = sigmoid(G(X; φ)) ∈ R^{n×6}``
(per token, i.e. per latent cell of that block's resolution) and a global gate
``g = softmax(G(Pool(X); ω)) ∈ R^6`` (per frame). :mod:`moee_jax.analysis.extract` records both
per clip; here they become

* :func:`global_gate_matrix` — the mean global gate per clip emotion ``(classes, 6)``: does the
  happiness expert carry the happy clips?
* :func:`expert_maps` — local gate maps of the clips, brought to one resolution and averaged over
  the chosen layers ``(N, h, w, 6)``;
* :func:`mean_maps` — those maps averaged over the clips of each emotion;
* :func:`overlay` — a map (any resolution) as a heat map over a face frame.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from moee_jax.analysis.extract import ClipLatents, emotion_order


def group_mean(values: np.ndarray, labels: Sequence[str], order: Sequence[str] | None = None) -> tuple[tuple[str, ...], np.ndarray]:
    """Mean of ``values (N, ...)`` over the rows of each label → ``(labels, (L, ...))``, labels in
    ``order`` (default: first appearance) — labels absent from the rows are left out."""
    labels = np.asarray([str(v) for v in labels])
    order = list(dict.fromkeys(labels.tolist())) if order is None else [o for o in order if o in set(labels.tolist())]
    return tuple(order), np.stack([np.asarray(values)[labels == o].mean(axis=0) for o in order])


def global_gate_matrix(latents: ClipLatents, order: Sequence[str] | None = None, layers: Sequence[str] | None = None):
    """Mean global gate per clip emotion, averaged over ``layers`` (default: all): ``(emotions,
    (E, 6))`` — row ``e`` is how the model splits its experts on clips of emotion ``e``. Emotions
    in ``order`` (default: :func:`~moee_jax.analysis.extract.emotion_order`)."""
    pick = _layer_indices(latents, layers)
    return group_mean(latents.global_gates[:, pick].mean(axis=1), latents.emotion, order or emotion_order(latents))


def resize_map(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of ``m (h, w)`` or ``(h, w, C)`` float to ``size = (H, W)``."""
    m = np.asarray(m, np.float32)
    if m.ndim == 3:
        return np.stack([resize_map(m[..., c], size) for c in range(m.shape[-1])], axis=-1)
    if m.shape == tuple(size):
        return m.copy()
    return np.asarray(Image.fromarray(np.ascontiguousarray(m)).resize((size[1], size[0]), Image.Resampling.BILINEAR))


def expert_maps(latents: ClipLatents, layers: Sequence[str] | None = None, size: tuple[int, int] | None = None) -> np.ndarray:
    """Local gate maps ``(N, H, W, 6)``: each layer's ``(N, h_l, w_l, 6)`` resized to ``size``
    (default: the finest layer's) and averaged over ``layers`` (default: all)."""
    names = [latents.layers[i] for i in _layer_indices(latents, layers)]
    if size is None:
        size = max((latents.local_gates[n].shape[1:3] for n in names), key=lambda s: s[0] * s[1])
    resized = [
        np.stack([resize_map(m, size) for m in latents.local_gates[n]]) if latents.local_gates[n].shape[1:3] != tuple(size)
        else latents.local_gates[n].astype(np.float32)
        for n in names
    ]  # fmt: skip
    return np.mean(resized, axis=0)


def mean_maps(latents: ClipLatents, order: Sequence[str] | None = None, layers: Sequence[str] | None = None):
    """:func:`expert_maps` averaged over the clips of each emotion → ``(emotions, (E, H, W, 6))``,
    emotions in ``order`` (default: :func:`~moee_jax.analysis.extract.emotion_order`)."""
    return group_mean(expert_maps(latents, layers), latents.emotion, order or emotion_order(latents))


def overlay(frame: np.ndarray, heat: np.ndarray, *, alpha: float = 0.5, cmap: str = "inferno", vmin: float | None = None,
            vmax: float | None = None) -> np.ndarray:  # fmt: skip
    """``heat (h, w)`` resized bilinearly to ``frame (S, S', 3)`` uint8, coloured by ``cmap``
    (``vmin`` / ``vmax`` default to the map's range) and blended: ``(1 − α)·frame + α·colour``."""
    import matplotlib

    frame = np.asarray(frame)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha}: must lie in [0, 1]")
    heat = resize_map(heat, frame.shape[:2])
    lo = float(heat.min()) if vmin is None else float(vmin)
    hi = float(heat.max()) if vmax is None else float(vmax)
    norm = np.clip((heat - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(heat)
    colour = matplotlib.colormaps[cmap](norm)[..., :3] * 255.0
    out = (1.0 - alpha) * frame.astype(np.float32) + alpha * colour
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _layer_indices(latents: ClipLatents, layers: Sequence[str] | None) -> list[int]:
    if not latents.layers:
        raise ValueError("these latents hold no Emotion-MoE gates (the run's MoE variant 'single' has none)")
    if layers is None:
        return list(range(len(latents.layers)))
    unknown = [n for n in layers if n not in latents.layers]
    if unknown:
        raise ValueError(f"unknown layer(s) {unknown}; the run's MoE layers are {list(latents.layers)}")
    return [latents.layers.index(n) for n in layers]
