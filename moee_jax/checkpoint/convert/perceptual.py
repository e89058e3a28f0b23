"""LPIPS-VGG weights → params of our :class:`~moee_jax.models.perceptual.LPIPS`.

Two files, as released:

* the VGG16 trunk — torchvision's ``vgg16`` state dict (``features.{i}.weight``/``bias``; its
  ImageNet ``classifier.*`` head is skipped), or the trunk of a saved ``lpips.LPIPS`` model
  (``net.slice{s}.{i}.weight``/``bias``, same ``i``);
* the linear layers — the ``lpips`` package's ``weights/v0.1/vgg.pth`` (``lin{k}.model.1.weight``,
  ``(1, C_k, 1, 1)``, non-negative; ``lin{k}.model.0.weight`` when saved without dropout).

A saved ``lpips.LPIPS`` state dict holds both, the linear layers a second time under
``lins.{k}.…`` (same values), and its ``scaling_layer.shift``/``scale`` buffers, which are checked
against our constants rather than loaded.

Every key, shape and value constraint is checked; all problems are reported in one
:class:`~moee_jax.checkpoint.convert.state_dict.ConversionError`.
"""

from __future__ import annotations

import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moee_jax.checkpoint.convert.state_dict import (
    ConversionError,
    StateDict,
    convert_state_dict,
    load_state_dict,
    require_complete,
)
from moee_jax.models.perceptual import LPIPS, SCALE, SHIFT
from moee_jax.nn.layers import Dtype

_VGG = re.compile(r"^(?:features|net\.slice[1-5])\.(?P<index>\d+)\.(?P<leaf>weight|bias)$")
_LIN = re.compile(r"^(?:lin|lins\.)(?P<level>\d+)\.model\.[01]\.weight$")
_SCALING = {"scaling_layer.shift": SHIFT, "scaling_layer.scale": SCALE}


def _rename(key: str) -> str | None:
    if key.startswith("classifier."):
        return None
    if m := _VGG.match(key):
        return f"net.features.{m['index']}.{m['leaf']}"
    if m := _LIN.match(key):
        return f"lin{m['level']}.weight"
    return key


def abstract_params(lpips: LPIPS) -> dict:
    """The unboxed ``ShapeDtypeStruct`` tree of ``lpips``' params, without allocating them."""
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    return nn.meta.unbox(jax.eval_shape(lpips.init, jax.random.key(0), x, x))["params"]


def _value_problems(state_dict: StateDict) -> list[str]:
    """Constraints on values that shapes cannot catch, and keys that would land on one param twice."""
    problems = []
    by_target: dict[str, str] = {}
    for key, value in state_dict.items():
        if key in _SCALING and (np.size(value) != 3 or not np.allclose(np.ravel(value), _SCALING[key], atol=1e-6)):
            problems.append(f"{key}: {np.ravel(value).tolist()} differs from LPIPS v0.1's {list(_SCALING[key])}")
        if _LIN.match(key) and np.size(value) and np.min(value) < 0:
            problems.append(f"{key}: has negative entries (min {float(np.min(value)):.3g}); LPIPS linear weights are ≥ 0")
        target = _rename(key)
        if target is None or key in _SCALING:
            continue
        if target in by_target and not np.array_equal(value, state_dict[by_target[target]]):
            problems.append(f"{key} and {by_target[target]}: both give {target}, with different values")
        by_target.setdefault(target, key)
    return problems


def convert_lpips(vgg: StateDict, lin: StateDict, lpips: LPIPS, *, source: str) -> dict:
    """Map the VGG16 and LPIPS-linear state dicts (torch layout, numpy values) onto ``lpips``' params.

    ``lin`` may be empty when ``vgg`` holds the linear layers too. Returns a nested dict of float32
    numpy arrays with the structure of ``lpips.init(...)["params"]``:
    ``net/features_{i}/{kernel (3, 3, C_in, C_out), bias}`` and ``lin{k}/kernel (1, 1, C_k, 1)``.
    Raises :class:`ConversionError` listing every missing, unexpected, mis-shaped, duplicated or
    out-of-range key.
    """
    clashes = sorted(k for k in vgg.keys() & lin.keys() if not np.array_equal(vgg[k], lin[k]))
    state_dict = {**vgg, **lin}
    problems = [f"{k}: the two files hold different values" for k in clashes] + _value_problems(state_dict)
    try:
        params, missing = convert_state_dict(
            state_dict, abstract_params(lpips), source=source, rename=_rename, derived=lambda k, v: k in _SCALING
        )
        require_complete(missing, source=source)
    except ConversionError as e:
        if not problems:
            raise
        raise ConversionError("\n".join([str(e), "  and invalid values:", *(f"    {p}" for p in problems)])) from None
    if problems:
        raise ConversionError("\n".join([f"{source}: invalid values:", *(f"    {p}" for p in problems)]))
    return params


def load_lpips(
    vgg_path: str | pathlib.Path,
    lin_path: str | pathlib.Path | None = None,
    *,
    allow_pickle: bool = False,
    dtype: Dtype = jnp.float32,
) -> tuple[LPIPS, dict]:
    """Read LPIPS-VGG from its weight files: ``(module, params)``, applied as ``module.apply({"params": params}, x, y)``.

    ``vgg_path``: torchvision's ``vgg16`` state dict (``vgg16-397923af.pth`` or a ``.safetensors``
    of it). ``lin_path``: the ``lpips`` package's ``vgg.pth``; ``None`` when ``vgg_path`` is a saved
    ``lpips.LPIPS`` state dict holding both. ``.pth`` files are pickles and are refused unless
    ``allow_pickle``. ``dtype`` is VGG's compute dtype.
    """
    source = str(vgg_path) if lin_path is None else f"{vgg_path} + {lin_path}"
    vgg = load_state_dict(vgg_path, allow_pickle=allow_pickle)
    lin = {} if lin_path is None else load_state_dict(lin_path, allow_pickle=allow_pickle)
    lpips = LPIPS(dtype=dtype)
    return lpips, convert_lpips(vgg, lin, lpips, source=source)
