"""Pretrained encoders from a local transformers folder: preprocessor + our Flax port + params.

Nothing is downloaded: ``folder`` is a directory the user has (``save_pretrained`` layout, with
``config.json``, the weights, and the feature extractor / tokenizer files). The preprocessing is
transformers' own (``AutoFeatureExtractor`` / ``AutoTokenizer`` with ``local_files_only``).
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moee_jax.checkpoint.convert.state_dict import read_hf_config
from moee_jax.checkpoint.convert.t5 import convert_t5_encoder
from moee_jax.checkpoint.convert.wav2vec2 import convert_wav2vec2
from moee_jax.models.encoders.t5 import T5Encoder
from moee_jax.models.encoders.wav2vec2 import Wav2Vec2Config, Wav2Vec2Model


def _folder(path: str | pathlib.Path) -> pathlib.Path:
    p = pathlib.Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: not a folder; pass the directory of a saved transformers model")
    return p


@dataclasses.dataclass(frozen=True)
class Wav2Vec2Bundle:
    """Feature extractor, model and params of a wav2vec2 checkpoint; :meth:`hidden_states` runs it."""

    feature_extractor: Any
    model: Wav2Vec2Model
    params: dict

    @property
    def rate(self) -> float:
        """Encoder positions per second of 16 kHz audio (50 for every released wav2vec2)."""
        return 16000 / float(np.prod(self.model.config.conv_stride))

    def hidden_states(self, wave: np.ndarray, sr: int = 16000) -> np.ndarray:
        """``wave (S,)`` mono at ``sr`` → all hidden states ``(layers + 1, L, D)`` at :attr:`rate`."""
        inputs = self.feature_extractor(wave, sampling_rate=sr, return_tensors="np")
        out = _wav2vec2_apply(self.model, self.params, jnp.asarray(inputs["input_values"], jnp.float32))
        return np.asarray(out.hidden_states[:, 0])


@functools.partial(jax.jit, static_argnums=0)
def _wav2vec2_apply(model, params, input_values):
    return model.apply({"params": params}, input_values)


def load_wav2vec2(folder: str | pathlib.Path, *, allow_pickle: bool = False) -> Wav2Vec2Bundle:
    """A wav2vec2 (or HuBERT-style wav2vec2-family) folder → :class:`Wav2Vec2Bundle`."""
    from transformers import AutoFeatureExtractor

    folder = _folder(folder)
    model = Wav2Vec2Model(Wav2Vec2Config.from_hf(read_hf_config(folder)))
    params = convert_wav2vec2(folder, model, allow_pickle=allow_pickle)
    extractor = AutoFeatureExtractor.from_pretrained(str(folder), local_files_only=True)
    return Wav2Vec2Bundle(extractor, model, params)


@dataclasses.dataclass(frozen=True)
class T5Bundle:
    """Tokenizer, encoder and params of a T5 checkpoint; :meth:`encode` runs it."""

    tokenizer: Any
    encoder: T5Encoder
    params: dict

    def encode(self, texts: list[str], max_length: int = 77) -> tuple[np.ndarray, np.ndarray]:
        """Texts → last hidden states ``(B, L, D)`` and the token mask ``(B, L)`` (True = token)."""
        tokens = self.tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="np")
        ids = jnp.asarray(tokens["input_ids"], jnp.int32)
        mask = jnp.asarray(tokens["attention_mask"], jnp.int32)
        out = _t5_apply(self.encoder, self.params, ids, mask)
        return np.asarray(out.last_hidden_state), np.asarray(tokens["attention_mask"]).astype(bool)


@functools.partial(jax.jit, static_argnums=0)
def _t5_apply(encoder, params, ids, mask):
    return encoder.apply({"params": params}, ids, mask)


def load_t5_encoder(folder: str | pathlib.Path, *, allow_pickle: bool = False) -> T5Bundle:
    """A T5 / Flan-T5 folder (encoder-only or full model) → :class:`T5Bundle`."""
    from transformers import AutoTokenizer

    folder = _folder(folder)
    conversion = convert_t5_encoder(folder, allow_pickle=allow_pickle)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return T5Bundle(tokenizer, T5Encoder(conversion.config), conversion.params)
