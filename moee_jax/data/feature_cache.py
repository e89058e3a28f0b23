"""Pretrained-encoder features of a dataset, computed once and stored beside it (``moee features``).

Training on wav2vec2 audio features and T5 text features (Hallo's audio path, MoEE's text and speech
emotion sources) needs the encoders' outputs for every clip. They are computed here, once per clip,
and stored; the training pipeline (:mod:`moee_jax.data.pipeline`, ``data.features=FOLDER``) reads
them. A cache rather than encoding on the fly, because

* the encoders run once per clip instead of once per sample (every step of every epoch);
* training stays encoder-free and fast: the jitted step holds no encoder, the data workers only
  read arrays;
* the features are the ones animation uses: they are made by the same functions the animator
  runs on a user's speech and text (:func:`~moee_jax.data.audio_features.audio_frame_features`,
  ``T5Bundle.encode``), and windows are cut by the same rule (:func:`~moee_jax.data.audio.clip_windows`).

Layout of a cache folder (one dataset, any of its splits)::

    FOLDER/features.json   the encoders (folder, config hash, layers, width), the text length, the
                           dataset, and per split its file and record count
    FOLDER/<split>.npz     per record, keyed by the record's ``id``:
                             <id>/audio      (T, layers + 1, D) float32  wav2vec2 hidden states (the
                                             embedding output and every layer) at the clip's T video
                                             frames (:func:`~moee_jax.data.audio.align_to_frames`)
                             <id>/text       (L, D_t) float32  T5 features of the record's ``text``
                             <id>/text_mask  (L,) bool         True = token

What a training sample of frames ``[s, s + F)`` with ``c`` frames of audio context takes from it
(:meth:`FeatureCache.clip`)::

    audio_features   (F, 2c + 1, layers + 1, D)  slot k of frame i is cached frame s + i + k − c,
                                                 clamped into the clip (its first / last frame
                                                 replicate past the ends)
    speech_features  (F, D) + speech_mask (F,)   the last layer at the target frames: the speech
                                                 emotion source of Emotion-to-Latents
    text_features    (L, D_t) + text_mask (L,)   the text emotion source

Encoders are identified by a hash of their ``config.json`` (architecture and preprocessing settings,
not the weights; ``transformers_version`` and private ``_``-fields are left out), with their number
of hidden states and width. Extending a cache with other encoders, training on it with a model of
other widths, continuing a stage trained on other audio features, and animating a run with other
encoders are refused with an error naming the ``features.json`` and the field. The trainer copies the
cache's ``features.json`` into ``RUN/<stage>/`` so that a run remembers what it was trained on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import zipfile
from collections.abc import Callable, Mapping

import numpy as np

from moee_jax.atomic import atomic_write, atomic_write_text
from moee_jax.data import schema
from moee_jax.data.audio import clip_windows

MANIFEST = "features.json"
FORMAT = 1
_VOLATILE = ("transformers_version",)  # config.json fields that change with the saving library, not the model
_COMPARED = ("config_hash", "layers", "dim")  # what makes two recorded encoders the same (not their folder)

log = logging.getLogger("moee_jax.data")


class FeatureCacheError(ValueError):
    """A feature cache that cannot be built or used as asked; the message names the file and field."""


def default_folder(data_dir: str | os.PathLike, dataset_name: str) -> pathlib.Path:
    """Where ``moee features`` puts a dataset's cache unless told: ``DATA_DIR/features/<name>``."""
    return pathlib.Path(data_dir) / "features" / dataset_name


# ---- the encoders ------------------------------------------------------------------------------------


def config_hash(folder: str | os.PathLike) -> str:
    """A short hash of a transformers folder's ``config.json`` (sorted keys; volatile fields left out)."""
    from moee_jax.checkpoint.convert.state_dict import read_hf_config

    config = read_hf_config(folder)
    kept = {k: v for k, v in config.items() if not k.startswith("_") and k not in _VOLATILE}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


def _model_folder(folder: str | os.PathLike, flag: str) -> pathlib.Path:
    path = pathlib.Path(folder).expanduser().resolve()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{flag} {folder}: no config.json there; pass the folder of a saved transformers model")
    return path


def describe_audio_encoder(folder: str | os.PathLike, flag: str = "--audio_encoder") -> dict:
    """A wav2vec2 folder as a cache records it: ``{folder, config_hash, layers, dim}`` (``layers``:
    hidden states = transformer layers + 1; ``dim``: their width), read from ``config.json`` alone."""
    from moee_jax.checkpoint.convert.state_dict import read_hf_config
    from moee_jax.models.encoders.wav2vec2 import Wav2Vec2Config

    path = _model_folder(folder, flag)
    config = Wav2Vec2Config.from_hf(read_hf_config(path))
    return {"folder": str(path), "config_hash": config_hash(path), "layers": config.num_hidden_layers + 1, "dim": config.hidden_size}


def describe_text_encoder(folder: str | os.PathLike, flag: str = "--text_encoder") -> dict:
    """A T5 folder as a cache records it: ``{folder, config_hash, layers, dim}`` (``dim = d_model``)."""
    from moee_jax.checkpoint.convert.state_dict import read_hf_config
    from moee_jax.models.encoders.t5 import T5EncoderConfig

    path = _model_folder(folder, flag)
    config = T5EncoderConfig.from_hf(read_hf_config(path))
    return {"folder": str(path), "config_hash": config_hash(path), "layers": config.num_layers + 1, "dim": config.d_model}


def check_encoder(recorded: Mapping | None, given: Mapping | None, *, field: str, manifest: str, given_as: str) -> None:
    """Refuse ``given`` (a :func:`describe_audio_encoder` / :func:`describe_text_encoder` dict, or None)
    unless it is the encoder recorded as ``field`` (``audio_encoder`` / ``text_encoder``) in the
    ``manifest`` file. ``given_as`` says where ``given`` comes from, for the message."""
    if recorded is None and given is None:
        return
    if recorded is None:
        raise FeatureCacheError(f"{manifest}: field {field} is null (no such features there), but {given_as} is {given['folder']}")
    if given is None:
        raise FeatureCacheError(f"{manifest}: field {field} is {recorded['folder']}, but {given_as} has none")
    for key in _COMPARED:
        if recorded.get(key) != given.get(key):
            raise FeatureCacheError(
                f"{manifest}: field {field}.{key} is {recorded.get(key)!r} ({recorded.get('folder')}), but {given_as} "
                f"{given['folder']} has {given.get(key)!r}: the features were made by another encoder"
            )


# ---- the manifest ------------------------------------------------------------------------------------


def read_manifest(folder: str | os.PathLike) -> dict:
    """``FOLDER/features.json``, checked; :class:`FeatureCacheError` naming it when missing or unreadable."""
    path = pathlib.Path(folder) / MANIFEST
    if not path.is_file():
        raise FeatureCacheError(f"{path}: not found; build the feature cache first (moee features --out {folder})")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FeatureCacheError(f"{path}: unreadable ({e}); rebuild the feature cache") from None
    return _checked(manifest, str(path))


def _checked(manifest, where: str) -> dict:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else None
        raise FeatureCacheError(f"{where}: field format is {got!r}, this version reads {FORMAT}; rebuild the feature cache")
    for field in ("dataset", "audio_encoder", "text_encoder", "text_length", "splits"):
        if field not in manifest:
            raise FeatureCacheError(f"{where}: field {field} is missing; rebuild the feature cache")
    return manifest


def read_run_manifest(stage_dir) -> dict | None:
    """The ``features.json`` a stage of a run was trained with (``RUN/<stage>/features.json``), or
    None when it was trained without a feature cache. ``stage_dir`` may be any ``epath`` location."""
    from etils import epath

    path = epath.Path(stage_dir) / MANIFEST
    if not path.exists():
        return None
    try:
        return _checked(json.loads(path.read_text()), str(path))
    except json.JSONDecodeError as e:
        raise FeatureCacheError(f"{path}: unreadable ({e})") from None


def record_in_run(stage_dir, manifest: dict | None) -> None:
    """Write ``manifest`` as ``RUN/<stage>/features.json`` (remove a stale one when None)."""
    from etils import epath

    path = epath.Path(stage_dir) / MANIFEST
    if manifest is None:
        if path.exists():
            path.unlink()
        return
    path.write_text(json.dumps(manifest, indent=2))


# ---- building ----------------------------------------------------------------------------------------


def _put(archive: zipfile.ZipFile, name: str, array: np.ndarray) -> None:
    with archive.open(name + ".npy", "w", force_zip64=True) as f:
        np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)


def _ids_of(npz_path: pathlib.Path) -> set[str]:
    with zipfile.ZipFile(npz_path) as archive:
        return {name.removesuffix(".npy").rsplit("/", 1)[0] for name in archive.namelist()}


def build_feature_cache(
    data_dir: str | os.PathLike,
    dataset_name: str,
    split: str,
    out_folder: str | os.PathLike,
    *,
    audio_encoder: str | os.PathLike | None = None,
    text_encoder: str | os.PathLike | None = None,
    text_length: int = 32,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Encode every record of ``dataset_name``'s ``split`` under ``data_dir`` into ``out_folder``
    (see the module docstring): ``audio_encoder`` a wav2vec2 folder, ``text_encoder`` a T5 folder
    (at least one), ``text_length`` tokens per text. An existing cache folder gets this split added
    (or replaced) when its dataset, encoders and text length are these; anything else is refused.
    Files are written atomically: an interrupted build leaves the folder as it was.
    ``progress(done, total)`` after each record. → the written manifest."""
    from moee_jax.checkpoint.pretrained import load_t5_encoder, load_wav2vec2
    from moee_jax.data.audio_features import audio_frame_features
    from moee_jax.data.pipeline import open_source

    if audio_encoder is None and text_encoder is None:
        raise FeatureCacheError("give an audio encoder (a wav2vec2 folder) and/or a text encoder (a T5 folder): nothing to compute")
    if int(text_length) < 1:
        raise FeatureCacheError(f"text_length={text_length}: must be at least 1")
    out = pathlib.Path(out_folder)
    audio = describe_audio_encoder(audio_encoder) if audio_encoder is not None else None
    text = describe_text_encoder(text_encoder) if text_encoder is not None else None
    manifest = {"format": FORMAT, "dataset": dataset_name, "audio_encoder": audio, "text_encoder": text,
                "text_length": int(text_length) if text is not None else None, "splits": {}}  # fmt: skip
    others: dict[str, set[str]] = {}
    if (out / MANIFEST).exists():
        existing = read_manifest(out)
        where = str(out / MANIFEST)
        if existing["dataset"] != dataset_name:
            raise FeatureCacheError(f"{where}: field dataset is {existing['dataset']!r}, not {dataset_name!r}; use another folder")
        check_encoder(existing["audio_encoder"], audio, field="audio_encoder", manifest=where, given_as="this build's audio encoder")
        check_encoder(existing["text_encoder"], text, field="text_encoder", manifest=where, given_as="this build's text encoder")
        if existing["text_length"] != manifest["text_length"]:
            raise FeatureCacheError(f"{where}: field text_length is {existing['text_length']}, this build's {manifest['text_length']}")
        manifest["splits"] = {k: v for k, v in existing["splits"].items() if k != split}
        others = {k: _ids_of(out / v["file"]) for k, v in manifest["splits"].items() if (out / v["file"]).is_file()}
    source = open_source(data_dir, dataset_name, split)
    audio_bundle = load_wav2vec2(audio["folder"]) if audio is not None else None
    text_bundle = load_t5_encoder(text["folder"]) if text is not None else None
    file = f"{split}.npz"
    total = len(source)

    def write(tmp: str) -> None:
        seen: set[str] = set()
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            for i in range(total):
                record = source[i]
                rid = schema.text_field(record["id"])
                clash = [k for k, ids in others.items() if rid in ids]
                if rid in seen or clash:
                    raise FeatureCacheError(
                        f"record {i} of {dataset_name} split {split!r}: id {rid!r} is also in "
                        + (f"split {clash[0]!r} of {out / MANIFEST}" if clash else "this split")
                        + "; records are looked up by id, so ids must be unique in a cache"
                    )
                seen.add(rid)
                try:
                    if audio_bundle is not None:
                        frames = audio_frame_features(np.asarray(record["audio"], np.float32), audio_bundle,
                                                      fps=float(record["fps"]), num_frames=len(record["frames"]))  # fmt: skip
                        _put(archive, f"{rid}/audio", frames)
                    if text_bundle is not None:
                        features, mask = text_bundle.encode([schema.text_field(record["text"])], max_length=int(text_length))
                        _put(archive, f"{rid}/text", features[0].astype(np.float32))
                        _put(archive, f"{rid}/text_mask", mask[0].astype(np.bool_))
                except ValueError as e:
                    raise FeatureCacheError(f"record {i} ({rid!r}) of {dataset_name} split {split!r}: {e}") from e
                if progress is not None:
                    progress(i + 1, total)

    atomic_write(out / file, write)
    manifest["splits"][split] = {"file": file, "num_records": total}
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2))
    log.info("feature cache %s: %d records of %s split %r", out, total, dataset_name, split)
    return manifest


# ---- reading -----------------------------------------------------------------------------------------


class FeatureCache:
    """A cache folder opened for reading. Split files are opened lazily in each process (the object
    pickles without them, for grain's worker processes)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = pathlib.Path(folder)
        self.manifest = read_manifest(self.folder)
        self._archives: dict | None = None
        self._where: dict[str, str] | None = None

    def __getstate__(self):
        return {"folder": self.folder, "manifest": self.manifest, "_archives": None, "_where": None}

    @property
    def path(self) -> str:
        return str(self.folder / MANIFEST)

    @property
    def audio_encoder(self) -> dict | None:
        return self.manifest["audio_encoder"]

    @property
    def text_encoder(self) -> dict | None:
        return self.manifest["text_encoder"]

    def _open(self) -> None:
        archives, where = {}, {}
        for split, entry in self.manifest["splits"].items():
            path = self.folder / entry["file"]
            if not path.is_file():
                raise FeatureCacheError(f"{self.path}: split {split!r} is stored in {entry['file']}, which is missing; rebuild it")
            archives[split] = np.load(path, allow_pickle=False)
            for name in archives[split].files:
                where.setdefault(name.rsplit("/", 1)[0], split)
        self._archives, self._where = archives, where

    def _get(self, record_id: str, name: str) -> np.ndarray:
        if self._archives is None:
            self._open()
        split = self._where.get(record_id)
        if split is None:
            raise FeatureCacheError(
                f"{self.path}: record {record_id!r} is in none of the cached splits ({', '.join(self.manifest['splits'])}); "
                "build the features of its split (moee features --splits ...)"
            )
        return self._archives[split][f"{record_id}/{name}"]

    def clip(self, record_id: str, start: int, num_frames: int, context: int, record_frames: int) -> dict[str, np.ndarray]:
        """The sample keys of frames ``[start, start + num_frames)`` of record ``record_id`` (a clip of
        ``record_frames`` frames) with ``context`` frames of audio context: ``audio_features (F, 2c+1,
        layers+1, D)``, ``speech_features (F, D)``, ``speech_mask (F,)`` when the cache has audio;
        ``text_features (L, D_t)``, ``text_mask (L,)`` when it has text (module docstring)."""
        out: dict[str, np.ndarray] = {}
        if self.audio_encoder is not None:
            frames = self._get(record_id, "audio")
            if frames.shape[0] != record_frames:
                raise FeatureCacheError(
                    f"{self.path}: record {record_id!r} has {frames.shape[0]} frames of cached audio features but the "
                    f"dataset's record has {record_frames} frames: the dataset changed; rebuild the feature cache"
                )
            out["audio_features"] = clip_windows(frames, start, num_frames, context)
            out["speech_features"] = np.ascontiguousarray(frames[start : start + num_frames, -1])
            out["speech_mask"] = np.ones(num_frames, np.bool_)
        if self.text_encoder is not None:
            out["text_features"] = self._get(record_id, "text")
            out["text_mask"] = self._get(record_id, "text_mask")
        return out


# ---- a training config against its cache ------------------------------------------------------------------


def check_training_config(config, *, num_records: int | None = None) -> dict | None:
    """The manifest of ``config.data.features`` (None without a cache), checked against the stage
    config: the cache holds ``config.data.name``'s ``config.data.split`` (``num_records`` records, when
    given), and the emotion sources' widths are the features' (``model.emotion.speech_dim`` the audio
    encoder's width, or ``data.mel_bins`` for a cache without one; ``model.emotion.text_dim`` the text
    encoder's). A text source needs a cache with text features. Raises :class:`FeatureCacheError` naming the
    field to change."""
    data, emotion = config.data, config.model.emotion
    sources = tuple(emotion.get("sources", ()))
    folder = str(data.get("features", "") or "")
    if config.get("stage") not in ("stage1", "stage2") or sources == ("embedder",):
        return read_manifest(folder) if folder else None
    if not folder:
        if "text" in sources:
            raise FeatureCacheError(
                "model.emotion.sources has 'text' but data.features is empty: the text source takes T5 features from a "
                "feature cache (moee features --text_encoder T5_FOLDER), set data.features to its folder"
            )
        return None
    manifest = read_manifest(folder)
    where = str(pathlib.Path(folder) / MANIFEST)
    if manifest["dataset"] != data.name:
        raise FeatureCacheError(f"{where}: field dataset is {manifest['dataset']!r} but data.name is {data.name!r}")
    if data.split not in manifest["splits"]:
        raise FeatureCacheError(
            f"{where}: field splits has {sorted(manifest['splits'])}, not data.split={data.split!r}; "
            f"build it: moee features --splits {data.split} --out {folder}"
        )
    cached = manifest["splits"][data.split]["num_records"]
    if num_records is not None and cached != num_records:
        raise FeatureCacheError(
            f"{where}: field splits.{data.split}.num_records is {cached} but the dataset's split has {num_records} "
            "records: the dataset changed; rebuild the feature cache"
        )
    audio, text = manifest["audio_encoder"], manifest["text_encoder"]
    if "speech" in sources:
        width, origin = (
            (audio["dim"], "audio_encoder.dim") if audio is not None else (int(data.mel_bins), "null audio_encoder: log-mel, data.mel_bins")
        )
        if emotion.get("speech_dim") != width:
            raise FeatureCacheError(
                f"{where}: the speech emotion features are {width} wide ({origin}) but model.emotion.speech_dim="
                f"{emotion.get('speech_dim')}; set it to {width}"
            )
    if "text" in sources:
        if text is None:
            raise FeatureCacheError(
                f"{where}: field text_encoder is null but model.emotion.sources has 'text'; build the cache with a T5 encoder"
            )
        if emotion.get("text_dim") != text["dim"]:
            raise FeatureCacheError(
                f"{where}: field text_encoder.dim is {text['dim']} but model.emotion.text_dim={emotion.get('text_dim')}; "
                f"set it to {text['dim']}"
            )
    if audio is None and int(data.mel_bins) < 1:
        raise FeatureCacheError(f"{where}: field audio_encoder is null and data.mel_bins=0: the model would have no audio features")
    return manifest


def check_earlier_stage(manifest: dict | None, stage_dir, *, features: str = "") -> None:
    """Refuse to continue from an earlier diffusion stage (``RUN/stage1``) trained on other audio
    features than ``manifest`` (this stage's cache, None: log-mel): its audio projection takes them."""
    from etils import epath

    stage_dir = epath.Path(stage_dir)
    earlier = read_run_manifest(stage_dir)
    theirs = None if earlier is None else earlier["audio_encoder"]
    ours = None if manifest is None else manifest["audio_encoder"]
    if theirs is None and ours is None:
        return
    here = f"data.features={features}" if features else "this stage (log-mel audio, no data.features)"
    if theirs is None:
        raise FeatureCacheError(
            f"{stage_dir} was trained on log-mel audio (no {MANIFEST} there) but {here} gives wav2vec2 features "
            f"({ours['folder']}); train both stages on the same audio features"
        )
    if ours is None:
        raise FeatureCacheError(
            f"{stage_dir / MANIFEST}: field audio_encoder is {theirs['folder']} but {here}; train both stages on the same audio features"
        )
    check_encoder(theirs, ours, field="audio_encoder", manifest=str(stage_dir / MANIFEST), given_as=f"{here}'s audio encoder")
