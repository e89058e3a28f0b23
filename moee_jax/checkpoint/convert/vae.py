"""diffusers ``AutoencoderKL`` weights (``vae/diffusion_pytorch_model.safetensors``) → our params.

Keys convert by the generic rule of :mod:`moee_jax.checkpoint.convert.state_dict`; two legacy
layouts that real SD VAE checkpoints still ship are normalised first:

* the mid-block attention's deprecated names ``query``, ``key``, ``value``, ``proj_attn``
  (diffusers' old ``AttentionBlock``) → ``to_q``, ``to_k``, ``to_v``, ``to_out.0``;
* those projections stored as 1×1 conv weights ``(out, in, 1, 1)`` → dense ``(out, in)``.
"""

from __future__ import annotations

import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moee_jax.checkpoint.convert.state_dict import (
    StateDict,
    convert_state_dict,
    find_weight_file,
    load_state_dict,
    require_complete,
)
from moee_jax.models.vae import AutoencoderKL

_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_ATTENTION_PARAM = re.compile(
    r"^(?P<prefix>.*\.attentions\.\d+\.)"
    r"(?P<proj>query|key|value|proj_attn|to_q|to_k|to_v|to_out\.0)\."
    r"(?P<leaf>weight|bias)$"
)


def _rename(key: str) -> str:
    m = _ATTENTION_PARAM.match(key)
    if m is None:
        return key
    proj = _LEGACY_ATTENTION.get(m["proj"], m["proj"])
    return f"{m['prefix']}{proj}.{m['leaf']}"


def _squeeze_attention_convs(state_dict: StateDict) -> StateDict:
    """Attention projections saved as 1×1 convs ``(out, in, 1, 1)`` become dense ``(out, in)``."""
    out = dict(state_dict)
    for key, value in state_dict.items():
        if _ATTENTION_PARAM.match(key) and value.ndim == 4 and value.shape[2:] == (1, 1):
            out[key] = value[:, :, 0, 0]
    return out


def abstract_params(vae: AutoencoderKL) -> dict:
    """The unboxed ``ShapeDtypeStruct`` tree of ``vae``'s params, without allocating them."""
    side = vae.downsample_factor
    x = jax.ShapeDtypeStruct((1, side, side, vae.in_channels), jnp.float32)
    variables = jax.eval_shape(vae.init, jax.random.key(0), x)
    return nn.meta.unbox(variables)["params"]


def convert_vae(path: str | pathlib.Path, vae: AutoencoderKL, *, allow_pickle: bool = False) -> dict:
    """Read a diffusers ``vae/`` folder (or its weight file) into params for ``vae``.

    Returns a nested dict of float32 numpy arrays with the structure of ``vae.init(...)["params"]``;
    ``latent_norm`` (not in diffusers' files) is SD's: shift 0, scale ``vae.scaling_factor``. Raises :class:`ConversionError` naming every missing, unexpected or mis-shaped key, and for
    pickle files unless ``allow_pickle``.
    """
    weight_file = find_weight_file(path)
    state_dict = _squeeze_attention_convs(load_state_dict(weight_file, allow_pickle=allow_pickle))
    abstract = abstract_params(vae)
    norm = abstract.pop("latent_norm")
    params, missing = convert_state_dict(state_dict, abstract, source=str(weight_file), rename=_rename)
    require_complete(missing, source=str(weight_file))
    params["latent_norm"] = {
        "shift": np.zeros(norm["shift"].shape, np.float32),
        "scale": np.full(norm["scale"].shape, vae.scaling_factor, np.float32),
    }
    return params
