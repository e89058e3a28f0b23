"""Discrete-time variance-preserving noise schedules and the training-side quantities built on them.

The forward process is ``x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε`` (Ho et al. 2020, eq. 4), with
``ᾱ_t = Π_{s<=t} (1 - β_s)`` for integer ``t`` in ``[0, num_train_timesteps)``.

Betas are computed in float64 NumPy and stored as float32, matching diffusers' ``DDIMScheduler`` /
``DPMSolverMultistepScheduler`` for ``linear``, ``scaled_linear`` and ``squaredcos_cap_v2``
(Nichol & Dhariwal 2021, eq. 17, with β capped at 0.999), optionally rescaled to zero terminal SNR
(Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Alg. 1).

Shapes: timesteps ``t`` are int32 ``(B,)``; samples ``x`` are ``(B, ...)`` of any rank (latents here are
``(B, F, H, W, C)`` or ``(B, H, W, C)``, channels last). Per-sample coefficients broadcast over the
trailing axes.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES: tuple[str, ...] = ("linear", "scaled_linear", "squaredcos_cap_v2", "cosine")
PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction", "sample")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    """A discrete VP schedule: float32 ``betas`` and ``alphas_cumprod`` (ᾱ), both ``(num_train_timesteps,)``.

    A pytree whose arrays are data and whose configuration strings are static, so it can be closed
    over in, or passed to, ``jax.jit``.
    """

    betas: jax.Array
    alphas_cumprod: jax.Array
    beta_schedule: str = dataclasses.field(metadata=dict(static=True))
    prediction_type: str = dataclasses.field(metadata=dict(static=True))
    rescale_zero_terminal_snr: bool = dataclasses.field(metadata=dict(static=True))

    @property
    def num_train_timesteps(self) -> int:
        return self.betas.shape[0]


def check_prediction_type(prediction_type: str) -> str:
    """Return ``prediction_type`` if known, else raise ``ValueError`` listing the allowed values."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type={prediction_type!r}; allowed values: {PREDICTION_TYPES}")
    return prediction_type


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal 2021, eq. 17: β_t = 1 - ᾱ(t+1)/ᾱ(t), ᾱ(t) = cos²((t/T + 0.008)/1.008 · π/2)."""

    def alpha_bar(u: np.ndarray) -> np.ndarray:
        return np.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    steps = np.arange(num_train_timesteps, dtype=np.float64)
    return np.minimum(1.0 - alpha_bar((steps + 1) / num_train_timesteps) / alpha_bar(steps / num_train_timesteps), max_beta)


def rescale_betas_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2024, Alg. 1: shift and scale sqrt(ᾱ) so that ᾱ_{T-1} = 0 while ᾱ_0 is unchanged.

    ``betas``: ``(T,)`` float64. Returns the rescaled ``(T,)`` float64 betas (the last one is exactly 1).
    """
    sqrt_ab = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    ab = sqrt_ab**2
    alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
    return 1.0 - alphas


def make_schedule(
    beta_schedule: str = "scaled_linear",
    num_train_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    rescale_zero_terminal_snr: bool = False,
    prediction_type: str = "epsilon",
) -> NoiseSchedule:
    """Build a :class:`NoiseSchedule` (float64 maths, float32 storage), as diffusers' schedulers do.

    ``beta_schedule``: ``"linear"`` (β linear in t), ``"scaled_linear"`` (sqrt β linear in t, the latent
    diffusion schedule), ``"squaredcos_cap_v2"`` or its alias ``"cosine"`` (``beta_start``/``beta_end``
    unused). ``prediction_type`` is what the denoiser outputs: ``"epsilon"``, ``"v_prediction"`` or
    ``"sample"``; zero terminal SNR is only meaningful with ``"v_prediction"`` or ``"sample"``
    (Lin et al. 2024, §3.2), since ε carries no information about x_0 at ᾱ = 0.
    """
    if beta_schedule not in BETA_SCHEDULES:
        raise ValueError(f"beta_schedule={beta_schedule!r}; allowed values: {BETA_SCHEDULES}")
    check_prediction_type(prediction_type)
    if num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps={num_train_timesteps}; must be >= 2")
    if beta_schedule == "linear":
        betas = np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)
    elif beta_schedule == "scaled_linear":
        betas = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float64) ** 2
    else:
        beta_schedule = "squaredcos_cap_v2"
        betas = _cosine_betas(num_train_timesteps)
    if rescale_zero_terminal_snr:
        betas = rescale_betas_zero_terminal_snr(betas)
    alphas_cumprod = np.cumprod(1.0 - betas)
    return NoiseSchedule(
        betas=jnp.asarray(betas, dtype=jnp.float32),
        alphas_cumprod=jnp.asarray(alphas_cumprod, dtype=jnp.float32),
        beta_schedule=beta_schedule,
        prediction_type=prediction_type,
        rescale_zero_terminal_snr=bool(rescale_zero_terminal_snr),
    )


def _per_sample(values: jax.Array, like: jax.Array) -> jax.Array:
    """Reshape ``(B,)`` coefficients to ``(B, 1, ..., 1)`` so they broadcast against ``like``."""
    return values.reshape(values.shape + (1,) * (like.ndim - values.ndim)).astype(like.dtype)


def _sqrt_alphas(schedule: NoiseSchedule, t: jax.Array, like: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(sqrt(ᾱ_t), sqrt(1 - ᾱ_t))`` gathered at ``t`` and shaped to broadcast against ``like``."""
    ab = schedule.alphas_cumprod[t]
    return _per_sample(jnp.sqrt(ab), like), _per_sample(jnp.sqrt(1.0 - ab), like)


def q_sample(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """Forward process x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε (Ho et al. 2020, eq. 4).

    ``x0``, ``noise``: ``(B, ...)``; ``t``: int32 ``(B,)``. Returns ``(B, ...)``.
    """
    a, s = _sqrt_alphas(schedule, t, x0)
    return a * x0 + s * noise


def velocity(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """The v target sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x_0 (Salimans & Ho 2022, §4); shapes as :func:`q_sample`."""
    a, s = _sqrt_alphas(schedule, t, x0)
    return a * noise - s * x0


def training_target(
    schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array, prediction_type: str | None = None
) -> jax.Array:
    """Regression target for ``prediction_type`` (default: the schedule's): ε, v, or x_0. Shape of ``x0``."""
    prediction_type = check_prediction_type(prediction_type or schedule.prediction_type)
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return velocity(schedule, x0, noise, t)
    return x0


def x0_and_eps_from_output(
    model_output: jax.Array,
    x_t: jax.Array,
    sqrt_alpha: jax.Array,
    sqrt_one_minus_alpha: jax.Array,
    prediction_type: str,
) -> tuple[jax.Array, jax.Array]:
    """Recover ``(x̂_0, ε̂)`` from a model output; a = sqrt(ᾱ_t), s = sqrt(1 - ᾱ_t) broadcast to ``x_t``.

    Inverts x_t = a x_0 + s ε: for ε, x_0 = (x_t - s ε)/a (DDIM, Song et al. 2021, eq. 12); for v,
    x_0 = a x_t - s v and ε = s x_t + a v (Salimans & Ho 2022, §4); for x_0, ε = (x_t - a x_0)/s.
    ``"epsilon"`` is undefined where ᾱ_t = 0 (zero terminal SNR).
    """
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return (x_t - sqrt_one_minus_alpha * model_output) / sqrt_alpha, model_output
    if prediction_type == "v_prediction":
        return (
            sqrt_alpha * x_t - sqrt_one_minus_alpha * model_output,
            sqrt_one_minus_alpha * x_t + sqrt_alpha * model_output,
        )
    return model_output, (x_t - sqrt_alpha * model_output) / sqrt_one_minus_alpha


def predict_x0_and_eps(
    schedule: NoiseSchedule,
    model_output: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    prediction_type: str | None = None,
) -> tuple[jax.Array, jax.Array]:
    """``(x̂_0, ε̂)`` from a ``prediction_type`` output (default: the schedule's), at timesteps ``t``.

    ``model_output``, ``x_t``: ``(B, ...)``; ``t``: int32 ``(B,)``. See :func:`x0_and_eps_from_output`.
    """
    a, s = _sqrt_alphas(schedule, t, x_t)
    return x0_and_eps_from_output(model_output, x_t, a, s, prediction_type or schedule.prediction_type)


def sample_timesteps(rng: jax.Array, batch: int, num_train_timesteps: int) -> jax.Array:
    """Training timesteps drawn uniformly from ``[0, num_train_timesteps)``: int32 ``(batch,)``."""
    return jax.random.randint(rng, (batch,), 0, num_train_timesteps, dtype=jnp.int32)


def offset_noise(rng: jax.Array, shape: tuple[int, ...], strength: float, dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """Training noise with a "noise offset" (Guttenberg 2023, "Diffusion with Offset Noise").

    Returns ε + strength · δ for ε ~ N(0, I) of ``shape`` and δ ~ N(0, I) of shape ``(B, 1, ..., 1, C)``:
    one value per sample and channel (channels last), shared over time and space, which lets the
    model learn to shift a sample's mean brightness. ``strength = 0`` gives plain Gaussian noise.
    """
    if len(shape) < 2:
        raise ValueError(f"shape={shape}; need at least (batch, channels)")
    base_rng, offset_rng = jax.random.split(rng)
    noise = jax.random.normal(base_rng, shape, dtype)
    offset_shape = (shape[0],) + (1,) * (len(shape) - 2) + (shape[-1],)
    return noise + jnp.asarray(strength, dtype) * jax.random.normal(offset_rng, offset_shape, dtype)


def snr(schedule: NoiseSchedule, t: jax.Array) -> jax.Array:
    """Signal-to-noise ratio ᾱ_t / (1 - ᾱ_t) at ``t``: float32 ``(B,)``; 0 at a zero-terminal-SNR end."""
    ab = schedule.alphas_cumprod[t]
    return ab / (1.0 - ab)


def min_snr_weight(schedule: NoiseSchedule, t: jax.Array, gamma: float, prediction_type: str | None = None) -> jax.Array:
    """Min-SNR-γ loss weights (Hang et al. 2023, eq. 10 and §3.4): float32 ``(B,)``.

    The weight min(SNR, γ) on the x_0-space loss, rewritten for the loss on each prediction type:
    ε → min(SNR, γ)/SNR, v → min(SNR, γ)/(SNR + 1), x_0 → min(SNR, γ). At SNR = 0 (zero terminal SNR)
    the ε weight takes its limit 1 rather than 0/0.
    """
    prediction_type = check_prediction_type(prediction_type or schedule.prediction_type)
    ratio = snr(schedule, t)
    clipped = jnp.minimum(ratio, gamma)
    if prediction_type == "epsilon":
        positive = ratio > 0
        return jnp.where(positive, clipped / jnp.where(positive, ratio, 1.0), 1.0)
    if prediction_type == "v_prediction":
        return clipped / (ratio + 1.0)
    return clipped
