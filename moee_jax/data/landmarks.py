"""Per-frame face landmarks of a video: from a sidecar file next to it, or from MediaPipe.

Two sources, chosen per video before any video is processed (:func:`plan_sources`):

* **sidecar** ``<stem>.landmarks.npz`` next to ``<stem>.mp4``, holding ``landmarks (T, K, 2)``
  float pixel ``(x, y)`` in the *original* video frame, one row per decoded frame (NaN rows where
  no face was found), and ``layout`` — a name in :data:`moee_jax.data.schema.LANDMARK_LAYOUTS`
  (``synthetic72``, ``mediapipe478``). Takes precedence when present: it is what the user computed.
* **MediaPipe FaceLandmarker** (Tasks API) with a user-given ``face_landmarker.task`` model;
  478 points (face mesh + irises), layout ``mediapipe478``. ``mediapipe`` is imported only then.

Pixel coordinates follow :mod:`moee_jax.data.masks`: ``(x, y)`` = (column, row) with pixel centres
at integers, so a normalised coordinate ``u ∈ [0, 1]`` over the image width ``W`` is ``u·W − 0.5``.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Sequence

import numpy as np

from moee_jax.data import schema
from moee_jax.data.video_io import VideoError, probe_video

SIDECAR_SUFFIX = ".landmarks.npz"
MEDIAPIPE_LAYOUT = "mediapipe478"


class LandmarkError(ValueError):
    """Landmarks of one video that cannot be used (bad sidecar, wrong frame count); names the file."""


class LandmarkSetupError(RuntimeError):
    """No landmark source for videos that need one; raised before any video is processed."""


def sidecar_path(video: str | os.PathLike) -> pathlib.Path:
    """``<dir>/<stem>.landmarks.npz`` for ``<dir>/<stem>.<ext>``."""
    video = pathlib.Path(video)
    return video.with_name(video.stem + SIDECAR_SUFFIX)


def write_sidecar(path: str | os.PathLike, landmarks: np.ndarray, layout: str) -> pathlib.Path:
    """Save ``landmarks (T, K, 2)`` (original-frame pixels, NaN rows for no face) and their ``layout``."""
    landmarks = np.asarray(landmarks, np.float32)
    _check_shape(pathlib.Path(path), landmarks, layout)
    path = pathlib.Path(path)
    with open(path, "wb") as f:
        np.savez(f, landmarks=landmarks, layout=np.asarray(layout))
    return path


def _check_shape(path: pathlib.Path, landmarks: np.ndarray, layout: str) -> None:
    if layout not in schema.LANDMARK_LAYOUTS:
        raise LandmarkError(f"{path}: field 'layout' is {layout!r}; expected one of {', '.join(schema.LANDMARK_LAYOUTS)}")
    points = schema.layout_groups(layout)["num_points"]
    if landmarks.ndim != 3 or landmarks.shape[-1] != 2 or landmarks.shape[1] not in points:
        raise LandmarkError(
            f"{path}: field 'landmarks' has shape {landmarks.shape}; expected (T, K, 2) with K in {points} for layout {layout!r}"
        )


def read_sidecar(path: str | os.PathLike) -> tuple[np.ndarray, str]:
    """``(landmarks (T, K, 2) float32, layout)`` from a sidecar file.

    Raises:
      LandmarkError: unreadable file, a missing ``landmarks`` or ``layout`` field, an unknown layout,
        a shape that does not fit the layout, or infinite values.
    """
    path = pathlib.Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in ("landmarks", "layout") if k not in data.files]
            if missing:
                raise LandmarkError(f"{path}: missing field(s) {missing}; a sidecar holds 'landmarks' (T, K, 2) and 'layout'")
            landmarks = np.asarray(data["landmarks"], np.float32)
            layout = str(data["layout"])
    except LandmarkError:
        raise
    except Exception as e:  # zipfile.BadZipFile, ValueError (pickled objects), OSError
        raise LandmarkError(f"{path}: not a readable landmarks .npz file ({type(e).__name__}: {e})") from e
    _check_shape(path, landmarks, layout)
    if np.isinf(landmarks).any():
        raise LandmarkError(f"{path}: field 'landmarks' has infinite values; use NaN rows for frames without a face")
    return landmarks, layout


def _import_mediapipe():
    try:
        import mediapipe as mp
    except ImportError as e:
        raise LandmarkSetupError(
            "detecting landmarks with --landmark_model needs MediaPipe, which is not installed: "
            "`pip install mediapipe` (or `pip install moee_jax[prepare]`), or put landmark sidecar files "
            f"(<stem>{SIDECAR_SUFFIX}) next to the videos instead"
        ) from e
    if not hasattr(getattr(getattr(mp, "tasks", None), "vision", None), "FaceLandmarker"):
        raise LandmarkSetupError(
            f"mediapipe {getattr(mp, '__version__', '?')} has no Tasks API FaceLandmarker; `pip install -U 'mediapipe>=0.10.14'`"
        )
    return mp


def detect_mediapipe(frames: np.ndarray, fps: float, model_path: str | os.PathLike) -> np.ndarray:
    """MediaPipe FaceLandmarker on ``frames (T, H, W, 3)`` uint8 RGB → ``(T, 478, 2)`` float32 pixels,
    NaN rows where no face was found (the first face of each frame when there are several)."""
    mp = _import_mediapipe()
    vision = mp.tasks.vision
    options = vision.FaceLandmarkerOptions(
        base_options=mp.tasks.BaseOptions(model_asset_path=str(model_path)),
        running_mode=vision.RunningMode.VIDEO,
        num_faces=1,
    )
    t, h, w = frames.shape[:3]
    out = np.full((t, 478, 2), np.nan, np.float32)
    # VIDEO mode tracks across frames and needs increasing timestamps, so one landmarker per clip.
    with vision.FaceLandmarker.create_from_options(options) as landmarker:
        for i, frame in enumerate(frames):
            image = mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(frame))
            result = landmarker.detect_for_video(image, int(round(i * 1000.0 / fps)))
            if result.face_landmarks:
                points = result.face_landmarks[0][:478]
                out[i, : len(points)] = [(p.x * w - 0.5, p.y * h - 0.5) for p in points]
    return out


@dataclasses.dataclass(frozen=True)
class LandmarkSource:
    """Where one video's landmarks come from: ``kind`` ``"sidecar"`` (``path`` the sidecar) or
    ``"mediapipe"`` (``path`` the ``face_landmarker.task`` model)."""

    kind: str
    path: pathlib.Path

    def landmarks(self, frames: np.ndarray, fps: float, indices: np.ndarray) -> tuple[np.ndarray, str]:
        """Landmarks of the kept frames ``frames[indices]`` of a decoded video ``frames (T, H, W, 3)``
        at ``fps`` → ``((T', K, 2) float32 pixels, layout)``.

        Raises:
          LandmarkError: the sidecar is unusable or its frame count differs from the video's.
        """
        if self.kind == "sidecar":
            landmarks, layout = read_sidecar(self.path)
            if landmarks.shape[0] != frames.shape[0]:
                raise LandmarkError(
                    f"{self.path}: field 'landmarks' has {landmarks.shape[0]} frames but the video decodes to "
                    f"{frames.shape[0]}; a sidecar needs one row per decoded frame"
                )
            return landmarks[indices], layout
        if self.kind == "mediapipe":
            return detect_mediapipe(frames[indices], fps, self.path), MEDIAPIPE_LAYOUT
        raise ValueError(f"unknown landmark source kind {self.kind!r}")


def plan_sources(
    videos: Sequence[str | os.PathLike], model_path: str | os.PathLike | None = None
) -> tuple[dict[pathlib.Path, LandmarkSource], dict[pathlib.Path, str]]:
    """Choose the landmark source of every video before any is processed.

    A video uses its sidecar when there is one, else the MediaPipe model when ``model_path`` is
    given. A video with neither is opened (headers only): one that is not a readable video needs no
    landmarks and is returned in the second dict with its reason, to be reported as skipped.
    → ``(sources by video, unreadable videos → reason)``.

    Raises:
      LandmarkSetupError: readable videos without a landmark source, a missing model file, or a
        model that would be used while ``mediapipe`` is not installed. The message lists the videos
        and the ways to fix it.
    """
    model = None if model_path is None else pathlib.Path(model_path)
    if model is not None and not model.is_file():
        raise LandmarkSetupError(
            f"--landmark_model {model} does not exist; give the path of MediaPipe's face_landmarker.task "
            f"(https://developers.google.com/mediapipe/solutions/vision/face_landmarker)"
        )
    sources: dict[pathlib.Path, LandmarkSource] = {}
    unreadable: dict[pathlib.Path, str] = {}
    missing: list[pathlib.Path] = []
    for video in map(pathlib.Path, videos):
        sidecar = sidecar_path(video)
        if sidecar.is_file():
            sources[video] = LandmarkSource("sidecar", sidecar)
        elif model is not None:
            sources[video] = LandmarkSource("mediapipe", model)
        else:
            try:
                probe_video(video)
            except VideoError as e:
                unreadable[video] = e.reason
            else:
                missing.append(video)
    if missing:
        shown = "\n  ".join(str(v) for v in missing[:10])
        more = f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise LandmarkSetupError(
            f"no face landmarks for {len(missing)} of {len(sources) + len(missing)} readable video(s):\n  {shown}{more}\n"
            f"Nothing was processed. Fix it by either\n"
            f"  - giving a MediaPipe model: --landmark_model face_landmarker.task (and `pip install mediapipe`), or\n"
            f"  - putting a sidecar <stem>{SIDECAR_SUFFIX} next to each video (arrays 'landmarks' (T, K, 2) in "
            f"pixels of the original frames, NaN rows for no face, and 'layout', one of "
            f"{', '.join(schema.LANDMARK_LAYOUTS)}), or\n"
            f"  - removing those videos from the input."
        )
    if any(s.kind == "mediapipe" for s in sources.values()):
        _import_mediapipe()
    return sources, unreadable
