"""Batch jobs (``moee animate --batch manifest.csv``): many videos from one manifest, bad rows skipped.

Each row is one video (:func:`read_manifest`); a bad row is reported and the job goes on; the
report is rewritten after every row, so finished work is on record even if the job is killed.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import pathlib
import time
from collections.abc import Callable

from moee_jax import checks
from moee_jax.atomic import atomic_write_text
from moee_jax.inference import inputs as inputs_lib
from moee_jax.inference.animator import Animator
from moee_jax.inference.inputs import EmotionSpec, InputError
from moee_jax.inference.outputs import animate_to_file

MANIFEST_COLUMNS = ("image", "audio", "emotion", "out")
OPTIONAL_COLUMNS = ("emotion_text", "emotion_video", "seed")
FROM_AUDIO = ("audio", "from_audio")


def read_manifest(path: str | os.PathLike) -> list[dict[str, str]]:
    """Rows of a batch manifest CSV: columns ``image, audio, emotion, out`` (+ optional
    ``emotion_text, emotion_video, seed``). ``emotion`` is a label or palette spec, ``audio`` for the
    emotion of the speech, or empty when ``emotion_text`` / ``emotion_video`` gives it. Relative paths
    are relative to the manifest's folder."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise InputError(f"--batch {path}: manifest file not found")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            missing = [c for c in MANIFEST_COLUMNS if c not in header]
            if missing:
                raise InputError(
                    f"--batch {path}: the header lacks column(s) {missing}; expected {', '.join(MANIFEST_COLUMNS)} "
                    f"(optional: {', '.join(OPTIONAL_COLUMNS)}), got {header}"
                )
            rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    except (UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"--batch {path}: not a readable CSV file ({e})") from None
    if not rows:
        raise InputError(f"--batch {path}: the manifest has no rows")
    return rows


def row_emotion(row: dict[str, str]) -> EmotionSpec:
    """The :class:`EmotionSpec` of one manifest row."""
    emotion = row.get("emotion", "")
    from_audio = emotion.lower() in FROM_AUDIO
    return inputs_lib.parse_emotion(
        emotion if emotion and not from_audio else None,
        emotion_text=row.get("emotion_text") or None,
        emotion_from_audio=from_audio,
        emotion_video=row.get("emotion_video") or None,
    )


def animate_batch(
    animator: Animator,
    manifest: str | os.PathLike,
    *,
    report: str | os.PathLike | None = None,
    on_row: Callable[[int, dict], None] | None = None,
    **options,
) -> dict:
    """Animate every row of ``manifest`` (see :func:`read_manifest`); a bad row is skipped and
    reported, and the run goes on. ``options`` go to :meth:`Animator.animate` (``steps``,
    ``sampler``, ``guidance``, ``seed``, ``detect``) and :func:`save_animation` (``paste``).

    The report (``report``, default ``<manifest>.report.json``) is rewritten after every row from
    the first video written on, so finished work is on record even if the job is killed:
    ``{"manifest", "rows", "done": [{"line", "out", "seconds", "frames", "sampling_seconds"}], "failed": [{"line", "error"}]}``;
    a job in which every row failed writes nothing (``result["report"]`` is None) and the failures
    are in the result. ``on_row(line, entry)`` follows each row. → the result.
    """
    manifest = pathlib.Path(manifest)
    rows = read_manifest(manifest)
    report_path = pathlib.Path(report) if report is not None else manifest.with_suffix(".report.json")
    try:
        checks.writable_location(report_path, "--report")
    except checks.UsageError as e:
        raise InputError(str(e)) from None
    base = manifest.parent
    paste = bool(options.pop("paste", False))
    result: dict = {"manifest": str(manifest), "rows": len(rows), "done": [], "failed": []}
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        t0 = time.perf_counter()
        try:
            if not row.get("image") or not row.get("audio") or not row.get("out"):
                raise InputError("image, audio and out must all be given")
            spec = row_emotion(row)
            if spec.video is not None and not spec.video.is_absolute():
                spec = dataclasses.replace(spec, video=base / spec.video, spec=str(base / spec.video))
            out = _under(base, row["out"])
            kwargs = dict(options)
            if row.get("seed"):
                try:
                    kwargs["seed"] = int(row["seed"])
                except ValueError:
                    raise InputError(f"seed {row['seed']!r} is not an integer") from None
            animation = animate_to_file(animator, _under(base, row["image"]), _under(base, row["audio"]), spec, out, paste=paste, **kwargs)
            entry = {"line": line, "out": str(out), "seconds": round(time.perf_counter() - t0, 2), "frames": int(animation.plan.num_frames),
                     "sampling_seconds": animation.settings["sampling_seconds"], "warnings": animation.warnings}  # fmt: skip
            result["done"].append(entry)
        except (InputError, ValueError, OSError, RuntimeError) as e:
            entry = {"line": line, "image": row.get("image", ""), "error": f"{e}"}
            result["failed"].append(entry)
        if result["done"]:
            atomic_write_text(report_path, json.dumps(result, indent=2))
        if on_row is not None:
            on_row(line, entry)
    result["report"] = str(report_path) if result["done"] else None
    return result


def _under(base: pathlib.Path, value: str) -> pathlib.Path:
    p = pathlib.Path(value).expanduser()
    return p if p.is_absolute() else base / p
