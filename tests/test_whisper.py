"""Whisper encoder: parity with transformers on a tiny random model, the converter, and input checks."""

from __future__ import annotations

import re
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from moee_jax.checkpoint.convert.state_dict import ConversionError
from moee_jax.checkpoint.convert.whisper import convert_whisper_encoder
from moee_jax.models.encoders.whisper import WhisperEncoder, WhisperEncoderConfig
from tests.reference_models import randomize, rel_err

ENCODER = dict(
    d_model=32,
    encoder_layers=2,
    encoder_attention_heads=4,
    encoder_ffn_dim=48,
    num_mel_bins=16,
    max_source_positions=30,
)
DECODER = dict(
    decoder_layers=1,
    decoder_attention_heads=4,
    decoder_ffn_dim=48,
    vocab_size=64,
    max_target_positions=16,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    decoder_start_token_id=1,
    begin_suppress_tokens=None,
)
FRAMES = 2 * ENCODER["max_source_positions"]
WEIGHTS = "model.safetensors"
TOL = 1e-4


@pytest.fixture(scope="module")
def hf_model(torch):
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    return randomize(torch, WhisperForConditionalGeneration(WhisperConfig(**ENCODER, **DECODER)), seed=1)


@pytest.fixture(scope="module")
def model_dir(hf_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("whisper")
    hf_model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def conversion(model_dir):
    return convert_whisper_encoder(model_dir)


@pytest.fixture(scope="module")
def features():
    """Log-mel-like features, channels-last (B, frames, mel_bins)."""
    return np.random.default_rng(0).standard_normal((2, FRAMES, ENCODER["num_mel_bins"])).astype(np.float32)


@pytest.fixture(scope="module")
def reference(torch, hf_model, features):
    channels_first = torch.from_numpy(np.ascontiguousarray(features.transpose(0, 2, 1)))
    with torch.no_grad():
        out = hf_model.model.encoder(channels_first, output_hidden_states=True)
    return out.last_hidden_state.numpy(), [h.numpy() for h in out.hidden_states]


@pytest.fixture(scope="module")
def ours(conversion, features):
    model = WhisperEncoder(conversion.config)
    return jax.jit(model.apply)({"params": conversion.params}, features)


def _edited_checkpoint(model_dir, tmp_path, edit):
    state = load_file(str(model_dir / WEIGHTS))
    edit(state)
    out = tmp_path / "edited"
    out.mkdir()
    shutil.copy(model_dir / "config.json", out / "config.json")
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(out / WEIGHTS))
    return out


def test_config_is_read_from_config_json(conversion):
    assert conversion.config == WhisperEncoderConfig(**ENCODER)


def test_last_hidden_state_matches_transformers(reference, ours):
    assert ours.last_hidden_state.shape == (2, ENCODER["max_source_positions"], ENCODER["d_model"])
    assert rel_err(ours.last_hidden_state, reference[0]) < TOL


def test_every_hidden_state_matches_transformers(reference, ours):
    hidden = reference[1]
    assert ours.hidden_states.shape[0] == len(hidden) == ENCODER["encoder_layers"] + 1
    for i, ref in enumerate(hidden):
        assert rel_err(ours.hidden_states[i], ref) < TOL, f"hidden state {i}"


def test_last_hidden_states_entry_is_after_the_final_layer_norm(ours):
    np.testing.assert_array_equal(ours.hidden_states[-1], ours.last_hidden_state)


def test_decoder_keys_are_ignored_and_counted(model_dir, conversion):
    keys = load_file(str(model_dir / WEIGHTS)).keys()
    decoder = sum(k.startswith("model.decoder.") for k in keys)
    assert decoder > 0
    assert conversion.ignored.get("model.decoder") == decoder
    assert set(conversion.ignored) <= {"model.decoder", "proj_out"}


def test_bare_encoder_checkpoint_converts_to_the_same_params(hf_model, conversion, tmp_path):
    hf_model.model.encoder.save_pretrained(tmp_path, safe_serialization=True)
    bare = convert_whisper_encoder(tmp_path)
    assert bare.ignored == {}
    flat, expected = traverse_util.flatten_dict(bare.params), traverse_util.flatten_dict(conversion.params)
    assert flat.keys() == expected.keys()
    for path, value in flat.items():
        np.testing.assert_array_equal(value, expected[path], err_msg="/".join(path))


def test_renamed_key_raises_conversion_error_naming_it(model_dir, tmp_path):
    renamed = "model.encoder.layers.1.fc_1.weight"

    def edit(state):
        state[renamed] = state.pop("model.encoder.layers.1.fc1.weight")

    with pytest.raises(ConversionError, match=re.escape(renamed)):
        convert_whisper_encoder(_edited_checkpoint(model_dir, tmp_path, edit))


def test_wrong_shaped_tensor_raises_conversion_error_naming_it(model_dir, tmp_path):
    key = "model.encoder.layers.0.self_attn.k_proj.weight"

    def edit(state):
        state[key] = state[key][:-1]

    with pytest.raises(ConversionError, match=re.escape(key)):
        convert_whisper_encoder(_edited_checkpoint(model_dir, tmp_path, edit))


@pytest.mark.parametrize("frames", [FRAMES - 1, FRAMES // 2])
def test_wrong_input_length_raises_value_error_naming_the_expected_length(conversion, frames):
    x = jnp.zeros((1, frames, ENCODER["num_mel_bins"]))
    with pytest.raises(ValueError, match=f"expects exactly {FRAMES} mel frames"):
        WhisperEncoder(conversion.config).apply({"params": conversion.params}, x)


def test_channels_first_input_is_rejected_with_a_transpose_hint(conversion):
    x = jnp.zeros((1, ENCODER["num_mel_bins"], FRAMES))
    with pytest.raises(ValueError, match="channels-first"):
        WhisperEncoder(conversion.config).apply({"params": conversion.params}, x)


def test_every_param_carries_logical_axes():
    model = WhisperEncoder(WhisperEncoderConfig(**ENCODER))
    x = jax.ShapeDtypeStruct((1, FRAMES, ENCODER["num_mel_bins"]), jnp.float32)
    boxed = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    leaves = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda v: isinstance(v, nn.Partitioned))
    unnamed = [jax.tree_util.keystr(p) for p, v in leaves if not isinstance(v, nn.Partitioned)]
    assert leaves and not unnamed
