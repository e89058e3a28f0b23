"""The XLA compiler options the project compiles with (moee_jax/xla_options.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moee_jax import xla_options
from moee_jax.xla_options import CPU_OPTIONS, compiler_options


def test_other_backends_compile_with_xlas_defaults():
    assert compiler_options("gpu") == {}
    assert compiler_options("tpu") == {}


def test_on_the_cpu_ynnpack_takes_the_dots_and_xla_the_convolutions():
    if not xla_options._supported(tuple(sorted(CPU_OPTIONS.items()))):
        pytest.skip(f"this jaxlib ({jax.__version__}) does not take {CPU_OPTIONS}")
    assert compiler_options("cpu") == {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


def test_an_xla_that_does_not_know_the_option_compiles_with_its_defaults(monkeypatch):
    monkeypatch.setattr(xla_options, "CPU_OPTIONS", {"xla_cpu_no_such_option_in_any_xla": "1"})
    assert compiler_options("cpu") == {}


def test_the_users_xla_flags_win(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION")
    assert compiler_options("cpu") == {}


def test_a_convolutions_value_and_gradients_do_not_change():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 16, 16, 8)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 8, 16)) * 0.1, jnp.float32)

    def loss(x, w):
        y = jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(jnp.sin(y) @ jnp.ones((16, 2)))

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    default = fn.lower(x, w).compile()(x, w)
    ours = fn.lower(x, w).compile(compiler_options=compiler_options())(x, w)
    for a, b in zip(jax.tree.leaves(default), jax.tree.leaves(ours)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)


_REFUSED = {"xla_cpu_no_such_option_in_any_xla": "1"}


def test_the_training_step_compiles_with_the_projects_options(monkeypatch, synthetic_tfds, tmp_path):
    from moee_jax.parallel.sharding import to_global
    from moee_jax.train import trainer as trainer_module
    from tests.train_helpers import single_device_trainer, stage_config

    trainer = single_device_trainer(stage_config("vae", synthetic_tfds[0], steps=1, batch_size=2), tmp_path / "run")
    state = trainer.init_state()
    monkeypatch.setattr(trainer_module, "compiler_options", lambda: _REFUSED)  # reaching XLA proves it is passed
    with pytest.raises(Exception, match="xla_cpu_no_such_option_in_any_xla"):
        trainer.compile(state, to_global(trainer.example, trainer.batch_shardings))


def test_the_reader_compiles_with_the_projects_options(monkeypatch):
    from moee_jax.eval import reader as reader_module

    net = reader_module.ReaderNet()
    params = net.init(jax.random.key(0), jnp.zeros((1, reader_module.INPUT_SIZE, reader_module.INPUT_SIZE, 3)))["params"]
    monkeypatch.setattr(reader_module, "compiler_options", lambda: _REFUSED)
    reader = reader_module.Reader(size=32, params=params, identity_mean=np.zeros(24), identity_std=np.ones(24))
    with pytest.raises(Exception, match="xla_cpu_no_such_option_in_any_xla"):
        reader.predict(np.zeros((2, 32, 32, 3), np.uint8))
