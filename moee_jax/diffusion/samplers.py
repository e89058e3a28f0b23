"""Jittable DDIM and DPM-Solver++(2M) samplers that step exactly like diffusers' schedulers.

Each sampler is split into a *plan* and a *step*:

* the plan (:func:`ddim_plan`, :func:`dpmpp_2m_plan`) is built eagerly in float64 NumPy from a
  concrete :class:`~moee_jax.diffusion.schedules.NoiseSchedule` (outside ``jit``, or with the
  schedule closed over): the timesteps and every per-step coefficient, as float32 ``(N,)`` arrays in
  a pytree whose only static fields are the prediction type and whether noise is drawn;
* the step (:func:`ddim_step`, :func:`dpmpp_2m_step`) applies step ``i`` of a plan; ``i`` may be traced.

:func:`run_sampler` runs a whole trajectory with one ``jax.lax.scan`` over the steps. The denoiser is
``model_fn(x, t) -> model_output`` with ``x`` of shape ``(B, ...)`` and ``t`` the step's timestep
broadcast to int32 ``(B,)``; it predicts the schedule's ``prediction_type``.

Timestep spacings ("leading", "trailing", "linspace"; Lin et al. 2024, Table 2) follow each diffusers
scheduler's ``set_timesteps``, which differ between DDIM and DPM-Solver. One deliberate deviation: for
"trailing", diffusers' float ``np.arange`` sometimes overshoots and appends a spurious timestep ``-1``
(e.g. 1000 training steps, 61 inference steps); we always produce exactly ``num_steps`` timesteps.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from moee_jax.diffusion.schedules import NoiseSchedule, x0_and_eps_from_output

SPACINGS: tuple[str, ...] = ("leading", "trailing", "linspace")
SAMPLERS: tuple[str, ...] = ("ddim", "dpmpp_2m")

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def _check_num_steps(num_steps: int, num_train_timesteps: int) -> None:
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps={num_steps}; allowed values: 1 ..= num_train_timesteps ({num_train_timesteps})")


def _check_spacing(spacing: str) -> None:
    if spacing not in SPACINGS:
        raise ValueError(f"spacing={spacing!r}; allowed values: {SPACINGS}")


def _trailing(num_train_timesteps: int, num_steps: int) -> np.ndarray:
    # Same float arange as diffusers, cut to num_steps: its overshoot would add a timestep -1.
    ratio = num_train_timesteps / num_steps
    return np.round(np.arange(num_train_timesteps, 0, -ratio))[:num_steps].astype(np.int64) - 1


def ddim_timesteps(num_train_timesteps: int, num_steps: int, spacing: str, steps_offset: int = 0) -> np.ndarray:
    """Descending int64 ``(num_steps,)`` timesteps of diffusers' ``DDIMScheduler.set_timesteps``.

    "leading": ``k · (T // N) + steps_offset``; "trailing": ``round(T - k · T/N) - 1``; "linspace":
    ``round(linspace(0, T - 1, N))``. ``steps_offset`` applies to "leading" only, as in diffusers.
    """
    _check_spacing(spacing)
    _check_num_steps(num_steps, num_train_timesteps)
    if spacing == "leading":
        ratio = num_train_timesteps // num_steps
        return (np.arange(num_steps)[::-1] * ratio + steps_offset).astype(np.int64)
    if spacing == "trailing":
        return _trailing(num_train_timesteps, num_steps)
    return np.linspace(0, num_train_timesteps - 1, num_steps).round()[::-1].astype(np.int64)


def dpmpp_timesteps(num_train_timesteps: int, num_steps: int, spacing: str, steps_offset: int = 0) -> np.ndarray:
    """Descending int64 ``(num_steps,)`` timesteps of ``DPMSolverMultistepScheduler.set_timesteps``.

    Unlike DDIM, "leading" and "linspace" lay out ``N + 1`` points and drop the last (t = 0):
    "leading": ``k · (T // (N + 1)) + steps_offset`` for k = N..1; "linspace":
    ``round(linspace(0, T - 1, N + 1))[1:]``; "trailing" is as for DDIM. (diffusers'
    ``lambda_min_clipped`` is fixed at its default −∞, so the range always ends at T.)
    """
    _check_spacing(spacing)
    _check_num_steps(num_steps, num_train_timesteps)
    if spacing == "leading":
        ts = (np.arange(num_steps + 1) * (num_train_timesteps // (num_steps + 1)))[::-1][:-1] + steps_offset
    elif spacing == "trailing":
        ts = _trailing(num_train_timesteps, num_steps)
    else:
        ts = np.linspace(0, num_train_timesteps - 1, num_steps + 1).round()[::-1][:-1]
    ts = ts.astype(np.int64)
    # diffusers locates a step by its timestep value, so repeated timesteps would be ambiguous.
    if np.any(np.diff(ts) >= 0):
        raise ValueError(f"num_steps={num_steps} is too large for spacing={spacing!r}: timesteps {ts} repeat")
    return ts


def _f32(values: np.ndarray) -> jax.Array:
    return jnp.asarray(values, dtype=jnp.float32)


def _coef(values: jax.Array, i: jax.Array | int, like: jax.Array) -> jax.Array:
    """Entry ``i`` of a per-step coefficient array, as a scalar of ``like``'s dtype."""
    return values[i].astype(like.dtype)


# --------------------------------------------------------------------------------------------- DDIM


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DDIMPlan:
    """Per-step DDIM coefficients (Song et al. 2021, eq. 12 and 16), each float32 ``(N,)`` unless noted.

    Step i maps x_t (t = ``timesteps[i]``) to x_prev = ``sqrt_alpha_prev`` · x̂_0 + ``direction`` · ε̂
    + ``noise_std`` · z, with x̂_0, ε̂ recovered through ``sqrt_alpha`` = sqrt(ᾱ_t) and
    ``sqrt_one_minus_alpha`` = sqrt(1 - ᾱ_t).
    """

    timesteps: jax.Array  # int32 (N,)
    sqrt_alpha: jax.Array
    sqrt_one_minus_alpha: jax.Array
    sqrt_alpha_prev: jax.Array
    direction: jax.Array
    noise_std: jax.Array
    prediction_type: str = dataclasses.field(metadata=dict(static=True))
    stochastic: bool = dataclasses.field(metadata=dict(static=True))

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]


def ddim_plan(
    schedule: NoiseSchedule,
    num_steps: int,
    spacing: str,
    *,
    eta: float = 0.0,
    steps_offset: int = 0,
    set_alpha_to_one: bool = True,
) -> DDIMPlan:
    """Plan ``num_steps`` DDIM steps (Song et al. 2021, eq. 12; σ_t(η) from eq. 16) as ``DDIMScheduler``.

    As in diffusers, the "previous" timestep of t is ``t - T // num_steps`` whatever the spacing, and
    below 0 it uses ᾱ = 1 (``set_alpha_to_one``) or ᾱ_0. η = 0 is deterministic DDIM, η = 1 is
    DDPM-like. diffusers' ``clip_sample`` / ``thresholding`` (pixel-space options) are not supported:
    compare against diffusers with ``clip_sample=False``. Must run on a concrete schedule (not a tracer).
    """
    if eta < 0:
        raise ValueError(f"eta={eta}; must be >= 0")
    T = schedule.num_train_timesteps
    ts = ddim_timesteps(T, num_steps, spacing, steps_offset)
    if ts.max() >= T:
        raise ValueError(f"steps_offset={steps_offset} pushes timestep {ts.max()} past num_train_timesteps={T}")
    ac = np.asarray(schedule.alphas_cumprod, dtype=np.float64)
    final = 1.0 if set_alpha_to_one else ac[0]
    prev = ts - T // num_steps
    a_t = ac[ts]
    a_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], final)
    variance = (1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)
    std = eta * np.sqrt(variance)
    return DDIMPlan(
        timesteps=jnp.asarray(ts, dtype=jnp.int32),
        sqrt_alpha=_f32(np.sqrt(a_t)),
        sqrt_one_minus_alpha=_f32(np.sqrt(1.0 - a_t)),
        sqrt_alpha_prev=_f32(np.sqrt(a_prev)),
        # 1 - ᾱ_prev - σ² is >= 0 analytically; clamp the rounding error that would make sqrt NaN at η = 1.
        direction=_f32(np.sqrt(np.maximum(1.0 - a_prev - std**2, 0.0))),
        noise_std=_f32(std),
        prediction_type=schedule.prediction_type,
        stochastic=eta > 0,
    )


def ddim_step(
    plan: DDIMPlan,
    i: jax.Array | int,
    model_output: jax.Array,
    x: jax.Array,
    noise: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Apply DDIM step ``i`` as ``DDIMScheduler.step`` does: returns ``(x_prev, x̂_0)``, shaped like ``x``.

    ``model_output``, ``x``: ``(B, ...)``. ``noise`` (z ~ N(0, I), shaped like ``x``) is required when
    the plan has η > 0 and plays the role of diffusers' ``variance_noise``.
    """
    if plan.stochastic and noise is None:
        raise ValueError("noise is required: this DDIM plan has eta > 0")
    x0, eps = x0_and_eps_from_output(
        model_output,
        x,
        _coef(plan.sqrt_alpha, i, x),
        _coef(plan.sqrt_one_minus_alpha, i, x),
        plan.prediction_type,
    )
    x_prev = _coef(plan.sqrt_alpha_prev, i, x) * x0 + _coef(plan.direction, i, x) * eps
    if plan.stochastic:
        x_prev = x_prev + _coef(plan.noise_std, i, x) * noise
    return x_prev.astype(x.dtype), x0


def ddim_noise_keys(rng: jax.Array, num_steps: int) -> jax.Array:
    """Keys of a stochastic DDIM trajectory: step i draws ``jax.random.normal(keys[i], x.shape, x.dtype)``."""
    return jax.random.split(rng, num_steps)


def ddim_sample(plan: DDIMPlan, model_fn: ModelFn, x_T: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """Run DDIM from ``x_T`` ``(B, ...)`` to x_0 in one ``lax.scan``; ``rng`` is needed iff η > 0."""
    if plan.stochastic and rng is None:
        raise ValueError("rng is required: this DDIM plan has eta > 0")
    batch = x_T.shape[0]
    keys = ddim_noise_keys(rng, plan.num_steps) if plan.stochastic else None

    def body(x, i):
        t = jnp.broadcast_to(plan.timesteps[i], (batch,))
        noise = jax.random.normal(keys[i], x.shape, x.dtype) if plan.stochastic else None
        x, _ = ddim_step(plan, i, model_fn(x, t), x, noise)
        return x, None

    x, _ = jax.lax.scan(body, x_T, jnp.arange(plan.num_steps))
    return x


# ------------------------------------------------------------------------------- DPM-Solver++(2M)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DPMSolverPlan:
    """Per-step DPM-Solver++(2M) coefficients (Lu et al. 2022, Alg. 2), each float32 ``(N,)`` unless noted.

    With α_s, σ_s at the current timestep, α_t, σ_t at the next, h = λ_t - λ_s (λ = log α/σ) and
    r = h_prev / h, step i maps x_s to
    x_t = (σ_t/σ_s) x_s + α_t (1 - e^{-h}) D_0 + α_t (1 - e^{-h})/(2r) (D_0 - D_prev),
    where D_0 = x̂_0 now and D_prev = x̂_0 of the previous step. ``sample_coef`` = σ_t/σ_s,
    ``x0_coef`` = α_t (1 - e^{-h}), ``correction_coef`` the last factor, zero on first-order steps.
    """

    timesteps: jax.Array  # int32 (N,)
    alpha: jax.Array  # α_s: converts the model output to x̂_0
    sigma: jax.Array  # σ_s
    sample_coef: jax.Array
    x0_coef: jax.Array
    correction_coef: jax.Array
    prediction_type: str = dataclasses.field(metadata=dict(static=True))

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]


def dpmpp_2m_plan(schedule: NoiseSchedule, num_steps: int, spacing: str, *, steps_offset: int = 0) -> DPMSolverPlan:
    """Plan DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) as diffusers' ``DPMSolverMultistepScheduler``.

    Matches diffusers with ``algorithm_type="dpmsolver++"``, ``solver_order=2``, ``solver_type="midpoint"``,
    ``lower_order_final=True``, ``final_sigmas_type="zero"``: the first step (no history) and the last
    step (to σ = 0) are first order (equivalent to DDIM), the rest second order. With a zero-terminal-SNR
    schedule, ᾱ_{T-1} is replaced by 2^-24 as diffusers does, so that the first σ/α stays finite.
    Must run on a concrete schedule (not a tracer).
    """
    T = schedule.num_train_timesteps
    ts = dpmpp_timesteps(T, num_steps, spacing, steps_offset)
    if ts.max() >= T:
        raise ValueError(f"steps_offset={steps_offset} pushes timestep {ts.max()} past num_train_timesteps={T}")
    ac = np.asarray(schedule.alphas_cumprod, dtype=np.float32)
    if schedule.rescale_zero_terminal_snr:
        ac = ac.copy()
        ac[-1] = 2.0**-24
    ac = ac.astype(np.float64)
    # Noise-to-signal ratios σ/α at the steps then 0; diffusers stores them as float32.
    ratio = np.sqrt((1.0 - ac[ts]) / ac[ts])
    ratio = np.concatenate([ratio, [0.0]]).astype(np.float32).astype(np.float64)
    alpha = 1.0 / np.sqrt(ratio**2 + 1.0)
    sigma = ratio * alpha
    # e^{-h} = (σ_t/α_t)/(σ_s/α_s), exactly 0 on the final step to σ = 0, where h = ∞.
    exp_neg_h = ratio[1:] / ratio[:-1]
    x0_coef = alpha[1:] * (1.0 - exp_neg_h)
    # Second order on steps 1 .. N-2 only: step 0 has no history and step N-1 ends at λ = ∞.
    lam = -np.log(ratio[:-1])
    h = lam[2:] - lam[1:-1]
    h_prev = lam[1:-1] - lam[:-2]
    correction = np.zeros(num_steps)
    correction[1:-1] = 0.5 * x0_coef[1:-1] * h / h_prev
    return DPMSolverPlan(
        timesteps=jnp.asarray(ts, dtype=jnp.int32),
        alpha=_f32(alpha[:-1]),
        sigma=_f32(sigma[:-1]),
        sample_coef=_f32(sigma[1:] / sigma[:-1]),
        x0_coef=_f32(x0_coef),
        correction_coef=_f32(correction),
        prediction_type=schedule.prediction_type,
    )


def dpmpp_2m_step(
    plan: DPMSolverPlan,
    i: jax.Array | int,
    model_output: jax.Array,
    x: jax.Array,
    prev_x0: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Apply DPM-Solver++(2M) step ``i`` as diffusers' ``step`` does: returns ``(x_next, x̂_0)``, like ``x``.

    ``prev_x0`` is the x̂_0 returned by step ``i - 1``; on step 0 it is ignored (pass zeros).
    """
    x0, _ = x0_and_eps_from_output(model_output, x, _coef(plan.alpha, i, x), _coef(plan.sigma, i, x), plan.prediction_type)
    x_next = _coef(plan.sample_coef, i, x) * x + _coef(plan.x0_coef, i, x) * x0 + _coef(plan.correction_coef, i, x) * (x0 - prev_x0)
    return x_next.astype(x.dtype), x0


def dpmpp_2m_sample(plan: DPMSolverPlan, model_fn: ModelFn, x_T: jax.Array) -> jax.Array:
    """Run DPM-Solver++(2M) from ``x_T`` ``(B, ...)`` to x_0 in one ``lax.scan`` (deterministic)."""
    batch = x_T.shape[0]

    def body(carry, i):
        x, prev_x0 = carry
        t = jnp.broadcast_to(plan.timesteps[i], (batch,))
        x, x0 = dpmpp_2m_step(plan, i, model_fn(x, t), x, prev_x0)
        return (x, x0.astype(x.dtype)), None

    (x, _), _ = jax.lax.scan(body, (x_T, jnp.zeros_like(x_T)), jnp.arange(plan.num_steps))
    return x


# ---------------------------------------------------------------------------------- front door


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """Which sampler to run and how: ``name`` in :data:`SAMPLERS`, ``spacing`` in :data:`SPACINGS`.

    ``eta`` (DDIM stochasticity) must be 0 for ``"dpmpp_2m"``; ``set_alpha_to_one`` is DDIM-only;
    ``steps_offset`` affects "leading" spacing only.
    """

    name: str = "ddim"
    num_steps: int = 25
    spacing: str = "trailing"
    eta: float = 0.0
    steps_offset: int = 0
    set_alpha_to_one: bool = True


def make_plan(config: SamplerConfig, schedule: NoiseSchedule) -> DDIMPlan | DPMSolverPlan:
    """Build the plan ``config`` describes on ``schedule`` (eagerly, in NumPy)."""
    if config.name == "ddim":
        return ddim_plan(
            schedule,
            config.num_steps,
            config.spacing,
            eta=config.eta,
            steps_offset=config.steps_offset,
            set_alpha_to_one=config.set_alpha_to_one,
        )
    if config.name == "dpmpp_2m":
        if config.eta != 0:
            raise ValueError(f"eta={config.eta}; the dpmpp_2m sampler is deterministic and allows only eta=0")
        return dpmpp_2m_plan(schedule, config.num_steps, config.spacing, steps_offset=config.steps_offset)
    raise ValueError(f"sampler name={config.name!r}; allowed values: {SAMPLERS}")


def run_sampler(plan: DDIMPlan | DPMSolverPlan, model_fn: ModelFn, x_T: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """Run ``plan`` from ``x_T`` ``(B, ...)`` to x_0 (same shape). Jittable with ``model_fn`` static.

    ``rng`` is only used (and then required) by DDIM with η > 0.
    """
    if isinstance(plan, DDIMPlan):
        return ddim_sample(plan, model_fn, x_T, rng)
    return dpmpp_2m_sample(plan, model_fn, x_T)


def make_sampler(config: SamplerConfig, schedule: NoiseSchedule) -> Callable[..., jax.Array]:
    """A ``sampler(model_fn, x_T, rng=None) -> x_0`` running the plan of ``config`` on ``schedule``."""
    return functools.partial(run_sampler, make_plan(config, schedule))


def sample(
    model_fn: ModelFn,
    x_T: jax.Array,
    rng: jax.Array | None,
    *,
    sampler: str,
    num_steps: int,
    schedule: NoiseSchedule,
    spacing: str,
    eta: float = 0.0,
    steps_offset: int = 0,
    set_alpha_to_one: bool = True,
) -> jax.Array:
    """Denoise ``x_T`` ``(B, ...)`` to x_0 with ``sampler`` in :data:`SAMPLERS`; see :class:`SamplerConfig`.

    ``model_fn(x, t)`` gets ``t`` as int32 ``(B,)`` and predicts ``schedule.prediction_type``. Under
    ``jax.jit``, close over ``schedule`` (its arrays must be concrete for the NumPy set-up).
    """
    config = SamplerConfig(sampler, num_steps, spacing, eta, steps_offset, set_alpha_to_one)
    return run_sampler(make_plan(config, schedule), model_fn, x_T, rng)
