"""TFDS builder ``talking_face_clips``: real talking-face videos prepared by ``moee prepare``.

The builder's manual directory is a prepared directory — the ``out_dir`` of
:func:`moee_jax.data.prepare.prepare_videos`, holding ``clips/<speaker>/<name>.npz``. Every clip
file becomes one record in the common format (:mod:`moee_jax.data.schema`): JPEG face crops at
25 fps, 16 kHz speech, landmarks in crop pixels with their layout, and the emotion fields; real
clips have no action units and no identity parameters. The split of a clip is the ``split`` column
of its manifest row (``train`` unless given); a split without clips is left out.

Build (needs ``tensorflow-cpu``, the ``prepare`` extra) — this is what ``moee prepare`` does::

    from moee_jax.data.builders.talking_face_clips import build
    build(prepared_dir="data/prepared", data_dir="data/tfds")

Reading (``tfds.data_source("talking_face_clips", data_dir=...)`` or
:mod:`moee_jax.data.pipeline`) does not need TensorFlow.
"""

from __future__ import annotations

import os
import pathlib

import tensorflow_datasets as tfds

from moee_jax.data import prepare, schema
from moee_jax.data.manifest import SPLITS


class TalkingFaceClips(tfds.core.GeneratorBasedBuilder):
    """Face-cropped real talking-face clips with emotion labels (from ``moee prepare``)."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "First release.", "1.1.0": "The speech_emotion feature (what the voice expresses)."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Prepare your videos with `moee prepare --input VIDEOS --out PREPARED ...` (or "
        "moee_jax.data.prepare.prepare_videos) and pass PREPARED as the manual directory."
    )

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=schema.features(),
            homepage="https://github.com/moee-jax/moee_jax",
        )

    def _split_generators(self, dl_manager):
        root = pathlib.Path(dl_manager.manual_dir)
        by_split = clips_by_split(root)
        return {split: self._generate_examples(paths) for split, paths in by_split.items()}

    def _generate_examples(self, paths):
        for path in paths:
            clip = prepare.read_clip(path)
            yield clip.clip_id, clip.record()


def clips_by_split(prepared_dir: str | os.PathLike) -> dict[str, list[pathlib.Path]]:
    """The clip files of a prepared directory grouped by their ``split``, splits with clips only.

    Raises:
      FileNotFoundError: the directory holds no prepared clips.
      ValueError: a clip file is unreadable or has an unknown split (names the file).
    """
    root = pathlib.Path(prepared_dir)
    paths = prepare.list_clips(root)
    if not paths:
        raise FileNotFoundError(f"no prepared clips in {root / prepare.CLIPS_DIR}; run `moee prepare` with --out {root} first")
    by_split: dict[str, list[pathlib.Path]] = {}
    for path in paths:
        split = prepare.read_metadata(path)["split"]
        if split not in SPLITS:
            raise ValueError(f"{path}: field 'split' is {split!r}; expected one of {', '.join(SPLITS)}")
        by_split.setdefault(split, []).append(path)
    return by_split


def build(prepared_dir: str | os.PathLike, data_dir: str | os.PathLike) -> tfds.core.DatasetBuilder:
    """Write the clips of ``prepared_dir`` as the ``talking_face_clips`` ArrayRecord dataset under
    ``data_dir``, replacing an earlier build of the same version; returns the builder.

    Raises:
      FileNotFoundError, ValueError: see :func:`clips_by_split`.
    """
    clips_by_split(prepared_dir)  # a missing or empty folder is named here, before TFDS starts writing
    builder = TalkingFaceClips(data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            manual_dir=str(prepared_dir),
            download_mode=tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS,
        )
    )
    return builder
