"""The whole system — backbone plus every conditioning path — trains (forward + backward) on a tiny
config, and on a fake 8-device mesh gives the single-device result."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moee_jax.configs import stage2
from moee_jax.models.system import MoEESystem
from moee_jax.parallel import DEFAULT_RULES, make_mesh
from moee_jax.parallel.sharding import logical_sharding, tree_shardings
from moee_jax.train.losses import emotion_classification_loss
from tests.reference_models import rel_err
from tests.train_helpers import fake_batch

B, TEXT_DIM = 4, 12
PATHS = {
    "latents": dict(sources=("label", "text", "speech"), text_dim=TEXT_DIM, discriminator=True, discriminator_hidden=16),
    "embedder_bank": dict(sources=("embedder",), embedder_dim=16, embedder_heads=2, embedder_audio_layers=1, embedder_layers=1,
                          embedder_visual_channels=(8, 16), bank=True, bank_size=8, discriminator=True, discriminator_hidden=16),
}  # fmt: skip


def make_config(path: str):
    c = stage2.get_config("tiny")
    c.model.emotion.update(PATHS[path])
    return c


def make_batch(config, seed=0) -> dict:
    batch = fake_batch(config, B, seed)
    rng = np.random.default_rng(seed + 1)
    batch["text_features"] = jnp.asarray(rng.standard_normal((B, 5, TEXT_DIM)), jnp.float32)
    batch["text_mask"] = jnp.ones((B, 5), bool)
    batch["emotion_drop"] = jnp.asarray(np.tile([[False, False, False]], (B, 1)))  # every modality reaches the model
    return batch


def perturbed(params, seed=1):
    """Zero-initialised outputs (MoE experts, audio, motion) made live so every path has gradients."""
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


def loss_fn(system, params, batch, t, rng):
    latents, _, inputs = system.encode(params, batch)
    cond = system.conditions(params, inputs, train=True, rng=rng)
    out = system.denoise(params, cond, latents, t)
    loss = jnp.mean(jnp.square(out.prediction - latents)) + emotion_classification_loss(out.emotion_logits, batch["emotion_class"])
    if cond.vq_loss is not None:
        loss += jnp.mean(cond.vq_loss)
    return loss


# The embedder path's forward/backward and sharding checks take about 3 CPU minutes (its visual
# encoder); they run in the slow suite, the embedder itself in test_emotion_embedder / test_train_stages.
@pytest.fixture(scope="module", params=["latents", pytest.param("embedder_bank", marks=pytest.mark.slow)])
def setup(request):
    config = make_config(request.param)
    system = MoEESystem(config)
    batch = make_batch(config)
    t = jnp.array([10, 300, 600, 900])
    boxed = jax.jit(system.init)(jax.random.key(0), batch)
    params = perturbed(nn.unbox(boxed))
    grad = jax.jit(jax.value_and_grad(lambda p, rng: loss_fn(system, p, batch, t, rng)))
    return request.param, system, boxed, params, batch, t, grad


def test_forward_and_backward_reach_every_part(setup):
    name, system, _, params, batch, t, grad = setup
    loss, grads = grad(params, jax.random.key(7))
    assert np.isfinite(float(loss))
    for part in ("face_locator", "context", "reference_net", "unet", "conditioning", "discriminator"):
        norm = optax.global_norm(grads[part])
        assert np.isfinite(float(norm)) and float(norm) > 0, part
    experts = grads["unet"]["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["emotion"]
    assert float(optax.global_norm(experts)) > 0
    cond = grads["conditioning"]
    assert float(optax.global_norm(cond["latents" if name == "latents" else "bank"])) > 0
    assert float(optax.global_norm(cond["audio_projection"])) > 0
    assert float(optax.global_norm(grads["vae"])) == 0  # the autoencoder never learns from the denoiser


def test_a_feature_the_config_needs_is_named_when_missing(setup):
    name, system, _, params, batch, _, _ = setup
    if name != "latents":
        pytest.skip("Emotion-to-Latents sources")
    with pytest.raises(ValueError, match="'text' source needs the 'text' features"):
        system.encode(params, {k: v for k, v in batch.items() if k != "text_features"})


@pytest.mark.slow  # ~3 CPU minutes of compilation; the U-Net's sharded forward is in test_sharding
def test_sharded_full_model_equals_single_device(setup):
    if jax.device_count() < 8:
        pytest.skip("needs 8 (fake) devices")
    name, system, boxed, params, batch, t, grad = setup
    rng = jax.random.key(7)
    single_loss, single_grads = grad(params, rng)
    mesh = make_mesh((2, 2, 2))
    shardings = tree_shardings(jax.eval_shape(lambda: boxed), mesh, DEFAULT_RULES)
    data = logical_sharding(mesh, ("batch",))
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        sharded = jax.jit(
            jax.value_and_grad(lambda p, b, tt, r: loss_fn(system, p, b, tt, r)),
            in_shardings=(shardings, jax.tree_util.tree_map(lambda _: data, batch), data, None),
            out_shardings=(None, shardings),
        )
        loss, grads = sharded(jax.device_put(params, shardings), batch, t, rng)
    assert abs(float(loss) - float(single_loss)) <= 1e-5 * abs(float(single_loss))
    flat_s = jax.tree_util.tree_leaves(single_grads)
    flat = jax.tree_util.tree_leaves(grads)
    assert rel_err(np.concatenate([np.ravel(g) for g in flat]), np.concatenate([np.ravel(g) for g in flat_s])) < 1e-5
