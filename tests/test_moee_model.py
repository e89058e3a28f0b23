"""The full model — backbone plus every conditioning path — trains (forward + backward) on a tiny
config, and on a fake 8-device mesh gives the single-device result."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moee_jax.models.moee import AudioConfig, EmotionConfig, build_moee
from moee_jax.parallel import DEFAULT_RULES, make_mesh
from moee_jax.parallel.sharding import logical_sharding, tree_shardings
from tests.reference_models import ours_unet_config, rel_err

B, F, H, W = 4, 2, 8, 8
TOKEN_DIM, AUDIO_DIM = 16, 16
WINDOW, LAYERS, D_AUDIO = 5, 3, 8
TEXT_DIM, SPEECH_DIM, EMB_AUDIO = 12, 10, 8

PATHS = {
    "latents": EmotionConfig(
        sources=("label", "text", "speech"), token_dim=TOKEN_DIM, num_tokens=4, moe_heads=2, latents_layers=1,
        latents_heads=2, text_dim=TEXT_DIM, speech_dim=SPEECH_DIM, discriminator=True, discriminator_hidden=16,
    ),
    "embedder_bank": EmotionConfig(
        sources=("embedder",), token_dim=TOKEN_DIM, num_tokens=4, moe_heads=2, embedder_dim=16, embedder_heads=2,
        embedder_audio_layers=1, embedder_layers=1, embedder_visual_channels=(8, 16), bank=True, bank_size=8,
        discriminator=True, discriminator_hidden=16,
    ),
}


def make_batch(seed=0):
    rng = np.random.default_rng(seed)
    n = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    label = np.zeros((B, 6), np.float32)
    label[np.arange(B), np.arange(B) % 6] = 1.0
    return {
        "ref_latents": n(B, H, W, 4),
        "context": n(B, 3, 16),
        "audio_windows": n(B, F, WINDOW, LAYERS, D_AUDIO),
        "emotion_label": jnp.asarray(label),
        "text_features": n(B, 5, TEXT_DIM),
        "speech_features": n(B, 7, SPEECH_DIM),
        "embedder_audio": n(B, 3, EMB_AUDIO),
        "expression_frames": n(B, 3, 16, 16, 3),
        "mouth_mask": jnp.zeros((B, 3, 16, 16)),
        "emotion_class": jnp.asarray(np.arange(B) % 7),
    }


def perturbed(params, seed=1):
    """Zero-initialised outputs (MoE experts, audio, motion) made live so every path has gradients."""
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


def loss_fn(model, params, batch, noisy, t, rng):
    out = model(params, batch, noisy, t, train=True, rng=rng)
    loss = jnp.mean(jnp.square(out.prediction - noisy))
    loss += jnp.mean(optax.softmax_cross_entropy_with_integer_labels(out.emotion_logits, batch["emotion_class"]))
    if out.vq_loss is not None:
        loss += jnp.mean(out.vq_loss)
    return loss


# The embedder path's full-model forward/backward and sharding checks take about 3 CPU minutes (its
# visual encoder); they run in the slow suite, the embedder itself in test_emotion_embedder / test_train_stages.
@pytest.fixture(scope="module", params=["latents", pytest.param("embedder_bank", marks=pytest.mark.slow)])
def setup(request):
    model = build_moee(ours_unet_config(motion_modules=True, audio_dim=AUDIO_DIM, layers_per_block=1), PATHS[request.param], AudioConfig(num_tokens=2, hidden_dim=16))
    batch = make_batch()
    noisy = jnp.asarray(np.random.default_rng(5).standard_normal((B, F, H, W, 4)), jnp.float32)
    t = jnp.array([10, 300, 600, 900])
    boxed = jax.jit(lambda r: model.init(r, batch, noisy, t))(jax.random.key(0))
    params = perturbed(nn.unbox(boxed))
    grad = jax.jit(jax.value_and_grad(lambda p, rng: loss_fn(model, p, batch, noisy, t, rng)))
    return request.param, model, boxed, params, batch, noisy, t, grad


def test_forward_and_backward_reach_every_part(setup):
    name, model, _, params, batch, noisy, t, grad = setup
    loss, grads = grad(params, jax.random.key(7))
    assert np.isfinite(float(loss))
    for part in ("reference_net", "unet", "conditioning", "discriminator"):
        norm = optax.global_norm(grads[part])
        assert np.isfinite(float(norm)) and float(norm) > 0, part
    experts = grads["unet"]["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["emotion"]
    assert float(optax.global_norm(experts)) > 0
    cond = grads["conditioning"]
    sub = "latents" if name == "latents" else "bank"
    assert float(optax.global_norm(cond[sub])) > 0
    assert float(optax.global_norm(cond["audio_projection"])) > 0


def test_sharded_full_model_equals_single_device(setup):
    if jax.device_count() < 8:
        pytest.skip("needs 8 (fake) devices")
    name, model, boxed, params, batch, noisy, t, grad = setup
    rng = jax.random.key(7)
    single_loss, single_grads = grad(params, rng)
    mesh = make_mesh((2, 2, 2))
    shardings = tree_shardings(jax.eval_shape(lambda: boxed), mesh, DEFAULT_RULES)
    data = logical_sharding(mesh, ("batch",))
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        sharded = jax.jit(
            jax.value_and_grad(lambda p, b, x, tt, r: loss_fn(model, p, b, x, tt, r)),
            in_shardings=(shardings, jax.tree_util.tree_map(lambda _: data, batch), data, data, None),
            out_shardings=(None, shardings),
        )
        loss, grads = sharded(jax.device_put(params, shardings), batch, noisy, t, rng)
    assert abs(float(loss) - float(single_loss)) <= 1e-5 * abs(float(single_loss))
    flat_s = jax.tree_util.tree_leaves(single_grads)
    flat = jax.tree_util.tree_leaves(grads)
    assert rel_err(np.concatenate([np.ravel(g) for g in flat]), np.concatenate([np.ravel(g) for g in flat_s])) < 1e-5
