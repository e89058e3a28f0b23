"""ReferenceNet conditions the denoiser; a clip's conditions are computed once and every sampler step
evaluates all guidance branches in one U-Net call; a dropped condition is what training dropped."""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moee_jax.configs import stage2
from moee_jax.diffusion import SamplerConfig, make_plan, make_schedule
from moee_jax.inference.sampling import branch_conditions, sample_clip
from moee_jax.models.system import MoEESystem
from moee_jax.models.unet import VideoUNet
from tests.reference_models import rel_err
from tests.train_helpers import fake_batch, wake

B = 1


# The tiny system's init and conditioning compile (~3.5 CPU minutes on 2 cores): the slow suite.
# The default suite samples through the same code in test_animate (guided clips, palettes, nulls).
pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def model():
    """The tiny system with every zero-initialised output woken, and one clip's conditions."""
    config = stage2.get_config("tiny")
    system = MoEESystem(config)
    batch = fake_batch(config, B)
    params = wake(nn.unbox(jax.jit(system.init)(jax.random.key(0), batch)), 1)
    latents, _, inputs = system.encode(params, batch, drop=False)
    cond = jax.jit(lambda p, i: system.conditions(p, i, with_nulls=True))(params, inputs)
    return system, params, cond, latents.shape


@pytest.fixture(scope="module")
def denoise(model):
    system, params, _, _ = model

    @jax.jit
    def run(cond, x):
        return system.denoise(params, cond, x, jnp.full((x.shape[0],), 500)).prediction

    return run


def _plan(name="ddim", steps=2):
    schedule = make_schedule(rescale_zero_terminal_snr=True, prediction_type="v_prediction")
    return make_plan(SamplerConfig(name, num_steps=steps, spacing="trailing"), schedule)


def test_reference_features_mirror_the_unet_blocks(model):
    system, _, cond, _ = model
    leaf = cond.reference["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["self_attn_states"]
    h = cond.ref_latents.shape[1]
    assert leaf.shape == (B, h * h, system.unet.config.block_out_channels[0])
    # Only blocks with attention read the reference: tiny has it in the first down block, the mid block
    # and the last up block.
    assert set(cond.reference) == {"down_blocks_0", "mid_block", "up_blocks_1"}


def test_denoiser_output_changes_with_the_reference_image(model, denoise):
    system, params, cond, shape = model
    x = jnp.ones(shape)
    other = dataclasses.replace(cond, reference=jax.tree_util.tree_map(lambda r: r + 1.0, cond.reference), ref_latents=cond.ref_latents + 1.0)
    assert rel_err(denoise(cond, x), denoise(other, x)) > 1e-3


def test_dropped_reference_does_not_reach_the_output(model, denoise):
    _, _, cond, shape = model
    x = jnp.ones(shape)
    drop = dataclasses.replace(cond, reference_keep=jnp.zeros((B,), bool))
    other = dataclasses.replace(drop, reference=jax.tree_util.tree_map(lambda r: r + 1.0, cond.reference), ref_latents=cond.ref_latents + 1.0)
    np.testing.assert_allclose(denoise(drop, x), denoise(other, x), atol=1e-6)


def test_branches_drop_audio_and_emotion_to_what_training_dropped(model):
    _, _, cond, _ = model
    names = ("reference", "audio", "emotion")
    keep = jnp.array([[True, True, True], [True, False, False]])
    branches = branch_conditions(cond, names, keep)
    np.testing.assert_array_equal(branches.audio[0], cond.audio[0])
    np.testing.assert_array_equal(branches.audio[1], cond.null_audio[0])  # all-zero windows' tokens, not zeros
    np.testing.assert_array_equal(branches.emotion.tokens[1], cond.null_emotion.tokens[0])  # learned null tokens
    assert bool(branches.emotion.palette_keep[0]) and not bool(branches.emotion.palette_keep[1])  # and no palette


@pytest.mark.slow  # samples without jit (~1.5 CPU minutes)
def test_unet_runs_once_per_sampler_step_for_every_branch(model, monkeypatch):
    """Executed eagerly (``disable_jit`` turns the sampler's scan into a Python loop), so the counts
    are real executions: all CFG branches in one U-Net call per step; ReferenceNet never inside."""
    system, params, cond, shape = model
    calls = {"refnet": 0, "unet": 0}
    original_apply = VideoUNet.apply

    def counting_apply(self, *args, **kwargs):
        calls["refnet" if kwargs.get("collect_reference") else "unet"] += 1
        return original_apply(self, *args, **kwargs)

    monkeypatch.setattr(VideoUNet, "apply", counting_apply)
    x_T = jnp.asarray(np.random.default_rng(1).standard_normal(shape), jnp.float32)
    with jax.disable_jit():
        out = sample_clip(lambda c, x, t: system.denoise(params, c, x, t).prediction, cond, _plan(),
                          {"reference": 2.0, "audio": 3.0, "emotion": 1.5}, x_T)  # fmt: skip
    assert calls == {"refnet": 0, "unet": 2}
    assert out.shape == x_T.shape and bool(jnp.isfinite(out).all())


def test_guidance_scales_and_palettes_change_the_clip(model):
    system, params, cond, shape = model
    x_T = jnp.asarray(np.random.default_rng(2).standard_normal(shape), jnp.float32)
    plan = _plan("dpmpp_2m", 3)

    @functools.partial(jax.jit, static_argnums=1)
    def run(c, scales):
        return sample_clip(lambda cc, x, t: system.denoise(params, cc, x, t).prediction, c, plan, dict(scales), x_T)

    base = run(cond, (("audio", 1.0), ("emotion", 3.0), ("reference", 1.0)))
    assert rel_err(base, run(cond, (("audio", 2.0), ("emotion", 3.0), ("reference", 1.0)))) > 1e-4
    sad = dataclasses.replace(cond, emotion=dataclasses.replace(cond.emotion, palette=jnp.asarray([[0, 1.0, 0, 0, 0, 0]])))
    assert rel_err(base, run(sad, (("audio", 1.0), ("emotion", 3.0), ("reference", 1.0)))) > 1e-4


def test_missing_guidance_scale_is_named(model):
    system, params, cond, shape = model
    with pytest.raises(ValueError, match="audio"):
        sample_clip(lambda c, x, t: x, cond, _plan(), {"reference": 2.0, "emotion": 1.0}, jnp.zeros(shape))
