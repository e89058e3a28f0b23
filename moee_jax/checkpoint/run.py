"""The run directory: the one place that knows its layout, and restores and exports its stages.

Layout (``RUN`` = ``moee train --run_dir``; every stage writes under its own name)::

    RUN/<stage>/checkpoints/<step>/{state, data, config}   Orbax CheckpointManager (keep-N, async)
    RUN/<stage>/final/{params/, metadata.json}             the stage's final parameters (next stage's init)
    RUN/<stage>/config.json                                the resolved config
    RUN/<stage>/metrics.jsonl                              one line per logged step (process 0)
    RUN/<stage>/data_shards/process_<i>.json               which records each process reads
    RUN/tensorboard/<stage>/                               TensorBoard event files (process 0)

Local paths are made absolute; ``gs://`` paths work through ``etils.epath``. A finished stage is
restored onto any mesh (:func:`restore_parts`, part by part, or :func:`restore_subtree`) or onto one
device (:func:`restore_final`); the stage-2 export of a run is found by :func:`resolve_checkpoint`.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import pathlib
from collections.abc import Callable

import jax
import orbax.checkpoint as ocp
from etils import epath

from moee_jax.checkpoint import integrity
from moee_jax.checkpoint.orbax import restore_params, save_params

log = logging.getLogger("moee_jax.checkpoint")

STAGES = ("vae", "embedder", "stage1", "stage2")
REQUIRED_STAGE = "stage2"


class RunError(ValueError):
    """A run directory or checkpoint that cannot be used; the message names it and says what to do."""


def run_path(path) -> epath.Path:
    """A local or ``gs://`` path (``pathlib`` would turn ``gs://`` into ``gs:/``)."""
    text = str(path)
    return epath.Path(text) if "://" in text else epath.Path(pathlib.Path(text).absolute())


@dataclasses.dataclass(frozen=True)
class RunDir:
    """Paths of one run directory (see the module docstring)."""

    root: epath.Path

    @classmethod
    def of(cls, path) -> RunDir:
        return cls(run_path(path))

    def stage(self, stage: str) -> epath.Path:
        return self.root / stage

    def final(self, stage: str) -> epath.Path:
        return self.root / stage / "final"

    def config(self, stage: str) -> epath.Path:
        return self.root / stage / "config.json"

    def checkpoints(self, stage: str) -> epath.Path:
        return self.root / stage / "checkpoints"

    def metrics(self, stage: str) -> epath.Path:
        return self.root / stage / "metrics.jsonl"

    def data_shards(self, stage: str) -> epath.Path:
        return self.root / stage / "data_shards"

    def tensorboard(self, stage: str) -> epath.Path:
        return self.root / "tensorboard" / stage

    def earlier_finals(self, stage: str) -> list[epath.Path]:
        """The final exports a stage starts from, latest stage first (those that exist or not)."""
        return [self.final(s) for s in reversed(STAGES[: STAGES.index(stage)])]


def export_final(final, params: dict, metadata: dict) -> epath.Path:
    """Write a stage's final export (replacing an older one): ``params/`` and ``metadata.json``."""
    final = run_path(final)
    if (final / "params").exists() and jax.process_index() == 0:
        final.rmtree()  # a re-run of a finished stage replaces its export
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("moee_export_final_cleared")
    return save_params(final, params, metadata)


def restore_final(final, device: jax.Device | None = None) -> dict:
    """A final export's params on one device (default: the first local one), whatever mesh wrote it."""
    final = run_path(final)
    sharding = jax.sharding.SingleDeviceSharding(device or jax.local_devices()[0])
    try:
        with ocp.StandardCheckpointer() as ckptr:
            stored = ckptr.metadata(final / "params").item_metadata.tree
        abstract = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), stored)
        return restore_params(final, abstract)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise RunError(f"--checkpoint: cannot read the parameters in {final} ({type(e).__name__}: {e})") from None


@dataclasses.dataclass(frozen=True)
class RunCheckpoint:
    """Where a trained model lives: ``final`` (params + metadata.json) and its resolved ``config.json``."""

    final: pathlib.Path
    config: pathlib.Path
    stage: str
    step: int
    metadata: dict


_STAGE_NOTES = {
    "vae": "it holds only the autoencoder",
    "embedder": "it holds only the emotion embedder",
    "stage1": "ReferenceNet and the U-Net are trained but no emotion modules are (the Emotion MoE and "
    "Emotion-to-Latents are trained in stage 2)",
}


def resolve_checkpoint(path: str | pathlib.Path) -> RunCheckpoint:
    """Find the stage-2 export under ``path``: a run directory (``RUN/stage2/final``), a stage
    directory (``RUN/stage2``) or the ``final`` directory itself. Raises :class:`RunError` for a
    missing directory, an unfinished stage 2, or a run of another stage ("wrong stage")."""
    path = pathlib.Path(path)
    if not path.exists():
        raise RunError(f"--checkpoint {path}: directory not found; pass the run directory of `moee train` (RUN)")
    if not path.is_dir():
        raise RunError(f"--checkpoint {path}: not a directory; pass the run directory of `moee train` (RUN)")
    if (path / "metadata.json").exists():
        final = path
    elif (path / "final").is_dir() or (path / "config.json").exists():
        final = path / "final"
    elif (path / REQUIRED_STAGE).is_dir():
        final = path / REQUIRED_STAGE / "final"
    else:
        present = [s for s in ("stage1", "embedder", "vae") if (path / s / "final" / "metadata.json").exists()]
        if present:
            _wrong_stage(path, present[0])
        raise RunError(
            f"--checkpoint {path}: no trained model here (expected {path}/{REQUIRED_STAGE}/final from "
            f"`moee train --config configs/stage2.py:<variant> --run_dir {path}`)"
        )
    if not (final / "metadata.json").exists() or not (final / "params").is_dir():
        raise RunError(
            f"--checkpoint {path}: {final} holds no finished export (metadata.json and params/); stage 2 has "
            f"not finished training — resume it with `moee train --config configs/stage2.py:<variant> --run_dir {_run_of(final)}`"
        )
    try:
        metadata = json.loads((final / "metadata.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RunError(f"--checkpoint {path}: {final / 'metadata.json'} is unreadable ({e})") from None
    stage = str(metadata.get("stage", ""))
    if stage != REQUIRED_STAGE:
        _wrong_stage(path, stage)
    config = final.parent / "config.json"
    if not config.exists():
        raise RunError(
            f"--checkpoint {path}: {config} is missing; `moee train` writes the resolved config there, "
            "and the model cannot be rebuilt without it"
        )
    return RunCheckpoint(final, config, stage, int(metadata.get("step", 0)), metadata)


def _run_of(final: pathlib.Path) -> pathlib.Path:
    return final.parent.parent


def _wrong_stage(path: pathlib.Path, stage: str):
    note = _STAGE_NOTES.get(stage, "it is not a stage-2 model")
    raise RunError(
        f"--checkpoint {path}: wrong stage: this is a {stage or 'unknown'} checkpoint — {note}. Animation needs "
        f"the stage-2 model: run `moee train --config configs/stage2.py:<variant> --run_dir <RUN>` (it starts "
        "from the run's stage-1 parameters) and pass that run directory."
    )


def load_run_config(checkpoint: RunCheckpoint):
    """The run's resolved config (``config.json``) as a ``ConfigDict`` with JSON lists as tuples."""
    from ml_collections import ConfigDict

    try:
        data = json.loads(checkpoint.config.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RunError(f"--checkpoint: {checkpoint.config} is unreadable ({e})") from None
    return ConfigDict(_tuples(data))


def _tuples(value):
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def struct_like(leaf, sharding):
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)


def restore_parts(
    path, current: dict[str, dict], shardings: dict[str, dict], trainable_here: Callable[[str], bool]
) -> dict[str, tuple[dict, list[str]]]:
    """The parts named in ``current`` from the params checkpoint at ``path``, leaf by leaf onto
    ``current``'s shardings, in one read.

    A leaf the checkpoint lacks, or holds with another shape, keeps its fresh initialisation when this
    stage trains it (a stage-2 ablation whose emotion module differs from stage 1's); for a leaf this
    stage would freeze that is an error naming the leaves. Returns ``{part: (params, fresh leaf paths)}``.
    """
    from flax import traverse_util

    cur = {part: traverse_util.flatten_dict(tree) for part, tree in current.items()}
    shard = {part: traverse_util.flatten_dict(tree) for part, tree in shardings.items()}
    _intact(path)
    with ocp.StandardCheckpointer() as ckptr:
        stored = ckptr.metadata(path / "params").item_metadata.tree
        absent = sorted(set(current) - set(stored))
        if absent:
            raise RunError(f"{path}: no {absent} params in this checkpoint (it holds {sorted(stored)})")
        any_sharding = jax.tree_util.tree_leaves(shardings)[0]
        replicated = jax.sharding.NamedSharding(any_sharding.mesh, jax.sharding.PartitionSpec())

        def target_of(p, m):
            part, key = p[0], p[1:]
            if part in cur and key in cur[part] and tuple(cur[part][key].shape) == tuple(m.shape):
                return jax.ShapeDtypeStruct(m.shape, cur[part][key].dtype, sharding=shard[part][key])
            return jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=replicated)

        flat_stored = traverse_util.flatten_dict(stored)
        target = traverse_util.unflatten_dict({p: target_of(p, m) for p, m in flat_stored.items()})
        restored_all = ckptr.restore(path / "params", target)
    out, missing = {}, []
    for part, leaves in cur.items():
        restored = traverse_util.flatten_dict(restored_all[part])
        values, fresh = {}, []
        for key, leaf in leaves.items():
            name = "/".join((part, *key))
            if key in restored and tuple(restored[key].shape) == tuple(leaf.shape):
                values[key] = restored[key]
            elif trainable_here(name):
                values[key] = leaf
                fresh.append(name)
            else:
                have = f"shape {tuple(restored[key].shape)}" if key in restored else "absent"
                missing.append(f"{name} (model {tuple(leaf.shape)}, checkpoint {have})")
        if fresh:
            log.info("%s: %d tensors of %r not in the checkpoint, trained from their initialisation: %s", path, len(fresh), part,
                     ", ".join(fresh[:5]) + (" …" if len(fresh) > 5 else ""))  # fmt: skip
        out[part] = (traverse_util.unflatten_dict(values), fresh)
    if missing:
        raise RunError(f"{path}: frozen parameters this checkpoint cannot fill: " + "; ".join(missing[:10])
                            + (f" … and {len(missing) - 10} more" if len(missing) > 10 else ""))  # fmt: skip
    return out


def _intact(path) -> None:
    try:
        integrity.ensure_intact(path)
    except integrity.DamagedCheckpoint as e:
        raise RunError(str(e)) from None


def restore_subtree(path, abstract: dict) -> dict:
    """Restore the parts in ``abstract`` (ShapeDtypeStructs with shardings) from a params checkpoint.

    Parts the checkpoint holds but ``abstract`` does not name are read replicated and dropped, so
    this works on any number of hosts without knowing how the checkpoint was sharded.
    """
    _intact(path)
    with ocp.StandardCheckpointer() as ckptr:
        stored = ckptr.metadata(path / "params").item_metadata.tree
        missing = sorted(set(abstract) - set(stored))
        if missing:
            raise RunError(f"{path}: no {missing} params in this checkpoint (it holds {sorted(stored)})")
        any_sharding = jax.tree_util.tree_leaves(abstract)[0].sharding
        replicated = jax.sharding.NamedSharding(any_sharding.mesh, jax.sharding.PartitionSpec())
        target = {
            part: abstract[part] if part in abstract else jax.tree_util.tree_map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=replicated), sub)
            for part, sub in stored.items()
        }  # fmt: skip
        restored = ckptr.restore(path / "params", target)
    return {part: restored[part] for part in abstract}


def fill_from_earlier_stages(
    params: dict,
    shardings: dict,
    sources: list,
    trainable_here: Callable[[str], bool],
    *,
    required: bool = False,
    skip: tuple[str, ...] = (),
) -> tuple[dict, dict[str, str]]:
    """Fill the parts of ``params`` that earlier stages' final exports hold (``sources``, earliest
    wins per part, one read per export), leaf by leaf onto ``shardings``.

    A leaf an export lacks keeps its fresh value if this stage trains it (:func:`restore_parts`);
    ``skip``: path patterns that keep their fresh values whatever the exports hold. The embedder
    stage's module is the conditioning's embedder in stage 2. ``required``: a source without an
    export is an error (sources the user named), else it is passed over. → ``(params, {part: source})``.
    """
    import re

    from flax import traverse_util

    fresh = params
    params = dict(params)
    filled: dict[str, str] = {}
    for src in sources:
        path = run_path(src)
        if not (path / "params").exists():
            if required:
                raise RunError(f"config.train.init_from: {src} holds no final params (params/ missing)")
            continue
        stored_parts = json.loads((path / "metadata.json").read_text()).get("parts", [])
        wanted = [part for part in stored_parts if part in params and part not in filled]
        if wanted:  # one read of the checkpoint for every part it fills
            restored = restore_parts(path, {k: params[k] for k in wanted}, {k: shardings[k] for k in wanted}, trainable_here)
            for part, (values, new) in restored.items():
                params[part] = values
                filled[part] = str(path) + (f" ({len(new)} new trainable tensors initialised)" if new else "")
        if "embedder" in stored_parts and "embedder" in params.get("conditioning", {}) and "conditioning/embedder" not in filled:
            sub = params["conditioning"]["embedder"]
            abstract = {"embedder": jax.tree_util.tree_map(struct_like, sub, shardings["conditioning"]["embedder"])}
            params["conditioning"] = dict(params["conditioning"], embedder=restore_subtree(path, abstract)["embedder"])
            filled["conditioning/embedder"] = str(path)
    if skip and filled:
        flat, fresh_flat = traverse_util.flatten_dict(params), traverse_util.flatten_dict(fresh)
        kept = [p for p in flat if any(re.search(pattern, "/".join(p)) for pattern in skip)]
        for p in kept:
            flat[p] = fresh_flat[p]
        params = traverse_util.unflatten_dict(flat)
        log.info("train.init_skip: %d tensors keep their fresh initialisation (%s)", len(kept), ", ".join(skip))
    if filled:
        log.info("initialised from earlier stages: %s", ", ".join(f"{k} ← {v}" for k, v in filled.items()))
    return params, filled


def stage_manager(run: RunDir, stage: str, *, every_steps: int, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
    """The Orbax manager of a stage's training checkpoints (train state, data-iterator state, config)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every_steps, enable_async_checkpointing=async_save)
    return ocp.CheckpointManager(run.checkpoints(stage), item_names=("state", "data", "config"), options=options)


def save_state(manager: ocp.CheckpointManager, step: int, state, iterator, config_json: dict, *, force: bool = False) -> bool:
    """One training checkpoint (saved when the manager's interval says so, or ``force``)."""
    import grain

    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(iterator),
                              config=ocp.args.JsonSave(config_json))  # fmt: skip
    return manager.save(step, args=args, force=force)


def restore_state(manager: ocp.CheckpointManager, step: int, abstract_state, iterator):
    """The train state at ``step`` onto ``abstract_state``'s shardings; the iterator resumes in place."""
    import grain

    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=grain.checkpoint.CheckpointRestore(iterator))
    return manager.restore(step, args=args).state


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) is a write that found no space left on the device.
    Orbax reports TensorStore's ENOSPC as ``ValueError: RESOURCE_EXHAUSTED … No space left``."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if (isinstance(error, OSError) and error.errno == errno.ENOSPC) or "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def disk_full_message(run: RunDir, stage: str) -> str:
    """What to do when a checkpoint write filled the disk; names the newest complete checkpoint."""
    folder = run.checkpoints(stage)
    steps = sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []
    kept = f"the newest complete checkpoint (step {steps[-1]}) is intact" if steps else "no checkpoint was completed"
    return (f"{stage}: no space left on the disk of {folder}: a checkpoint could not be written, so training stopped; "
            f"{kept}. Free space (or give --run_dir on a larger disk) and run the same command to resume.")  # fmt: skip


DAMAGED_PREFIX = "damaged."


def restore_newest(manager: ocp.CheckpointManager, abstract_state, iterator) -> tuple[object, int, list[str]]:
    """The newest *readable* training checkpoint: ``(state, step, set_aside)``.

    A checkpoint that fails to restore is read once more without the model's structure
    (:func:`~moee_jax.checkpoint.integrity.read_test`). If that read fails too, its bytes are
    damaged (a truncated or corrupted file, an interrupted copy): it is logged, renamed to
    ``damaged.<step>`` beside the others (kept for inspection, out of Orbax's way) and the one
    before it is tried. If it reads, the checkpoint is sound but does not fit this config: that is
    a :class:`RunError`, and nothing is renamed. All damaged: :class:`RunError` (a re-run then starts
    the stage from its beginning).
    """
    set_aside: list[str] = []
    for step in sorted(manager.all_steps(), reverse=True):
        step_dir = run_path(manager.directory) / str(step)
        try:
            return restore_state(manager, step, abstract_state, iterator), step, set_aside
        except Exception as e:  # noqa: BLE001 - Orbax/TensorStore raise many types; classified just below
            reason = integrity.read_test(step_dir)
            if reason is None:
                raise RunError(
                    f"{step_dir}: the checkpoint reads but does not fit this config ({integrity.describe_error(e)}); resume with "
                    "the config the stage was started with (RUN/<stage>/config.json), or train into a new --run_dir"
                ) from None
        log.error("checkpoint %s is damaged (%s); set aside as %s%d, trying the one before", step_dir, reason, DAMAGED_PREFIX, step)
        set_aside.append(f"{step_dir} ({reason})")
        if jax.process_index() == 0:
            step_dir.rename(step_dir.parent / f"{DAMAGED_PREFIX}{step}")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"moee_set_aside_{step}")
        manager.reload()
    raise RunError(
        f"{run_path(manager.directory)}: every training checkpoint is damaged ({'; '.join(set_aside)}); they are kept as "
        f"{DAMAGED_PREFIX}<step>. Run the same command again to train the stage from its beginning."
    )
