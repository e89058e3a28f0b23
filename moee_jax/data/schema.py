"""The record format of every talking-face dataset: one record = one video clip.

Both TFDS builders (:mod:`moee_jax.data.builders`) write these features to ArrayRecord, and the
grain pipeline (:mod:`moee_jax.data.pipeline`) reads them through ``tfds.data_source`` — only plain
tensors and byte strings, so reading never imports TensorFlow. Frames are stored one encoded image
per frame (PNG for synthetic data, JPEG for real video) so that a training sample decodes only the
``F + M + 1`` frames it uses, not the whole video.

=================  ======================  ============================================================
feature            shape / dtype           meaning
=================  ======================  ============================================================
``id``             text                    unique clip id (``<speaker>/<name>``)
``speaker``        text                    identity; the pipeline draws reference frames within a clip
``frames``         ``(T,)`` bytes          PNG / JPEG of each ``S × S`` RGB frame (face crop)
``fps``            float32                 frame rate (25 after preparation)
``audio``          ``(A,)`` float32        16 kHz mono speech, ``A ≈ T · 16000 / fps``
``landmarks``      ``(T, K, 2)`` float32   pixel ``(x, y)`` in the crop; NaN where no face was found
``landmark_layout`` text                   ``synthetic72`` or ``mediapipe478`` (:data:`LANDMARK_LAYOUTS`)
``emotion``        text                    canonical label, compound name or ``mixed``
``emotion_class``  int64                   index into :data:`CLASSES` (six emotions + neutral), −1 otherwise
``palette``        ``(6,)`` float32        weights over :data:`~moee_jax.emotions.EMOTIONS`
``intensity``      float32                 emotion intensity in ``[0, 1]``
``text``           text                    emotion description ("a sadly fearful person speaking")
``speech_emotion`` text                    the emotion the voice expresses: ``emotion`` for real data;
                                           ``neutral`` for synthetic clips drawn with a neutral voice
``action_units``   ``(T', 11)`` float32    ground-truth AUs per frame (synthetic); ``T' = 0`` for real data
``identity``       ``(P,)`` float32        identity parameters (synthetic, :func:`identity_vector`); empty for real
=================  ======================  ============================================================
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np

from moee_jax.data import face_layout
from moee_jax.data import masks as masks_lib
from moee_jax.emotions import COMPOUND_EMOTIONS, EMOTIONS, NEUTRAL, canonical_emotion, palette_name, parse_palette

SAMPLE_RATE = 16000
FPS = 25.0
NUM_AUS = face_layout.NUM_AUS

# The classes of emotion classification: the six basic emotions in EMOTIONS order, then neutral.
CLASSES: tuple[str, ...] = (*EMOTIONS, NEUTRAL)

# Landmark index groups used for masks and crops, per landmark layout.
LANDMARK_LAYOUTS: dict[str, dict[str, tuple[int, ...]]] = {
    "synthetic72": {
        "num_points": (face_layout.NUM_LANDMARKS,),
        "face_oval": face_layout.LANDMARK_GROUPS["face_oval"],
        "lips": face_layout.LANDMARK_GROUPS["lips"],
    },
    "mediapipe478": {"num_points": (468, 478), "face_oval": masks_lib.MEDIAPIPE_FACE_OVAL, "lips": masks_lib.MEDIAPIPE_LIPS},
}

# The identity parameters of a synthetic person, in the order of the ``identity`` feature.
IDENTITY_FIELDS: tuple[str, ...] = (
    "face_width", "face_height", "jaw_width", "eye_spacing", "eye_size", "mouth_width",
    "brow_thickness", "nose_length", "skin", "hair", "iris", "lips", "background", "f0",
)  # fmt: skip


def layout_groups(layout: str) -> dict[str, tuple[int, ...]]:
    """The landmark index groups (``face_oval``, ``lips``) of a layout; a clear error if unknown."""
    if layout not in LANDMARK_LAYOUTS:
        raise ValueError(f"unknown landmark layout {layout!r}; known: {', '.join(LANDMARK_LAYOUTS)}")
    return LANDMARK_LAYOUTS[layout]


def features():
    """The ``tfds.features.FeaturesDict`` of a clip record (imports tensorflow_datasets lazily)."""
    import tensorflow_datasets as tfds

    f32, text = np.float32, tfds.features.Text()
    return tfds.features.FeaturesDict({
        "id": text,
        "speaker": tfds.features.Text(),
        "frames": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
        "fps": tfds.features.Scalar(dtype=f32),
        "audio": tfds.features.Tensor(shape=(None,), dtype=f32),
        "landmarks": tfds.features.Tensor(shape=(None, None, 2), dtype=f32, encoding="bytes"),
        "landmark_layout": tfds.features.Text(),
        "emotion": tfds.features.Text(),
        "emotion_class": tfds.features.Scalar(dtype=np.int64),
        "palette": tfds.features.Tensor(shape=(len(EMOTIONS),), dtype=f32),
        "intensity": tfds.features.Scalar(dtype=f32),
        "text": tfds.features.Text(),
        "speech_emotion": tfds.features.Text(),
        "action_units": tfds.features.Tensor(shape=(None, NUM_AUS), dtype=f32),
        "identity": tfds.features.Tensor(shape=(None,), dtype=f32),
    })  # fmt: skip


def encode_frame(frame: np.ndarray, fmt: str = "png", quality: int = 95) -> bytes:
    """One ``(S, S, 3)`` uint8 frame as PNG (lossless) or JPEG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    image = Image.fromarray(np.asarray(frame, np.uint8))
    if fmt == "png":
        image.save(buf, format="PNG", compress_level=1)
    elif fmt == "jpeg":
        image.save(buf, format="JPEG", quality=quality)
    else:
        raise ValueError(f"frame format must be 'png' or 'jpeg', got {fmt!r}")
    return buf.getvalue()


def text_field(value) -> str:
    """A record's string field as ``str`` (``tfds.data_source`` and grain give ``bytes``)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def decode_frames(encoded: Sequence[bytes], indices: Sequence[int] | None = None) -> np.ndarray:
    """Decode frames (all, or ``indices``) to ``(n, S, S, 3)`` uint8."""
    from PIL import Image

    picked = encoded if indices is None else [encoded[i] for i in indices]
    return np.stack([np.asarray(Image.open(io.BytesIO(bytes(b))).convert("RGB")) for b in picked])


def emotion_fields(emotion: str, intensity: float = 1.0) -> dict[str, object]:
    """``emotion``, ``emotion_class`` and ``palette`` for a label, alias, compound name or palette spec.

    A basic emotion or neutral gets its class index in :data:`CLASSES`; a compound (a name such as
    ``happily_surprised``, see :data:`moee_jax.emotions.COMPOUND_EMOTIONS`, or a spec with more
    than one label, stored under its canonical spec :func:`~moee_jax.emotions.palette_name`, e.g.
    ``happiness:0.5,surprise:0.5``) gets class −1. Raises ``ValueError`` naming the emotion when it is unknown.
    """
    name = emotion.strip().lower()
    if name in COMPOUND_EMOTIONS:
        palette = np.zeros(len(EMOTIONS), np.float32)
        for part in COMPOUND_EMOTIONS[name]:
            palette[EMOTIONS.index(part)] = 0.5
        return {"emotion": name, "emotion_class": -1, "palette": palette}
    if "," in name or ":" in name:
        palette = parse_palette(name).astype(np.float32)
        return {"emotion": palette_name(palette), "emotion_class": -1, "palette": palette}
    label = canonical_emotion(name)
    palette = parse_palette(label).astype(np.float32)
    return {"emotion": label, "emotion_class": CLASSES.index(label), "palette": palette}


def identity_vector(identity: Mapping[str, object]) -> np.ndarray:
    """Flatten a synthetic :class:`~moee_jax.data.synthetic.Identity` dict (colours as 3 numbers, /255)."""
    out: list[float] = []
    for name in IDENTITY_FIELDS:
        value = identity[name]
        if isinstance(value, (tuple, list)):
            out.extend(float(v) / 255.0 for v in value)
        else:
            out.append(float(value))
    return np.asarray(out, np.float32)


def make_record(
    *,
    clip_id: str,
    speaker: str,
    frames: np.ndarray | Sequence[bytes],
    audio: np.ndarray,
    landmarks: np.ndarray,
    landmark_layout: str,
    emotion: str,
    intensity: float,
    text: str,
    fps: float = FPS,
    action_units: np.ndarray | None = None,
    identity: np.ndarray | None = None,
    frame_format: str = "png",
    speech_emotion: str | None = None,
) -> dict[str, object]:
    """A record dict ready for a builder's ``_generate_examples``; checks the lengths agree.

    ``frames`` is ``(T, S, S, 3)`` uint8 (encoded here) or already-encoded bytes. ``speech_emotion``
    (default: ``emotion``) is what the voice expresses, when that differs from the face.
    """
    groups = layout_groups(landmark_layout)
    landmarks = np.asarray(landmarks, np.float32)
    if landmarks.ndim != 3 or landmarks.shape[-1] != 2 or landmarks.shape[1] not in groups["num_points"]:
        raise ValueError(f"{clip_id}: landmarks must be (T, K, 2) with K in {groups['num_points']}, got {landmarks.shape}")
    if isinstance(frames, np.ndarray):
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[1] != frames.shape[2]:
            raise ValueError(f"{clip_id}: frames must be square RGB (T, S, S, 3), got {frames.shape}")
        encoded = [encode_frame(f, frame_format) for f in frames]
    else:
        encoded = [bytes(b) for b in frames]
    if len(encoded) != landmarks.shape[0]:
        raise ValueError(f"{clip_id}: {len(encoded)} frames but {landmarks.shape[0]} landmark frames")
    aus = np.zeros((0, NUM_AUS), np.float32) if action_units is None else np.asarray(action_units, np.float32)
    if aus.shape[0] not in (0, len(encoded)):
        raise ValueError(f"{clip_id}: {aus.shape[0]} action-unit frames for {len(encoded)} frames")
    return {
        "id": clip_id,
        "speaker": speaker,
        "frames": encoded,
        "fps": np.float32(fps),
        "audio": np.asarray(audio, np.float32).reshape(-1),
        "landmarks": landmarks,
        "landmark_layout": landmark_layout,
        **emotion_fields(emotion, intensity),
        "intensity": np.float32(intensity),
        "text": text,
        "speech_emotion": emotion_fields(emotion if speech_emotion is None else speech_emotion)["emotion"],
        "action_units": aus,
        "identity": np.zeros((0,), np.float32) if identity is None else np.asarray(identity, np.float32),
    }
