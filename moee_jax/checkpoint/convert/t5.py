"""transformers T5 checkpoints (Raffel et al. 2020) → params of our Flax ``T5Encoder``.

Accepted: ``T5EncoderModel``, ``T5Model`` and ``T5ForConditionalGeneration`` folders (``model.safetensors``
+ ``config.json``) or weight files. The decoder (``decoder.*``) and ``lm_head`` are skipped and
counted. Keys convert by the generic rule of :mod:`moee_jax.checkpoint.convert.state_dict`; the two
embedding tables become ``embedding`` params:

* the token table is tied: ``shared.weight`` and ``encoder.embed_tokens.weight`` are one tensor in
  transformers, and ``save_pretrained`` may write either or both. Either fills ``shared/embedding``;
  when both are present they must be equal.
* ``encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight`` → ``…/embedding``.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import pathlib

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
from moee_jax.models.encoders.t5 import T5Encoder, T5EncoderConfig

log = logging.getLogger(__name__)

SHARED = "shared.weight"
EMBED_TOKENS = "encoder.embed_tokens.weight"
_RELATIVE_BIAS = ".relative_attention_bias.weight"
# Top-level modules of T5 models that are not the encoder.
_NON_ENCODER = ("decoder", "lm_head")


@dataclasses.dataclass
class T5Conversion:
    """Converted encoder params, the config they fit, and the skipped non-encoder keys.

    ``ignored`` counts skipped keys per top-level module (``{"decoder": 34, "lm_head": 1}``).
    """

    params: dict
    config: T5EncoderConfig
    ignored: dict[str, int]


def abstract_params(encoder: T5Encoder) -> dict:
    """The unboxed ``ShapeDtypeStruct`` tree of ``encoder``'s params, without allocating them."""
    ids = jax.ShapeDtypeStruct((1, 2), jnp.int32)
    return nn.meta.unbox(jax.eval_shape(encoder.init, jax.random.key(0), ids))["params"]


def _resolve_config(path, config) -> T5EncoderConfig:
    if isinstance(config, T5EncoderConfig):
        return config
    return T5EncoderConfig.from_hf(read_hf_config(path) if config is None else config)


def _one_token_table(state_dict: StateDict, *, source: str) -> StateDict:
    """Keep one token table: drop ``encoder.embed_tokens.weight`` when ``shared.weight`` equals it."""
    if SHARED not in state_dict or EMBED_TOKENS not in state_dict:
        return state_dict
    shared, embed = np.asarray(state_dict[SHARED]), np.asarray(state_dict[EMBED_TOKENS])
    if shared.shape != embed.shape or not np.array_equal(shared, embed):
        raise ConversionError(
            f"{source}: {SHARED} {shared.shape} and {EMBED_TOKENS} {embed.shape} differ, but T5 ties them "
            "(one tensor), so the file is inconsistent; keep only the table the encoder was trained with."
        )
    return {k: v for k, v in state_dict.items() if k != EMBED_TOKENS}


def convert_t5_encoder(
    path: str | pathlib.Path,
    config: T5EncoderConfig | dict | None = None,
    *,
    allow_pickle: bool = False,
) -> T5Conversion:
    """Read a transformers T5 folder or weight file into :class:`T5Encoder` params.

    ``config``: our config, a transformers config (object or ``config.json`` dict), or None to read
    ``config.json`` beside the weights. The params are a nested dict of float32 numpy arrays with the
    structure of ``T5Encoder(config).init(...)["params"]``. Raises
    :class:`~moee_jax.checkpoint.convert.state_dict.ConversionError` naming every missing, unexpected
    or mis-shaped encoder key, and for pickle files unless ``allow_pickle``.
    """
    cfg = _resolve_config(path, config)
    weight_file = find_weight_file(path, stem="model")
    source = str(weight_file)
    state_dict = _one_token_table(load_state_dict(weight_file, allow_pickle=allow_pickle), source=source)
    ignored: collections.Counter[str] = collections.Counter()

    def rename(key: str) -> str | None:
        group = key.split(".")[0]
        if group in _NON_ENCODER:
            ignored[group] += 1
            return None
        if key in (SHARED, EMBED_TOKENS):
            return "shared.embedding"
        if key.endswith(_RELATIVE_BIAS):
            return key.removesuffix(".weight") + ".embedding"
        return key

    params, missing = convert_state_dict(state_dict, abstract_params(T5Encoder(cfg)), source=source, rename=rename)
    require_complete(missing, source=source)
    if ignored:
        log.info("%s: skipped %d non-encoder key(s): %s", source, sum(ignored.values()), dict(ignored))
    return T5Conversion(params=params, config=cfg, ignored=dict(sorted(ignored.items())))
