"""transformers Whisper checkpoints (Radford et al. 2022) → params of our Flax ``WhisperEncoder``.

Accepted layouts (a folder with ``model.safetensors`` and ``config.json``, or the weight file):

* ``WhisperForConditionalGeneration`` — encoder keys under ``model.encoder.``;
* ``WhisperModel`` / ``WhisperForAudioClassification`` — under ``encoder.``;
* a bare ``WhisperEncoder`` — no prefix.

Only encoder keys are converted; the decoder and the heads (``proj_out``, ``projector``,
``classifier``, ``layer_weights``) are skipped and counted. Keys convert by the generic rule of
:mod:`moee_jax.checkpoint.convert.state_dict` (conv kernels ``(out, in, k)`` → ``(k, in, out)``);
``embed_positions.weight`` becomes our ``embed_positions/embedding`` param as stored (released
checkpoints hold Whisper's sinusoids there, but the file's table is what the model was trained with).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp

from moee_jax.checkpoint.convert.state_dict import (
    convert_state_dict,
    find_weight_file,
    load_state_dict,
    read_hf_config,
    require_complete,
)
from moee_jax.models.encoders.whisper import WhisperEncoder, WhisperEncoderConfig

log = logging.getLogger(__name__)

# Checked in order: the first prefix any key starts with is the encoder's.
ENCODER_PREFIXES = ("model.encoder.", "encoder.")
# Top-level modules of Whisper models that are not the encoder (under ``model.`` for the decoder
# of ``WhisperForConditionalGeneration``).
_NON_ENCODER = ("decoder", "proj_out", "projector", "classifier", "layer_weights")


@dataclasses.dataclass
class WhisperConversion:
    """Converted encoder params, the config they fit, and the skipped non-encoder keys.

    ``ignored`` counts skipped keys per top-level module (``{"model.decoder": 59, "proj_out": 1}``).
    """

    params: dict
    config: WhisperEncoderConfig
    ignored: dict[str, int]


def abstract_params(encoder: WhisperEncoder) -> dict:
    """The unboxed ``ShapeDtypeStruct`` tree of ``encoder``'s params, without allocating them."""
    cfg = encoder.config
    features = jax.ShapeDtypeStruct((1, cfg.num_frames, cfg.num_mel_bins), jnp.float32)
    return nn.meta.unbox(jax.eval_shape(encoder.init, jax.random.key(0), features))["params"]


def _resolve_config(path, config) -> WhisperEncoderConfig:
    if isinstance(config, WhisperEncoderConfig):
        return config
    return WhisperEncoderConfig.from_hf(read_hf_config(path) if config is None else config)


def _module_group(key: str) -> str:
    parts = key.split(".")
    return ".".join(parts[:2]) if parts[0] == "model" else parts[0]


def convert_whisper_encoder(
    path: str | pathlib.Path,
    config: WhisperEncoderConfig | dict | None = None,
    *,
    allow_pickle: bool = False,
) -> WhisperConversion:
    """Read a transformers Whisper folder or weight file into :class:`WhisperEncoder` params.

    ``config``: our config, a transformers config (object or ``config.json`` dict), or None to read
    ``config.json`` beside the weights. The params are a nested dict of float32 numpy arrays with the
    structure of ``WhisperEncoder(config).init(...)["params"]``. Raises
    :class:`~moee_jax.checkpoint.convert.state_dict.ConversionError` naming every missing, unexpected
    or mis-shaped encoder key, and for pickle files unless ``allow_pickle``.
    """
    cfg = _resolve_config(path, config)
    weight_file = find_weight_file(path, stem="model")
    source = str(weight_file)
    state_dict = load_state_dict(weight_file, allow_pickle=allow_pickle)
    prefix = next((p for p in ENCODER_PREFIXES if any(k.startswith(p) for k in state_dict)), "")
    ignored: collections.Counter[str] = collections.Counter()

    def rename(key: str) -> str | None:
        if prefix and not key.startswith(prefix):
            group = _module_group(key)
            if group.removeprefix("model.") in _NON_ENCODER:
                ignored[group] += 1
                return None
            return key  # neither encoder nor a known head: reported as unexpected
        inner = key.removeprefix(prefix)
        return "embed_positions.embedding" if inner == "embed_positions.weight" else inner

    params, missing = convert_state_dict(state_dict, abstract_params(WhisperEncoder(cfg)), source=source, rename=rename)
    require_complete(missing, source=source)
    if ignored:
        log.info("%s: skipped %d non-encoder key(s): %s", source, sum(ignored.values()), dict(ignored))
    return WhisperConversion(params=params, config=cfg, ignored=dict(sorted(ignored.items())))
