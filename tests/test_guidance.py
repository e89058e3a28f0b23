"""Nested multi-condition classifier-free guidance."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moee_jax.diffusion import guidance as G
from moee_jax.diffusion import samplers as P
from moee_jax.diffusion.schedules import make_schedule

SHAPE = (2, 3, 4, 4, 4)  # (B, F, H, W, C)


def _branches(num_branches: int, seed: int = 0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).standard_normal((num_branches, *SHAPE), dtype=np.float32))


def test_branch_keep_mask_keeps_a_growing_prefix_of_conditions():
    mask = G.branch_keep_mask(3)
    expected = np.array(
        [
            [False, False, False],  # unconditional
            [True, False, False],  # reference
            [True, True, False],  # reference + audio
            [True, True, True],  # reference + audio + emotion
        ]
    )
    assert mask.shape == (4, 3) and mask.dtype == bool
    np.testing.assert_array_equal(mask, expected)


def test_combine_nested_with_two_conditions_equals_the_formula():
    u, c1, c12 = _branches(3)
    g1, g2 = 2.5, 4.0
    expected = u + g1 * (c1 - u) + g2 * (c12 - c1)
    np.testing.assert_allclose(
        G.combine_nested(jnp.stack([u, c1, c12]), [g1, g2]), expected, rtol=1e-6, atol=1e-6
    )


def test_combine_nested_with_three_conditions_equals_the_formula():
    u, c1, c12, c123 = _branches(4)
    g1, g2, g3 = 1.5, 3.0, 0.5
    expected = u + g1 * (c1 - u) + g2 * (c12 - c1) + g3 * (c123 - c12)
    got = G.combine_nested(jnp.stack([u, c1, c12, c123]), jnp.array([g1, g2, g3]))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_unit_scales_give_the_fully_conditioned_branch():
    branches = _branches(4)
    np.testing.assert_allclose(G.combine_nested(branches, [1.0, 1.0, 1.0]), branches[-1], rtol=0, atol=1e-5)


def test_combine_nested_rejects_mismatched_scales():
    with pytest.raises(ValueError, match="len\\(scales\\) \\+ 1"):
        G.combine_nested(_branches(3), [1.0, 2.0, 3.0])


def _branch_dependent_model(x, t, keep):
    """Output depends on the row's timestep and on which conditions it keeps, so the layout is observable."""
    code = keep.astype(x.dtype) @ jnp.array([1.0, 2.0, 4.0], x.dtype)  # ((K+1)·B,)
    scale = (code + t.astype(x.dtype) / 1000.0).reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.sin(x) * (1.0 + scale)


def test_guided_model_fn_folds_branches_into_the_batch_branch_major():
    scales = jnp.array([2.0, 3.0, 1.5])
    x = _branches(1)[0]
    t = jnp.array([999, 10], dtype=jnp.int32)
    seen = {}

    def model(x_branches, t_branches, keep):
        seen.update(x=x_branches, t=t_branches, keep=keep)
        return _branch_dependent_model(x_branches, t_branches, keep)

    got = G.guided_model_fn(model, scales)(x, t)
    batch = SHAPE[0]
    assert seen["x"].shape == (4 * batch, *SHAPE[1:])
    np.testing.assert_array_equal(seen["t"], np.tile([999, 10], 4))
    np.testing.assert_array_equal(seen["keep"], np.repeat(G.branch_keep_mask(3), batch, axis=0))
    per_branch = jnp.stack(
        [_branch_dependent_model(x, t, jnp.broadcast_to(row, (batch, 3))) for row in G.branch_keep_mask(3)]
    )
    np.testing.assert_allclose(got, G.combine_nested(per_branch, scales), rtol=1e-6, atol=1e-6)


def test_guided_model_fn_calls_the_batched_model_once_per_sampler_step():
    num_steps = 3
    calls = []

    def model(x_branches, t_branches, keep):
        calls.append(x_branches.shape)
        return _branch_dependent_model(x_branches, t_branches, keep)

    model_fn = G.guided_model_fn(model, [2.0, 3.0, 1.5])
    plan = P.ddim_plan(make_schedule(prediction_type="v_prediction"), num_steps, "trailing")
    x = _branches(1)[0]
    for i in range(num_steps):
        t = jnp.broadcast_to(plan.timesteps[i], (SHAPE[0],))
        x, _ = P.ddim_step(plan, i, model_fn(x, t), x)
    assert calls == [(4 * SHAPE[0], *SHAPE[1:])] * num_steps


@pytest.mark.parametrize("scales", [(1.0, 1.0, 3.0), (2.0, 1.0, 1.0), (1.5, 2.5, 3.5), (1.0, 1.0, 1.0)])
def test_branches_of_zero_weight_are_skipped_and_the_result_is_unchanged(scales):
    branch_weights = G.branch_weights

    def model(x, t, keep):  # every branch gives a distinct, condition-dependent output
        return x * (1.0 + keep.astype(x.dtype) @ jnp.array([0.5, 2.0, -1.5]))[:, None]

    calls = []

    def counting(x, t, keep):
        calls.append(x.shape[0])
        return model(x, t, keep)

    x = jnp.arange(6.0).reshape(2, 3) + 1.0
    t = jnp.zeros((2,), jnp.int32)
    full = G.guided_model_fn(model, jnp.asarray(scales))(x, t)  # array scales: all four branches
    pruned = G.guided_model_fn(counting, np.asarray(scales))(x, t)
    np.testing.assert_allclose(pruned, full, rtol=1e-6)
    assert calls == [2 * int(np.count_nonzero(branch_weights(scales)))]
    assert calls[0] == {(1.0, 1.0, 3.0): 4, (2.0, 1.0, 1.0): 6, (1.5, 2.5, 3.5): 8, (1.0, 1.0, 1.0): 2}[tuple(scales)]
