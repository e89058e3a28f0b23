"""ReferenceNet conditions the denoiser, and one sampling run computes its features exactly once."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moee_jax.diffusion import SamplerConfig, make_plan, make_schedule
from moee_jax.inference.sampling import ClipConditions, make_clip_sampler, sample_clip
from moee_jax.models.init import init_unet_params
from moee_jax.models.reference import reference_config, reference_features
from moee_jax.models.unet import VideoUNet
from tests.reference_models import ours_unet_config, rel_err

B, F, H, W = 1, 2, 8, 8


@pytest.fixture(scope="module")
def models():
    cfg = ours_unet_config(motion_modules=True, audio_dim=8, layers_per_block=1)
    unet, refnet = VideoUNet(cfg), VideoUNet(reference_config(cfg))
    return unet, refnet, init_unet_params(unet, jax.random.key(1)), init_unet_params(refnet, jax.random.key(2))


@pytest.fixture(scope="module")
def cond():
    rng = np.random.default_rng(0)
    return ClipConditions(
        ref_latents=jnp.asarray(rng.standard_normal((B, H, W, 4)), jnp.float32),
        context=jnp.asarray(rng.standard_normal((B, 3, 16)), jnp.float32),
        audio=jnp.asarray(rng.standard_normal((B, F, 5, 8)), jnp.float32),
    )


@pytest.fixture(scope="module")
def denoise(models):
    unet, refnet, params, ref_params = models

    @jax.jit
    def run(ref_latents, context, x, keep):
        feats = reference_features(refnet, ref_params, ref_latents, context)
        return unet.apply({"params": params}, x, jnp.array([500]), context, reference=feats, reference_keep=keep)

    return run


def test_reference_features_mirror_the_unet_blocks(models, cond):
    unet, refnet, _, ref_params = models
    feats = reference_features(refnet, ref_params, cond.ref_latents, cond.context)
    leaf = feats["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["self_attn_states"]
    assert leaf.shape == (B, H * W, unet.config.block_out_channels[0])
    assert "up_blocks_1" in feats and "mid_block" in feats


def test_denoiser_output_changes_with_the_reference_image(denoise, cond):
    x = jnp.ones((B, F, H, W, 4))
    keep = jnp.array([True])
    a = denoise(cond.ref_latents, cond.context, x, keep)
    b = denoise(cond.ref_latents + 1.0, cond.context, x, keep)
    assert rel_err(a, b) > 1e-3


def test_dropped_reference_does_not_reach_the_output(denoise, cond):
    x = jnp.ones((B, F, H, W, 4))
    keep = jnp.array([False])
    a = denoise(cond.ref_latents, cond.context, x, keep)
    b = denoise(cond.ref_latents + 1.0, cond.context, x, keep)
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_reference_net_runs_once_per_sampling_run_and_unet_once_per_step(models, cond, monkeypatch):
    """Executed eagerly (``disable_jit`` turns the sampler's scan into a Python loop), so the
    counts are real executions: features once, and all CFG branches in one U-Net call per step."""
    unet, refnet, params, ref_params = models
    calls = {"refnet": 0, "unet": 0}
    original_apply = VideoUNet.apply

    def counting_apply(self, *args, **kwargs):
        calls["refnet" if kwargs.get("collect_reference") else "unet"] += 1
        return original_apply(self, *args, **kwargs)

    monkeypatch.setattr(VideoUNet, "apply", counting_apply)
    schedule = make_schedule(rescale_zero_terminal_snr=True, prediction_type="v_prediction")
    plan = make_plan(SamplerConfig("ddim", num_steps=2, spacing="trailing"), schedule)
    x_T = jnp.asarray(np.random.default_rng(1).standard_normal((B, F, H, W, 4)), jnp.float32)
    with jax.disable_jit():
        out = sample_clip(unet, params, refnet, ref_params, cond, plan, {"reference": 2.0, "audio": 3.0}, x_T)
    assert calls == {"refnet": 1, "unet": 2}
    assert out.shape == x_T.shape and bool(jnp.isfinite(out).all())


def test_jitted_clip_sampler_matches_eager_and_guidance_scales_matter(models, cond):
    unet, refnet, params, ref_params = models
    schedule = make_schedule(rescale_zero_terminal_snr=True, prediction_type="v_prediction")
    plan = make_plan(SamplerConfig("dpmpp_2m", num_steps=3, spacing="trailing"), schedule)
    x_T = jnp.asarray(np.random.default_rng(2).standard_normal((B, F, H, W, 4)), jnp.float32)
    sampler = make_clip_sampler(unet, refnet)
    a = sampler(params, ref_params, cond, plan, {"reference": 2.0, "audio": 1.0}, x_T)
    b = sampler(params, ref_params, cond, plan, {"reference": 1.0, "audio": 1.0}, x_T)
    eager = sample_clip(unet, params, refnet, ref_params, cond, plan, {"reference": 2.0, "audio": 1.0}, x_T)
    assert rel_err(a, eager) < 1e-5
    assert rel_err(a, b) > 1e-4


def test_missing_guidance_scale_is_named(models, cond):
    unet, refnet, params, ref_params = models
    schedule = make_schedule()
    plan = make_plan(SamplerConfig("ddim", num_steps=2), schedule)
    with pytest.raises(ValueError, match="audio"):
        sample_clip(unet, params, refnet, ref_params, cond, plan, {"reference": 2.0}, jnp.zeros((B, F, H, W, 4)))


def test_emotion_condition_with_palette_is_guided_and_the_palette_steers(cond):
    """CFG over an MoE U-Net: the emotion branch drops tokens to the null tokens, the palette
    (compound emotion) stays, and different palettes give different clips."""
    import functools

    from moee_jax.models.emotion_moe import EmotionCondition, EmotionMoE

    cfg = ours_unet_config(audio_dim=8, layers_per_block=1, emotion_slot=functools.partial(EmotionMoE, heads=2), emotion_dim=6)
    unet, refnet = VideoUNet(cfg), VideoUNet(reference_config(cfg))
    params = init_unet_params(unet, jax.random.key(1))
    params = jax.tree_util.tree_map(lambda p: p + 0.05, params)  # make the zero-initialised experts live
    ref_params = init_unet_params(refnet, jax.random.key(2))
    tokens = jnp.asarray(np.random.default_rng(3).standard_normal((B, 3, 6)), jnp.float32)
    schedule = make_schedule(rescale_zero_terminal_snr=True, prediction_type="v_prediction")
    plan = make_plan(SamplerConfig("ddim", num_steps=2, spacing="trailing"), schedule)
    x_T = jnp.asarray(np.random.default_rng(4).standard_normal((B, F, H, W, 4)), jnp.float32)
    sampler = make_clip_sampler(unet, refnet)
    scales = {"reference": 1.5, "audio": 2.0, "emotion": 3.0}

    def run(palette):
        c = ClipConditions(cond.ref_latents, cond.context, audio=cond.audio, emotion=EmotionCondition(tokens, palette))
        return sampler(params, ref_params, c, plan, scales, x_T)

    happy_surprised = jnp.asarray([[0.6, 0, 0, 0, 0, 0.4]], jnp.float32)
    sad = jnp.asarray([[0, 1.0, 0, 0, 0, 0]], jnp.float32)
    a, b = run(happy_surprised), run(sad)
    assert bool(jnp.isfinite(a).all()) and rel_err(a, b) > 1e-4
