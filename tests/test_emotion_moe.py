"""Emotion palettes and the Mixture of Emotion Experts (MoEE §Design 1: X' = X + Σ g_i E_i(X·s_i))."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from moee_jax.emotions import EMOTIONS, label_weights, parse_palette
from moee_jax.models.emotion_moe import EmotionCondition, EmotionMoE
from moee_jax.models.transformers import SpatialTransformerBlock
from moee_jax.nn.attention import Attention
from tests.reference_models import rel_err

B, F, L, C = 2, 2, 6, 16  # clips, frames, tokens per frame, width
LE, DE = 3, 8  # emotion tokens per clip, their width
HEADS = 2
E = len(EMOTIONS)


def _onehot(j: int) -> np.ndarray:
    return np.eye(E, dtype=np.float32)[j]


# --- palettes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("happy", _onehot(0)),
        ("fearful", _onehot(4)),
        ("happy:0.6,surprised:0.4", 0.6 * _onehot(0) + 0.4 * _onehot(5)),
        ("  Happy : 3 ,\tsad:1 ", 0.75 * _onehot(0) + 0.25 * _onehot(1)),
        ("angry,disgusted", 0.5 * _onehot(2) + 0.5 * _onehot(3)),
        ("anger:2,fear:0", _onehot(2)),
        ("neutral", np.zeros(E, np.float32)),
        ("happy:1,neutral:1", 0.5 * _onehot(0)),
    ],
)
def test_valid_palettes_parse_to_normalised_weights_in_expert_order(spec, expected):
    weights = parse_palette(spec)
    assert weights.shape == (E,) and weights.dtype == np.float32
    np.testing.assert_allclose(weights, expected, rtol=1e-6)


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("joy:1", "unknown emotion 'joy'"),
        ("happy:-0.5", "'-0.5' of 'happy'"),
        ("happy:much", "'much' of 'happy' in emotion palette 'happy:much' is not a number"),
        ("happy:inf", "is not finite"),
        ("happy:0.5,happiness:0.5", "'happiness' appears more than once"),
        ("happy:0,sad:0", "all weights of palette 'happy:0,sad:0' are zero"),
        ("happy:", "malformed item 'happy:'"),
        (":0.5", "malformed item ':0.5'"),
        ("happy:0.5:1", "malformed item 'happy:0.5:1'"),
        ("happy:1,,sad:1", "malformed item ''"),
        ("  ", "empty emotion palette"),
    ],
)
def test_invalid_palettes_raise_naming_the_item_and_the_known_emotions(spec, fragment):
    with pytest.raises(ValueError) as err:
        parse_palette(spec)
    message = str(err.value)
    assert fragment in message
    assert "known emotions: happiness, sadness, anger, disgust, fear, surprise, neutral" in message


def test_label_weights_stack_a_batch_of_labels():
    weights = label_weights(["happy", "sad:1,angry:1", "neutral"])
    np.testing.assert_allclose(weights, np.stack([_onehot(0), 0.5 * (_onehot(1) + _onehot(2)), np.zeros(E)]))


# --- the mixture of experts -------------------------------------------------------------------


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((B * F, L, C), dtype=np.float32))  # frame-folded, row b·F + f
    tokens = jnp.asarray(rng.standard_normal((B, LE, DE), dtype=np.float32))  # per clip
    return x, tokens


@pytest.fixture(scope="module")
def moe():
    return EmotionMoE(heads=HEADS)


@pytest.fixture(scope="module")
def boxed(moe, inputs):
    x, tokens = inputs
    return jax.jit(moe.init)(jax.random.key(0), x, EmotionCondition(tokens))


@pytest.fixture(scope="module")
def params(boxed):
    """Params as after training: every leaf perturbed, so no expert output is zero."""
    fresh = nn.unbox(boxed)["params"]
    leaves, tree = jax.tree.flatten(fresh)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    return jax.tree.unflatten(tree, [p + 0.3 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def run(moe):
    """``(params, x, emotion) → (output, intermediates)``, jitted."""
    return jax.jit(lambda p, x, emotion: moe.apply({"params": p}, x, emotion, mutable="intermediates"))


def _gates(intermediates):
    return intermediates["intermediates"]["local_gates"][0], intermediates["intermediates"]["global_gates"][0]


def _specs(tree) -> list[P]:
    return jax.tree.leaves(tree, is_leaf=lambda s: isinstance(s, P))


def _layer_norm(x, scale, bias, eps=1e-5):
    x = np.asarray(x, np.float64)
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps) * scale + bias


def test_vectorised_experts_equal_a_per_expert_loop(params, inputs, run):
    x, tokens = inputs
    out, _ = run(params, x, EmotionCondition(tokens))

    h = _layer_norm(x, params["norm"]["scale"], params["norm"]["bias"])
    local, glob = params["local_gate"], params["global_gate"]
    s = 1 / (1 + np.exp(-(h @ np.asarray(local["kernel"], np.float64) + np.asarray(local["bias"]))))  # (N, L, E)
    logits = h.mean(1) @ np.asarray(glob["kernel"], np.float64) + np.asarray(glob["bias"])
    g = np.exp(logits - logits.max(-1, keepdims=True))
    g /= g.sum(-1, keepdims=True)  # (N, E + 1): six experts and "none"
    g = g[:, :E]
    expected = np.asarray(x, np.float64)
    for i in range(E):
        expert_i = jax.tree.map(lambda p: p[i], params["experts"])
        e_i = Attention(HEADS, C // HEADS, zero_init_out=True).apply(
            {"params": expert_i}, jnp.asarray(h * s[..., i : i + 1], jnp.float32), tokens
        )
        expected = expected + g[:, i, None, None] * np.asarray(e_i, np.float64)
    assert rel_err(out, expected) < 1e-5


def test_one_hot_palette_gives_other_experts_exactly_zero_gradient(params, inputs, moe):
    x, tokens = inputs
    j = 3
    emotion = EmotionCondition(tokens, jnp.asarray(np.tile(_onehot(j), (B, 1))))
    loss = lambda p: jnp.sum(moe.apply({"params": p}, x, emotion) ** 2)  # noqa: E731
    grads = jax.jit(jax.grad(loss))(params)["experts"]
    for path, grad in jax.tree_util.tree_flatten_with_path(grads)[0]:
        grad = np.asarray(grad)
        others = np.delete(grad, j, axis=0)
        assert np.all(others == 0), f"{jax.tree_util.keystr(path)}: other experts get gradient"
        assert np.any(grad[j] != 0), f"{jax.tree_util.keystr(path)}: the chosen expert gets none"


def test_one_hot_palette_output_ignores_the_other_experts(params, inputs, run):
    x, tokens = inputs
    j = 1
    emotion = EmotionCondition(tokens, jnp.asarray(np.tile(_onehot(j), (B, 1))))
    other = np.arange(E) != j
    changed = dict(params)
    changed["experts"] = jax.tree.map(
        lambda p: jnp.where(other.reshape((E,) + (1,) * (p.ndim - 1)), p + 1.0, p), params["experts"]
    )
    np.testing.assert_array_equal(run(params, x, emotion)[0], run(changed, x, emotion)[0])


def test_local_gates_lie_in_the_open_unit_interval_and_the_learned_global_gate_leaves_room_for_no_emotion(params, inputs, run):
    x, tokens = inputs
    local, glob = _gates(run(params, x, EmotionCondition(tokens))[1])
    logits = run(params, x, EmotionCondition(tokens))[1]["intermediates"]["global_gate_logits"][0]
    assert local.shape == (B * F, L, E) and glob.shape == (B * F, E) and logits.shape == (B * F, E + 1)
    assert np.all((local > 0) & (local < 1))
    assert np.all(glob > 0)
    none = np.asarray(jax.nn.softmax(logits, axis=-1))[:, E]
    np.testing.assert_allclose(glob.sum(-1) + none, 1.0, rtol=1e-6)
    assert np.all(glob.sum(-1) < 1.0)


def test_palette_keep_chooses_per_clip_between_the_palette_and_the_learned_gate(params, inputs, run):
    x, tokens = inputs
    palette = np.stack([parse_palette("angry"), parse_palette("sad")])
    _, learned = _gates(run(params, x, EmotionCondition(tokens))[1])
    _, glob = _gates(run(params, x, EmotionCondition(tokens, jnp.asarray(palette), jnp.array([True, False])))[1])
    np.testing.assert_array_equal(glob[:F], np.repeat(palette[:1], F, axis=0))  # clip 0: its label's expert
    np.testing.assert_array_equal(glob[F:], learned[F:])  # clip 1: emotion not from a label, the gate network acts


def test_neutral_palette_switches_every_expert_off(params, inputs, run):
    x, tokens = inputs
    neutral = EmotionCondition(tokens, jnp.zeros((B, E)))
    np.testing.assert_array_equal(run(params, x, neutral)[0], x)


def test_palette_replaces_the_global_gate_for_every_frame_of_its_clip(params, inputs, run):
    x, tokens = inputs
    palette = np.stack([parse_palette("happy:0.6,surprised:0.4"), parse_palette("sad")])
    _, glob = _gates(run(params, x, EmotionCondition(tokens, jnp.asarray(palette)))[1])
    np.testing.assert_array_equal(glob, np.repeat(palette, F, axis=0))


def test_palette_of_the_wrong_shape_is_refused(moe, params, inputs):
    x, tokens = inputs
    with pytest.raises(ValueError, match=r"palette must be \(B, 6\) weights"):
        moe.apply({"params": params}, x, EmotionCondition(tokens, jnp.ones((B, 5))))


def test_stacked_expert_params_carry_the_expert_logical_axis(boxed):
    specs = nn.get_partition_spec(boxed)["params"]
    assert specs["experts"]["to_q"]["kernel"] == P("expert", "embed", "heads")
    assert specs["experts"]["to_out_0"]["kernel"] == P("expert", "heads", "embed")
    for spec, leaf in zip(_specs(specs["experts"]), jax.tree.leaves(nn.unbox(boxed)["params"]["experts"])):
        assert spec[0] == "expert" and leaf.shape[0] == E


def test_fresh_moe_is_the_identity(boxed, inputs, run):
    x, tokens = inputs
    np.testing.assert_array_equal(run(nn.unbox(boxed)["params"], x, EmotionCondition(tokens))[0], x)


@pytest.mark.parametrize(
    "variant, param_names",
    [
        ("single", {"norm", "attn"}),
        ("no_global", {"norm", "local_gate", "experts"}),
        ("no_local", {"norm", "global_gate", "experts"}),
    ],
)
def test_ablation_variants_have_their_parameter_structure_and_gates(variant, param_names, inputs):
    x, tokens = inputs
    moe = EmotionMoE(heads=HEADS, variant=variant)
    boxed = jax.jit(moe.init)(jax.random.key(0), x, EmotionCondition(tokens))
    assert set(boxed["params"]) == param_names
    out, inter = jax.jit(lambda v: moe.apply(v, x, EmotionCondition(tokens), mutable="intermediates"))(nn.unbox(boxed))
    assert out.shape == x.shape
    if variant == "single":
        assert all("expert" not in tuple(spec) for spec in _specs(nn.get_partition_spec(boxed)))
        assert not inter
        return
    local, glob = _gates(inter)
    if variant == "no_global":
        np.testing.assert_array_equal(glob, np.full((B * F, E), 1 / E, np.float32))
        # Unbound experts: a palette does not steer them.
        _, inter = jax.jit(lambda v: moe.apply(v, x, EmotionCondition(tokens, jnp.tile(jnp.eye(E)[:1], (B, 1))), mutable="intermediates"))(
            nn.unbox(boxed)
        )
        np.testing.assert_array_equal(_gates(inter)[1], np.full((B * F, E), 1 / E, np.float32))
    else:
        np.testing.assert_array_equal(local, np.ones((B * F, L, E), np.float32))


def test_works_as_the_emotion_slot_of_a_spatial_transformer_block(inputs):
    x, tokens = inputs
    block = SpatialTransformerBlock(C, HEADS, cross_attention_dim=4, emotion_slot=functools.partial(EmotionMoE, heads=HEADS))
    context = jnp.ones((B, 1, 4))
    emotion = EmotionCondition(tokens, jnp.asarray(np.tile(_onehot(0), (B, 1))))
    variables = jax.jit(block.init)(jax.random.key(0), x, context, emotion=emotion)
    assert variables["params"]["emotion"]["experts"]["to_k"]["kernel"].unbox().shape == (E, DE, C)
    assert block.apply(variables, x, context, emotion=emotion).shape == x.shape
