"""One training step of a stage: loss and gradients (optionally accumulated over micro-batches),
the optimizer update, the EMA, and a guard that skips a step whose loss or gradients are not finite.

:func:`make_step` builds ``step(state, batch, extra) → (state, metrics)`` for
:class:`~moee_jax.train.trainer.Trainer` to compile once with explicit shardings; ``extra`` holds
the LPIPS parameters when the perceptual loss is on.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from moee_jax.train.optim import ema_decay, ema_update
from moee_jax.train.partition import merge_params
from moee_jax.train.stages import Stage
from moee_jax.train.state import TrainState


def stage_loss(stage: Stage, lpips_module=None) -> Callable:
    """``loss(trainable, frozen, batch, rng, extra) → (loss, metrics)`` of ``stage``, with the LPIPS
    function built from ``extra["lpips"]`` params when ``lpips_module`` is given."""

    def loss(trainable, frozen, batch, rng, extra):
        fns = {}
        if lpips_module is not None:
            fns["lpips"] = lambda a, b: lpips_module.apply({"params": extra["lpips"]}, a, b)
        return stage.loss(merge_params(trainable, frozen), batch, rng, fns)

    return loss


def make_step(stage: Stage, tx: optax.GradientTransformation, schedule: optax.Schedule, *, accum: int = 1,
              ema: float = 0.0, lpips_module=None) -> Callable:  # fmt: skip
    """The training step of ``stage``: ``accum`` micro-batches per step (the batch split along its
    leading axis), AdamW through ``tx``, an EMA of decay ``ema`` (with warm-up) when the state has
    one; a non-finite loss or gradient norm leaves the state untouched and counts a bad step."""
    grad_fn = jax.value_and_grad(stage_loss(stage, lpips_module), has_aux=True)

    def gradients(state: TrainState, batch: dict, rng, extra):
        if accum == 1:
            return grad_fn(state.trainable, state.frozen, batch, rng, extra)
        micro = jax.tree_util.tree_map(lambda x: x.reshape((accum, x.shape[0] // accum) + x.shape[1:]), batch)

        def body(carry, xs):
            i, mb = xs
            (l, t), g = grad_fn(state.trainable, state.frozen, mb, jax.random.fold_in(rng, i), extra)
            acc_l, acc_t, acc_g = carry
            return (acc_l + l, jax.tree_util.tree_map(jnp.add, acc_t, t), jax.tree_util.tree_map(jnp.add, acc_g, g)), None

        zeros_g = jax.tree_util.tree_map(jnp.zeros_like, state.trainable)
        (_, t0), _ = jax.eval_shape(grad_fn, state.trainable, state.frozen, jax.tree_util.tree_map(lambda x: x[0], micro), rng, extra)
        zeros_t = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), t0)
        (loss, terms, grads), _ = jax.lax.scan(body, (jnp.zeros(()), zeros_t, zeros_g), (jnp.arange(accum), micro))
        scale = lambda x: x / accum  # noqa: E731
        return (loss / accum, jax.tree_util.tree_map(scale, terms)), jax.tree_util.tree_map(scale, grads)

    def step(state: TrainState, batch: dict, extra: dict):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        (loss, terms), grads = gradients(state, batch, rng, extra)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        new_ema = None if state.ema is None else ema_update(state.ema, trainable, ema_decay(ema, state.step))

        def pick(new, old):
            return jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)

        new_state = state.replace(
            step=state.step + 1,
            trainable=pick(trainable, state.trainable),
            opt_state=pick(opt_state, state.opt_state),
            ema=None if new_ema is None else pick(new_ema, state.ema),
            bad_steps=jnp.where(finite, 0, state.bad_steps + 1),
            skipped=state.skipped + (~finite).astype(jnp.int32),
        )
        return new_state, {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step), **terms}

    return step
