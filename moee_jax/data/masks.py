"""Face, lip and mouth masks from landmarks, and the region gate of the audio cross-attention.

Hallo (Xu et al. 2024, "hierarchical audio-driven visual synthesis") splits the audio
cross-attention output by three nested regions — lip ⊂ face ⊂ full frame — into the disjoint parts
lip, expression (face without lip) and pose (frame without face), and blends them with per-region
weights. Our U-Net has one audio attention per block, whose output is multiplied by one gate
``audio_mask (B, F, h, w)``; :func:`combine_region_masks` builds that gate as the weighted sum of the
three disjoint regions, so the per-region weights keep Hallo's meaning (with all weights 1 the gate
is 1 everywhere, i.e. plain unmasked audio attention).

Landmarks are pixel coordinates ``(x, y)`` (column, row), e.g. MediaPipe Face Mesh's normalised
points times ``(W, H)``; the index sets are parameters, with MediaPipe's 468-point indices as
defaults. Masks are float32 in ``[0, 1]``: binary at pixel resolution, fractional after area pooling.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

# MediaPipe Face Mesh (468 points): the face-oval contour, in drawing order (FACEMESH_FACE_OVAL).
MEDIAPIPE_FACE_OVAL: tuple[int, ...] = (
    10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377,
    152, 148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109,
)  # fmt: skip
# MediaPipe Face Mesh: the outer lip contour (lower lip 61 → 291, then upper lip back to 61). Its
# convex hull contains the inner contour, so the lip region needs only these points.
MEDIAPIPE_LIPS: tuple[int, ...] = (
    61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291, 409, 270, 269, 267, 0, 37, 39, 40, 185,
)  # fmt: skip

REGIONS = ("full", "face", "lip")

# How training crops frame the face (`moee prepare`, moee_jax.data.face_crop): the crop's side is
# FRAMING_MARGIN × the longer side of the face-oval box, centred on it; FACE_ASPECT is a face oval's
# width / height.
FRAMING_MARGIN = 1.6
FACE_ASPECT = 0.8


def _convex_hull(points: np.ndarray) -> np.ndarray:
    """Vertices ``(K, 2)`` of the convex hull of ``points (N, 2)``, counter-clockwise (monotone chain)."""
    pts = sorted(set(map(tuple, points.tolist())))
    if len(pts) < 3:
        return np.asarray(pts, np.float64)

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    def half(seq):
        chain = []
        for p in seq:
            while len(chain) >= 2 and cross(chain[-2], chain[-1], p) <= 0:
                chain.pop()
            chain.append(p)
        return chain[:-1]

    return np.asarray(half(pts) + half(pts[::-1]), np.float64)


def fill_convex_hull(points: np.ndarray, height: int, width: int) -> np.ndarray:
    """``(H, W)`` float32 mask, 1 on and inside the convex hull of pixel points ``(N, 2)`` as ``(x, y)``.

    Filled with PIL's polygon rasteriser: pixel ``(row y, col x)`` is set when it lies inside the
    hull or on its boundary, so corners ``(2, 2)``, ``(9, 9)`` of a square fill rows and columns 2–9.
    """
    hull = _convex_hull(np.asarray(points, np.float64))
    image = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(image)
    coords = [tuple(p) for p in hull.tolist()]
    if len(coords) >= 3:
        draw.polygon(coords, fill=1, outline=1)
    else:  # a point or a segment: degenerate landmarks still mark their pixels
        draw.line(coords + coords[:1], fill=1)
    return np.asarray(image, np.float32)


def framing_face_mask(size: int, downsample: int) -> np.ndarray:
    """The face-locator mask ``(size/downsample, size/downsample)`` float32 of a crop framed like the
    training crops: the face-oval ellipse such a crop holds (centred, height ``size / FRAMING_MARGIN``,
    width ``FACE_ASPECT`` × that), area-pooled to latent cells.

    A portrait at inference has no landmarks, so this is the mask the animator gives the face locator;
    training gives it the same (``data.face_mask = "framing"``) so that the mask says where a face
    is, as at inference, and not how this face's outline and jaw move in each frame.
    """
    r = size / (2 * FRAMING_MARGIN)
    centre = np.array([(size - 1) / 2, (size - 1) / 2])
    angles = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    oval = centre + np.stack([FACE_ASPECT * r * np.cos(angles), r * np.sin(angles)], axis=1)
    face = fill_convex_hull(oval, size, size)[None]
    small = size // downsample
    return region_masks(face, np.zeros_like(face), (small, small))["face"][0]


def _check_landmarks(landmarks, indices: Sequence[int], name: str) -> np.ndarray:
    lm = np.asarray(landmarks, np.float64)
    if lm.ndim != 3 or lm.shape[-1] != 2:
        raise ValueError(f"landmarks must be (F, N, 2) pixel coordinates (x, y), got shape {lm.shape}")
    if len(indices) == 0 or max(indices) >= lm.shape[1]:
        raise ValueError(f"{name} indices reach {max(indices, default=None)}, but landmarks have {lm.shape[1]} points")
    picked = lm[:, list(indices)]
    bad = np.flatnonzero(~np.isfinite(picked).all(axis=(1, 2)))
    if bad.size:
        raise ValueError(f"{name} landmarks are not finite in frame(s) {bad.tolist()} (face not detected?)")
    return picked


def masks_from_landmarks(
    landmarks,
    height: int,
    width: int,
    face_idx: Sequence[int] = MEDIAPIPE_FACE_OVAL,
    lip_idx: Sequence[int] = MEDIAPIPE_LIPS,
) -> tuple[np.ndarray, np.ndarray]:
    """Face and lip masks ``(F, H, W)`` from ``landmarks (F, N, 2)`` in pixels (Hallo's region masks).

    Each region is the filled convex hull of its landmark subset (``face_idx``, ``lip_idx``); the
    lip mask is clipped to the face mask so the regions nest.
    """
    face_pts = _check_landmarks(landmarks, face_idx, "face")
    lip_pts = _check_landmarks(landmarks, lip_idx, "lip")
    face = np.stack([fill_convex_hull(p, height, width) for p in face_pts])
    lip = np.stack([fill_convex_hull(p, height, width) for p in lip_pts])
    return face, np.minimum(lip, face)


def mouth_mask(
    landmarks,
    height: int,
    width: int,
    lip_idx: Sequence[int] = MEDIAPIPE_LIPS,
    scale: float = 1.5,
) -> np.ndarray:
    """``(F, H, W)`` float32 box masks over the mouth, for MoEE's masked noisy emotion sampling.

    The box is the lips' bounding box scaled by ``scale`` about its centre (room for the jaw and
    lip motion of other frames), clipped to the image; pixels it touches are 1. Hiding this box
    makes the emotion modules learn expression rather than lip shape.
    """
    if scale < 1.0:
        raise ValueError(f"scale must be >= 1 (the box must cover the lips), got {scale}")
    pts = _check_landmarks(landmarks, lip_idx, "lip")
    lo, hi = pts.min(axis=1), pts.max(axis=1)
    centre, half = (lo + hi) / 2, (hi - lo) * scale / 2
    x0, y0 = np.floor(centre - half).astype(np.int64).T
    x1, y1 = np.ceil(centre + half).astype(np.int64).T
    cols, rows = np.arange(width), np.arange(height)
    in_x = (cols[None] >= x0[:, None]) & (cols[None] <= x1[:, None])
    in_y = (rows[None] >= y0[:, None]) & (rows[None] <= y1[:, None])
    return (in_y[:, :, None] & in_x[:, None, :]).astype(np.float32)


def _area_weights(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)`` area-resampling matrix: row ``i`` averages the input span of output cell ``i``.

    Rows are non-negative and sum to 1, so resampled masks stay in ``[0, 1]`` and keep their mean.
    """
    edges = np.arange(n_out + 1) * (n_in / n_out)
    j = np.arange(n_in)
    overlap = np.minimum(edges[1:, None], j[None] + 1) - np.maximum(edges[:-1, None], j[None])
    return np.clip(overlap, 0.0, None) / (n_in / n_out)


def _as_unit_mask(mask, name: str) -> np.ndarray:
    m = np.asarray(mask, np.float32)
    if m.ndim not in (3, 4):
        raise ValueError(f"{name} mask must be (F, H, W) or (B, F, H, W), got shape {m.shape}")
    if m.size and (m.min() < 0.0 or m.max() > 1.0):
        raise ValueError(f"{name} mask must lie in [0, 1], got [{m.min()}, {m.max()}] (divide 0–255 masks by 255)")
    return m


def region_masks(face_mask, lip_mask, latent_hw: tuple[int, int]) -> dict[str, np.ndarray]:
    """Nested region masks at latent size for the audio attention (Hallo, Xu et al. 2024).

    ``face_mask``, ``lip_mask``: ``(F, H, W)`` or ``(B, F, H, W)`` in ``[0, 1]`` at pixel size.
    → ``{"full", "face", "lip"}``, each ``(..., h, w)`` float32 in ``[0, 1]`` with
    ``lip ≤ face ≤ full = 1``: the lip mask is clipped to the face before resizing, and area
    resampling (each latent cell averages the pixels it covers) preserves the order.
    """
    face = _as_unit_mask(face_mask, "face")
    lip = _as_unit_mask(lip_mask, "lip")
    if face.shape != lip.shape:
        raise ValueError(f"face mask {face.shape} and lip mask {lip.shape} must have the same shape")
    h, w = latent_hw
    a_h, a_w = _area_weights(face.shape[-2], h), _area_weights(face.shape[-1], w)

    def resize(m):
        return np.clip(a_h @ m @ a_w.T, 0.0, 1.0).astype(np.float32)  # separable area resampling

    face_small = resize(face)
    return {"full": np.ones_like(face_small), "face": face_small, "lip": resize(np.minimum(lip, face))}


def combine_region_masks(masks: Mapping[str, np.ndarray], weights: Mapping[str, float] | None = None) -> np.ndarray:
    """The U-Net's audio gate ``audio_mask (B, F, h, w)`` from nested region masks (Hallo, Xu et al. 2024).

    ``masks``: :func:`region_masks` output, ``(F, h, w)`` (a batch axis of 1 is added) or
    ``(B, F, h, w)``. ``weights`` (default 1 each) weight the disjoint regions, as Hallo's inference
    weights do::

        gate = w_full · (full − face) + w_face · (face − lip) + w_lip · lip

    i.e. ``w_full`` scales audio-driven pose (head motion outside the face), ``w_face`` expression,
    ``w_lip`` lip motion. The gate lies in ``[0, max(weights)]``.
    """
    w = {name: 1.0 for name in REGIONS}
    unknown = set(weights or {}) - set(REGIONS)
    if unknown:
        raise ValueError(f"unknown region weight(s) {sorted(unknown)}; expected keys among {REGIONS}")
    w.update(weights or {})
    full, face, lip = (np.asarray(masks[name], np.float32) for name in REGIONS)
    gate = w["full"] * (full - face) + w["face"] * (face - lip) + w["lip"] * lip
    return (gate[None] if gate.ndim == 3 else gate).astype(np.float32)
