"""The video U-Net's conditioning parts each do what they claim, and bad inputs are named."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moee_jax.models.emotion_moe import EmotionCondition
from moee_jax.models.face_locator import FaceLocator
from moee_jax.models.init import init_unet_params
from moee_jax.models.unet import VideoUNet
from moee_jax.nn.attention import Attention
from tests.reference_models import ours_unet_config, rel_err

B, F, M, H, W = 1, 2, 2, 8, 8
AUDIO_DIM, EMOTION_DIM = 8, 6


class CrossAttentionSlot(nn.Module):
    """A minimal emotion slot: residual cross-attention to the condition's tokens (per clip, so
    repeated over the clip's frame rows of ``x``)."""

    @nn.compact
    def __call__(self, x, emotion: EmotionCondition):
        tokens = jnp.repeat(emotion.tokens, x.shape[0] // emotion.tokens.shape[0], axis=0)
        return x + Attention(2, x.shape[-1] // 2)(x, tokens)


@pytest.fixture(scope="module")
def unet():
    return VideoUNet(
        ours_unet_config(
            motion_modules=True, audio_dim=AUDIO_DIM, layers_per_block=1, emotion_slot=CrossAttentionSlot, emotion_dim=EMOTION_DIM
        )
    )


@pytest.fixture(scope="module")
def params(unet):
    """Initialised, then perturbed so zero-initialised branches (audio, motion out) are live."""
    fresh = init_unet_params(unet, jax.random.key(0))
    leaves, tree = jax.tree_util.tree_flatten(fresh)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    return {
        "sample": jnp.asarray(rng.standard_normal((B, F, H, W, 4)), jnp.float32),
        "timesteps": jnp.array([300]),
        "context": jnp.asarray(rng.standard_normal((B, 3, 16)), jnp.float32),
        "audio": jnp.asarray(rng.standard_normal((B, F, 5, AUDIO_DIM)), jnp.float32),
        "audio_mask": jnp.ones((B, F, H, W)),
        "emotion": EmotionCondition(jnp.asarray(rng.standard_normal((B, 4, EMOTION_DIM)), jnp.float32)),
        "motion_frames": jnp.asarray(rng.standard_normal((B, M, H, W, 4)), jnp.float32),
    }


@pytest.fixture(scope="module")
def run(unet, params):
    return jax.jit(lambda kw: unet.apply({"params": params}, **kw))


def test_motion_frames_condition_the_clip_and_are_not_returned(run, inputs):
    out = run(inputs)
    assert out.shape == (B, F, H, W, 4)
    shifted = run(dict(inputs, motion_frames=inputs["motion_frames"] + 1.0))
    assert rel_err(out, shifted) > 1e-3


def test_motion_frames_reach_the_clip_only_through_temporal_attention(inputs):
    unet = VideoUNet(ours_unet_config(motion_modules=False, audio_dim=None, layers_per_block=1))
    params = init_unet_params(unet, jax.random.key(0))
    run = jax.jit(lambda s, m: unet.apply({"params": params}, s, inputs["timesteps"], inputs["context"], motion_frames=m))
    a = run(inputs["sample"], inputs["motion_frames"])
    b = run(inputs["sample"], inputs["motion_frames"] + 1.0)
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_a_single_frame_works(unet, params, inputs):
    out = jax.jit(lambda kw: unet.apply({"params": params}, **kw))(
        dict(inputs, sample=inputs["sample"][:, :1], audio=inputs["audio"][:, :1], audio_mask=None, motion_frames=None)
    )
    assert out.shape == (B, 1, H, W, 4) and bool(jnp.isfinite(out).all())


def test_zero_region_mask_removes_the_audio_effect(run, inputs):
    silent_region = run(dict(inputs, audio_mask=jnp.zeros((B, F, H, W))))
    other_audio = run(dict(inputs, audio_mask=jnp.zeros((B, F, H, W)), audio=inputs["audio"] + 1.0))
    np.testing.assert_allclose(silent_region, other_audio, atol=1e-6)
    assert rel_err(run(inputs), run(dict(inputs, audio=inputs["audio"] + 1.0))) > 1e-3


def test_emotion_slot_receives_the_emotion_tokens(run, inputs, params):
    block = params["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]
    assert "emotion" in block
    assert rel_err(run(inputs), run(dict(inputs, emotion=EmotionCondition(inputs["emotion"].tokens * -1.0)))) > 1e-3


def test_emotion_time_embedding_starts_as_the_identity_and_then_carries_the_emotion(inputs):
    unet = VideoUNet(
        ours_unet_config(motion_modules=False, audio_dim=None, layers_per_block=1, emotion_dim=EMOTION_DIM, emotion_time_embedding=True)
    )
    fresh = init_unet_params(unet, jax.random.key(0))
    assert set(fresh["emotion"]) == {"linear_1", "linear_2"}  # under unet/emotion/: one of the emotion parts
    base = {k: inputs[k] for k in ("sample", "timesteps", "context")}
    other = EmotionCondition(-inputs["emotion"].tokens)
    run = jax.jit(lambda p, e: unet.apply({"params": p}, **base, emotion=e))
    np.testing.assert_array_equal(run(fresh, inputs["emotion"]), run(fresh, other))  # zero-initialised output layer
    live = dict(fresh, emotion=jax.tree_util.tree_map(lambda p: p + 0.1, fresh["emotion"]))
    assert rel_err(run(live, inputs["emotion"]), run(live, other)) > 1e-3


def test_fresh_face_locator_changes_nothing_and_trained_one_does(unet, params, inputs):
    locator = FaceLocator(out_channels=32, channels=(8, 16))  # 2× like the tiny latents here
    mask = jnp.ones((B, F, 2 * H, 2 * W, 1))
    fl_params = locator.init(jax.random.key(3), mask)["params"]
    features = locator.apply({"params": fl_params}, mask)
    assert features.shape == (B, F, H, W, 32)
    np.testing.assert_array_equal(features, 0.0)  # zero-initialised output conv
    live = jax.tree_util.tree_map(lambda p: p + 0.1, fl_params)
    assert float(jnp.abs(locator.apply({"params": live}, mask)).max()) > 0
    base = {k: inputs[k] for k in ("sample", "timesteps", "context")}
    run = jax.jit(lambda kw: unet.apply({"params": params}, **kw))
    plain = run(base)
    located = run(dict(base, face_locator=locator.apply({"params": live}, mask)))
    assert rel_err(plain, located) > 1e-3


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda kw: dict(kw, sample=kw["sample"][..., :3]), "channels"),
        (lambda kw: dict(kw, sample=kw["sample"][:, :, :7]), "divisible"),
        (lambda kw: dict(kw, context=kw["context"][..., :5]), "context"),
        (lambda kw: dict(kw, audio=kw["audio"][:, :1]), "audio"),
        (lambda kw: dict(kw, sample=jnp.zeros((B, 31, H, W, 4)), audio=None), "at most 32 frames"),
    ],
)
def test_bad_inputs_raise_a_named_error(unet, params, inputs, change, message):
    kw = change({k: inputs[k] for k in ("sample", "timesteps", "context", "audio", "motion_frames")})
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(lambda p: unet.apply({"params": p}, **kw), params)


def test_pallas_attention_outside_tpu_says_what_to_use_instead():
    from moee_jax.nn.attention import dot_product_attention

    q = jnp.zeros((1, 4, 2, 8))
    if jax.default_backend() == "tpu":
        pytest.skip("on TPU the Pallas kernel runs")
    with pytest.raises(ValueError, match="TPU only"):
        dot_product_attention(q, q, q, implementation="pallas")
    with pytest.raises(ValueError, match="expected one of"):
        dot_product_attention(q, q, q, implementation="flash")


def test_xla_attention_is_softmax_attention_and_respects_the_mask():
    from moee_jax.nn.attention import dot_product_attention

    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 3, 2, 4)).astype(np.float32) for _ in range(3))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / 2.0
    mask = np.array([True, True, False])[None, None, None, :]
    logits = np.where(mask, logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    expected = np.einsum("bhqk,bkhd->bqhd", weights, v)
    np.testing.assert_allclose(dot_product_attention(q, k, v, jnp.asarray(mask)), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("policy", ["full", "dots"])
@pytest.mark.slow  # compiles the U-Net's gradient twice per policy
def test_rematerialised_unet_has_the_same_output_and_gradients(unet, params, inputs, policy):
    remat = VideoUNet(unet.config.replace(remat=policy))

    def loss(module, p):
        return jnp.mean(jnp.square(module.apply({"params": p}, **inputs)))

    want, want_grads = jax.jit(jax.value_and_grad(lambda p: loss(unet, p)))(params)
    got, got_grads = jax.jit(jax.value_and_grad(lambda p: loss(remat, p)))(params)
    assert rel_err(got, want) < 1e-6
    for g, w in zip(jax.tree_util.tree_leaves(got_grads), jax.tree_util.tree_leaves(want_grads)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-7)


def test_unknown_remat_policy_is_named(unet, params, inputs):
    with pytest.raises(ValueError, match="remat='sometimes'"):
        VideoUNet(unet.config.replace(remat="sometimes")).apply({"params": params}, **inputs)
