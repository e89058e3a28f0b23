"""Scores of generated clips against the synthetic generator's ground truth, from the reader's outputs.

Every function is pure NumPy over :meth:`moee_jax.eval.reader.Reader.predict` outputs (or ground
truth in the same layout) and returns plain Python numbers, lists and dicts, so that
:func:`summarize` can go straight into ``metrics.json`` and :func:`to_markdown` into a report.
Classes are :data:`moee_jax.data.schema.CLASSES` (six emotions, then neutral); action units are
:data:`moee_jax.data.synthetic.ACTION_UNITS`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np

from moee_jax.data import schema, synthetic
from moee_jax.data.audio import num_video_frames
from moee_jax.emotions import canonical_emotion

CLASSES = schema.CLASSES
ACTION_UNITS = synthetic.ACTION_UNITS
# The identity vector's last entry is the speaking pitch f0, which no frame shows; identity errors
# are over the visible parameters only.
VISIBLE_IDENTITY_FIELDS = tuple(f for f in schema.IDENTITY_FIELDS if f != "f0")
# AU26 (jaw drop) also carries the speech-driven opening, so it says nothing about an emotion while
# the face speaks; compound checks use the other characteristic AUs.
SPEECH_AUS = ("AU26",)
# Entries per identity field in the identity vector (colours take 3).
_FIELD_WIDTHS = {f: 3 if isinstance(v, tuple) else 1 for f, v in dataclasses.asdict(synthetic.Identity.from_seed(0)).items()}
IDENTITY_DIM = sum(_FIELD_WIDTHS[f] for f in schema.IDENTITY_FIELDS)


def _clip_array(x, name: str, width: int, index: int | None = None) -> np.ndarray:
    """One clip's per-frame array ``(F, width)`` (a single row ``(width,)`` counts as one frame)."""
    where = name if index is None else f"{name}[{index}]"
    a = np.asarray(x, np.float64)
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2 or a.shape[1] != width:
        raise ValueError(f"{where} must be (F, {width}) per-frame values, got shape {np.shape(x)}")
    if a.shape[0] == 0:
        raise ValueError(f"{where} has no frames")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{where} contains NaN or infinite values")
    return a


def _skip(a: np.ndarray, skip_frames: int, where: str) -> np.ndarray:
    if skip_frames < 0:
        raise ValueError(f"skip_frames must be >= 0, got {skip_frames}")
    if skip_frames >= len(a):
        raise ValueError(f"{where}: skip_frames={skip_frames} leaves none of its {len(a)} frames")
    return a[skip_frames:]


def _class_index(target, i: int) -> int:
    if isinstance(target, str):
        try:
            return CLASSES.index(canonical_emotion(target))
        except ValueError as e:
            raise ValueError(f"target_classes[{i}]: {e}") from None
    k = int(target)
    if not 0 <= k < len(CLASSES):
        raise ValueError(f"target_classes[{i}] = {target!r} is not a class index in [0, {len(CLASSES)}) of {CLASSES}")
    return k


# ---- emotion ---------------------------------------------------------------------------------


def emotion_accuracy(probs_per_clip: Sequence[np.ndarray] | np.ndarray, target_classes: Sequence, *, skip_frames: int = 0) -> dict:
    """Clip-level emotion accuracy over :data:`CLASSES`.

    ``probs_per_clip``: ``N`` arrays ``(F_i, 7)`` (or one ``(N, F, 7)`` array) of per-frame class
    probabilities. ``target_classes``: ``N`` class indices into :data:`CLASSES` or emotion names.
    A clip's prediction is the argmax of its frames' mean probability, after dropping its first
    ``skip_frames`` frames (e.g. the frames carried over from the reference). Measured: the
    fraction of clips whose prediction is the target (``accuracy``), the accuracy per target class
    (``None`` for a class with no clip), and the confusion matrix ``(7, 7)`` of clip counts, rows
    the target and columns the prediction.
    """
    clips = list(probs_per_clip)
    targets = list(target_classes)
    if len(clips) != len(targets):
        raise ValueError(f"probs_per_clip has {len(clips)} clips but target_classes has {len(targets)}")
    if not clips:
        raise ValueError("probs_per_clip is empty")
    k = len(CLASSES)
    preds = []
    for i, p in enumerate(clips):
        p = _skip(_clip_array(p, "probs_per_clip", k, i), skip_frames, f"probs_per_clip[{i}]")
        preds.append(int(np.argmax(p.mean(0))))
    truth = [_class_index(t, i) for i, t in enumerate(targets)]
    confusion = np.zeros((k, k), np.int64)
    for t, p in zip(truth, preds):
        confusion[t, p] += 1
    per_class = {c: (float(confusion[j, j] / confusion[j].sum()) if confusion[j].sum() else None) for j, c in enumerate(CLASSES)}
    return {
        "accuracy": float(np.trace(confusion) / len(truth)),
        "num_clips": len(truth),
        "per_class_accuracy": per_class,
        "confusion": confusion.tolist(),
        "predictions": preds,
    }


# ---- action units ----------------------------------------------------------------------------


def au_error(aus_pred: np.ndarray, aus_true: np.ndarray) -> dict:
    """Mean absolute action-unit error.

    ``aus_pred`` ``(..., 11)`` per-frame AUs (reader output); ``aus_true`` the same shape, or
    ``(11,)`` for one static target broadcast over every frame. Measured: ``mean |pred − true|``
    over all frames and AUs (``mae``) and per AU over frames (``per_au``), in AU units (``[0, 1]``).
    """
    pred = np.asarray(aus_pred, np.float64)
    true = np.asarray(aus_true, np.float64)
    n = len(ACTION_UNITS)
    if pred.ndim == 0 or pred.shape[-1] != n or pred.size == 0:
        raise ValueError(f"aus_pred must be (..., {n}) with at least one frame, got shape {pred.shape}")
    if true.shape not in (pred.shape, (n,)):
        raise ValueError(f"aus_true must have aus_pred's shape {pred.shape} or be ({n},), got {true.shape}")
    err = np.abs(pred - true).reshape(-1, n)
    return {"mae": float(err.mean()), "per_au": {a: float(e) for a, e in zip(ACTION_UNITS, err.mean(0))}}


def characteristic_aus(emotion: str, min_weight: float = 0.5) -> dict[str, float]:
    """``{AU: weight at intensity 1}`` of an emotion's prototype AUs with weight ≥ ``min_weight``,
    without the speech-driven :data:`SPEECH_AUS`."""
    name = canonical_emotion(emotion)
    weights = synthetic.EMOTION_AUS[name]
    return {a: float(w) for a, w in zip(ACTION_UNITS, weights) if w >= min_weight and a not in SPEECH_AUS}


def compound_components(
    aus_pred_per_clip: np.ndarray,
    compound_name: str,
    *,
    intensity: float = 1.0,
    threshold: float = 0.3,
    min_weight: float = 0.5,
    probs: np.ndarray | None = None,
    skip_frames: int = 0,
) -> dict:
    """Whether a clip shows both components of a compound emotion.

    ``aus_pred_per_clip`` ``(F, 11)``: one clip's per-frame AUs; ``compound_name`` a key of
    :data:`~moee_jax.data.synthetic.COMPOUND_EMOTIONS` such as ``happily_surprised``; ``intensity``
    the clip's emotion intensity. For each component emotion, its characteristic AUs
    (:func:`characteristic_aus`: prototype weight ≥ ``min_weight``, AU26 excluded as it moves with
    speech) are each *active* when the clip's mean predicted value reaches ``threshold`` × the AU's
    value at ``intensity`` (``intensity · weight``). Measured per component: ``score``, the fraction
    of its characteristic AUs that are active; ``present``, all of them active; and per AU the
    clip mean and the level required. ``both_present``: both components present.

    The default ``threshold`` is low because a 50/50 palette draws each component at half its
    weight, antagonistic AUs partly cancel on the drawn face (AU12 lifts the lip corners that AU15
    lowers; AU1/2 raise the brows that AU4 lowers), and the reader's estimates of the subtle AUs
    spread widely across identities at 32²: the demo's reader reads fear's AU7 and AU20 under
    sadness at 0.8 of what is drawn on average, but at 0.10–0.35 and 0.12–0.68 over 24 identities
    where 0.25 and 0.45 are drawn, following the identity's mouth width (r +0.84 for AU20 over 48 identities:
    the widths vary as much as a 50/50 compound stretches the mouth), while a neutral face reads AU7 up
    to 0.22 (``benchmarks/reader_ceiling.py``). Measured with the demo's reader (12,000 steps) on
    ground-truth 50/50 palettes of ``happily_surprised`` and ``sadly_fearful`` from 24 identities
    outside every training split (32² from 64²): both components found in 0.83 of the clips (0.58 with a
    3,000-step reader, fear's lid tightener AU7 and lip stretcher AU20 failing first), while none
    of the 96 clips showing one component alone was judged to show both. On another 24 such
    identities (seeds 50,000–50,023) the same reader finds both in 0.75 (happily surprised 22/24,
    sadly fearful 14/24 with the face's own voice and with a neutral one alike: in the clips it
    misses, it reads fear's lip stretcher at 0.11–0.25 where 0.45 is drawn), so the check's
    ceiling on sadly fearful faces is set by what one 32² frame shows, not by the voice; readers
    given the identity's neutral frame as well did no better. The evaluation reports
    that false-alarm rate on generated clips too (:func:`moee_jax.eval.evaluate.score_items`).
    Compounds whose components are antagonistic (``happily_disgusted``, ``angrily_surprised``)
    are rarely recognised by the AUs at all.

    Secondary, when ``probs`` ``(F, 7)`` (the reader's class probabilities) is given: the two
    classes of highest mean probability (``top2``) and ``top2_match``, whether they are exactly
    the two components.
    """
    name = compound_name.strip().lower()
    if name not in synthetic.COMPOUND_EMOTIONS:
        raise ValueError(f"unknown compound emotion {compound_name!r}; known: {', '.join(synthetic.COMPOUND_EMOTIONS)}")
    if not 0.0 < intensity <= 1.0:
        raise ValueError(f"intensity must lie in (0, 1], got {intensity}")
    aus = _skip(_clip_array(aus_pred_per_clip, "aus_pred_per_clip", len(ACTION_UNITS)), skip_frames, "aus_pred_per_clip")
    mean = dict(zip(ACTION_UNITS, aus.mean(0)))
    components = {}
    for emotion in synthetic.COMPOUND_EMOTIONS[name]:
        units = {}
        for au, weight in characteristic_aus(emotion, min_weight).items():
            required = threshold * intensity * weight
            units[au] = {"mean": float(mean[au]), "required": float(required), "active": bool(mean[au] >= required)}
        active = [u["active"] for u in units.values()]
        components[emotion] = {"score": float(np.mean(active)), "present": bool(all(active)), "aus": units}
    out = {
        "compound": name,
        "components": components,
        "both_present": all(c["present"] for c in components.values()),
    }
    if probs is not None:
        p = _skip(_clip_array(probs, "probs", len(CLASSES)), skip_frames, "probs").mean(0)
        top2 = [CLASSES[i] for i in np.argsort(-p, kind="stable")[:2]]
        out["top2"] = top2
        out["top2_match"] = set(top2) == set(synthetic.COMPOUND_EMOTIONS[name])
    return out


# ---- lip sync --------------------------------------------------------------------------------


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation; 0 when either signal is constant (a still mouth is not in sync)."""
    a = a - a.mean()
    b = b - b.mean()
    den = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum() / den) if den > 1e-12 else 0.0


def audio_mouth_envelope(audio: np.ndarray, num_frames: int, fps: float, sample_rate: int = synthetic.SAMPLE_RATE) -> np.ndarray:
    """``(F,)`` the jaw opening that ``audio`` implies per video frame: the frame RMS
    (:func:`~moee_jax.data.synthetic.frame_rms`) through the generator's one-pole jaw smoother
    (:func:`~moee_jax.data.synthetic.mouth_from_rms`). Audio past the last frame is ignored."""
    wave = np.asarray(audio, np.float32).reshape(-1)
    if num_video_frames(len(wave), sample_rate, fps) < num_frames:
        raise ValueError(
            f"audio of {len(wave)} samples at {sample_rate} Hz covers "
            f"{num_video_frames(len(wave), sample_rate, fps)} frames at {fps} fps, fewer than the {num_frames} mouth frames"
        )
    wave = wave[: math.floor(num_frames * sample_rate / fps + 1e-9)]
    return synthetic.mouth_from_rms(synthetic.frame_rms(wave, num_frames))


def lip_sync(
    mouth_pred: np.ndarray,
    audio: np.ndarray,
    fps: float,
    *,
    sample_rate: int = synthetic.SAMPLE_RATE,
    max_lag: int = 2,
    skip_frames: int = 0,
) -> dict:
    """Lip sync of a generated mouth-opening track with its speech.

    ``mouth_pred`` ``(F,)``: the reader's mouth opening per frame; ``audio`` ``(S,)`` the speech at
    ``sample_rate`` whose frames at ``fps`` cover the ``F`` video frames. Measured: ``pearson``,
    the Pearson correlation over frames (after the first ``skip_frames``) of the mouth opening with
    :func:`audio_mouth_envelope` (the audio's frame RMS, jaw-smoothed as the generator does; 0
    when either is constant); ``best_lag_pearson`` and ``best_lag``, the highest correlation over
    shifts of ``−max_lag … max_lag`` frames (positive: the mouth follows the audio late).
    """
    mouth = np.asarray(mouth_pred, np.float64)
    if mouth.ndim != 1 or mouth.size < 2:
        raise ValueError(f"mouth_pred must be (F,) with F >= 2, got shape {mouth.shape}")
    if not np.all(np.isfinite(mouth)):
        raise ValueError("mouth_pred contains NaN or infinite values")
    if max_lag < 0:
        raise ValueError(f"max_lag must be >= 0, got {max_lag}")
    env = audio_mouth_envelope(audio, len(mouth), fps, sample_rate).astype(np.float64)
    mouth = _skip(mouth, skip_frames, "mouth_pred")
    env = env[skip_frames:]
    n = len(mouth)
    if n - max_lag < 2:
        raise ValueError(f"mouth_pred has {n} frames after skip_frames, too few for lags up to {max_lag}")
    lagged = {lag: _pearson(mouth[lag:], env[: n - lag]) if lag >= 0 else _pearson(mouth[: n + lag], env[-lag:])
              for lag in range(-max_lag, max_lag + 1)}  # fmt: skip
    best = max(lagged, key=lambda lag: (lagged[lag], -abs(lag)))
    return {"pearson": lagged[0], "best_lag_pearson": lagged[best], "best_lag": int(best), "num_frames": n}


# ---- identity --------------------------------------------------------------------------------


def identity_error(identity_pred_per_clip: np.ndarray, identity_true: np.ndarray | Mapping[str, object]) -> dict:
    """Identity drift of a clip from its reference person.

    ``identity_pred_per_clip`` ``(F, 24)`` (or ``(24,)``): the reader's per-frame identity vectors
    (:func:`~moee_jax.data.schema.identity_vector` layout), averaged over frames; ``identity_true``
    the reference identity's vector ``(24,)`` or its :class:`~moee_jax.data.synthetic.Identity`
    dict. Measured: mean absolute error over the visible parameters
    (:data:`VISIBLE_IDENTITY_FIELDS`: geometry in face units, colours as RGB / 255; the pitch f0 is
    left out), overall (``mae``) and per field (colours averaged over their 3 channels).
    """
    true = schema.identity_vector(identity_true) if isinstance(identity_true, Mapping) else np.asarray(identity_true, np.float64)
    if true.shape != (IDENTITY_DIM,):
        raise ValueError(f"identity_true must be an ({IDENTITY_DIM},) identity vector or an Identity dict, got shape {true.shape}")
    pred = _clip_array(identity_pred_per_clip, "identity_pred_per_clip", IDENTITY_DIM).mean(0)
    err = np.abs(pred - true)
    per_field, visible, i = {}, [], 0
    for field in schema.IDENTITY_FIELDS:
        k = _FIELD_WIDTHS[field]
        if field in VISIBLE_IDENTITY_FIELDS:
            per_field[field] = float(err[i : i + k].mean())
            visible.extend(range(i, i + k))
        i += k
    return {"mae": float(err[visible].mean()), "per_field": per_field}


# ---- summary ---------------------------------------------------------------------------------


def _mean(values) -> float | None:
    values = [float(v) for v in values]
    return float(np.mean(values)) if values else None


def _mean_dicts(dicts: Sequence[Mapping[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([d[k] for d in dicts])) for k in dicts[0]} if dicts else {}


def summarize(
    *,
    emotion: Mapping | None = None,
    action_units: Sequence[Mapping] = (),
    compounds: Sequence[Mapping] = (),
    compound_false_positives: Sequence[Mapping] = (),
    lip_sync: Sequence[Mapping] = (),
    identity: Sequence[Mapping] = (),
) -> dict:
    """One JSON-ready dict of an evaluation, from the per-clip results of this module.

    ``emotion``: an :func:`emotion_accuracy` result (kept as is, less the per-clip predictions);
    ``action_units``, ``compounds``, ``lip_sync``, ``identity``: lists of per-clip results of
    :func:`au_error`, :func:`compound_components`, :func:`lip_sync` and :func:`identity_error`,
    averaged over clips (compounds also per compound name). ``compound_false_positives``:
    :func:`compound_components` results on clips that show *one* of a compound's components alone
    (the instrument's false alarms: ``false_positive_rate``, the share judged to show both).
    Sections with no input are left out; ``headline`` gathers the one-number scores.
    """
    out: dict = {}
    headline: dict = {}
    if emotion is not None:
        out["emotion"] = {k: v for k, v in emotion.items() if k != "predictions"} | {"classes": list(CLASSES)}
        headline["emotion_accuracy"] = emotion["accuracy"]
    if action_units:
        out["action_units"] = {
            "num_clips": len(action_units),
            "mae": _mean(r["mae"] for r in action_units),
            "per_au": _mean_dicts([r["per_au"] for r in action_units]),
        }
        headline["au_mae"] = out["action_units"]["mae"]
    if compounds:
        per_name: dict[str, list] = {}
        for r in compounds:
            per_name.setdefault(r["compound"], []).append(r)
        with_top2 = [r for r in compounds if "top2_match" in r]

        def block(rs):
            b = {
                "num_clips": len(rs),
                "both_present_rate": _mean(r["both_present"] for r in rs),
                "component_scores": _mean_dicts([{e: c["score"] for e, c in r["components"].items()} for r in rs]),
            }
            top2 = [r["top2_match"] for r in rs if "top2_match" in r]
            if top2:
                b["top2_match_rate"] = _mean(top2)
            return b

        out["compounds"] = {
            "num_clips": len(compounds),
            "both_present_rate": _mean(r["both_present"] for r in compounds),
            "per_compound": {name: block(rs) for name, rs in sorted(per_name.items())},
        }
        headline["compound_both_present_rate"] = out["compounds"]["both_present_rate"]
        if compound_false_positives:
            out["compounds"]["false_positive_rate"] = _mean(r["both_present"] for r in compound_false_positives)
            out["compounds"]["false_positive_clips"] = len(compound_false_positives)
            headline["compound_false_positive_rate"] = out["compounds"]["false_positive_rate"]
        if with_top2:
            out["compounds"]["top2_match_rate"] = _mean(r["top2_match"] for r in with_top2)
            headline["compound_top2_match_rate"] = out["compounds"]["top2_match_rate"]
    if lip_sync:
        out["lip_sync"] = {
            "num_clips": len(lip_sync),
            "pearson": _mean(r["pearson"] for r in lip_sync),
            "best_lag_pearson": _mean(r["best_lag_pearson"] for r in lip_sync),
            "best_lags": [int(r["best_lag"]) for r in lip_sync],
        }
        headline["lip_sync_pearson"] = out["lip_sync"]["pearson"]
        headline["lip_sync_best_lag_pearson"] = out["lip_sync"]["best_lag_pearson"]
    if identity:
        out["identity"] = {
            "num_clips": len(identity),
            "mae": _mean(r["mae"] for r in identity),
            "per_field": _mean_dicts([r["per_field"] for r in identity]),
        }
        headline["identity_mae"] = out["identity"]["mae"]
    return {"headline": headline, **out}


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return lines


def to_markdown(summary: Mapping) -> str:
    """Markdown tables of a :func:`summarize` result: the headline scores, then per section detail
    (confusion matrix, per-AU error, per-compound rates, lip sync, identity per field)."""
    lines = ["## Evaluation", ""]
    head = summary.get("headline", {})
    ceilings = [(title, summary[key].get("headline", {})) for key, title in
                (("ceiling", "ground truth (ceiling)"), ("ceiling_round_trip", "ground truth through the latents"),
                 ("ceiling_labelled", "ground truth, neutral voice")) if key in summary]  # fmt: skip
    if ceilings:
        # Every generated number beside the reader's score on the ground truth seen the same way.
        lines += _table(("metric", "generated", *(t for t, _ in ceilings)),
                        [(k, v, *(c.get(k) for _, c in ceilings)) for k, v in head.items()])  # fmt: skip
    else:
        lines += _table(("metric", "value"), list(head.items()))
    if "emotion" in summary:
        e = summary["emotion"]
        classes = e.get("classes", list(CLASSES))
        lines += ["", f"### Emotion ({e['num_clips']} clips, accuracy {_fmt(e['accuracy'])})", "", "rows: target, columns: prediction", ""]
        lines += _table(("", *classes, "accuracy"), [(c, *row, e["per_class_accuracy"][c]) for c, row in zip(classes, e["confusion"])])
    if "action_units" in summary:
        a = summary["action_units"]
        lines += ["", f"### Action units ({a['num_clips']} clips, MAE {_fmt(a['mae'])})", ""]
        lines += _table(tuple(a["per_au"]), [tuple(a["per_au"].values())])
    if "compounds" in summary:
        c = summary["compounds"]
        lines += ["", f"### Compound emotions ({c['num_clips']} clips)", ""]
        rows = []
        for name, b in c["per_compound"].items():
            scores = ", ".join(f"{e} {_fmt(s)}" for e, s in b["component_scores"].items())
            rows.append((name, b["num_clips"], b["both_present_rate"], scores, b.get("top2_match_rate")))
        lines += _table(("compound", "clips", "both present", "component AU scores", "top-2 match"), rows)
        if "false_positive_rate" in c:
            lines += ["", f"Clips of one component alone judged to show both: {_fmt(c['false_positive_rate'])} "
                          f"({c['false_positive_clips']} clips)."]  # fmt: skip
    if "lip_sync" in summary:
        s = summary["lip_sync"]
        lines += ["", f"### Lip sync ({s['num_clips']} clips)", ""]
        lines += _table(("Pearson", "best over lags"), [(s["pearson"], s["best_lag_pearson"])])
    if "identity" in summary:
        i = summary["identity"]
        lines += ["", f"### Identity ({i['num_clips']} clips, MAE {_fmt(i['mae'])})", ""]
        lines += _table(tuple(i["per_field"]), [tuple(i["per_field"].values())])
    return "\n".join(lines) + "\n"
