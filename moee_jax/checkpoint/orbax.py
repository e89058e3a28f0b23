"""Orbax I/O for parameter trees (converted weights; the trainer's managers build on the same calls).

A parameter checkpoint is a directory holding ``params/`` (an Orbax ``StandardCheckpointer``
tree), ``metadata.json`` (what it holds, the config it fits, and its provenance) and
``checksums.json`` (:mod:`moee_jax.checkpoint.integrity`), verified before every read.
"""

from __future__ import annotations

import json
import pathlib

import jax
import orbax.checkpoint as ocp
from etils import epath

from moee_jax.checkpoint.integrity import ensure_intact, write_manifest


def _path(directory) -> epath.Path:
    """Local paths made absolute; ``gs://`` and other remote paths kept as they are."""
    text = str(directory)
    return epath.Path(text) if "://" in text else epath.Path(pathlib.Path(text).absolute())


def save_params(directory: str | pathlib.Path, params: dict, metadata: dict) -> epath.Path:
    """Write ``params`` (any pytree of arrays) and ``metadata`` under ``directory``."""
    directory = _path(directory)
    if (directory / "params").exists():
        raise FileExistsError(f"{directory} already holds a checkpoint; choose a new --out directory")
    directory.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory / "params", params)
        ckptr.wait_until_finished()
    if jax.process_index() == 0:  # one writer, so the manifest never hashes a file another process rewrites
        (directory / "metadata.json").write_text(json.dumps(metadata, indent=2, sort_keys=True))
        write_manifest(directory)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("moee_save_params_manifest")
    return directory


def load_metadata(directory: str | pathlib.Path) -> dict:
    path = _path(directory) / "metadata.json"
    if not path.exists():
        raise FileNotFoundError(f"{directory}: not a moee_jax parameter checkpoint (no metadata.json)")
    return json.loads(path.read_text())


def restore_params(directory: str | pathlib.Path, abstract: dict | None = None) -> dict:
    """Read ``params`` back; ``abstract`` (ShapeDtypeStructs, optionally with shardings) places
    every leaf directly on its devices, which is how a different mesh restores the same tree."""
    directory = _path(directory)
    if not (directory / "params").exists():
        raise FileNotFoundError(f"{directory}: no params/ inside; is this a moee_jax parameter checkpoint?")
    ensure_intact(directory)
    with ocp.StandardCheckpointer() as ckptr:
        if abstract is None:
            return ckptr.restore(directory / "params")
        return ckptr.restore(directory / "params", jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, abstract))
