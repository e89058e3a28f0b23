"""Inputs of ``moee animate``: checked, decoded and shaped the way the trained model saw its data.

Every problem a user can cause raises :class:`InputError` naming the input (flag and file) and
what to do; nothing here touches the model.

Shapes at the boundaries::

    load_image(path)                      image (H, W, 3) uint8 RGB
    prepare_portrait(image, S)            Portrait: crop (S, S, 3) uint8 + its box in the image
    video_portrait(path | image, S)       (Portrait, the name it is reported by)
    face_region_mask(S, r)                (S/r, S/r) float32 face mask at latent resolution
    load_speech(path)                     Speech: wave (A,) float32 mono 16 kHz (+ warnings)
    video_speech(path | Speech, fps)      Speech at least one video frame long
    parse_emotion(...)                    EmotionSpec (label weights (6,), palette override (6,) | None, ...)
    resolve_checkpoint(path)              RunCheckpoint: RUN/stage2/final + RUN/stage2/config.json
    paste_back(image, frames, box)        frames (T, H, W, 3) uint8: the animated crop in the photo
    iter_paste_back(image, frames, box)   the same one (H, W, 3) frame at a time (bounded memory)

Decisions
---------
* **Image modes.** Grayscale (``L``, 16-bit ``I;16``), palette and CMYK images are converted to
  RGB. Transparency (``RGBA``, ``LA``, palette with a transparent colour) is composited onto
  **white**: cut-out portraits are made to be shown on white, and black would merge with dark hair.
  EXIF orientation is applied, so a phone photo is upright.
* **Size.** An image whose short side is under :data:`MIN_IMAGE_SIDE` (64 px) is refused: below
  that a face has too few pixels for the detector or the model. A face crop smaller than the model
  resolution is accepted and upsampled, with a warning (the video is then softer than the model
  can make it).
* **Face detection** uses OpenCV's bundled frontal-face Haar cascade (offline; no landmark model):
  the largest face wins, and the crop is a square of :data:`DETECT_MARGIN` × the detected box's side
  around its centre, padded by replicating the border where it leaves the photo — the framing of
  ``moee prepare``'s crops (1.6 × the face-oval box; on the synthetic faces a Haar box is 0.93–1.08
  of that box's height, so 1.7 frames the face alike with a little room to spare).
  ``detect=False`` takes the image as an already-cropped face: its centred square, resized.
* **Face region.** The face locator was trained on the face-oval mask of each crop; at inference
  there are no landmarks, so the mask is the ellipse that oval occupies in a crop framed as above
  (centred, height ``S / 1.6``, width 0.8 × that), area-pooled to latent cells as in training.
* **Silent audio** is valid input (a mouth-closed video); :func:`load_speech` warns about it.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from moee_jax.data import masks as masks_lib
from moee_jax.data.audio import SAMPLE_RATE, AudioError, is_silent, load_audio, peak_dbfs
from moee_jax.data.face_crop import crop_frame
from moee_jax.emotions import EMOTIONS, parse_palette

MIN_IMAGE_SIDE = 64
TRAINING_MARGIN = masks_lib.FRAMING_MARGIN  # `moee prepare`: crop side / longer side of the face-oval box
DETECT_MARGIN = 1.7  # crop side / side of the Haar face box
FACE_ASPECT = masks_lib.FACE_ASPECT  # face-oval width / height
HAAR_CASCADE = "haarcascade_frontalface_default.xml"
REQUIRED_STAGE = "stage2"


class InputError(ValueError):
    """An input of ``moee animate`` that cannot be used; the message names it and says what to do."""


# ---- the portrait -------------------------------------------------------------------------------------


def load_image(path: str | pathlib.Path, *, flag: str = "--image") -> np.ndarray:
    """Decode an image file to ``(H, W, 3)`` uint8 RGB (see the module docstring for modes and size)."""
    path = pathlib.Path(path)
    _check_file(path, flag, "image")
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(
            f"{flag} {path}: not an image that can be read ({type(e).__name__}: {e}); give a PNG, JPEG, WebP or BMP file"
        ) from None
    rgb = _to_rgb(im)
    h, w = rgb.shape[:2]
    if min(h, w) < MIN_IMAGE_SIDE:
        raise InputError(
            f"{flag} {path}: image is {w}×{h} px; the short side must be at least {MIN_IMAGE_SIDE} px "
            "for the face to be recognisable. Use a larger photo."
        )
    return rgb


def _to_rgb(im: Image.Image) -> np.ndarray:
    """Any PIL mode → ``(H, W, 3)`` uint8; transparency composited on white, 16-bit scaled to 8-bit."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        gray = np.asarray(im, np.float64)
        peak = 65535.0 if im.mode.startswith("I;16") or gray.max() > 255 else 255.0
        gray = np.clip(np.round(gray * (255.0 / peak)), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    if im.mode == "F":
        gray = np.asarray(im, np.float64)
        gray = gray * 255.0 if gray.max() <= 1.0 else gray
        return np.repeat(np.clip(np.round(gray), 0, 255).astype(np.uint8)[..., None], 3, axis=-1)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"), np.uint8)
    return np.asarray(im.convert("RGB"), np.uint8)


def detect_face(image: np.ndarray) -> tuple[int, int, int, int] | None:
    """The largest frontal face in ``image (H, W, 3)`` uint8 as ``(x, y, w, h)`` pixels, or None."""
    faces = detect_faces(image)
    return faces[0] if faces else None


def detect_faces(image: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Every frontal face in ``image (H, W, 3)`` uint8 as ``(x, y, w, h)`` pixels, largest first.

    OpenCV's bundled Haar cascade (no download); faces under a tenth of the short side are ignored.
    """
    try:
        import cv2
    except ImportError:
        raise InputError(
            "face detection needs OpenCV: `pip install 'opencv-python-headless<5'`; or pass --no_detect "
            "when the image is already a face crop"
        ) from None
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + HAAR_CASCADE)
    if cascade.empty():
        raise InputError(f"OpenCV has no {HAAR_CASCADE} in {cv2.data.haarcascades}; install opencv-python-headless<5")
    gray = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)
    smallest = max(24, int(0.1 * min(gray.shape)))
    faces = cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=4, minSize=(smallest, smallest))
    return sorted((tuple(int(v) for v in f) for f in faces), key=lambda f: -f[2] * f[3])


@dataclasses.dataclass(frozen=True)
class Portrait:
    """The face the model animates.

    crop  (S, S, 3) uint8 — the model's reference image
    box   (cx, cy, side) — the crop's square in ``image`` pixels (pixel centres at integers)
    image (H, W, 3) uint8 — the whole photo, for :func:`paste_back`
    """

    crop: np.ndarray
    box: tuple[float, float, float]
    image: np.ndarray
    detected: bool
    warnings: tuple[str, ...] = ()


def prepare_portrait(
    image: np.ndarray, size: int, *, detect: bool = True, margin: float = DETECT_MARGIN, name: str = "--image"
) -> Portrait:
    """Square face crop ``(size, size, 3)`` of ``image (H, W, 3)`` uint8.

    ``detect=True`` finds the face (Haar cascade; the largest where there are several, with a
    warning) and frames it with ``margin``; ``detect=False`` takes the centred square of the image.
    Raises :class:`InputError` when no face is found.
    """
    h, w = image.shape[:2]
    warnings = []
    if detect:
        faces = detect_faces(image)
        if not faces:
            raise InputError(
                f"{name}: no face found in the image ({w}×{h} px). Use a photo with a clear, frontal, "
                "well-lit face, or pass --no_detect if the image is already a face crop."
            )
        x, y, fw, fh = faces[0]
        if len(faces) > 1:
            warnings.append(
                f"{name}: {len(faces)} faces found; animating the largest ({fw}×{fh} px at x={x}, y={y}). "
                "Crop the photo to the face you want to animate another one."
            )
        box = (x + (fw - 1) / 2, y + (fh - 1) / 2, margin * max(fw, fh))
    else:
        side = min(h, w)
        box = ((w - 1) / 2, (h - 1) / 2, float(side))
    if box[2] < size:
        warnings.append(
            f"{name}: the face crop is {box[2]:.0f} px wide and is upsampled to the model's {size} px; a larger photo gives a sharper video"
        )
    crop = crop_frame(image, box, size)
    return Portrait(crop, tuple(float(v) for v in box), image, detect, tuple(warnings))


def video_portrait(image: str | pathlib.Path | np.ndarray, size: int, *, detect: bool = True) -> tuple[Portrait, str]:
    """The portrait to animate from a path or an ``(H, W, 3)`` uint8 array (:func:`prepare_portrait`)
    → ``(Portrait, the name messages and settings give it)``."""
    if isinstance(image, np.ndarray):
        picture, name = np.asarray(image, np.uint8), "image"
    else:
        picture, name = load_image(image), str(image)
    return prepare_portrait(picture, size, detect=detect, name=f"--image {name}"), name


def face_region_mask(size: int, downsample: int) -> np.ndarray:
    """The face locator's input mask ``(size/downsample, size/downsample)`` float32 for a crop framed
    like the training crops (:func:`moee_jax.data.masks.framing_face_mask`, what training gives it
    with ``data.face_mask = "framing"``)."""
    return masks_lib.framing_face_mask(size, downsample)


def mouth_region_mask(size: int, downsample: int, scale: float = 1.5) -> np.ndarray:
    """Mouth mask ``(size, size)`` float32 for a crop framed like the training crops, at the latent-cell
    granularity the embedder was trained with (cells the box touches, upsampled back to pixels).

    Without landmarks the lips are placed where they sit in such a crop: centred horizontally,
    ``0.55 r`` below the centre (``r`` the face-oval half-height), ``0.6 r`` wide and ``0.3 r`` tall,
    then scaled by ``scale`` as :func:`moee_jax.data.masks.mouth_mask` does.
    """
    r = size / (2 * TRAINING_MARGIN)
    cx, cy = (size - 1) / 2, (size - 1) / 2 + 0.55 * r
    half_w, half_h = 0.3 * r * scale, 0.15 * r * scale
    rows, cols = np.arange(size)[:, None], np.arange(size)[None]
    box = (np.abs(cols - cx) <= half_w) & (np.abs(rows - cy) <= half_h)
    cells = box.reshape(size // downsample, downsample, size // downsample, downsample).any(axis=(1, 3))
    return np.repeat(np.repeat(cells, downsample, axis=0), downsample, axis=1).astype(np.float32)


def paste_back(original: np.ndarray, frames: np.ndarray, box, *, feather: float = 0.08) -> np.ndarray:
    """Put generated crops back into the photo they were cut from.

    ``original (H, W, 3)`` uint8, ``frames (T, S, S, 3)`` uint8, ``box`` the crop's
    ``(cx, cy, side)`` in ``original`` pixels (as :class:`Portrait` gives) → ``(T, H, W, 3)`` uint8.
    Each frame is resized to the box and blended in with a border that fades linearly over
    ``feather × side`` pixels, so no seam shows where the crop ends; parts of the box outside the
    photo are dropped. Memory: ``T·H·W·3`` bytes; :func:`iter_paste_back` gives one frame at a time.
    """
    frames = np.asarray(frames, np.uint8)
    original = np.asarray(original, np.uint8)
    if frames.ndim != 4:
        raise ValueError(f"paste_back needs original (H, W, 3) and frames (T, S, S, 3); got {original.shape}, {frames.shape}")
    out = np.empty((frames.shape[0],) + original.shape, np.uint8)
    for t, frame in enumerate(iter_paste_back(original, frames, box, feather=feather)):
        out[t] = frame
    return out


def iter_paste_back(original: np.ndarray, frames, box, *, feather: float = 0.08) -> Iterator[np.ndarray]:
    """:func:`paste_back` one frame at a time: ``frames`` any iterable of ``(S, S, 3)`` uint8 crops →
    ``(H, W, 3)`` uint8 photos, each a new array, so a video of any length needs memory for one photo
    (the writer consumes them as they come)."""
    original = np.asarray(original, np.uint8)
    if original.ndim != 3 or original.shape[-1] != 3:
        raise ValueError(f"paste_back needs original (H, W, 3) and frames (T, S, S, 3); got {original.shape}")
    h, w = original.shape[:2]
    cx, cy, side = (float(v) for v in box)
    n = max(1, int(round(side)))
    x0, y0 = int(round(cx + 0.5 - n / 2)), int(round(cy + 0.5 - n / 2))
    # The box's part inside the photo: rows/cols [ya, yb) × [xa, xb) of the photo.
    xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x0 + n, w), min(y0 + n, h)
    inside = xa < xb and ya < yb
    ramp = max(1.0, feather * n)
    pos = np.arange(n) + 0.5
    edge = np.minimum(pos, n - pos) / ramp  # distance to the nearest box edge, in ramps
    alpha = np.clip(np.minimum(edge[:, None], edge[None, :]), 0.0, 1.0)[ya - y0 : yb - y0, xa - x0 : xb - x0, None]
    background = original[ya:yb, xa:xb].astype(np.float32)
    for frame in frames:
        frame = np.asarray(frame, np.uint8)
        if frame.ndim != 3 or frame.shape[-1] != 3:
            raise ValueError(f"paste_back needs original (H, W, 3) and frames (T, S, S, 3); got a frame of shape {frame.shape}")
        out = original.copy()
        if inside:
            big = np.asarray(Image.fromarray(frame).resize((n, n), Image.Resampling.BICUBIC), np.float32)
            patch = big[ya - y0 : yb - y0, xa - x0 : xb - x0]
            out[ya:yb, xa:xb] = np.clip(np.round(alpha * patch + (1.0 - alpha) * background), 0, 255).astype(np.uint8)
        yield out


# ---- speech ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Speech:
    """wave (A,) float32 mono at 16 kHz, and what the user should know about it."""

    wave: np.ndarray
    path: pathlib.Path
    warnings: tuple[str, ...] = ()

    @property
    def seconds(self) -> float:
        return self.wave.size / SAMPLE_RATE


def load_speech(path: str | pathlib.Path, *, flag: str = "--audio") -> Speech:
    """Load the driving speech (any rate, any channel count; see :func:`moee_jax.data.audio.load_audio`)."""
    path = pathlib.Path(path)
    try:
        wave = load_audio(path)
    except AudioError as e:
        raise InputError(f"{flag}: {e}") from None
    warnings = []
    if is_silent(wave):
        warnings.append(f"{flag} {path}: the audio is silent (peak {peak_dbfs(wave):.1f} dBFS); the video will show a closed mouth")
    return Speech(wave, path, tuple(warnings))


def video_speech(audio: str | pathlib.Path | Speech, fps: float, *, flag: str = "--audio") -> Speech:
    """The driving speech from a path (:func:`load_speech`) or already loaded; refused when it is
    shorter than one video frame at ``fps``."""
    speech = audio if isinstance(audio, Speech) else load_speech(audio, flag=flag)
    if speech.wave.size < SAMPLE_RATE / fps:
        raise InputError(
            f"{flag} {speech.path}: {1000 * speech.wave.size / SAMPLE_RATE:.1f} ms of audio is shorter than one video frame "
            f"({1000 / fps:.0f} ms at {fps:g} fps); give the speech to animate"
        )
    return speech


# ---- the emotion ---------------------------------------------------------------------------------------------


EMOTION_KINDS = ("label", "palette", "text", "audio", "video")


@dataclasses.dataclass(frozen=True)
class EmotionSpec:
    """One emotion condition, as the user gave it.

    kind     one of :data:`EMOTION_KINDS`: ``label`` (one emotion, e.g. ``happy``), ``palette``
             (a compound ``happy:0.6,surprised:0.4``), ``text`` (a description), ``audio`` (from
             the speech itself), ``video`` (a reference clip, embedder models)
    weights  (6,) over EMOTIONS — the label MLP's input (label / palette)
    palette  (6,) — the MoE's global gate (the same weights, label and palette), else None
    """

    kind: str
    weights: np.ndarray | None = None
    palette: np.ndarray | None = None
    text: str | None = None
    video: pathlib.Path | None = None
    spec: str = ""

    def describe(self) -> dict:
        """JSON-ready summary for the settings sidecar."""
        out: dict = {"kind": self.kind, "spec": self.spec}
        if self.weights is not None:
            out["weights"] = {e: round(float(v), 6) for e, v in zip(EMOTIONS, self.weights) if v}
        if self.palette is not None:
            out["palette_gate_override"] = True
        if self.video is not None:
            out["video"] = str(self.video)
        return out


def parse_emotion(
    emotion: str | None = None,
    *,
    emotion_text: str | None = None,
    emotion_from_audio: bool = False,
    emotion_video: str | pathlib.Path | None = None,
) -> EmotionSpec:
    """Exactly one emotion source → :class:`EmotionSpec`.

    ``emotion`` is a label or palette spec (:func:`moee_jax.emotions.parse_palette`). Its weights feed
    the label MLP *and* set the MoE's global gate: a label (``happy``, ``happy:1``) activates its own
    expert, a spec of two or more items is a compound palette that mixes experts (MoEE's palette).
    ``neutral`` is the all-zero label: no expert.
    """
    given = [
        name
        for name, value in (
            ("--emotion", emotion),
            ("--emotion_text", emotion_text),
            ("--emotion_from_audio", emotion_from_audio or None),
            ("--emotion_video", emotion_video),
        )
        if value is not None
    ]
    if len(given) != 1:
        what = "none was given" if not given else f"got {', '.join(given)}"
        raise InputError(
            "give exactly one emotion source: --emotion happy | --emotion happy:0.6,surprised:0.4 | "
            f"--emotion_text '...' | --emotion_from_audio | --emotion_video ref.mp4 ({what})"
        )
    if emotion is not None:
        try:
            weights = parse_palette(emotion)
        except ValueError as e:
            raise InputError(f"--emotion {emotion!r}: {e}") from None
        compound = len([item for item in emotion.split(",") if item.strip()]) > 1
        return EmotionSpec("palette" if compound else "label", weights, weights, spec=emotion)
    if emotion_text is not None:
        if not emotion_text.strip():
            raise InputError("--emotion_text is empty; describe the emotion, e.g. 'a cheerful, excited person'")
        return EmotionSpec("text", text=emotion_text.strip(), spec=emotion_text.strip())
    if emotion_video is not None:
        path = pathlib.Path(emotion_video)
        _check_file(path, "--emotion_video", "video")
        return EmotionSpec("video", video=path, spec=str(path))
    return EmotionSpec("audio", spec="from_audio")


# ---- helpers -------------------------------------------------------------------------------------------------------


def _check_file(path: pathlib.Path, flag: str, what: str) -> None:
    if not path.exists():
        raise InputError(f"{flag} {path}: {what} file not found")
    if not path.is_file():
        raise InputError(f"{flag} {path}: not a file")
    if path.stat().st_size == 0:
        raise InputError(f"{flag} {path}: {what} file is empty (0 bytes)")
