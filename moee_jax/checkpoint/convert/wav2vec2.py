"""transformers wav2vec 2.0 checkpoints (Baevski et al. 2020) → params of our Flax ports.

* :func:`convert_wav2vec2` — a bare ``Wav2Vec2Model`` (keys without prefix) or a model with a head
  (``Wav2Vec2ForCTC``, ``Wav2Vec2ForPreTraining``, ``Wav2Vec2ForSequenceClassification``: keys
  under ``wav2vec2.``) → :class:`~moee_jax.models.encoders.wav2vec2.Wav2Vec2Model` params. Head
  keys (``lm_head``, ``quantizer``, ``project_hid``, ``project_q``, ``projector``, ``classifier``,
  ``layer_weights``) and the SpecAugment vector ``masked_spec_embed`` are skipped and logged.
* :func:`convert_speech_emotion` — a ``Wav2Vec2ForSequenceClassification`` →
  :class:`~moee_jax.models.encoders.speech_emotion.SpeechEmotionEncoder` params.

Keys convert by the generic rule of :mod:`moee_jax.checkpoint.convert.state_dict`. One pre-pass:
the positional conv is weight-normalised in PyTorch (``weight_norm(conv, dim=2)``), stored as
``…conv.parametrizations.weight.original0`` / ``original1`` (g / v; older transformers:
``…conv.weight_g`` / ``weight_v``); both are folded into the effective kernel
``w = g · v / ‖v‖`` (norm over every axis but the kernel-tap axis 2), which is what our plain conv
holds. Fine-tuning then trains that kernel, not the (g, v) pair.
"""

from __future__ import annotations

import logging
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
    find_weight_file,
    load_state_dict,
    read_hf_config,
    require_complete,
)
from moee_jax.models.encoders.speech_emotion import SpeechEmotionConfig, SpeechEmotionEncoder
from moee_jax.models.encoders.wav2vec2 import Wav2Vec2Config, Wav2Vec2Model, min_num_samples

log = logging.getLogger(__name__)

PREFIX = "wav2vec2."
# Top-level modules of transformers' wav2vec2 heads that a bare backbone has no use for.
_HEAD_MODULES = ("lm_head", "quantizer", "project_hid", "project_q", "projector", "classifier", "layer_weights")
_SPEC_AUGMENT = "masked_spec_embed"
_WEIGHT_NORM = re.compile(r"^(?P<prefix>.*\.)(?:parametrizations\.weight\.original(?P<new>[01])|weight_(?P<old>[gv]))$")
# ``weight_norm(..., dim=2)``: g keeps the kernel-tap axis, the norm runs over (out, in / groups).
_WEIGHT_NORM_DIM = 2


def fold_weight_norm(state_dict: StateDict, *, source: str) -> StateDict:
    """Replace every weight-norm (g, v) pair by the effective ``<prefix>weight = g · v / ‖v‖``."""
    out: StateDict = {}
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, value in state_dict.items():
        m = _WEIGHT_NORM.match(key)
        if m is None:
            out[key] = value
            continue
        part = m["old"] or ("g" if m["new"] == "0" else "v")
        pairs.setdefault(m["prefix"], {})[part] = np.asarray(value)
    for prefix, parts in pairs.items():
        if set(parts) != {"g", "v"}:
            absent = "v (original1 / weight_v)" if "g" in parts else "g (original0 / weight_g)"
            raise ConversionError(f"{source}: weight-normalised {prefix}weight lacks its {absent} tensor")
        g, v = parts["g"].astype(np.float64), parts["v"].astype(np.float64)
        axes = tuple(i for i in range(v.ndim) if i != _WEIGHT_NORM_DIM)
        expected = tuple(n if i == _WEIGHT_NORM_DIM else 1 for i, n in enumerate(v.shape))
        if g.shape != expected:
            raise ConversionError(
                f"{source}: weight-norm magnitude of {prefix}weight has shape {g.shape}, expected {expected} for v {v.shape}"
            )
        out[f"{prefix}weight"] = (g * v / np.sqrt(np.sum(v * v, axis=axes, keepdims=True))).astype(np.float32)
    return out


def abstract_params(module: nn.Module, config: Wav2Vec2Config) -> dict:
    """The unboxed ``ShapeDtypeStruct`` tree of ``module``'s params, without allocating them."""
    waveform = jax.ShapeDtypeStruct((1, min_num_samples(config)), jnp.float32)
    return nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), waveform))["params"]


def _load(path: str | pathlib.Path, allow_pickle: bool) -> tuple[StateDict, str]:
    weight_file = find_weight_file(path, stem="model")
    source = str(weight_file)
    return fold_weight_norm(load_state_dict(weight_file, allow_pickle=allow_pickle), source=source), source


def _log_skipped(source: str, skipped: list[str]) -> None:
    if skipped:
        log.info("%s: skipped %d key(s) the target model has no use for: %s", source, len(skipped), ", ".join(sorted(skipped)))


def _resolve_backbone(path, module_or_config) -> Wav2Vec2Model:
    if isinstance(module_or_config, Wav2Vec2Model):
        return module_or_config
    if isinstance(module_or_config, Wav2Vec2Config):
        return Wav2Vec2Model(module_or_config)
    return Wav2Vec2Model(Wav2Vec2Config.from_hf(read_hf_config(path) if module_or_config is None else module_or_config))


def convert_wav2vec2(
    path: str | pathlib.Path,
    module_or_config: Wav2Vec2Model | Wav2Vec2Config | dict | None = None,
    *,
    allow_pickle: bool = False,
) -> dict:
    """Read a transformers wav2vec2 folder (``model.safetensors``) or weight file into ``Wav2Vec2Model`` params.

    ``module_or_config``: our module, our config, a transformers config (object or dict), or None to
    read ``config.json`` beside the weights. Returns a nested dict of float32 numpy arrays with the
    structure of ``Wav2Vec2Model.init(...)["params"]``. Head keys are skipped and logged at INFO.
    Raises :class:`ConversionError` naming every missing, unexpected or mis-shaped key, and for
    pickle files unless ``allow_pickle``.
    """
    model = _resolve_backbone(path, module_or_config)
    state_dict, source = _load(path, allow_pickle)
    prefixed = any(k.startswith(PREFIX) for k in state_dict)
    skipped: list[str] = []

    def rename(key: str) -> str | None:
        inner = key.removeprefix(PREFIX) if prefixed else key
        if inner == _SPEC_AUGMENT or (prefixed and inner == key and key.split(".")[0] in _HEAD_MODULES):
            skipped.append(key)
            return None
        return inner

    params, missing = convert_state_dict(state_dict, abstract_params(model, model.config), source=source, rename=rename)
    require_complete(missing, source=source)
    _log_skipped(source, skipped)
    return params


def convert_speech_emotion(
    path: str | pathlib.Path,
    module_or_config: SpeechEmotionEncoder | SpeechEmotionConfig | dict | None = None,
    *,
    allow_pickle: bool = False,
) -> dict:
    """Read a ``Wav2Vec2ForSequenceClassification`` folder or weight file into ``SpeechEmotionEncoder`` params.

    ``module_or_config`` as in :func:`convert_wav2vec2` (None reads ``config.json``). Keys
    ``wav2vec2.*`` fill the backbone, ``projector.*``, ``classifier.*`` and ``layer_weights`` (with
    ``use_weighted_layer_sum``) the head; ``wav2vec2.masked_spec_embed`` is skipped.
    """
    if isinstance(module_or_config, SpeechEmotionEncoder):
        model = module_or_config
    elif isinstance(module_or_config, SpeechEmotionConfig):
        model = SpeechEmotionEncoder(module_or_config)
    else:
        hf = read_hf_config(path) if module_or_config is None else module_or_config
        model = SpeechEmotionEncoder(SpeechEmotionConfig.from_hf(hf))
    state_dict, source = _load(path, allow_pickle)
    skipped: list[str] = []

    def rename(key: str) -> str | None:
        if key == PREFIX + _SPEC_AUGMENT:
            skipped.append(key)
            return None
        return key

    target = abstract_params(model, model.config.backbone)
    params, missing = convert_state_dict(state_dict, target, source=source, rename=rename)
    require_complete(missing, source=source)
    _log_skipped(source, skipped)
    return params
