"""diffusers ``UNet2DConditionModel`` / ``UNetMotionModel`` and AnimateDiff motion weights → our U-Net.

Our module tree uses diffusers' names, so U-Net keys convert by the generic rule of
:mod:`~moee_jax.checkpoint.convert.state_dict`. Motion modules come either inside a full
``UNetMotionModel`` checkpoint or as a separate ``MotionAdapter`` file (diffusers layout, or the
original AnimateDiff layout with ``temporal_transformer`` / ``attention_blocks`` names).
Parts no such checkpoint has — audio attention, the emotion slot, and motion modules when no
motion weights are given — keep their initialisation and are reported.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
from collections.abc import Callable

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from moee_jax.checkpoint.convert.state_dict import (
    ConversionError,
    convert_state_dict,
    find_weight_file,
    load_state_dict,
    require_complete,
)
from moee_jax.models.init import abstract_unet_variables
from moee_jax.models.unet import VideoUNet
from moee_jax.nn.embeddings import sinusoidal_positions

# Modules that no diffusers / AnimateDiff checkpoint contains.
NEW_MODULES = ("audio_attn", "norm_audio", "emotion")

_ORIGINAL_ANIMATEDIFF = (
    (re.compile(r"\.temporal_transformer\."), "."),
    (re.compile(r"\.attention_blocks\.0\."), ".attn1."),
    (re.compile(r"\.attention_blocks\.1\."), ".attn2."),
    (re.compile(r"\.norms\.0\."), ".norm1."),
    (re.compile(r"\.norms\.1\."), ".norm2."),
    (re.compile(r"\.ff_norm\."), ".norm3."),
    (re.compile(r"\.pos_encoder\.pe$"), ".pos_embed.pe"),
)


def animatediff_key(key: str) -> str:
    """Original AnimateDiff motion-module key → diffusers ``MotionAdapter`` key (idempotent)."""
    for pattern, repl in _ORIGINAL_ANIMATEDIFF:
        key = pattern.sub(repl, key)
    return key


def _is_position_table(key: str, value: np.ndarray) -> bool:
    """Sinusoidal ``pos_embed.pe`` buffers are recomputed, after checking the file's copy agrees."""
    if not key.endswith("pos_embed.pe"):
        return False
    table = np.asarray(value, np.float32).reshape(value.shape[-2], value.shape[-1])
    ours = sinusoidal_positions(*table.shape)
    if not np.allclose(table, ours, atol=1e-5):
        raise ConversionError(f"{key}: positional table differs from the sinusoidal one this model computes")
    return True


@dataclasses.dataclass
class UNetConversion:
    """Converted params plus what was not in the source files (kept at initialisation)."""

    params: dict
    initialised: list[str]


def convert_unet(
    unet_path: str | pathlib.Path,
    unet: VideoUNet,
    *,
    motion_adapter: str | pathlib.Path | None = None,
    init_params: dict | Callable[[], dict] | None = None,
    allow_pickle: bool = False,
) -> UNetConversion:
    """Convert a diffusers U-Net folder / file (and optionally motion-adapter weights) for ``unet``.

    ``init_params`` (unboxed params, or a function returning them, called only when needed)
    supplies values for modules absent from the sources; when omitted, absent modules must be none.
    """
    target = nn.unbox(abstract_unet_variables(unet))["params"]
    unet_file = find_weight_file(unet_path)
    sources = [(str(unet_file), load_state_dict(unet_file, allow_pickle=allow_pickle))]
    if motion_adapter is not None:
        motion_file = find_weight_file(motion_adapter)
        sources.append((str(motion_file), load_state_dict(motion_file, allow_pickle=allow_pickle)))

    flat_target = traverse_util.flatten_dict(target)
    converted: dict = {}
    for source, state in sources:
        params, _ = convert_state_dict(state, target, source=source, rename=animatediff_key, derived=_is_position_table)
        for path, value in traverse_util.flatten_dict(params).items():
            if path in converted:
                raise ConversionError(f"{source}: parameter {'/'.join(path)} is also given by an earlier file")
            converted[path] = value
    missing = [p for p in flat_target if p not in converted]
    has_motion = any(any(c.startswith("motion_modules") for c in p) for p in converted)
    optional = NEW_MODULES + (() if has_motion else ("motion_modules",))
    source_names = " + ".join(s for s, _ in sources)
    initialised = require_complete(missing, source=source_names, optional_modules=optional)
    if initialised:
        if init_params is None:
            raise ConversionError(f"{source_names}: {len(initialised)} parameters are not in the source and no initial values were given")
        flat_init = traverse_util.flatten_dict(init_params() if callable(init_params) else init_params)
        for p in initialised:
            converted[p] = np.asarray(flat_init[p])
    return UNetConversion(
        params=jax.tree_util.tree_map(np.asarray, traverse_util.unflatten_dict(converted)),
        initialised=sorted({_module_of(p) for p in initialised}),
    )


def _module_of(path: tuple[str, ...]) -> str:
    """The top-most new module on ``path``, for reporting (``.../attentions_0/.../audio_attn``)."""
    for i, c in enumerate(path):
        if c in NEW_MODULES or c.startswith("motion_modules"):
            return "/".join(path[: i + 1])
    return "/".join(path[:-1])
