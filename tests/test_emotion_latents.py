"""Emotion-to-Latents (MoEE §Design 2): text / audio / label features → emotion tokens."""

from __future__ import annotations

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moee_jax.emotions import label_weights
from moee_jax.models.emotion_latents import MODALITIES, EmotionToLatents

B, LT, LA = 3, 5, 4  # batch, text tokens, audio tokens
DT, DA, D, Q = 12, 10, 16, 4  # text / audio feature widths, token width, queries


@pytest.fixture(scope="module")
def model():
    return EmotionToLatents(D, num_queries=Q, num_layers=1, heads=2, text_dim=DT, audio_dim=DA)


@pytest.fixture(scope="module")
def features():
    rng = np.random.default_rng(0)
    return {
        "text": jnp.asarray(rng.standard_normal((B, LT, DT), dtype=np.float32)),
        "audio": jnp.asarray(rng.standard_normal((B, LA, DA), dtype=np.float32)),
        "label": jnp.asarray(label_weights(["happy", "sad:0.5,angry:0.5", "surprised"])),
    }


@pytest.fixture(scope="module")
def params(model, features):
    return nn.unbox(jax.jit(model.init)(jax.random.key(0), **features))["params"]


@pytest.fixture(scope="module")
def run(model):
    """``(params, **inputs) → emotion tokens``, jitted."""
    return jax.jit(lambda p, **kw: model.apply({"params": p}, **kw))


def test_output_is_num_queries_tokens_of_width_dim(params, features, run):
    out = run(params, **features)
    assert out.shape == (B, Q, D)
    assert np.all(np.isfinite(out))


@pytest.mark.parametrize(
    "subset", [c for r in (1, 2) for c in itertools.combinations(MODALITIES, r)], ids="+".join
)
def test_any_subset_of_modalities_gives_conditioned_tokens(params, features, run, model, subset):
    out = run(params, **{m: features[m] for m in subset})
    assert out.shape == (B, Q, D)
    assert np.all(np.isfinite(out))
    assert not np.allclose(out, model.apply({"params": params}, B, method=EmotionToLatents.null))


def test_parameter_tree_does_not_depend_on_the_modalities_given_at_init(model, features):
    def shapes(**inputs):
        return jax.tree.map(lambda a: a.shape, nn.unbox(jax.eval_shape(model.init, jax.random.key(0), **inputs)))

    assert shapes(label=features["label"]) == shapes(**features)


def test_sample_with_all_modalities_dropped_is_the_null_tokens(params, features, run, model):
    drop = jnp.array([[True, True, True], [False, False, False], [True, False, True]])
    out = run(params, **features, drop=drop)
    null = model.apply({"params": params}, 1, method=EmotionToLatents.null)[0]
    np.testing.assert_array_equal(out[0], null)
    assert not np.allclose(out[1], null) and not np.allclose(out[2], null)


def test_dropping_one_modality_changes_that_samples_tokens_only(params, features, run):
    full = run(params, **features)
    drop = jnp.array([[True, False, False], [False, False, False], [False, False, False]])
    out = run(params, **features, drop=drop)
    assert not np.allclose(out[0], full[0], atol=1e-4)
    np.testing.assert_allclose(out[1:], full[1:], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("modality, length", [("text", LT), ("audio", LA)])
def test_padded_tokens_are_ignored(params, features, run, modality, length):
    valid = np.arange(length) < length - 2
    mask = jnp.asarray(np.tile(valid, (B, 1)))
    noise = np.random.default_rng(1).standard_normal(features[modality].shape).astype(np.float32)
    repadded = jnp.where(valid[None, :, None], features[modality], 10.0 * noise)
    out = run(params, **features, **{f"{modality}_mask": mask})
    out_repadded = run(params, **{**features, modality: repadded}, **{f"{modality}_mask": mask})
    np.testing.assert_allclose(out_repadded, out, rtol=1e-6, atol=1e-6)
    assert not np.allclose(out, run(params, **features), atol=1e-4)  # the mask is in effect


def test_no_modality_or_an_undeclared_one_is_refused(features):
    text_only = EmotionToLatents(D, num_queries=Q, num_layers=1, heads=2, text_dim=DT, use_label=False)
    with pytest.raises(ValueError, match="needs at least one of text, audio, label"):
        text_only.init(jax.random.key(0))
    with pytest.raises(ValueError, match="audio features were given but this EmotionToLatents has no audio branch"):
        text_only.init(jax.random.key(0), text=features["text"], audio=features["audio"])
