"""Shared helpers of the training tests."""

from __future__ import annotations

import importlib.util
import pathlib

import jax
import numpy as np
from flax import traverse_util

from moee_jax.train.trainer import to_global

REPO = pathlib.Path(__file__).resolve().parent.parent


def stage_config(stage: str, data_dir: str, **train):
    spec = importlib.util.spec_from_file_location(f"cfg_{stage}", REPO / "configs" / f"{stage}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config("tiny")
    c.data.data_dir = data_dir
    c.train.log_every = 1
    c.checkpoint.async_save = False
    for k, v in train.items():
        setattr(c.train, k, v)
    return c


def _leaves(tree) -> dict:
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(jax.device_get(tree)).items()}


def _fixed_batch(trainer):
    return to_global(trainer.example, trainer.batch_shardings)


def _train_and_measure(trainer, steps):
    trainer.state = trainer._init_state()
    batch = _fixed_batch(trainer)
    before = trainer.eval_loss(trainer.state, batch)
    result = trainer.run(max_steps=steps)
    after = trainer.eval_loss(trainer.state, batch)
    return before, after, result




def single_device_trainer(config, run_dir):
    """A :class:`Trainer` on the first device only (the tests' other 7 fake devices unused): the
    stage tests check learning and freezing, the sharded tests check the mesh."""
    import moee_jax.train.trainer as trainer_module
    from moee_jax.parallel import mesh as mesh_lib

    original = mesh_lib.make_mesh
    trainer_module.make_mesh = lambda shape: original(shape, devices=jax.devices()[:1])
    try:
        config.mesh.shape = (1, 1, 1)
        return trainer_module.Trainer(config, run_dir)
    finally:
        trainer_module.make_mesh = original
