"""T5 encoder: parity with transformers on tiny random models (ReLU and gated-GELU), and the converter."""

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
from moee_jax.checkpoint.convert.t5 import convert_t5_encoder
from moee_jax.models.encoders.t5 import T5Encoder, T5EncoderConfig, relative_position_buckets
from tests.reference_models import randomize, rel_err

ENCODER = dict(
    vocab_size=100,
    d_model=32,
    d_kv=8,
    d_ff=48,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=16,  # small, so the tiny sequences reach the logarithmic buckets
)
# feed_forward_proj → the transformers class saved, so both converter layouts are exercised.
VARIANTS = {"relu": "T5EncoderModel", "gated-gelu": "T5ForConditionalGeneration"}
LENGTH, VALID = 12, 7  # the second sample is padded after VALID tokens
WEIGHTS = "model.safetensors"
TOL = 1e-4


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def feed_forward_proj(request):
    return request.param


@pytest.fixture(scope="module")
def hf_model(torch, feed_forward_proj):
    import transformers

    config = transformers.T5Config(
        **ENCODER, feed_forward_proj=feed_forward_proj, num_decoder_layers=1, decoder_start_token_id=0
    )
    torch.manual_seed(0)
    return randomize(torch, getattr(transformers, VARIANTS[feed_forward_proj])(config), seed=1)


@pytest.fixture(scope="module")
def model_dir(hf_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("t5")
    hf_model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def conversion(model_dir):
    return convert_t5_encoder(model_dir)


@pytest.fixture(scope="module")
def batch():
    """Token ids (2, LENGTH) and the padding mask: the second sample has VALID tokens, then pad (0)."""
    ids = np.random.default_rng(0).integers(2, ENCODER["vocab_size"], (2, LENGTH)).astype(np.int32)
    mask = np.ones((2, LENGTH), np.int32)
    ids[1, VALID:] = 0
    mask[1, VALID:] = 0
    return ids, mask


@pytest.fixture(scope="module")
def reference(torch, hf_model, batch):
    ids, mask = batch
    with torch.no_grad():
        out = hf_model.encoder(
            input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask), output_hidden_states=True
        )
    return out.last_hidden_state.numpy(), [h.numpy() for h in out.hidden_states]


@pytest.fixture(scope="module")
def ours(conversion, batch):
    ids, mask = batch
    return jax.jit(T5Encoder(conversion.config).apply)({"params": conversion.params}, ids, mask)


def valid(x, mask) -> np.ndarray:
    """The valid tokens of (B, L, D) ``x`` under the (B, L) mask, concatenated."""
    return np.concatenate([np.asarray(x)[b][mask[b].astype(bool)] for b in range(len(mask))])


def _edited_checkpoint(model_dir, tmp_path, edit):
    state = load_file(str(model_dir / WEIGHTS))
    edit(state)
    out = tmp_path / "edited"
    out.mkdir()
    shutil.copy(model_dir / "config.json", out / "config.json")
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(out / WEIGHTS))
    return out


def test_relative_position_buckets_match_transformers(torch):
    from transformers.models.t5.modeling_t5 import T5Attention

    for length, num_buckets, max_distance in ((LENGTH, 8, 16), (600, 32, 128)):
        relative = torch.arange(length)[None, :] - torch.arange(length)[:, None]
        expected = T5Attention._relative_position_bucket(relative, True, num_buckets, max_distance).numpy()
        ours = relative_position_buckets(length, length, num_buckets=num_buckets, max_distance=max_distance)
        np.testing.assert_array_equal(ours, expected)


def test_config_is_read_from_config_json(conversion, feed_forward_proj):
    assert conversion.config == T5EncoderConfig(**ENCODER, feed_forward_proj=feed_forward_proj)


def test_last_hidden_state_matches_transformers_at_valid_tokens(reference, ours, batch):
    mask = batch[1]
    assert ours.last_hidden_state.shape == (2, LENGTH, ENCODER["d_model"])
    assert rel_err(valid(ours.last_hidden_state, mask), valid(reference[0], mask)) < TOL


def test_every_hidden_state_matches_transformers_at_valid_tokens(reference, ours, batch):
    mask, hidden = batch[1], reference[1]
    assert ours.hidden_states.shape[0] == len(hidden) == ENCODER["num_layers"] + 1
    for i, ref in enumerate(hidden):
        assert rel_err(valid(ours.hidden_states[i], mask), valid(ref, mask)) < TOL, f"hidden state {i}"


def test_non_encoder_keys_are_ignored_and_counted(model_dir, conversion):
    keys = load_file(str(model_dir / WEIGHTS)).keys()
    expected = {g: sum(k.startswith(g + ".") for k in keys) for g in ("decoder", "lm_head")}
    assert conversion.ignored == {g: n for g, n in expected.items() if n}


def test_token_table_under_encoder_embed_tokens_only_converts_the_same(model_dir, conversion, tmp_path):
    def edit(state):
        table = state.pop("shared.weight", None)
        if table is not None:
            state["encoder.embed_tokens.weight"] = table

    edited = convert_t5_encoder(_edited_checkpoint(model_dir, tmp_path, edit))
    flat, expected = traverse_util.flatten_dict(edited.params), traverse_util.flatten_dict(conversion.params)
    assert flat.keys() == expected.keys()
    for path, value in flat.items():
        np.testing.assert_array_equal(value, expected[path], err_msg="/".join(path))


def test_differing_tied_token_tables_raise_conversion_error(model_dir, tmp_path):
    def edit(state):
        table = state.get("shared.weight", state.get("encoder.embed_tokens.weight"))
        state["shared.weight"] = table
        state["encoder.embed_tokens.weight"] = table + 1.0

    with pytest.raises(ConversionError, match=r"shared\.weight .* encoder\.embed_tokens\.weight .* differ"):
        convert_t5_encoder(_edited_checkpoint(model_dir, tmp_path, edit))


def test_renamed_key_raises_conversion_error_naming_it(model_dir, tmp_path):
    original = "encoder.block.1.layer.0.SelfAttention.o.weight"
    renamed = "encoder.block.1.layer.0.SelfAttention.out.weight"

    def edit(state):
        state[renamed] = state.pop(original)

    with pytest.raises(ConversionError, match=re.escape(renamed)):
        convert_t5_encoder(_edited_checkpoint(model_dir, tmp_path, edit))


def test_wrong_shaped_tensor_raises_conversion_error_naming_it(model_dir, tmp_path):
    key = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"

    def edit(state):
        state[key] = state[key][:-1]

    with pytest.raises(ConversionError, match=re.escape(key)):
        convert_t5_encoder(_edited_checkpoint(model_dir, tmp_path, edit))


def test_every_param_carries_logical_axes(feed_forward_proj):
    model = T5Encoder(T5EncoderConfig(**ENCODER, feed_forward_proj=feed_forward_proj))
    ids = jax.ShapeDtypeStruct((1, LENGTH), jnp.int32)
    boxed = jax.eval_shape(model.init, jax.random.key(0), ids)["params"]
    leaves = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda v: isinstance(v, nn.Partitioned))
    unnamed = [jax.tree_util.keystr(p) for p, v in leaves if not isinstance(v, nn.Partitioned)]
    assert leaves and not unnamed
