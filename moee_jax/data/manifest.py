"""What to prepare: clip descriptions from a manifest CSV or a MEAD folder tree.

**Manifest CSV** (one row per video; header row required; UTF-8)::

    path,speaker,emotion,intensity,text,split
    clips/anna_01.mp4,anna,happy,0.8,,train
    clips/anna_02.mp4,anna,"happy:0.6,surprised:0.4",1,a delighted woman,test

``path`` (relative to the manifest's folder, or absolute), ``speaker`` and ``emotion`` are required;
``emotion`` is a label or alias, a compound name (``happily_surprised``) or a palette spec.
``intensity`` defaults to 1 and must lie in ``[0, 1]``; ``text`` defaults to the emotion's
description ("a happy person speaking"); ``split`` is ``train`` (default), ``validation`` or
``test``; an optional ``name`` column names the clip (default: the file's stem), and an optional
``audio`` column gives a separate audio file for a video without a usable audio track. A clip's id
is ``<speaker>/<name>``.

**MEAD** (Wang et al. 2020, "MEAD: A Large-scale Audio-visual Dataset for Emotional Talking-face
Generation")::

    <root>/<speaker>/video/front/<emotion>/level_<n>/<NNN>.mp4
    <root>/<speaker>/audio/<emotion>/level_<n>/<NNN>.m4a      (used when the mp4 has no audio)

MEAD's emotions map to ours (``angry`` → anger, ...); ``contempt`` is not one of our classes and is
skipped with that reason. ``level_1`` … ``level_3`` → intensity 1/3, 2/3, 1; neutral clips get
intensity 0 (no emotion, as in the synthetic data).

A malformed manifest (missing file or column) raises :class:`ManifestError`; a bad row (unknown
emotion, bad intensity, ...) becomes a :class:`Rejected` entry, reported and skipped, so one typo
does not stop a batch. Every message names the file, the row and the field.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import pathlib
import re

from moee_jax.data import schema, synthetic
from moee_jax.emotions import NEUTRAL

SPLITS = ("train", "validation", "test")
REQUIRED_COLUMNS = ("path", "speaker", "emotion")
OPTIONAL_COLUMNS = ("intensity", "text", "split", "name", "audio")
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi", ".webm")

# MEAD emotion folder → our label (None: not one of our classes).
MEAD_EMOTIONS: dict[str, str | None] = {
    "angry": "anger", "contempt": None, "disgusted": "disgust", "fear": "fear", "happy": "happiness",
    "neutral": "neutral", "sad": "sadness", "surprised": "surprise",
}  # fmt: skip
MEAD_LEVELS = {"level_1": 1 / 3, "level_2": 2 / 3, "level_3": 1.0}

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+\-]*$")


class ManifestError(ValueError):
    """A manifest that cannot be read, or one bad row of it; names the file, row and field."""

    def __init__(self, path: str | os.PathLike, message: str, *, row: int | None = None, field: str | None = None):
        self.path, self.row, self.field = pathlib.Path(path), row, field
        where = str(self.path)
        if row is not None:
            where += f", row {row}"
        if field is not None:
            where += f", field {field!r}"
        super().__init__(f"{where}: {message}")


@dataclasses.dataclass(frozen=True)
class ClipSpec:
    """One video to prepare and its metadata; ``clip_id`` is ``<speaker>/<name>``."""

    video: pathlib.Path
    speaker: str
    name: str
    emotion: str
    intensity: float
    text: str
    split: str = "train"
    audio: pathlib.Path | None = None  # a separate audio file, used when the video has no audio track

    @property
    def clip_id(self) -> str:
        return f"{self.speaker}/{self.name}"


@dataclasses.dataclass(frozen=True)
class Rejected:
    """An input that will not be prepared: ``source`` (a file, or ``file, row n``) and ``reason``
    (which names the file, and for a manifest row the row and field)."""

    source: str
    reason: str


@dataclasses.dataclass
class Inputs:
    clips: list[ClipSpec]
    rejected: list[Rejected]


def describe_emotion(emotion: str, intensity: float = 1.0) -> str:
    """The default text of an emotion, worded as the synthetic data's ("a happy person speaking")."""
    schema.emotion_fields(emotion, intensity)  # the record's check: raises naming an unknown emotion
    return synthetic.resolve_emotion(emotion.strip().lower(), 1.0)[3]


def _check_name(value: str, what: str) -> str:
    if not _SAFE_NAME.match(value):
        raise ValueError(
            f"{what} {value!r} must start with a letter or digit and contain only letters, digits, '.', '_', '+', '-' "
            f"(it becomes a file name)"
        )
    return value


def read_manifest(path: str | os.PathLike, root: str | os.PathLike | None = None) -> Inputs:
    """Clips of a manifest CSV (see the module docstring); relative paths resolve against ``root``
    (default: the manifest's folder).

    Raises:
      ManifestError: the file is missing or unreadable, has no header, lacks a required column, or
        lists no rows. Bad rows are returned as :class:`Rejected`, not raised.
    """
    path = pathlib.Path(path)
    root = path.parent if root is None else pathlib.Path(root)
    if not path.is_file():
        raise ManifestError(path, "manifest file not found")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [c.strip() for c in (reader.fieldnames or [])]
            if not header:
                raise ManifestError(path, f"empty manifest; the first row must name the columns {', '.join(REQUIRED_COLUMNS)}")
            reader.fieldnames = header
            missing = [c for c in REQUIRED_COLUMNS if c not in header]
            if missing:
                raise ManifestError(
                    path,
                    f"missing column(s) {', '.join(missing)}; the header is {header} and must include "
                    f"{', '.join(REQUIRED_COLUMNS)} (optional: {', '.join(OPTIONAL_COLUMNS)})",
                )
            rows = [(reader.line_num, row) for row in reader]
    except UnicodeDecodeError as e:
        raise ManifestError(path, f"not UTF-8 text ({e})") from e
    except csv.Error as e:
        raise ManifestError(path, f"malformed CSV ({e})") from e
    if not rows:
        raise ManifestError(path, "the manifest lists no videos")

    clips: list[ClipSpec] = []
    rejected: list[Rejected] = []
    seen: dict[str, int] = {}
    for number, (line, row) in enumerate(rows, start=1):
        try:
            clip = _parse_row(path, root, number, row)
        except ManifestError as e:
            rejected.append(Rejected(f"{path}, row {number} (line {line})", str(e)))
            continue
        if clip.clip_id in seen:
            error = ManifestError(
                path,
                f"clip id {clip.clip_id!r} repeats row {seen[clip.clip_id]}; give the rows distinct 'name' values",
                row=number,
                field="name" if "name" in header else "path",
            )
            rejected.append(Rejected(f"{path}, row {number} (line {line})", str(error)))
            continue
        seen[clip.clip_id] = number
        clips.append(clip)
    return Inputs(clips, rejected)


def _parse_row(path: pathlib.Path, root: pathlib.Path, number: int, row: dict) -> ClipSpec:
    def field(name: str) -> str:
        value = row.get(name)
        return "" if value is None else value.strip()

    def error(name: str, message: str) -> ManifestError:
        return ManifestError(path, message, row=number, field=name)

    for name in REQUIRED_COLUMNS:
        if not field(name):
            raise error(name, "is empty")
    video = pathlib.Path(os.path.expanduser(field("path")))
    video = video if video.is_absolute() else root / video
    try:
        speaker = _check_name(field("speaker"), "speaker")
    except ValueError as e:
        raise error("speaker", str(e)) from None
    try:
        name = _check_name(field("name") or video.stem, "clip name")
    except ValueError as e:
        raise error("name" if field("name") else "path", str(e)) from None
    intensity_text = field("intensity") or "1"
    try:
        intensity = float(intensity_text)
    except ValueError:
        raise error("intensity", f"{intensity_text!r} is not a number; expected a value in [0, 1]") from None
    if not 0.0 <= intensity <= 1.0:
        raise error("intensity", f"{intensity_text} is outside [0, 1]")
    emotion = field("emotion")
    try:
        description = describe_emotion(emotion, intensity)
    except ValueError as e:
        raise error("emotion", str(e)) from None
    text = field("text") or description
    split = (field("split") or "train").lower()
    if split not in SPLITS:
        raise error("split", f"{split!r} is not one of {', '.join(SPLITS)}")
    audio = None
    if field("audio"):
        audio = pathlib.Path(os.path.expanduser(field("audio")))
        audio = audio if audio.is_absolute() else root / audio
    return ClipSpec(video, speaker, name, emotion, intensity, text, split, audio)


def read_mead(root: str | os.PathLike) -> Inputs:
    """Clips of a MEAD tree (see the module docstring), sorted by path; ``contempt`` clips and
    unknown emotion or level folders are :class:`Rejected` with the reason.

    Raises:
      ManifestError: ``root`` is not a folder or holds no ``<speaker>/video/front/...`` videos.
    """
    root = pathlib.Path(root)
    if not root.is_dir():
        raise ManifestError(root, "MEAD root folder not found")
    videos = sorted(p for p in root.glob("*/video/front/*/level_*/*") if p.suffix.lower() == ".mp4")
    if not videos:
        raise ManifestError(root, "no MEAD videos found; expected <root>/<speaker>/video/front/<emotion>/level_<n>/<NNN>.mp4")
    clips: list[ClipSpec] = []
    rejected: list[Rejected] = []
    for video in videos:
        level_dir, emotion_dir = video.parent.name, video.parent.parent.name
        speaker = video.parents[4].name
        if emotion_dir not in MEAD_EMOTIONS:
            rejected.append(
                Rejected(str(video), f"{video}: unknown MEAD emotion folder {emotion_dir!r}; known: {', '.join(MEAD_EMOTIONS)}")
            )
            continue
        label = MEAD_EMOTIONS[emotion_dir]
        if label is None:
            rejected.append(
                Rejected(str(video), f"{video}: MEAD emotion {emotion_dir!r} is not one of the emotion classes {schema.CLASSES}")
            )
            continue
        if level_dir not in MEAD_LEVELS:
            rejected.append(Rejected(str(video), f"{video}: unknown MEAD intensity folder {level_dir!r}; known: {', '.join(MEAD_LEVELS)}"))
            continue
        try:
            speaker = _check_name(speaker, "speaker")
        except ValueError as e:
            rejected.append(Rejected(str(video), f"{video}: {e}"))
            continue
        audio = root / speaker / "audio" / emotion_dir / level_dir / f"{video.stem}.m4a"
        clips.append(
            ClipSpec(
                video=video,
                speaker=speaker,
                name=f"{emotion_dir}_{level_dir}_{video.stem}",
                emotion=label,
                intensity=0.0 if label == NEUTRAL else MEAD_LEVELS[level_dir],
                text=describe_emotion(label),
                audio=audio if audio.is_file() else None,
            )
        )
    return Inputs(clips, rejected)


# Files --input takes for a video by mistake (a manifest is a .csv).
VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")


def load_inputs(input_path: str | os.PathLike, *, manifest: str | os.PathLike | None = None, mead: bool = False) -> Inputs:
    """The clips named by the ``moee prepare`` inputs.

    ``input_path`` is a manifest CSV; or a folder with ``mead=True`` (a MEAD tree), with
    ``manifest`` (a CSV whose relative paths resolve against the folder), or holding its own
    ``manifest.csv``.

    Raises:
      ManifestError: no way to find the clips' metadata, or an unreadable manifest / MEAD tree.
    """
    input_path = pathlib.Path(input_path)
    if mead and manifest is not None:
        raise ManifestError(input_path, "give either a manifest or the MEAD layout, not both")
    if mead:
        return read_mead(input_path)
    if input_path.is_file():
        if manifest is not None:
            raise ManifestError(input_path, "the input is already a manifest file; --manifest is for a video folder")
        if input_path.suffix.lower() in VIDEO_SUFFIXES:
            raise ManifestError(
                input_path, "this is a video, not a manifest: give a manifest .csv (path, speaker, emotion) naming it, or "
                "its folder with --manifest"
            )  # fmt: skip
        return read_manifest(input_path)
    if not input_path.is_dir():
        raise ManifestError(input_path, "input not found (expected a folder of videos or a manifest .csv)")
    if manifest is not None:
        return read_manifest(manifest, root=input_path)
    if (input_path / "manifest.csv").is_file():
        return read_manifest(input_path / "manifest.csv")
    raise ManifestError(
        input_path,
        "no clip metadata: give --manifest clips.csv (columns path, speaker, emotion[, intensity, text, split]), "
        "put a manifest.csv in the folder, or pass --mead for a MEAD tree",
    )
