"""Noise schedules and training-side quantities, checked against diffusers' PyTorch ``DDIMScheduler``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moee_jax.diffusion import schedules as S

SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SHAPE = (2, 3, 4, 4, 4)  # (B, F, H, W, C)


@pytest.fixture(scope="module")
def ddim_reference(torch):
    diffusers = pytest.importorskip("diffusers")

    def build(beta_schedule: str, rescale: bool = False):
        return diffusers.DDIMScheduler(
            num_train_timesteps=1000,
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule=beta_schedule,
            rescale_betas_zero_snr=rescale,
            clip_sample=False,
        )

    return build


def _data(seed: int = 0):
    rng = np.random.default_rng(seed)
    x0 = rng.standard_normal(SHAPE).astype(np.float32)
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    t = np.array([0, 999], dtype=np.int32) if seed == 0 else rng.integers(0, 1000, SHAPE[0]).astype(np.int32)
    return x0, noise, t


@pytest.mark.parametrize("beta_schedule", SCHEDULES)
def test_betas_and_alphas_cumprod_match_diffusers(beta_schedule, ddim_reference):
    ours = S.make_schedule(beta_schedule)
    ref = ddim_reference(beta_schedule)
    np.testing.assert_allclose(ours.betas, ref.betas.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=0, atol=1e-6)
    assert ours.betas.dtype == jnp.float32 and ours.alphas_cumprod.shape == (1000,)


def test_cosine_is_an_alias_of_squaredcos_cap_v2():
    alias, canonical = S.make_schedule("cosine"), S.make_schedule("squaredcos_cap_v2")
    np.testing.assert_array_equal(alias.betas, canonical.betas)
    assert alias.beta_schedule == "squaredcos_cap_v2"


@pytest.mark.parametrize("beta_schedule", SCHEDULES)
def test_zero_terminal_snr_rescale_reaches_zero_and_matches_diffusers(beta_schedule, ddim_reference, torch):
    ours = S.make_schedule(beta_schedule, rescale_zero_terminal_snr=True)
    ref = ddim_reference(beta_schedule, rescale=True)
    assert float(ours.alphas_cumprod[-1]) == 0.0
    np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=0, atol=1e-6)
    # The scheduler rescales in float32 (up to 2e-5 relative error in betas); we rescale in float64,
    # so compare betas with diffusers' own rescale run in float64.
    rescale = pytest.importorskip("diffusers.schedulers.scheduling_ddim").rescale_zero_terminal_snr
    betas64 = rescale(
        torch.from_numpy(np.asarray(ddim_reference(beta_schedule).betas, dtype=np.float64))
    ).numpy()
    np.testing.assert_allclose(ours.betas, betas64, rtol=1e-6, atol=0)
    # Alg. 1 keeps the first step's signal level.
    np.testing.assert_allclose(
        ours.alphas_cumprod[0], S.make_schedule(beta_schedule).alphas_cumprod[0], rtol=1e-6
    )


@pytest.mark.parametrize("rescale", [False, True])
def test_q_sample_matches_diffusers_add_noise(rescale, ddim_reference, torch):
    schedule = S.make_schedule(rescale_zero_terminal_snr=rescale)
    ref = ddim_reference("scaled_linear", rescale)
    for seed in (0, 1):
        x0, noise, t = _data(seed)
        ours = S.q_sample(schedule, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
        expected = ref.add_noise(
            torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t).long()
        ).numpy()
        np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rescale", [False, True])
def test_velocity_matches_diffusers_get_velocity(rescale, ddim_reference, torch):
    schedule = S.make_schedule(rescale_zero_terminal_snr=rescale)
    ref = ddim_reference("scaled_linear", rescale)
    for seed in (0, 1):
        x0, noise, t = _data(seed)
        ours = S.velocity(schedule, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
        expected = ref.get_velocity(
            torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t).long()
        ).numpy()
        np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(3,), (3, 4, 4, 2), (3, 2, 4, 4, 2)])
def test_per_sample_coefficients_broadcast_to_any_rank(shape):
    schedule = S.make_schedule()
    t = jnp.array([0, 500, 999], dtype=jnp.int32)
    ones = jnp.ones(shape)
    noisy = S.q_sample(schedule, ones, jnp.zeros(shape), t)
    expected = np.sqrt(np.asarray(schedule.alphas_cumprod)[np.asarray(t)])
    np.testing.assert_allclose(
        noisy.reshape(3, -1), np.broadcast_to(expected[:, None], (3, noisy[0].size)), rtol=1e-6
    )


@pytest.mark.parametrize("prediction_type", S.PREDICTION_TYPES)
def test_predict_x0_and_eps_round_trips_the_training_target(prediction_type):
    schedule = S.make_schedule(prediction_type=prediction_type)
    x0, noise, _ = _data(1)
    t = jnp.array([3, 998], dtype=jnp.int32)
    x_t = S.q_sample(schedule, jnp.asarray(x0), jnp.asarray(noise), t)
    target = S.training_target(schedule, jnp.asarray(x0), jnp.asarray(noise), t)
    x0_hat, eps_hat = S.predict_x0_and_eps(schedule, target, x_t, t)
    np.testing.assert_allclose(x0_hat, x0, rtol=0, atol=1e-4)
    np.testing.assert_allclose(eps_hat, noise, rtol=0, atol=1e-4)


def test_v_prediction_round_trips_at_zero_terminal_snr():
    schedule = S.make_schedule(rescale_zero_terminal_snr=True, prediction_type="v_prediction")
    x0, noise, t = _data(0)  # t = [0, 999]: ᾱ_999 = 0
    x_t = S.q_sample(schedule, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
    v = S.training_target(schedule, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
    x0_hat, eps_hat = S.predict_x0_and_eps(schedule, v, x_t, jnp.asarray(t))
    np.testing.assert_allclose(x0_hat, x0, rtol=0, atol=1e-5)
    np.testing.assert_allclose(eps_hat, noise, rtol=0, atol=1e-5)


def test_training_target_selects_noise_velocity_or_sample():
    schedule = S.make_schedule()
    x0, noise, t = (jnp.asarray(a) for a in _data(1))
    np.testing.assert_array_equal(S.training_target(schedule, x0, noise, t, "epsilon"), noise)
    np.testing.assert_array_equal(S.training_target(schedule, x0, noise, t, "sample"), x0)
    np.testing.assert_array_equal(
        S.training_target(schedule, x0, noise, t, "v_prediction"), S.velocity(schedule, x0, noise, t)
    )


@pytest.mark.parametrize("prediction_type", S.PREDICTION_TYPES)
def test_min_snr_weight_is_finite_at_zero_terminal_snr(prediction_type):
    schedule = S.make_schedule(rescale_zero_terminal_snr=True)
    t = jnp.arange(1000, dtype=jnp.int32)
    weights = S.min_snr_weight(schedule, t, gamma=5.0, prediction_type=prediction_type)
    assert bool(jnp.all(jnp.isfinite(weights)))
    assert float(weights[-1]) == {"epsilon": 1.0, "v_prediction": 0.0, "sample": 0.0}[prediction_type]


@pytest.mark.parametrize("prediction_type", S.PREDICTION_TYPES)
def test_min_snr_weight_equals_hang_et_al_formula(prediction_type):
    schedule = S.make_schedule()
    t = jnp.array([0, 100, 400, 999], dtype=jnp.int32)
    gamma = 5.0
    ab = np.asarray(schedule.alphas_cumprod, dtype=np.float64)[np.asarray(t)]
    snr = ab / (1 - ab)
    expected = {
        "epsilon": np.minimum(snr, gamma) / snr,
        "v_prediction": np.minimum(snr, gamma) / (snr + 1),
        "sample": np.minimum(snr, gamma),
    }[prediction_type]
    np.testing.assert_allclose(S.min_snr_weight(schedule, t, gamma, prediction_type), expected, rtol=1e-5)


def test_offset_noise_shifts_each_sample_and_channel_uniformly():
    rng = jax.random.PRNGKey(0)
    plain = S.offset_noise(rng, SHAPE, 0.0)
    shifted = S.offset_noise(rng, SHAPE, 0.5)
    offset = np.asarray(shifted - plain)
    per_sample_channel = offset[:, :1, :1, :1, :]
    np.testing.assert_allclose(offset, np.broadcast_to(per_sample_channel, SHAPE), rtol=0, atol=1e-6)
    assert np.unique(np.round(per_sample_channel, 6)).size == SHAPE[0] * SHAPE[-1]


def test_sample_timesteps_are_int32_in_range():
    t = S.sample_timesteps(jax.random.PRNGKey(0), 4096, 1000)
    assert t.shape == (4096,) and t.dtype == jnp.int32
    assert int(t.min()) == 0 and int(t.max()) == 999


def test_unknown_schedule_or_prediction_type_raises_naming_the_argument():
    with pytest.raises(ValueError, match="beta_schedule='sigmoid'.*allowed values"):
        S.make_schedule("sigmoid")
    with pytest.raises(ValueError, match="prediction_type='flow'.*allowed values"):
        S.make_schedule(prediction_type="flow")
    with pytest.raises(ValueError, match="prediction_type='x'"):
        S.training_target(S.make_schedule(), jnp.zeros(SHAPE), jnp.zeros(SHAPE), jnp.zeros(2, jnp.int32), "x")
