"""Synthetic emotional talking faces with exact ground truth: frames, speech, landmarks, action units.

A cartoon face is built from an identity (:class:`Identity`), FACS-like action units, a head pose
and a mouth opening, as a set of 2-D landmarks; the frame is then drawn *from those landmarks*
(PIL polygons and lines), so the landmarks, the action units and the emotion label are exact ground
truth rather than detector estimates. The speech track is a voiced source whose syllable envelope,
pitch and energy depend on the emotion, and the mouth opening of every video frame follows the
audio's RMS envelope at the frame rate. Everything is NumPy (plus PIL for drawing) and deterministic
in its seeds; it is meant for unit tests and smoke-training runs that need data whose signal is
known, not for realism.

Action units
------------
The 11 action units (:data:`ACTION_UNITS`, each in ``[0, 1]``) are those of the Facial Action
Coding System (Ekman & Friesen 1978, "Facial Action Coding System"; Ekman, Friesen & Hager 2002)
that the prototypes of the six basic emotions need (Ekman & Friesen 1975, "Unmasking the Face";
the EMFACS prototypes). :data:`EMOTION_AUS` gives each emotion's AUs at intensity 1; a clip at
intensity ``s`` has ``s`` times these values:

============  =====  =====  =====  =====  =====  =====  =====  =====  =====  =====  =====
emotion       AU1    AU2    AU4    AU5    AU6    AU7    AU9    AU12   AU15   AU20   AU26
============  =====  =====  =====  =====  =====  =====  =====  =====  =====  =====  =====
neutral       .      .      .      .      .      .      .      .      .      .      .
happiness     .      .      .      .      0.8    .      .      1.0    .      .      .
sadness       0.9    .      0.6    .      .      .      .      .      0.9    .      .
anger         .      .      1.0    0.7    .      0.9    .      .      .      .      .
disgust       .      .      .      .      .      .      1.0    .      0.7    .      .
fear          0.8    0.7    0.5    1.0    .      0.5    .      .      .      0.9    0.5
surprise      1.0    1.0    .      0.9    .      .      .      .      .      .      0.7
============  =====  =====  =====  =====  =====  =====  =====  =====  =====  =====  =====

AU1 inner brow raiser, AU2 outer brow raiser, AU4 brow lowerer, AU5 upper lid raiser, AU6 cheek
raiser, AU7 lid tightener, AU9 nose wrinkler, AU12 lip corner puller, AU15 lip corner depressor,
AU20 lip stretcher, AU26 jaw drop. Two prototype details have no AU of their own here and are
rendered from AUs that are present: disgust's upper-lip raise (AU10) comes with AU9, as the levator
labii it shares does; anger's lip press (AU23/24) is rendered as thinner, narrower lips in
proportion to ``min(AU4, AU7) · (1 − AU20)`` — a tense brow and lids without the lip stretch of fear.

Compound emotions (Du, Tao & Martinez 2014, "Compound facial expressions of emotion", PNAS) are the
union of their components' AUs, i.e. the element-wise maximum (:data:`COMPOUND_EMOTIONS`, named
``<adverb>_<adjective>`` such as ``happily_surprised``). An arbitrary palette (weights over
:data:`moee_jax.emotions.EMOTIONS`) mixes by weighted sum, clipped to 1. During speech AU26 also
carries the speech-driven jaw opening (see below), so ``action_units[:, AU26]`` varies per frame.

Speech and mouth
----------------
Words of one to three syllables alternate with pauses; each syllable is a raised-sine amplitude
bump with its own vowel (two formants, Peterson & Barney 1952 vowel means) on a harmonic source
whose f0 follows a rise-fall accent per word and a declination over the clip. Per emotion
(:data:`PROSODY`, after the acoustic profiles of Scherer 2003 / Banse & Scherer 1996): sadness is low,
flat, quiet and slow; anger loud and fast; fear and surprise high with a wide range; happiness
higher and lively. ``generate_clip(..., speech_emotion=NEUTRAL)`` draws an emotional face with
the neutral voice instead (the same words as the neutral clip of that seed). The mouth opening of frame ``f`` is the RMS of audio frame ``f`` mapped linearly
to ``[0, 1]`` and passed through a one-pole smoother (the jaw's inertia, a lag of under a frame),
and added to the emotion's own jaw drop.

Landmarks
---------
72 points in pixels ``(x, y)`` (column, row), listed in :data:`LANDMARK_GROUPS`: a 24-point face
contour (clockwise from the top of the forehead), 5 points per brow and 6 per eye (left to right in
the image, eyes as in the 68-point iBUG layout), 4 nose points (bridge, tip, nostrils), a 12-point
outer and 8-point inner lip contour, and 2 cheek points. ``LANDMARK_GROUPS["face_oval"]`` and
``["lips"]`` are the ``face_idx`` / ``lip_idx`` of :func:`moee_jax.data.masks.masks_from_landmarks`
and :func:`~moee_jax.data.masks.mouth_mask`.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image, ImageDraw

from moee_jax.data.audio import SAMPLE_RATE, num_video_frames
from moee_jax.data.face_layout import ACTION_UNITS, LANDMARK_GROUPS, NUM_AUS, NUM_LANDMARKS  # noqa: F401 (part of this module's API)
from moee_jax.emotions import ADJECTIVE as _ADJECTIVE
from moee_jax.emotions import ADVERB as _ADVERB
from moee_jax.emotions import COMPOUND_EMOTIONS, EMOTIONS, NEUTRAL, NUM_EMOTIONS, parse_palette  # noqa: F401

_AU = {name: i for i, name in enumerate(ACTION_UNITS)}

# The synthetic72 landmark groups (:mod:`moee_jax.data.face_layout`) the renderer places and draws.
_FACE, _NOSE, _CHEEKS = LANDMARK_GROUPS["face_oval"], LANDMARK_GROUPS["nose"], LANDMARK_GROUPS["cheeks"]
_LBROW, _RBROW = LANDMARK_GROUPS["left_brow"], LANDMARK_GROUPS["right_brow"]
_LEYE, _REYE = LANDMARK_GROUPS["left_eye"], LANDMARK_GROUPS["right_eye"]
_OUTER, _INNER = LANDMARK_GROUPS["outer_lips"], LANDMARK_GROUPS["inner_lips"]
_N_CONTOUR, _N_BROW = len(_FACE), len(_LBROW)

def _aus(**values: float) -> np.ndarray:
    out = np.zeros(NUM_AUS, np.float32)
    for name, v in values.items():
        out[_AU[name]] = v
    return out


# Prototype AUs at intensity 1 (the table of the module docstring).
EMOTION_AUS: dict[str, np.ndarray] = {
    NEUTRAL: _aus(),
    "happiness": _aus(AU6=0.8, AU12=1.0),
    "sadness": _aus(AU1=0.9, AU4=0.6, AU15=0.9),
    "anger": _aus(AU4=1.0, AU5=0.7, AU7=0.9),
    "disgust": _aus(AU9=1.0, AU15=0.7),
    "fear": _aus(AU1=0.8, AU2=0.7, AU4=0.5, AU5=1.0, AU7=0.5, AU20=0.9, AU26=0.5),
    "surprise": _aus(AU1=1.0, AU2=1.0, AU5=0.9, AU26=0.7),
}

# Prosody per emotion: f0 factor (× the speaker's f0), pitch range (semitones of the word accent),
# syllable rate (Hz), energy (× neutral RMS), mean pause between words (s).
_PROSODY_FIELDS = ("f0", "range", "rate", "energy", "pause")
PROSODY: dict[str, tuple[float, float, float, float, float]] = {
    NEUTRAL: (1.00, 3.0, 4.5, 1.00, 0.20),
    "happiness": (1.15, 6.0, 5.3, 1.20, 0.15),
    "sadness": (0.85, 1.5, 3.2, 0.55, 0.35),
    "anger": (1.10, 4.0, 5.2, 1.60, 0.15),
    "disgust": (0.95, 3.0, 3.8, 0.90, 0.25),
    "fear": (1.30, 7.0, 5.8, 0.90, 0.15),
    "surprise": (1.30, 9.0, 5.0, 1.30, 0.20),
}

@dataclasses.dataclass(frozen=True)
class Identity:
    """Appearance of one synthetic person; lengths are in face units (half the face height = 1)."""

    face_width: float  # half-width of the face ellipse
    face_height: float  # face size in the image, relative to the default
    jaw_width: float  # lower-face width relative to the cheekbones (1 = pure ellipse)
    eye_spacing: float  # distance between the eye centres
    eye_size: float  # half-width of an eye
    mouth_width: float  # half-width of the mouth
    brow_thickness: float  # brow stroke, as a fraction of the face height
    nose_length: float  # bridge-to-tip length
    skin: tuple[int, int, int]
    hair: tuple[int, int, int]
    iris: tuple[int, int, int]
    lips: tuple[int, int, int]
    background: tuple[int, int, int]
    f0: float  # speaking pitch in Hz

    @classmethod
    def from_seed(cls, seed: int) -> Identity:
        rng = np.random.default_rng([seed, 0x1D])
        tones = np.array([[255, 224, 196], [234, 192, 160], [198, 150, 112], [150, 105, 75], [96, 66, 46]])
        skin = tones[rng.integers(len(tones))] + rng.uniform(-12, 12, 3)
        hair = rng.choice([[30, 22, 18], [70, 45, 25], [140, 100, 50], [200, 170, 110], [90, 90, 95]]) + rng.uniform(-10, 10, 3)
        iris = rng.choice([[60, 40, 25], [50, 90, 140], [70, 110, 70], [20, 20, 20]])
        lips = skin * np.array([0.85, 0.55, 0.55]) + np.array([30, 0, 0])
        background = rng.uniform(40, 220, 3)

        def rgb(c):
            return tuple(int(v) for v in np.clip(np.round(c), 0, 255))

        return cls(
            face_width=float(rng.uniform(0.70, 0.82)),
            face_height=float(rng.uniform(0.92, 1.03)),
            jaw_width=float(rng.uniform(0.65, 0.85)),
            eye_spacing=float(rng.uniform(0.58, 0.68)),
            eye_size=float(rng.uniform(0.12, 0.15)),
            mouth_width=float(rng.uniform(0.20, 0.26)),
            brow_thickness=float(rng.uniform(0.035, 0.06)),
            nose_length=float(rng.uniform(0.28, 0.36)),
            skin=rgb(skin), hair=rgb(hair), iris=rgb(iris), lips=rgb(lips), background=rgb(background),
            f0=float(rng.choice([rng.uniform(95, 140), rng.uniform(170, 230)])),
        )  # fmt: skip


@dataclasses.dataclass
class SyntheticClip:
    """One generated clip; every array is exact ground truth for the frames."""

    frames: np.ndarray  # (F, H, W, 3) uint8
    audio: np.ndarray  # (S,) float32 at SAMPLE_RATE, num_video_frames(S, SAMPLE_RATE, fps) == F
    landmarks: np.ndarray  # (F, NUM_LANDMARKS, 2) float32 pixels (x, y)
    action_units: np.ndarray  # (F, NUM_AUS) float32 in [0, 1], columns ACTION_UNITS
    emotion: str  # "happiness", "neutral", "happily_surprised", or "mixed"
    palette: np.ndarray  # (6,) float32 weights over EMOTIONS
    intensity: float
    identity: dict  # Identity fields
    text: str  # e.g. "a happy person speaking"
    speech_emotion: str  # the emotion the speech's prosody expresses (== emotion unless decoupled)
    mouth_opening: np.ndarray  # (F,) float32 speech-driven jaw opening in [0, 1]
    head_pose: np.ndarray  # (F, 6) float32: yaw, pitch, roll (rad), dx, dy (px), scale
    fps: float = 25.0
    sample_rate: int = SAMPLE_RATE


# ---- emotion specification --------------------------------------------------------------------


def resolve_emotion(emotion: str | np.ndarray, intensity: float) -> tuple[str, np.ndarray, np.ndarray, str]:
    """``(label, palette (6,), static AUs (11,), description)`` for an emotion name or palette.

    ``emotion`` is a basic emotion or alias, ``"neutral"``, a compound name (:data:`COMPOUND_EMOTIONS`),
    a palette spec such as ``"happy:0.6,surprised:0.4"``, or a weight vector ``(6,)`` over
    :data:`~moee_jax.emotions.EMOTIONS`. Compounds take the union (max) of their components' AUs;
    palettes their weighted sum.
    """
    if not 0.0 <= intensity <= 1.0:
        raise ValueError(f"intensity must lie in [0, 1], got {intensity}")
    if isinstance(emotion, str) and emotion.strip().lower() in COMPOUND_EMOTIONS:
        name = emotion.strip().lower()
        parts = COMPOUND_EMOTIONS[name]
        palette = np.zeros(NUM_EMOTIONS, np.float32)
        for p in parts:
            palette[EMOTIONS.index(p)] = 0.5
        aus = intensity * np.maximum(EMOTION_AUS[parts[0]], EMOTION_AUS[parts[1]])
        return name, palette, aus.astype(np.float32), _describe(name.replace("_", " "))
    if isinstance(emotion, str):
        palette = parse_palette(emotion)
    else:
        palette = np.asarray(emotion, np.float32)
        if palette.shape != (NUM_EMOTIONS,) or not np.all(np.isfinite(palette)) or (palette < 0).any():
            raise ValueError(f"a palette must be {NUM_EMOTIONS} non-negative weights over {EMOTIONS}, got {emotion!r}")
    aus = np.clip(intensity * sum(w * EMOTION_AUS[e] for w, e in zip(palette, EMOTIONS)), 0.0, 1.0).astype(np.float32)
    active = [EMOTIONS[i] for i in np.argsort(-palette, kind="stable") if palette[i] > 0]
    if not active or intensity == 0:
        label = NEUTRAL
    elif len(active) == 1:
        label = active[0]
    elif len(active) == 2:
        label = f"{_ADVERB[active[0]]}_{_ADJECTIVE[active[1]]}"
    else:
        label = "mixed"
    if label == "mixed":
        text = "a person with mixed emotions speaking"
    elif "_" in label:
        text = _describe(label.replace("_", " "))
    else:
        text = _describe(_ADJECTIVE[label])
    return label, palette, aus, text


def _describe(adjective: str) -> str:
    """``"a happy person speaking"``, ``"an angry person speaking"``."""
    article = "an" if adjective[0] in "aeiou" else "a"
    return f"{article} {adjective} person speaking"


def _prosody(palette: np.ndarray, intensity: float) -> dict[str, float]:
    """Prosody moved from neutral towards each emotion's by its weight times the intensity."""
    base = np.array(PROSODY[NEUTRAL])
    # Prosody interpolates between emotions, so weights above a total of one (a raw array) are
    # normalised; a total below one (neutral's share of a palette) keeps that share neutral.
    w = palette / max(float(palette.sum()), 1.0)
    shift = sum(wi * (np.array(PROSODY[e]) - base) for wi, e in zip(w, EMOTIONS))
    return dict(zip(_PROSODY_FIELDS, (base + intensity * shift).tolist()))


# ---- audio ------------------------------------------------------------------------------------

# Peterson & Barney (1952) mean F1, F2 (Hz) of adult vowels: /a/ /i/ /u/ /e/ /ae/ /o/.
_VOWELS = np.array([[730, 1090], [270, 2290], [300, 870], [530, 1840], [660, 1720], [570, 840]], np.float64)
_HARMONICS = 24
_VOICED_RMS = 0.08  # RMS of a syllable peak at neutral energy
_OPEN_RMS = 0.10  # frame RMS that opens the mouth fully (anger's peaks, about)


def synth_speech(rng: np.random.Generator, prosody: dict[str, float], f0: float, num_samples: int, sr: int = SAMPLE_RATE):
    """``(wave (S,) float32, envelope (S,))``: voiced syllables in words with pauses, given prosody."""
    dur = num_samples / sr
    env = np.zeros(num_samples)
    accent = np.zeros(num_samples)  # pitch accent in [-1, 1] per word
    vowel = np.zeros(num_samples, np.int64)
    t = rng.uniform(0.03, 0.15)
    while t < dur:
        n_syl = int(rng.integers(1, 4))
        word_start = t
        syl = rng.uniform(0.8, 1.2, n_syl) / prosody["rate"]
        word_len = syl.sum()
        for d in syl:
            a, b = int(t * sr), min(int((t + d) * sr), num_samples)
            if a >= num_samples:
                break
            u = (np.arange(a, b) / sr - t) / d
            env[a:b] = rng.uniform(0.6, 1.0) * np.sin(np.pi * np.clip(u, 0, 1)) ** 0.8
            wu = (np.arange(a, b) / sr - word_start) / word_len
            accent[a:b] = np.sin(np.pi * wu) * rng.uniform(0.5, 1.0) - 0.3
            vowel[a:b] = rng.integers(len(_VOWELS))
            t += d
        t += prosody["pause"] * rng.uniform(0.5, 1.5)
    time = np.arange(num_samples) / sr
    declination = -0.15 * time / max(dur, 1e-9)  # a falling baseline over the utterance, in octaves
    f0_t = f0 * prosody["f0"] * 2.0 ** (prosody["range"] / 12.0 * accent + declination)
    phase = 2 * np.pi * np.cumsum(f0_t) / sr
    formants = _VOWELS[vowel]
    # Formant transitions of ~10 ms instead of jumps (a moving average over the vowel targets).
    k = int(0.01 * sr)
    c = np.cumsum(np.pad(formants, ((k // 2, k - k // 2), (0, 0)), mode="edge"), axis=0)
    formants = (c[k:] - c[:-k])[:num_samples] / k
    harm = np.arange(1, _HARMONICS + 1)[:, None] * f0_t[None]  # (K, S) harmonic frequencies
    amp = (
        np.exp(-0.5 * ((harm - formants[None, :, 0]) / 120.0) ** 2)
        + 0.6 * np.exp(-0.5 * ((harm - formants[None, :, 1]) / 180.0) ** 2)
        + 0.15 / np.arange(1, _HARMONICS + 1)[:, None]  # spectral tilt of the glottal source
    )
    voiced = (amp * np.sin(np.arange(1, _HARMONICS + 1)[:, None] * phase[None])).sum(0)
    # Normalise by the instantaneous harmonic power so loudness follows the envelope, not the vowel.
    voiced /= np.sqrt(0.5 * (amp**2).sum(0))
    level = _VOICED_RMS * prosody["energy"] * env
    wave = level * (voiced + 0.1 * rng.standard_normal(num_samples)) + 1e-4 * rng.standard_normal(num_samples)
    return np.clip(wave, -1.0, 1.0).astype(np.float32), env


def frame_rms(wave: np.ndarray, num_frames: int) -> np.ndarray:
    """``(F,)`` RMS of the audio under each video frame (frame ``f`` covers samples ``[f·S/F, (f+1)·S/F)``)."""
    edges = np.round(np.linspace(0, len(wave), num_frames + 1)).astype(np.int64)
    c = np.concatenate([[0.0], np.cumsum(np.asarray(wave, np.float64) ** 2)])
    return np.sqrt((c[edges[1:]] - c[edges[:-1]]) / np.maximum(np.diff(edges), 1)).astype(np.float32)


def mouth_from_rms(rms: np.ndarray, smoothing: float = 0.3) -> np.ndarray:
    """Speech jaw opening ``(F,)`` in ``[0, 1]``: linear in the frame RMS, one-pole smoothed (inertia)."""
    target = np.clip(np.asarray(rms, np.float64) / _OPEN_RMS, 0.0, 1.0)
    out = np.empty_like(target)
    prev = 0.0
    for i, x in enumerate(target):
        prev = (1 - smoothing) * x + smoothing * prev
        out[i] = prev
    return out.astype(np.float32)


# ---- head motion ------------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, num_frames: int, fps: float, dims: int) -> np.ndarray:
    """``(F, dims)`` smooth, stationary, unit-variance motion: white noise through two AR(1) low-passes."""
    a = math.exp(-1.0 / (0.4 * fps))  # ~0.4 s time constant: slow head drift, not jitter
    burn = int(3 * 0.4 * fps)  # start in the stationary regime
    x = rng.standard_normal((num_frames + burn, dims))
    for _ in range(2):
        y = np.empty_like(x)
        prev = np.zeros(dims)
        for i in range(len(x)):
            prev = a * prev + math.sqrt(1 - a * a) * x[i]
            y[i] = prev
        x = y
    # Two passes of a unit-variance AR(1) on white noise leave variance (1 + a²) / (1 − a²).
    return x[burn:] / math.sqrt((1 + a * a) / (1 - a * a))


# ---- geometry ---------------------------------------------------------------------------------


def face_landmarks(ident: Identity, aus: np.ndarray, pose: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Landmarks ``(F, 72, 2)`` in pixels from identity, per-frame AUs ``(F, 11)`` and pose ``(F, 6)``.

    The face is laid out in face units (origin between the eyes' midline and the nose, y down, half
    face height 1) with a depth per point on an ellipsoid head, moved by the AUs, rotated by yaw,
    pitch, roll, projected orthographically and placed by the translation and scale.
    """
    au = {name: aus[:, i][:, None] for i, name in enumerate(ACTION_UNITS)}
    F = aus.shape[0]
    pts = np.zeros((F, NUM_LANDMARKS, 3))
    jaw = au["AU26"]
    press = np.minimum(au["AU4"], au["AU7"]) * (1 - au["AU20"])

    # Face contour: an ellipse whose lower half narrows to the jaw and drops with AU26.
    th = -np.pi / 2 + 2 * np.pi * np.arange(_N_CONTOUR) / _N_CONTOUR
    low = np.clip(np.sin(th), 0, None)
    cx = ident.face_width * np.cos(th) * (1 - (1 - ident.jaw_width) * low**2)
    cy = np.sin(th) + 0.2 * jaw * low**2
    pts[:, _FACE, 0], pts[:, _FACE, 1] = cx, cy

    # Brows: inner (t=0) to outer (t=1). AU1 lifts the inner end, AU2 the outer, AU4 lowers and
    # draws the inner ends together; AU9 pulls the inner ends down a little (procerus).
    t = np.linspace(0, 1, _N_BROW)[None]
    inner_x = ident.eye_spacing / 2 - 0.9 * ident.eye_size
    bx = inner_x + t * 2.0 * ident.eye_size - 0.07 * au["AU4"] * (1 - t)
    by = (-0.47 - 0.06 * np.sin(np.pi * (0.3 + 0.6 * t)) - 0.16 * au["AU1"] * (1 - t) - 0.16 * au["AU2"] * t
          + 0.07 * au["AU4"] + 0.05 * au["AU4"] * (1 - t) + 0.03 * au["AU9"] * (1 - t))  # fmt: skip
    pts[:, _LBROW, 0], pts[:, _LBROW, 1] = -bx[:, ::-1], by[:, ::-1]
    pts[:, _RBROW, 0], pts[:, _RBROW, 1] = bx, by

    # Eyes: AU5 raises the upper lid, AU7 tightens both lids, AU6 pushes the lower lid up.
    ey, ew = -0.2, ident.eye_size
    up = ew * 0.55 * (1 + 0.9 * au["AU5"] - 0.45 * au["AU7"] - 0.2 * au["AU6"])
    lo = ew * 0.45 * np.clip(1 - 0.45 * au["AU6"] - 0.5 * au["AU7"], 0.05, None)
    rx = ident.eye_spacing / 2
    # right eye (x > 0): inner corner, upper inner, upper outer, outer corner, lower outer, lower inner
    ex = np.array([-1.0, -0.4, 0.4, 1.0, 0.4, -0.4]) * ew
    eyy = np.stack([0 * up[:, 0], -up[:, 0], -up[:, 0], 0 * up[:, 0], lo[:, 0], lo[:, 0]], 1) + ey
    pts[:, _REYE, 0], pts[:, _REYE, 1] = rx + ex, eyy
    mirror = [3, 2, 1, 0, 5, 4]  # the left eye in 68-point order: outer corner first
    pts[:, _LEYE, 0], pts[:, _LEYE, 1] = -(rx + ex[mirror]), eyy[:, mirror]

    # Nose: AU9 wrinkles it, lifting and flaring the nostrils.
    tip_y = -0.12 + ident.nose_length - 0.03 * au["AU9"][:, 0]
    nos_y = tip_y + 0.03 - 0.04 * au["AU9"][:, 0]
    nos_x = 0.09 + 0.03 * au["AU9"][:, 0]
    pts[:, _NOSE[0], :2] = [0.0, -0.15]
    pts[:, _NOSE[1], 0], pts[:, _NOSE[1], 1] = 0.0, tip_y
    pts[:, _NOSE[2], 0], pts[:, _NOSE[2], 1] = -nos_x, nos_y
    pts[:, _NOSE[3], 0], pts[:, _NOSE[3], 1] = nos_x, nos_y

    # Mouth. Corners: AU12 pulls out and up, AU15 down, AU20 out; the lip press narrows and thins.
    my = 0.5
    mw = ident.mouth_width * (1 + 0.35 * au["AU12"] + 0.4 * au["AU20"] - 0.15 * press)
    corner_dy = -0.09 * au["AU12"] + 0.09 * au["AU15"] + 0.05 * jaw
    thick = (1 - 0.35 * au["AU20"] - 0.5 * press) * (1 - 0.2 * au["AU12"])
    u = np.array([-2, -1, 0, 1, 2]) / 3.0  # lip points between the corners, as a fraction of mw
    bend = u**2 * 2.25  # 1 at the points next to the corners, 0 at the centre: how much they follow the corners
    upper_raise = 0.04 * au["AU9"]  # the AU10 component of disgust
    gap = 0.17 * jaw  # lip separation follows the jaw
    upper_y = my - upper_raise - thick * 0.06 * (1 - 0.3 * np.abs(np.cos(np.pi * u * 1.5)))[None] + bend * corner_dy
    lower_y = my + gap + 0.05 * jaw + thick * 0.07 * (1 - u**2 * 1.5) + bend * corner_dy
    pts[:, _OUTER[0], 0], pts[:, _OUTER[0], 1] = -mw[:, 0], my + corner_dy[:, 0]
    pts[:, _OUTER[1:6], 0], pts[:, _OUTER[1:6], 1] = u * mw, upper_y
    pts[:, _OUTER[6], 0], pts[:, _OUTER[6], 1] = mw[:, 0], my + corner_dy[:, 0]
    pts[:, _OUTER[7:12], 0], pts[:, _OUTER[7:12], 1] = (u * mw)[:, ::-1], lower_y[:, ::-1]
    ui = np.array([-0.5, 0.0, 0.5])
    ib = ui**2 * 1.5
    inner_up = my - upper_raise * 0.5 + ib * corner_dy
    inner_lo = inner_up + gap * (1 - ui**2 * 1.2)
    pts[:, _INNER[0], 0], pts[:, _INNER[0], 1] = -0.85 * mw[:, 0], my + corner_dy[:, 0]
    pts[:, _INNER[1:4], 0], pts[:, _INNER[1:4], 1] = 0.85 * ui * mw, inner_up
    pts[:, _INNER[4], 0], pts[:, _INNER[4], 1] = 0.85 * mw[:, 0], my + corner_dy[:, 0]
    pts[:, _INNER[5:8], 0], pts[:, _INNER[5:8], 1] = (0.85 * ui * mw)[:, ::-1], inner_lo[:, ::-1]

    # Cheeks: AU6 lifts them towards the eyes.
    pts[:, _CHEEKS[0], 0], pts[:, _CHEEKS[1], 0] = -rx - 0.05, rx + 0.05
    pts[:, _CHEEKS, 1] = 0.12 - 0.1 * au["AU6"]

    # Depth on an ellipsoid head (the contour is the silhouette, z = 0), the nose tip standing out.
    x, y = pts[..., 0], pts[..., 1]
    pts[..., 2] = 0.5 * np.sqrt(np.clip(1 - (x / ident.face_width) ** 2 - (y / 1.15) ** 2, 0, None))
    pts[:, _NOSE[1], 2] += 0.25
    pts[:, _NOSE[2:], 2] += 0.1
    pts[:, _FACE, 2] = 0.0

    yaw, pitch, roll, dx, dy, scale = (pose[:, i][:, None] for i in range(6))
    # Rotate: yaw about y, pitch about x, roll in the image plane (orthographic projection).
    x1 = x * np.cos(yaw) + pts[..., 2] * np.sin(yaw)
    z1 = -x * np.sin(yaw) + pts[..., 2] * np.cos(yaw)
    y1 = y * np.cos(pitch) - z1 * np.sin(pitch)
    x2 = x1 * np.cos(roll) - y1 * np.sin(roll)
    y2 = x1 * np.sin(roll) + y1 * np.cos(roll)
    h, w = size
    unit = 0.31 * h * ident.face_height * scale  # pixels per face unit
    out = np.stack([w / 2 + dx + unit * x2, 0.47 * h + dy + unit * y2], -1)
    return out.astype(np.float32)


# ---- rendering --------------------------------------------------------------------------------


def _mix(a, b, t: float) -> tuple[int, int, int]:
    return tuple(math.floor((1 - t) * x + t * y + 0.5) for x, y in zip(a, b))


def render_frame(lm: np.ndarray, ident: Identity, aus: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``(H, W, 3)`` uint8 frame drawn from landmarks ``(72, 2)`` (only positions come from ``lm``;
    ``aus`` shades the AU6 cheek blush)."""
    h, w = size
    img = Image.new("RGB", (w, h), ident.background)
    d = ImageDraw.Draw(img)
    pts = [tuple(p) for p in lm.tolist()]
    contour = lm[list(_FACE)]
    centre = contour.mean(0)
    # Hair: the upper contour pushed outwards from the face centre, behind the face.
    upper = [i for i in range(_N_CONTOUR) if i <= 7 or i >= 17]
    order = upper[upper.index(17) :] + upper[: upper.index(17)]
    hair = centre + 1.15 * (contour[order] - centre) - np.array([0, 0.04 * h])
    d.polygon([tuple(p) for p in hair.tolist()], fill=ident.hair)
    d.polygon([pts[i] for i in _FACE], fill=ident.skin)
    unit = np.linalg.norm(contour[12] - contour[0]) / 2  # face half-height in pixels
    blush = float(aus[_AU["AU6"]])
    if blush > 0.05:
        r = 0.12 * unit
        cheek = _mix(ident.skin, (220, 90, 90), 0.35 * blush)
        for i in _CHEEKS:
            x, y = pts[i]
            d.ellipse([x - r, y - 0.7 * r, x + r, y + 0.7 * r], fill=cheek)
    brow_w = max(1, math.floor(ident.brow_thickness * 2 * unit + 0.5))
    for group in (_LBROW, _RBROW):
        d.line([pts[i] for i in group], fill=ident.hair, width=brow_w)
    for group in (_LEYE, _REYE):
        eye = lm[list(group)]
        d.polygon([tuple(p) for p in eye.tolist()], fill=(245, 245, 245))
        c = eye.mean(0)
        opening = eye[:, 1].max() - eye[:, 1].min()
        r = min(0.3 * (eye[:, 0].max() - eye[:, 0].min()), 0.5 * opening)
        if r > 0.3:
            d.ellipse([c[0] - r, c[1] - r, c[0] + r, c[1] + r], fill=ident.iris)
        d.line([tuple(p) for p in eye[[0, 1, 2, 3]].tolist()], fill=_mix(ident.hair, (0, 0, 0), 0.5), width=1)
    shade = _mix(ident.skin, (0, 0, 0), 0.25)
    d.line([pts[_NOSE[0]], pts[_NOSE[1]]], fill=shade, width=1)
    d.polygon([pts[_NOSE[1]], pts[_NOSE[2]], pts[_NOSE[3]]], fill=shade)
    d.polygon([pts[i] for i in _OUTER], fill=ident.lips)
    inner = lm[list(_INNER)]
    if inner[:, 1].max() - inner[:, 1].min() > 0.5:
        d.polygon([tuple(p) for p in inner.tolist()], fill=(60, 20, 25))
    return np.asarray(img, np.uint8)


# ---- the clip ---------------------------------------------------------------------------------


def generate_clip(
    identity_seed: int,
    emotion: str | np.ndarray = NEUTRAL,
    intensity: float = 1.0,
    *,
    seed: int = 0,
    num_frames: int = 50,
    fps: float = 25.0,
    size: int | tuple[int, int] = 64,
    text: bool = True,
    speech_emotion: str | np.ndarray | None = None,
) -> SyntheticClip:
    """A talking-face clip of identity ``identity_seed`` showing ``emotion`` at ``intensity``.

    ``emotion``: see :func:`resolve_emotion`. ``seed`` draws the speech (words, pitch accents,
    vowels) and the head motion; the same ``(identity_seed, emotion, intensity, seed, ...)`` gives
    bit-identical arrays. ``size`` is ``H = W`` or ``(H, W)``. The audio has
    ``floor(num_frames · SAMPLE_RATE / fps)`` samples, so
    :func:`moee_jax.data.audio.num_video_frames` maps it back to ``num_frames``. ``text=False``
    leaves the description empty. ``speech_emotion`` (a label or palette, :func:`resolve_emotion`)
    sets the emotion the speech's prosody expresses, at the clip's intensity; ``None`` gives the
    face's own emotion. ``NEUTRAL`` decouples the two: the face shows ``emotion`` while the voice is
    emotion-neutral, so the label is the only cue to the expression.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    h, w = (size, size) if isinstance(size, int) else size
    ident = Identity.from_seed(identity_seed)
    label, palette, static_aus, description = resolve_emotion(emotion, float(intensity))
    rng = np.random.default_rng([seed, identity_seed, 0x5EC])

    # floor(F·sr/fps) samples map back to F frames under num_video_frames' ceiling (for fps ≤ sr).
    num_samples = math.floor(num_frames * SAMPLE_RATE / fps + 1e-9)
    if num_video_frames(num_samples, SAMPLE_RATE, fps) != num_frames:
        raise ValueError(f"fps={fps} is too high for {SAMPLE_RATE} Hz audio with one frame per sample span")
    speech_label, speech_palette = label, palette
    if speech_emotion is not None:
        speech_label, speech_palette = resolve_emotion(speech_emotion, float(intensity))[:2]
    prosody = _prosody(speech_palette, float(intensity))
    wave, _ = synth_speech(rng, prosody, ident.f0, num_samples)
    speech_open = mouth_from_rms(frame_rms(wave, num_frames))

    aus = np.repeat(static_aus[None], num_frames, axis=0)
    base_jaw = aus[:, _AU["AU26"]].copy()
    aus[:, _AU["AU26"]] = base_jaw + (1 - base_jaw) * speech_open

    motion = _smooth_noise(rng, num_frames, fps, 5)
    amp = np.array([0.12, 0.07, 0.06, 0.02 * w, 0.02 * h])  # rad, rad, rad, px, px: small head motion
    pose = np.concatenate([motion * amp, 1 + 0.02 * np.tanh(motion[:, :1])], axis=1)
    landmarks = face_landmarks(ident, aus, pose, (h, w))
    frames = np.stack([render_frame(landmarks[f], ident, aus[f], (h, w)) for f in range(num_frames)])
    return SyntheticClip(
        frames=frames,
        audio=wave,
        landmarks=landmarks,
        action_units=aus.astype(np.float32),
        emotion=label,
        palette=palette.astype(np.float32),
        intensity=float(intensity),
        identity=dataclasses.asdict(ident),
        text=description if text else "",
        speech_emotion=speech_label,
        mouth_opening=speech_open,
        head_pose=pose.astype(np.float32),
        fps=float(fps),
    )
