"""DDIM and DPM-Solver++(2M): timesteps, single steps and whole jitted trajectories against diffusers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moee_jax.diffusion import samplers as P
from moee_jax.diffusion.schedules import make_schedule

SHAPE = (2, 3, 4, 4, 4)  # (B, F, H, W, C)
TOL = 1e-4

# (prediction_type, spacing, steps_offset, zero_terminal_snr)
CASES = [
    ("epsilon", "trailing", 0, False),
    ("epsilon", "leading", 1, False),
    ("v_prediction", "trailing", 0, True),
    ("v_prediction", "leading", 1, True),
    ("sample", "linspace", 0, False),
]
CASE_IDS = ["eps-trailing", "eps-leading", "v-trailing-zsnr", "v-leading-zsnr", "sample-linspace"]

# Jitted once per module; plans are traced arguments, so cases with equal shapes share a compilation.
_run = jax.jit(P.run_sampler, static_argnums=1)


@pytest.fixture(scope="module")
def diffusers(torch):
    return pytest.importorskip("diffusers")


def _schedule(prediction_type="epsilon", zero_snr=False):
    return make_schedule("scaled_linear", rescale_zero_terminal_snr=zero_snr, prediction_type=prediction_type)


def _reference(diffusers, kind, prediction_type="epsilon", spacing="leading", steps_offset=0, zero_snr=False):
    common = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        timestep_spacing=spacing,
        steps_offset=steps_offset,
        rescale_betas_zero_snr=zero_snr,
    )
    if kind == "ddim":
        return diffusers.DDIMScheduler(clip_sample=False, set_alpha_to_one=True, **common)
    return diffusers.DPMSolverMultistepScheduler(
        algorithm_type="dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
        lower_order_final=True,
        final_sigmas_type="zero",
        **common,
    )


def _rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def _toy_model(x, s, xp):
    """A fixed nonlinear denoiser of ``x`` and broadcastable ``s = t / 1000``; ``xp``: jax.numpy or torch."""
    return xp.tanh(0.8 * x) * (1.0 - 0.5 * s) + 0.3 * s * x + 0.05 * xp.cos(3.0 * x)


def toy_model_jax(x, t):
    return _toy_model(x, (t.astype(x.dtype) / 1000.0).reshape((-1,) + (1,) * (x.ndim - 1)), jnp)


def toy_model_torch(x, t, torch):
    return _toy_model(x, (t.to(x.dtype) / 1000.0).reshape((-1,) + (1,) * (x.ndim - 1)), torch)


# ------------------------------------------------------------------------------------- timesteps


@pytest.mark.parametrize("spacing", P.SPACINGS)
def test_ddim_timesteps_match_diffusers_set_timesteps(spacing, diffusers):
    for steps_offset in (0, 1):
        ref = _reference(diffusers, "ddim", spacing=spacing, steps_offset=steps_offset)
        for num_steps in (1, 7, 10, 25, 50, 333, 999):
            ref.set_timesteps(num_steps)
            np.testing.assert_array_equal(
                P.ddim_timesteps(1000, num_steps, spacing, steps_offset), ref.timesteps.numpy()
            )


@pytest.mark.parametrize("spacing", P.SPACINGS)
def test_dpmpp_timesteps_match_diffusers_set_timesteps(spacing, diffusers):
    for steps_offset in (0, 1):
        ref = _reference(diffusers, "dpmpp", spacing=spacing, steps_offset=steps_offset)
        for num_steps in (1, 7, 10, 25, 50, 333):
            ref.set_timesteps(num_steps)
            np.testing.assert_array_equal(
                P.dpmpp_timesteps(1000, num_steps, spacing, steps_offset), ref.timesteps.numpy()
            )


def test_trailing_spacing_gives_exactly_num_steps_where_diffusers_overshoots(diffusers):
    ref = _reference(diffusers, "ddim", spacing="trailing")
    ref.set_timesteps(61)
    ours = P.ddim_timesteps(1000, 61, "trailing")
    assert len(ref.timesteps) == 62 and int(ref.timesteps[-1]) == -1
    np.testing.assert_array_equal(ours, ref.timesteps.numpy()[:61])


def test_bad_sampler_arguments_raise_value_error_naming_them():
    schedule = _schedule()
    with pytest.raises(ValueError, match="num_steps=1001.*num_train_timesteps"):
        P.ddim_plan(schedule, 1001, "trailing")
    with pytest.raises(ValueError, match="num_steps=0"):
        P.dpmpp_2m_plan(schedule, 0, "trailing")
    with pytest.raises(ValueError, match="spacing='uniform'.*allowed values"):
        P.ddim_timesteps(1000, 10, "uniform")
    with pytest.raises(ValueError, match="sampler name='euler'.*allowed values"):
        P.make_plan(P.SamplerConfig(name="euler"), schedule)
    with pytest.raises(ValueError, match="eta=0.5"):
        P.make_plan(P.SamplerConfig(name="dpmpp_2m", eta=0.5), schedule)


# ---------------------------------------------------------------------------------- single steps


@pytest.mark.parametrize(("prediction_type", "spacing", "steps_offset", "zero_snr"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_single_steps_match_diffusers_step(
    prediction_type, spacing, steps_offset, zero_snr, eta, diffusers, torch
):
    num_steps = 10
    plan = P.ddim_plan(
        _schedule(prediction_type, zero_snr), num_steps, spacing, eta=eta, steps_offset=steps_offset
    )
    ref = _reference(diffusers, "ddim", prediction_type, spacing, steps_offset, zero_snr)
    ref.set_timesteps(num_steps)
    rng = np.random.default_rng(0)
    for i, t in enumerate(ref.timesteps):
        x, out, noise = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(3))
        expected = ref.step(
            torch.from_numpy(out), t, torch.from_numpy(x), eta=eta, variance_noise=torch.from_numpy(noise)
        )
        x_prev, x0 = P.ddim_step(plan, i, jnp.asarray(out), jnp.asarray(x), jnp.asarray(noise))
        assert _rel_err(x_prev, expected.prev_sample) < TOL, (i, int(t))
        assert _rel_err(x0, expected.pred_original_sample) < TOL, (i, int(t))


def test_ddim_without_set_alpha_to_one_matches_diffusers_final_step(diffusers, torch):
    plan = P.ddim_plan(_schedule(), 5, "leading", set_alpha_to_one=False)
    ref = diffusers.DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
    )
    ref.set_timesteps(5)
    rng = np.random.default_rng(0)
    x, out = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(2))
    expected = ref.step(torch.from_numpy(out), ref.timesteps[-1], torch.from_numpy(x)).prev_sample
    x_prev, _ = P.ddim_step(plan, 4, jnp.asarray(out), jnp.asarray(x))
    assert _rel_err(x_prev, expected) < TOL


@pytest.mark.parametrize(
    ("prediction_type", "spacing", "steps_offset", "zero_snr"),
    [*CASES, ("epsilon", "trailing", 0, True)],
    ids=[*CASE_IDS, "eps-trailing-zsnr"],
)
def test_dpmpp_2m_single_steps_match_diffusers_step(
    prediction_type, spacing, steps_offset, zero_snr, diffusers, torch
):
    num_steps = 10
    plan = P.dpmpp_2m_plan(
        _schedule(prediction_type, zero_snr), num_steps, spacing, steps_offset=steps_offset
    )
    ref = _reference(diffusers, "dpmpp", prediction_type, spacing, steps_offset, zero_snr)
    ref.set_timesteps(num_steps)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    for i, t in enumerate(ref.timesteps):
        out = rng.standard_normal(SHAPE).astype(np.float32)
        prev_x0 = np.zeros(SHAPE, np.float32) if i == 0 else ref.model_outputs[-1].numpy()
        expected = ref.step(torch.from_numpy(out), t, torch.from_numpy(x)).prev_sample.numpy()
        x_next, x0 = P.dpmpp_2m_step(plan, i, jnp.asarray(out), jnp.asarray(x), jnp.asarray(prev_x0))
        assert _rel_err(x0, ref.model_outputs[-1]) < TOL, (i, int(t))
        assert _rel_err(x_next, expected) < TOL, (i, int(t))
        x = expected


# ----------------------------------------------------------------------------- whole trajectories


def _diffusers_trajectory(ref, x_T, torch, eta=0.0, noises=None):
    x = torch.from_numpy(np.array(x_T))
    for i, t in enumerate(ref.timesteps):
        out = toy_model_torch(x, torch.full((x.shape[0],), int(t)), torch)
        if noises is None:
            x = ref.step(out, t, x).prev_sample
        else:
            x = ref.step(out, t, x, eta=eta, variance_noise=torch.from_numpy(np.array(noises[i]))).prev_sample
    return x.numpy()


@pytest.mark.parametrize(("prediction_type", "spacing", "steps_offset", "zero_snr"), CASES, ids=CASE_IDS)
def test_jitted_ddim_trajectory_matches_diffusers(
    prediction_type, spacing, steps_offset, zero_snr, diffusers, torch
):
    num_steps = 10
    plan = P.ddim_plan(_schedule(prediction_type, zero_snr), num_steps, spacing, steps_offset=steps_offset)
    ref = _reference(diffusers, "ddim", prediction_type, spacing, steps_offset, zero_snr)
    ref.set_timesteps(num_steps)
    x_T = jax.random.normal(jax.random.PRNGKey(1), SHAPE)
    ours = _run(plan, toy_model_jax, x_T, None)
    assert _rel_err(ours, _diffusers_trajectory(ref, x_T, torch)) < TOL


@pytest.mark.parametrize(
    ("prediction_type", "spacing", "steps_offset", "zero_snr"), CASES[1:3], ids=CASE_IDS[1:3]
)
def test_jitted_stochastic_ddim_trajectory_matches_diffusers_with_shared_noise(
    prediction_type, spacing, steps_offset, zero_snr, diffusers, torch
):
    num_steps, eta = 10, 0.5
    plan = P.ddim_plan(
        _schedule(prediction_type, zero_snr), num_steps, spacing, eta=eta, steps_offset=steps_offset
    )
    ref = _reference(diffusers, "ddim", prediction_type, spacing, steps_offset, zero_snr)
    ref.set_timesteps(num_steps)
    x_T = jax.random.normal(jax.random.PRNGKey(1), SHAPE)
    rng = jax.random.PRNGKey(2)
    noises = [jax.random.normal(k, SHAPE, jnp.float32) for k in P.ddim_noise_keys(rng, num_steps)]
    ours = _run(plan, toy_model_jax, x_T, rng)
    assert _rel_err(ours, _diffusers_trajectory(ref, x_T, torch, eta, noises)) < TOL


@pytest.mark.parametrize(
    ("prediction_type", "spacing", "steps_offset", "zero_snr"),
    [*CASES, ("epsilon", "linspace", 0, False)],
    ids=[*CASE_IDS, "eps-linspace"],
)
def test_jitted_dpmpp_2m_trajectory_matches_diffusers(
    prediction_type, spacing, steps_offset, zero_snr, diffusers, torch
):
    num_steps = 10
    plan = P.dpmpp_2m_plan(
        _schedule(prediction_type, zero_snr), num_steps, spacing, steps_offset=steps_offset
    )
    ref = _reference(diffusers, "dpmpp", prediction_type, spacing, steps_offset, zero_snr)
    ref.set_timesteps(num_steps)
    x_T = jax.random.normal(jax.random.PRNGKey(1), SHAPE)
    ours = _run(plan, toy_model_jax, x_T, None)
    assert _rel_err(ours, _diffusers_trajectory(ref, x_T, torch)) < TOL


def test_model_fn_receives_each_steps_timestep_broadcast_to_the_batch():
    plan = P.dpmpp_2m_plan(_schedule(), 4, "trailing")
    seen = []

    def recording_model(x, t):
        jax.debug.callback(lambda t: seen.append(np.asarray(t)), t)
        return jnp.zeros_like(x)

    jax.block_until_ready(jax.jit(P.run_sampler, static_argnums=1)(plan, recording_model, jnp.ones(SHAPE)))
    assert all(t.shape == (SHAPE[0],) and t.dtype == np.int32 for t in seen)
    np.testing.assert_array_equal([t[0] for t in seen], [999, 749, 499, 249])


def test_sample_and_make_sampler_equal_run_sampler_on_the_same_plan():
    schedule = _schedule("v_prediction", zero_snr=True)
    config = P.SamplerConfig(name="ddim", num_steps=10, spacing="trailing", eta=0.0)
    x_T = jax.random.normal(jax.random.PRNGKey(1), SHAPE)
    expected = _run(P.make_plan(config, schedule), toy_model_jax, x_T, None)
    via_sample = jax.jit(
        lambda x: P.sample(
            toy_model_jax, x, None, sampler="ddim", num_steps=10, schedule=schedule, spacing="trailing"
        )
    )(x_T)
    via_factory = jax.jit(lambda x: P.make_sampler(config, schedule)(toy_model_jax, x))(x_T)
    np.testing.assert_allclose(via_sample, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(via_factory, expected, rtol=1e-6, atol=1e-6)
