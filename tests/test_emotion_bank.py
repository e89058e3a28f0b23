"""DICE-Talk emotion bank (eqs. 9–13, 17) and emotion discrimination (eq. 16), as specifications.

Where stop-gradients act is checked through gradients, and the bank's attention and the
cross-entropy against NumPy transcriptions of the equations.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moee_jax.models.emotion_bank import EmotionBank, nearest_code
from moee_jax.models.emotion_discriminator import EmotionDiscriminator
from moee_jax.train.losses import emotion_classification_loss

D, K, HEADS, TOKENS, OUT = 8, 5, 2, 3, 6
BETA = 0.25
BANK = EmotionBank(num_codes=K, heads=HEADS, num_tokens=TOKENS, out_features=OUT, beta=BETA)


@pytest.fixture(scope="module")
def params():
    return nn.meta.unbox(BANK.init(jax.random.key(0), jnp.zeros((1, D)), train=False))["params"]


@pytest.fixture(scope="module")
def near_codes(params):
    """Two priors, each a small step from a different code: ``(s, k)`` with ``k = (3, 1)``."""
    k = np.array([3, 1])
    codebook = np.asarray(params["codebook"])
    s = codebook[k] + 0.05 * np.random.default_rng(0).standard_normal((2, D)).astype(np.float32)
    return jnp.asarray(s), k


def _apply(params, s, train):
    return BANK.apply({"params": params}, s, train=train)


def test_nearest_code_is_the_argmin():
    rng = np.random.default_rng(1)
    s, codebook = rng.standard_normal((6, D)), rng.standard_normal((K, D))
    expected = np.argmin(((s[:, None] - codebook[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(nearest_code(jnp.asarray(s), jnp.asarray(codebook)), expected)


def test_training_retrieves_the_nearest_code_as_value(params, near_codes):
    s, k = near_codes
    out = _apply(params, s, True)
    np.testing.assert_array_equal(out.index, k)
    np.testing.assert_allclose(out.quantized, np.asarray(params["codebook"])[k], atol=1e-6)


def test_straight_through_gradient_to_s_is_the_gradient_to_s_q(params, near_codes):
    s, _ = near_codes
    w = jnp.arange(1.0, 1.0 + 2 * D).reshape(2, D)
    grad = jax.grad(lambda s: jnp.sum(w * jnp.sin(_apply(params, s, True).quantized)))(s)
    s_q = _apply(params, s, True).quantized
    np.testing.assert_allclose(grad, w * jnp.cos(s_q), rtol=1e-6)  # identity Jacobian ds_q/ds


def test_no_gradient_reaches_the_codebook_through_s_q(params, near_codes):
    s, _ = near_codes
    grads = jax.grad(lambda p: jnp.sum(jnp.sin(_apply(p, s, True).quantized)))(params)
    np.testing.assert_array_equal(grads["codebook"], 0.0)


def test_vq_loss_is_eq_17(params, near_codes):
    s, k = near_codes
    sq = ((np.asarray(s) - np.asarray(params["codebook"])[k]) ** 2).sum(-1)
    np.testing.assert_allclose(_apply(params, s, True).vq_loss, np.mean((1 + BETA) * sq), rtol=1e-5)


def test_vq_loss_moves_only_the_selected_code_toward_s(params, near_codes):
    s, k = near_codes
    codebook = np.asarray(params["codebook"])
    grad = jax.grad(lambda p: _apply(p, s, True).vq_loss)(params)["codebook"]
    expected = np.zeros_like(codebook)
    expected[k] = 2.0 * (codebook[k] - np.asarray(s)) / len(k)  # ‖sg[s] − C_k‖², batch mean
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)


def test_vq_loss_moves_s_toward_its_code_with_weight_beta(params, near_codes):
    s, k = near_codes
    grad = jax.grad(lambda s: _apply(params, s, True).vq_loss)(s)
    expected = 2.0 * BETA * (np.asarray(s) - np.asarray(params["codebook"])[k]) / len(k)  # β‖s − sg[C_k]‖²
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)


def test_training_attention_over_one_code_is_its_value(params, near_codes):
    s, k = near_codes
    expected = np.asarray(params["codebook"])[k] @ np.asarray(params["to_v"]["kernel"])  # eq. 11, softmax ≡ 1
    np.testing.assert_allclose(_apply(params, s, True).emotion, expected, rtol=1e-5, atol=1e-6)


def test_inference_attends_over_the_whole_bank(params):
    s = np.random.default_rng(2).standard_normal((3, D)).astype(np.float32)
    codebook = np.asarray(params["codebook"], np.float64)
    q = s @ np.asarray(params["to_q"]["kernel"], np.float64)
    keys = codebook @ np.asarray(params["to_k"]["kernel"], np.float64)
    values = codebook @ np.asarray(params["to_v"]["kernel"], np.float64)
    dh = D // HEADS
    emotion = np.zeros((3, D))
    for h in range(HEADS):  # eqs. 12–13 per head: softmax(q Kᵀ/√d_h) V
        cols = slice(h * dh, (h + 1) * dh)
        logits = q[:, cols] @ keys[:, cols].T / np.sqrt(dh)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        emotion[:, cols] = (p / p.sum(-1, keepdims=True)) @ values[:, cols]
    proj = params["proj_tokens"]
    tokens = (emotion @ np.asarray(proj["kernel"]) + np.asarray(proj["bias"])).reshape(3, TOKENS, OUT)

    out = _apply(params, jnp.asarray(s), False)
    np.testing.assert_allclose(out.emotion, emotion, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.tokens, tokens, rtol=1e-5, atol=1e-6)
    assert out.vq_loss is None and out.quantized is None


@pytest.mark.parametrize("train", [True, False])
def test_emotion_tokens_fill_the_unet_emotion_slot(params, train):
    assert _apply(params, jnp.ones((2, D)), train).tokens.shape == (2, TOKENS, OUT)


@pytest.mark.parametrize("shape", [(2, 3, 4, 4, 16), (2, 10, 16), (2, 16)])
def test_discriminator_pools_all_but_batch_and_channel(shape):
    disc = EmotionDiscriminator(num_classes=7, hidden=8)
    x = jnp.ones(shape)
    logits = disc.apply(disc.init(jax.random.key(0), x), x)
    assert logits.shape == (2, 7)


def test_classification_loss_is_cross_entropy():
    rng = np.random.default_rng(3)
    logits, labels = rng.standard_normal((5, 7)) * 3, rng.integers(0, 7, 5)
    expected = np.mean([np.log(np.exp(row).sum()) - row[y] for row, y in zip(logits, labels)])  # −log p_y
    got = emotion_classification_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(labels))
    np.testing.assert_allclose(got, expected, rtol=1e-5)
