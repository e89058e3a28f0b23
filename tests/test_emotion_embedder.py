"""DICE-Talk Gaussian emotion embedder (eqs. 2–6) and its InfoNCE loss (eqs. 7–8), as specifications."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moee_jax.models.emotion_embedder import GaussianEmotionEmbedder, modality_keep_masks
from moee_jax.train.losses import info_nce

B, N, H, W, D_AUDIO, D = 2, 4, 16, 16, 8, 16
EPS = 1e-6
MODEL = GaussianEmotionEmbedder(dim=D, heads=2, num_audio_layers=1, num_layers=2, visual_channels=(4, 8), eps=EPS)


@pytest.fixture(scope="module")
def inputs():
    ka, kf = jax.random.split(jax.random.key(0))
    audio = jax.random.normal(ka, (B, N, D_AUDIO))
    frames = jax.random.uniform(kf, (B, N, H, W, 3), minval=-1.0, maxval=1.0)
    mouth = jnp.zeros((B, N, H, W)).at[:, :, 10:14, 4:12].set(1.0)
    return {"audio_features": audio, "frames": frames, "mouth_mask": mouth}


@pytest.fixture(scope="module")
def params(inputs):
    return nn.meta.unbox(MODEL.init(jax.random.key(1), **inputs, deterministic=True))["params"]


MODES = {
    "audio": ("audio_features",),
    "video": ("frames", "mouth_mask"),
    "both": ("audio_features", "frames", "mouth_mask"),
}


def _embed(params, inputs, mode="both", seed=0, model=MODEL, **kw):
    given = {name: inputs[name] for name in MODES[mode]}
    rngs = {"sample": jax.random.key(seed), "dropout": jax.random.key(seed + 1)}
    return model.apply({"params": params}, **given, rngs=rngs, **kw)


@pytest.mark.parametrize("mode", MODES)
def test_runs_on_audio_only_video_only_and_both(params, inputs, mode):
    prior = _embed(params, inputs, mode)
    for x in (prior.mu, prior.sigma, prior.sample):
        assert x.shape == (B, D) and bool(jnp.all(jnp.isfinite(x)))


@pytest.mark.parametrize("mode", MODES)
def test_sigma_is_positive(params, inputs, mode):
    assert bool(jnp.all(_embed(params, inputs, mode).sigma > 0))


def test_same_rng_gives_the_same_sample(params, inputs):
    np.testing.assert_array_equal(_embed(params, inputs, seed=3).sample, _embed(params, inputs, seed=3).sample)


def test_different_rng_gives_a_different_sample(params, inputs):
    a, b = _embed(params, inputs, seed=3), _embed(params, inputs, seed=5)
    np.testing.assert_array_equal(a.mu, b.mu)
    assert not np.allclose(a.sample, b.sample)


def test_deterministic_sample_is_mu(params, inputs):
    prior = _embed(params, inputs, deterministic=True)
    np.testing.assert_array_equal(prior.sample, prior.mu)
    np.testing.assert_array_equal(prior.mu, _embed(params, inputs).mu)


def test_mouth_region_does_not_reach_the_prior(params, inputs):
    noise = jax.random.uniform(jax.random.key(7), inputs["frames"].shape, minval=-1.0, maxval=1.0)
    changed = jnp.where(inputs["mouth_mask"][..., None] > 0, noise, inputs["frames"])
    a = _embed(params, inputs, "video", deterministic=True)
    b = _embed(params, {**inputs, "frames": changed}, "video", deterministic=True)
    np.testing.assert_allclose(a.mu, b.mu, rtol=1e-6, atol=1e-6)


def test_video_only_prior_has_no_spread(params, inputs):
    # Zeroed audio makes every frame's query equal, so every frame gets the same feature (σ² = 0).
    np.testing.assert_allclose(_embed(params, inputs, "video").sigma, np.sqrt(EPS), rtol=1e-2)


def test_dropped_video_is_audio_only(params, inputs):
    dropped = _embed(params, inputs, model=MODEL.clone(p_audio_drop=0.0, p_video_drop=1.0), train=True, deterministic=True)
    np.testing.assert_allclose(dropped.mu, _embed(params, inputs, "audio", deterministic=True).mu, rtol=1e-6, atol=1e-6)


def test_dropped_audio_is_video_only(params, inputs):
    dropped = _embed(params, inputs, model=MODEL.clone(p_audio_drop=1.0, p_video_drop=0.0), train=True, deterministic=True)
    np.testing.assert_allclose(dropped.mu, _embed(params, inputs, "video", deterministic=True).mu, rtol=1e-6, atol=1e-6)


def test_modality_dropout_never_drops_both():
    keep_audio, keep_video = modality_keep_masks(jax.random.key(0), 100_000, 0.3, 0.45)
    assert not bool(jnp.any(~keep_audio & ~keep_video))
    assert abs(float(jnp.mean(~keep_audio)) - 0.3) < 0.01
    assert abs(float(jnp.mean(~keep_video)) - 0.45) < 0.01


def test_modality_dropout_rejects_rates_that_would_drop_both():
    with pytest.raises(ValueError, match="never both dropped"):
        modality_keep_masks(jax.random.key(0), 4, 0.6, 0.5)


def _info_nce_reference(embeddings, labels, temperature):
    """Eq. 8 anchor by anchor: −log(ω(s^p) / (ω(s^p) + Σ_n ω(s^n))), mean over positives, then anchors."""
    z = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    anchor_losses = []
    for i in range(len(labels)):
        positives = [j for j in range(len(labels)) if j != i and labels[j] == labels[i]]
        negatives = [j for j in range(len(labels)) if labels[j] != labels[i]]
        if not positives:
            continue
        omega = lambda j: np.exp(np.dot(z[i], z[j]) / temperature)  # noqa: E731  (eq. 7)
        neg_sum = sum(omega(n) for n in negatives)
        anchor_losses.append(np.mean([-np.log(omega(p) / (omega(p) + neg_sum)) for p in positives]))
    return np.mean(anchor_losses)


def test_info_nce_matches_the_reference():
    rng = np.random.default_rng(0)
    embeddings = rng.standard_normal((9, 6))
    labels = np.array([0, 0, 1, 1, 1, 2, 3, 3, 4])  # labels 2 and 4: anchors without a positive
    got = info_nce(jnp.asarray(embeddings, jnp.float32), jnp.asarray(labels), 0.5)
    np.testing.assert_allclose(got, _info_nce_reference(embeddings, labels, 0.5), rtol=1e-5)


def test_info_nce_without_negatives_is_zero_with_finite_gradient():
    embeddings = jnp.asarray(np.random.default_rng(1).standard_normal((4, 6)), jnp.float32)
    labels = jnp.zeros((4,), jnp.int32)
    loss, grad = jax.value_and_grad(info_nce)(embeddings, labels, 0.1)
    assert float(loss) == pytest.approx(0.0, abs=1e-6)
    assert bool(jnp.all(jnp.isfinite(grad)))
