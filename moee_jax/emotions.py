"""The emotion vocabulary and emotion palettes.

MoEE (Liu et al. 2025, CVPR, arXiv 2501.01808) has one expert per basic emotion (Ekman's six);
:data:`EMOTIONS` fixes their order, which is the order of the stacked expert axis of
:class:`moee_jax.models.emotion_moe.EmotionMoE` and of every 6-way weight vector in the project.

A *palette* is a compound emotion written as weighted labels, ``"happy:0.6,surprised:0.4"``
(MoEE's "palette" of single-emotion experts). :func:`parse_palette` turns it into a weight vector
``(6,)`` over :data:`EMOTIONS`: the global-gate override of the MoE at inference, and the input of
the label MLP of Emotion-to-Latents (:func:`label_weights`).

``neutral`` is the absence of emotion: its weight vector is all zeros, so it activates no expert.
In a mix it is a share of "no emotion" — ``"happy:0.5,neutral:0.5"`` is ``0.5`` happiness, a
half-intensity smile — which is why a palette with neutral in it sums to less than one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

EMOTIONS: tuple[str, ...] = ("happiness", "sadness", "anger", "disgust", "fear", "surprise")
NUM_EMOTIONS = len(EMOTIONS)
NEUTRAL = "neutral"

ALIASES: dict[str, str] = {
    "happy": "happiness",
    "sad": "sadness",
    "angry": "anger",
    "disgusted": "disgust",
    "fearful": "fear",
    "afraid": "fear",
    "scared": "fear",
    "surprised": "surprise",
}

# Adverb and adjective of each emotion, for compound names and text descriptions.
ADVERB = {"happiness": "happily", "sadness": "sadly", "anger": "angrily", "disgust": "disgustedly",
          "fear": "fearfully", "surprise": "surprisedly"}  # fmt: skip
ADJECTIVE = {"happiness": "happy", "sadness": "sad", "anger": "angry", "disgust": "disgusted",
             "fear": "fearful", "surprise": "surprised", NEUTRAL: "neutral"}  # fmt: skip

# Compound emotions of Du, Tao & Martinez (2014) expressible with the six basic ones.
COMPOUND_EMOTIONS: dict[str, tuple[str, str]] = {
    f"{ADVERB[a]}_{ADJECTIVE[b]}": (a, b)
    for a, b in (
        ("happiness", "surprise"), ("happiness", "disgust"), ("sadness", "fear"), ("sadness", "anger"),
        ("sadness", "surprise"), ("sadness", "disgust"), ("fear", "anger"), ("fear", "surprise"),
        ("fear", "disgust"), ("anger", "surprise"), ("anger", "disgust"), ("disgust", "surprise"),
    )
}  # fmt: skip

_KNOWN = f"known emotions: {', '.join(EMOTIONS)}, {NEUTRAL} (aliases: {', '.join(f'{a}={c}' for a, c in ALIASES.items())})"


def canonical_emotion(name: str) -> str:
    """The canonical name of an emotion label or alias (case and surrounding spaces ignored)."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in EMOTIONS and key != NEUTRAL:
        raise _error(f"unknown emotion {name.strip()!r}")
    return key


def parse_palette(spec: str) -> np.ndarray:
    """Weights ``(6,)`` float32 over :data:`EMOTIONS` from a palette spec.

    ``spec`` is a comma-separated list of ``label:weight`` items, or bare labels (weight 1);
    whitespace and case are ignored. Weights are normalised to sum to one, neutral's share
    included, and neutral's share is then dropped (see the module docstring). So
    ``"happy:0.6, surprised:0.4"`` gives happiness 0.6 and surprise 0.4, ``"angry"`` a one-hot on
    anger, ``"happy:3,sad:1"`` 0.75 / 0.25, and ``"neutral"`` all zeros.

    Raises ``ValueError`` naming the offending item, and listing the known emotions, for an unknown
    emotion, a negative, non-finite or non-numeric weight, a repeated emotion (aliases count as
    their emotion), an item that is not ``label`` or ``label:weight``, an empty spec, or weights
    that are all zero.
    """
    if not isinstance(spec, str):
        raise _error(f"an emotion palette must be a string such as 'happy:0.6,surprised:0.4', got {spec!r}")
    if not spec.strip():
        raise _error("empty emotion palette; expected e.g. 'happy' or 'happy:0.6,surprised:0.4'")
    weights: dict[str, float] = {}
    for item in spec.split(","):
        label, weight = _parse_item(item, spec)
        name = canonical_emotion(label)
        if name in weights:
            raise _error(f"emotion {name!r} appears more than once in palette {spec!r} (at {item.strip()!r})")
        weights[name] = weight
    total = sum(weights.values())
    if total == 0:
        raise _error(f"all weights of palette {spec!r} are zero; give at least one positive weight, or use {NEUTRAL!r} for no emotion")
    out = np.zeros(NUM_EMOTIONS, np.float32)
    if weights.keys() == {NEUTRAL}:
        return out
    for name, w in weights.items():
        if name != NEUTRAL:
            out[EMOTIONS.index(name)] = w / total
    return out


def _parse_item(item: str, spec: str) -> tuple[str, float]:
    """``(label, weight)`` of one ``label`` or ``label:weight`` item of ``spec``."""
    parts = [p.strip() for p in item.split(":")]
    if len(parts) > 2 or not parts[0] or (len(parts) == 2 and not parts[1]):
        raise _error(
            f"malformed item {item.strip()!r} in emotion palette {spec!r}: expected 'label' or "
            f"'label:weight' items separated by commas, e.g. 'happy:0.6,surprised:0.4'"
        )
    if len(parts) == 1:
        return parts[0], 1.0
    where = f"weight {parts[1]!r} of {parts[0]!r} in emotion palette {spec!r}"
    try:
        weight = float(parts[1])
    except ValueError:
        raise _error(f"{where} is not a number") from None
    if not np.isfinite(weight):
        raise _error(f"{where} is not finite")
    if weight < 0:
        raise _error(f"{where} is negative; weights must be ≥ 0")
    return parts[0], weight


def _error(message: str) -> ValueError:
    return ValueError(f"{message}; {_KNOWN}")


def label_weights(labels: str | Sequence[str]) -> np.ndarray:
    """Input of the label MLP of Emotion-to-Latents: weights ``(6,)`` for one label or palette
    spec, ``(B, 6)`` for a sequence of them (see :func:`parse_palette`)."""
    if isinstance(labels, str):
        return parse_palette(labels)
    return np.array([parse_palette(spec) for spec in labels], np.float32).reshape(-1, NUM_EMOTIONS)


def palette_name(weights: np.ndarray | Sequence[float]) -> str:
    """The canonical spec of a weight vector ``(6,)``: ``"happiness:0.5,surprise:0.5"`` (non-zero
    weights in :data:`EMOTIONS` order, ``%g``), ``"neutral"`` for all zeros. ``parse_palette`` of it
    gives the weights back (normalised)."""
    w = np.asarray(weights, np.float64).reshape(-1)
    if w.shape != (NUM_EMOTIONS,):
        raise ValueError(f"a palette has {NUM_EMOTIONS} weights over {EMOTIONS}, got shape {w.shape}")
    items = [f"{e}:{v:g}" for e, v in zip(EMOTIONS, w) if v > 0]
    return ",".join(items) if items else NEUTRAL
