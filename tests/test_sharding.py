"""Every parameter is shardable by the rules table, and sharding does not change the numbers."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moee_jax.models.init import unet_example_inputs
from moee_jax.models.unet import VideoUNet
from moee_jax.parallel import DEFAULT_RULES, make_mesh, resolve_mesh_shape
from moee_jax.parallel.sharding import logical_sharding, sharded_init, tree_shardings
from tests.reference_models import ours_unet_config, rel_err


@pytest.fixture(scope="module")
def mesh():
    if jax.device_count() < 8:
        pytest.skip("needs 8 (fake) devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
    return make_mesh((2, 2, 2))


@pytest.fixture(scope="module")
def unet():
    return VideoUNet(ours_unet_config(motion_modules=True, audio_dim=16))


@pytest.fixture(scope="module")
def sharded(unet, mesh):
    def init(rng):
        return unet.init(rng, **unet_example_inputs(unet.config))["params"]

    return sharded_init(init, jax.random.key(0), mesh)


def _leaf(tree, path):
    for p in path.split("/"):
        tree = tree[p]
    return tree


@pytest.mark.parametrize(
    "path, spec",
    [
        ("conv_in/kernel", P(None, None, "fsdp", "tensor")),
        ("down_blocks_0/resnets_0/conv1/kernel", P(None, None, "fsdp", "tensor")),
        ("down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q/kernel", P("fsdp", "tensor")),
        ("down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_k/kernel", P("fsdp", "tensor")),
        ("down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_v/kernel", P("fsdp", "tensor")),
        ("down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_out_0/kernel", P("tensor", "fsdp")),
        ("down_blocks_0/motion_modules_0/proj_in/kernel", P("fsdp", "tensor")),
        ("down_blocks_0/motion_modules_0/transformer_blocks_0/attn1/to_q/kernel", P("fsdp", "tensor")),
        ("down_blocks_0/motion_modules_0/proj_out/kernel", P("tensor", "fsdp")),
        ("down_blocks_0/resnets_0/norm1/scale", P(None)),
    ],
)
def test_named_params_get_the_rules_table_partition_spec(sharded, path, spec):
    params, shardings = sharded
    sharding = _leaf(shardings, path)
    assert isinstance(sharding, NamedSharding)
    assert sharding.spec == spec
    assert _leaf(params, path).sharding.spec == spec


def test_every_large_param_is_sharded(sharded):
    """No weight matrix of the U-Net is silently left replicated."""
    params, _ = sharded
    flat = jax.tree_util.tree_leaves_with_path(params)
    replicated = [
        jax.tree_util.keystr(k) for k, v in flat if v.ndim >= 2 and all(s is None for s in v.sharding.spec)
    ]
    assert replicated == []


def test_dimensions_the_mesh_does_not_divide_stay_replicated(mesh):
    class RGBIn(nn.Module):
        @nn.compact
        def __call__(self, x):
            from moee_jax.nn.layers import conv

            return conv(8, 3, name="conv")(x)

    abstract = jax.eval_shape(lambda: RGBIn().init(jax.random.key(0), jnp.zeros((1, 4, 4, 3)))["params"])
    assert tree_shardings(abstract, mesh)["conv"]["kernel"].spec == P(None, None, None, "tensor")


def test_sharded_forward_equals_single_device_forward(unet, sharded, mesh):
    params, shardings = sharded
    rng = np.random.default_rng(0)
    inputs = {
        "sample": rng.standard_normal((4, 2, 8, 8, 4)).astype(np.float32),
        "timesteps": np.array([1, 200, 500, 999], np.int32),
        "context": rng.standard_normal((4, 3, unet.config.cross_attention_dim)).astype(np.float32),
        "audio": rng.standard_normal((4, 2, 5, 16)).astype(np.float32),
    }
    # Non-trivial output projections, so every branch contributes.
    params = jax.tree_util.tree_map(lambda p, s: jax.device_put(p + 0.01, s), params, shardings)
    single = jax.jit(lambda p, kw: unet.apply({"params": p}, **kw))(
        jax.device_get(params), inputs
    )
    batch = logical_sharding(mesh, ("batch",))
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        fn = jax.jit(
            lambda p, kw: unet.apply({"params": p}, **kw),
            in_shardings=(shardings, {k: batch for k in inputs}),
            out_shardings=batch,
        )
        out = fn(params, inputs)
    assert out.sharding.spec == P(("fsdp", "data"))
    assert rel_err(out, single) < 1e-5


def test_mesh_shape_fills_minus_one():
    assert resolve_mesh_shape((-1, 2, 2), 8) == (2, 2, 2)
    with pytest.raises(ValueError, match="divide"):
        resolve_mesh_shape((3, -1, 1), 8)
