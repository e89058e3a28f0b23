"""Reading PyTorch-world weight files and mapping their keys onto our Flax parameter trees.

Our module names mirror diffusers' so that a key converts by rule, not by table
(``down_blocks.0.resnets.1.conv1.weight`` → ``down_blocks_0/resnets_1/conv1/kernel``):

* a numeric key part joins the previous one with ``_`` (``resnets.1`` → ``resnets_1``);
* ``weight`` becomes ``kernel`` (dense / conv) or ``scale`` (norms), whichever the target has;
* conv kernels go OIHW → HWIO (1-D: OIK → KIO), dense kernels are transposed.

Every converter checks the whole tree: missing, unexpected and shape-mismatched keys are all
reported in one :class:`ConversionError`.
"""

from __future__ import annotations

import json
import pathlib
import re
from collections.abc import Callable, Iterable, Mapping

import numpy as np
from flax import traverse_util

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
StateDict = dict[str, np.ndarray]
Path = tuple[str, ...]


class ConversionError(ValueError):
    """A weight file does not fit the target model; the message lists every offending key."""


def load_state_dict(path: str | pathlib.Path, *, allow_pickle: bool = False) -> StateDict:
    """Load a ``.safetensors`` file (or a sharded ``*.safetensors.index.json``) as numpy arrays.

    Pickle formats (``.bin``, ``.ckpt``, ``.pt``, ``.pth``) can run arbitrary code when loaded,
    so they are refused unless ``allow_pickle`` is set; even then they are read with
    ``torch.load(weights_only=True)``.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weight file not found: {path}")
    if path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise ConversionError(
                f"{path}: refusing to load a pickle-based '{path.suffix}' file, because unpickling can execute "
                "arbitrary code. Convert it to .safetensors, or pass --allow_pickle if you trust its source."
            )
        return _load_pickle(path)
    if path.name.endswith(".safetensors.index.json"):
        index = json.loads(path.read_text())
        shards = sorted(set(index["weight_map"].values()))
        out: StateDict = {}
        for shard in shards:
            out.update(load_state_dict(path.parent / shard))
        return out
    if path.suffix != ".safetensors":
        raise ConversionError(f"{path}: unsupported weight file type '{path.suffix}'; expected .safetensors")
    from safetensors import safe_open

    try:
        # The "flax" reader understands bfloat16 (numpy does not); every tensor leaves as numpy,
        # bf16 ones upcast to float32.
        with safe_open(str(path), framework="flax") as f:
            return {k: _to_numpy(f.get_tensor(k)) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise ConversionError(f"{path}: not a readable safetensors file ({e})") from e


def _to_numpy(t) -> np.ndarray:
    return np.asarray(t.astype("float32")) if t.dtype.name == "bfloat16" else np.asarray(t)


def _load_pickle(path: pathlib.Path) -> StateDict:
    try:
        import torch
    except ImportError as e:
        raise ConversionError(f"{path}: loading pickle checkpoints needs PyTorch (pip install torch)") from e
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in obj.items()}


def find_weight_file(folder_or_file: str | pathlib.Path, stem: str = "diffusion_pytorch_model") -> pathlib.Path:
    """Resolve a diffusers component folder (``unet/``, ``vae/``) or a file to its weight file.

    Prefers ``<stem>.safetensors``, then a sharded index, then a pickle file (which
    :func:`load_state_dict` refuses without ``allow_pickle``).
    """
    p = pathlib.Path(folder_or_file)
    if p.is_file():
        return p
    if not p.is_dir():
        raise FileNotFoundError(f"no such file or folder: {p}")
    for name in (f"{stem}.safetensors", f"{stem}.safetensors.index.json", "model.safetensors", f"{stem}.bin"):
        if (p / name).exists():
            return p / name
    found = sorted(x.name for x in p.iterdir())
    raise FileNotFoundError(f"{p}: no {stem}.safetensors (or sharded index) found; folder holds {found}")


def read_hf_config(path: str | pathlib.Path) -> dict:
    """The ``config.json`` of a transformers model folder (or of the folder holding the weight file ``path``)."""
    p = pathlib.Path(path)
    config_file = (p if p.is_dir() else p.parent) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: no config.json; pass the model config explicitly")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{config_file}: not valid JSON ({e})") from e


_NUMERIC = re.compile(r"^\d+$")


def torch_key_to_path(key: str) -> Path:
    """``a.b.0.c.weight`` → ``('a', 'b_0', 'c', 'weight')`` (leaf name resolved later)."""
    out: list[str] = []
    for part in key.split("."):
        if _NUMERIC.match(part) and out:
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(part)
    return tuple(out)


def _to_flax_array(leaf: str, value: np.ndarray, target_leaves: Iterable[str]) -> tuple[str, np.ndarray]:
    target_leaves = set(target_leaves)
    if leaf == "bias":
        return "bias", value
    if leaf != "weight":
        return leaf, value
    if "kernel" in target_leaves:
        if value.ndim == 4:
            return "kernel", value.transpose(2, 3, 1, 0)
        if value.ndim == 3:  # Conv1d (out, in, k) → (k, in, out)
            return "kernel", value.transpose(2, 1, 0)
        if value.ndim == 2:
            return "kernel", value.T
        return "kernel", value
    return "scale", value


def convert_state_dict(
    state_dict: Mapping[str, np.ndarray],
    target: Mapping,
    *,
    source: str,
    rename: Callable[[str], str | None] = lambda k: k,
    derived: Callable[[str, np.ndarray], bool] = lambda k, v: False,
) -> tuple[dict, list[Path]]:
    """Map ``state_dict`` onto the structure of ``target`` (a params tree or its ``eval_shape``).

    ``rename(key)`` rewrites a source key into our naming before the generic rule, or returns
    ``None`` to mark it as not belonging to this target. ``derived(key, value)`` returns True for
    buffers we recompute (e.g. sinusoidal tables) after checking them. Returns the converted
    nested dict (numpy, float32) holding only the keys found in the source, and the list of
    target paths the source did not provide. Unexpected keys or shape mismatches raise
    :class:`ConversionError` naming every offending key.
    """
    flat_target = traverse_util.flatten_dict(dict(target))
    leaves_by_module: dict[Path, set[str]] = {}
    for p in flat_target:
        leaves_by_module.setdefault(p[:-1], set()).add(p[-1])

    converted: dict[Path, np.ndarray] = {}
    unexpected: list[str] = []
    mismatched: list[str] = []
    for key, value in state_dict.items():
        new_key = rename(key)
        if new_key is None:
            continue
        if derived(new_key, value):
            continue
        path = torch_key_to_path(new_key)
        module, leaf = path[:-1], path[-1]
        if module not in leaves_by_module:
            unexpected.append(key)
            continue
        leaf, arr = _to_flax_array(leaf, np.asarray(value), leaves_by_module[module])
        full = module + (leaf,)
        if full not in flat_target:
            unexpected.append(key)
            continue
        want = tuple(flat_target[full].shape)
        if tuple(arr.shape) != want:
            mismatched.append(f"{key}: file has shape {tuple(value.shape)}, model expects {want} (as {'/'.join(full)})")
            continue
        converted[full] = arr.astype(np.float32)
    missing = [p for p in flat_target if p not in converted]
    if unexpected or mismatched:
        lines = [f"{source}: the weights do not fit the model configuration."]
        if mismatched:
            lines.append(f"  {len(mismatched)} shape mismatch(es):")
            lines += [f"    {m}" for m in mismatched]
        if unexpected:
            lines.append(f"  {len(unexpected)} unexpected key(s) (not in the model):")
            lines += [f"    {k}" for k in sorted(unexpected)]
        if missing:
            lines.append(f"  {len(missing)} key(s) of the model absent from the file, e.g.:")
            lines += [f"    {'/'.join(p)}" for p in missing[:20]]
        lines.append("  Check that the config matches the checkpoint (block channels, layers, heads, cross-attention dim).")
        raise ConversionError("\n".join(lines))
    return traverse_util.unflatten_dict(converted), missing


def require_complete(missing: list[Path], *, source: str, optional_modules: Iterable[str] = ()) -> list[Path]:
    """Raise if a path in ``missing`` lies outside ``optional_modules``; return the optional ones.

    Optional modules are those the source format never contains (audio attention, emotion slot,
    face locator, motion modules in an image checkpoint): a path is optional when one of its
    components is such a module name. They keep their fresh initialisation and are reported.
    """
    optional = tuple(optional_modules)

    def is_optional(path: Path) -> bool:
        return any(c == o or c.startswith(o + "_") for c in path for o in optional)

    required = [p for p in missing if not is_optional(p)]
    if required:
        keys = "\n".join(f"    {'/'.join(p)}" for p in required[:40])
        more = f"\n    ... and {len(required) - 40} more" if len(required) > 40 else ""
        raise ConversionError(
            f"{source}: {len(required)} parameter(s) of the model are missing from the file:\n{keys}{more}\n"
            "  Check that the config matches the checkpoint, and that the file is complete."
        )
    return [p for p in missing if is_optional(p)]
