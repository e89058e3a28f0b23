"""Square face crops of a clip from its landmarks, stable over time, and landmarks in crop pixels.

For every frame the face-oval landmarks give a box; the crop is a square of side ``margin ×`` the
box's longer side around its centre. With ``smooth_window = 0`` one crop serves the whole clip (the
square around the union of all frames' boxes, so the head moves inside a fixed frame as in the
source video); with ``smooth_window = n`` the per-frame centres and sides are averaged over ``n``
frames (a crop that follows the head without jitter). Crops reaching past the image are padded by
replicating the border pixels, then resized to ``size × size``.

Frames without a face (NaN landmarks) are tolerated up to ``max_missing`` of the clip: their
landmarks are linearly interpolated from the nearest frames with a face (held at the clip's ends).
More than that, or none at all, raises :class:`NoFaceError`.

Pixel coordinates follow :mod:`moee_jax.data.masks` (pixel centres at integers).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

from moee_jax.data import masks as masks_lib
from moee_jax.data import schema


class NoFaceError(ValueError):
    """Too many frames of a clip have no face landmarks."""


@dataclasses.dataclass(frozen=True)
class CropConfig:
    """``size``: output side in pixels; ``margin``: crop side / longer side of the face-oval box;
    ``max_missing``: largest fraction of frames without a face that is interpolated over;
    ``smooth_window``: 0 for one crop per clip, else the moving-average length in frames."""

    size: int = 512
    margin: float = 1.6
    max_missing: float = 0.2
    smooth_window: int = 0

    def __post_init__(self):
        if self.size < 8:
            raise ValueError(f"crop size must be >= 8 pixels, got {self.size}")
        if self.margin < 1.0:
            raise ValueError(f"margin must be >= 1 (the crop must contain the face), got {self.margin}")
        if not 0.0 <= self.max_missing < 1.0:
            raise ValueError(f"max_missing must lie in [0, 1), got {self.max_missing}")
        if self.smooth_window < 0:
            raise ValueError(f"smooth_window must be >= 0, got {self.smooth_window}")


@dataclasses.dataclass
class CroppedClip:
    frames: np.ndarray  # (T, S, S, 3) uint8
    landmarks: np.ndarray  # (T, K, 2) float32 pixels in the crop; interpolated where face_missing
    face_missing: np.ndarray  # (T,) bool: no face in the source landmarks of this frame
    boxes: np.ndarray  # (T, 3) float32 crop centre x, centre y, side in source pixels


def face_present(landmarks: np.ndarray) -> np.ndarray:
    """``(T,)`` bool: every landmark of the frame is finite (a partial detection counts as none)."""
    return np.isfinite(np.asarray(landmarks)).all(axis=(1, 2))


def fill_missing(landmarks: np.ndarray, max_missing: float) -> tuple[np.ndarray, np.ndarray]:
    """Interpolate frames without a face in ``landmarks (T, K, 2)``.

    → ``(filled (T, K, 2) float32, missing (T,) bool)``. Each coordinate is interpolated linearly
    in the frame index between the nearest frames with a face, and held constant before the first
    and after the last one.

    Raises:
      NoFaceError: no frame has a face, or more than ``max_missing`` of the frames have none.
    """
    landmarks = np.asarray(landmarks, np.float32)
    present = face_present(landmarks)
    t = landmarks.shape[0]
    missing = ~present
    if not present.any():
        raise NoFaceError(f"no face: none of the {t} frames has face landmarks")
    if missing.mean() > max_missing:
        raise NoFaceError(
            f"no face in {int(missing.sum())} of {t} frames ({missing.mean():.0%}), more than the "
            f"{max_missing:.0%} that are interpolated over"
        )
    if not missing.any():
        return landmarks, missing
    frames = np.arange(t)
    flat = landmarks.reshape(t, -1)
    filled = np.stack([np.interp(frames, frames[present], flat[present, j]) for j in range(flat.shape[1])], axis=1)
    return filled.reshape(landmarks.shape).astype(np.float32), missing


def _moving_average(x: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average of ``x (T, C)`` over ``window`` frames, edges padded by replication."""
    if window <= 1 or x.shape[0] == 1:
        return x
    left = (window - 1) // 2
    padded = np.pad(x, ((left, window - 1 - left), (0, 0)), mode="edge")
    cumsum = np.cumsum(np.pad(padded, ((1, 0), (0, 0))), axis=0)
    return (cumsum[window:] - cumsum[:-window]) / window


def face_boxes(landmarks: np.ndarray, face_idx, margin: float, smooth_window: int = 0) -> np.ndarray:
    """Square crop boxes ``(T, 3)`` (centre x, centre y, side) from filled ``landmarks (T, K, 2)``.

    ``face_idx``: the face-oval landmark indices of the layout. See the module docstring.
    """
    pts = np.asarray(landmarks, np.float64)[:, list(face_idx)]
    lo, hi = pts.min(axis=1), pts.max(axis=1)  # (T, 2) each
    t = pts.shape[0]
    if smooth_window == 0:
        lo, hi = lo.min(axis=0, keepdims=True), hi.max(axis=0, keepdims=True)
        centre, side = (lo + hi) / 2, margin * (hi - lo).max(axis=1, keepdims=True)
        return np.repeat(np.concatenate([centre, side], axis=1), t, axis=0).astype(np.float32)
    boxes = np.concatenate([(lo + hi) / 2, margin * (hi - lo).max(axis=1, keepdims=True)], axis=1)
    return _moving_average(boxes, smooth_window).astype(np.float32)


def crop_frame(frame: np.ndarray, box, size: int) -> np.ndarray:
    """Crop the square ``box`` (centre x, centre y, side) of ``frame (H, W, 3)`` to ``(size, size, 3)``."""
    cx, cy, side = (float(v) for v in box)
    if not side > 0:
        raise ValueError(f"crop box side must be > 0, got {side} (degenerate face landmarks?)")
    h, w = frame.shape[:2]
    # Box edges in continuous image coordinates (pixel i spans [i, i + 1)).
    x0, y0 = cx + 0.5 - side / 2, cy + 0.5 - side / 2
    x1, y1 = x0 + side, y0 + side
    pad = int(np.ceil(max(0.0, -x0, -y0, x1 - w, y1 - h)))
    if pad:
        frame = np.pad(frame, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    image = Image.fromarray(np.ascontiguousarray(frame, np.uint8))
    box_px = (x0 + pad, y0 + pad, x1 + pad, y1 + pad)
    return np.asarray(image.resize((size, size), Image.Resampling.LANCZOS, box=box_px))


def to_crop_coords(landmarks: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """Map source-pixel ``landmarks (T, K, 2)`` into the ``size × size`` crops of ``boxes (T, 3)``."""
    boxes = np.asarray(boxes, np.float64)
    centre, side = boxes[:, None, :2], boxes[:, None, 2:3]
    origin = centre + 0.5 - side / 2  # top-left edge of the crop in continuous source coordinates
    out = (np.asarray(landmarks, np.float64) + 0.5 - origin) * (size / side) - 0.5
    return out.astype(np.float32)


def crop_clip(frames: np.ndarray, landmarks: np.ndarray, layout: str, config: CropConfig) -> CroppedClip:
    """Face crops of a clip: ``frames (T, H, W, 3)`` uint8 and ``landmarks (T, K, 2)`` source pixels
    (NaN rows without a face) of ``layout`` → :class:`CroppedClip` at ``config.size``.

    Raises:
      NoFaceError: see :func:`fill_missing`.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be (T, H, W, 3), got shape {frames.shape}")
    if landmarks.shape[0] != frames.shape[0]:
        raise ValueError(f"{frames.shape[0]} frames but {landmarks.shape[0]} landmark frames")
    filled, missing = fill_missing(landmarks, config.max_missing)
    boxes = face_boxes(filled, schema.layout_groups(layout)["face_oval"], config.margin, config.smooth_window)
    crops = np.stack([crop_frame(f, b, config.size) for f, b in zip(frames, boxes)])
    return CroppedClip(crops, to_crop_coords(filled, boxes, config.size), missing, boxes)


def check_regions(landmarks: np.ndarray, size: int, layout: str, min_face_fraction: float = 0.02) -> None:
    """Check that every frame of crop-pixel ``landmarks (T, K, 2)`` gives usable face, lip and mouth
    masks (:func:`moee_jax.data.masks.masks_from_landmarks`, :func:`~moee_jax.data.masks.mouth_mask`).

    Raises:
      ValueError: naming the first bad frame — a face region smaller than ``min_face_fraction`` of
        the crop, an empty lip region, or face landmarks outside the crop.
    """
    groups = schema.layout_groups(layout)
    face_idx, lip_idx = groups["face_oval"], groups["lips"]
    oval = np.asarray(landmarks)[:, list(face_idx)]
    outside = (oval < -0.5) | (oval > size - 0.5)
    if outside.any():
        frame = int(np.flatnonzero(outside.any(axis=(1, 2)))[0])
        raise ValueError(f"face landmarks leave the crop in frame {frame}; increase the crop margin")
    for i in range(landmarks.shape[0]):
        face, lip = masks_lib.masks_from_landmarks(landmarks[i : i + 1], size, size, face_idx, lip_idx)
        if face.mean() < min_face_fraction:
            raise ValueError(f"face region covers {face.mean():.1%} of the crop in frame {i} (degenerate landmarks?)")
        if not lip.any() or not masks_lib.mouth_mask(landmarks[i : i + 1], size, size, lip_idx).any():
            raise ValueError(f"empty lip / mouth region in frame {i} (lip landmarks outside the face?)")
