"""Shared helpers of the training tests."""

from __future__ import annotations

import importlib
import pathlib

import jax
import numpy as np
from flax import traverse_util

from moee_jax.parallel.sharding import to_global

REPO = pathlib.Path(__file__).resolve().parent.parent


def stage_config(stage: str, data_dir: str, **train):
    c = importlib.import_module(f"moee_jax.configs.{stage}").get_config("tiny")
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
    trainer.state = trainer.init_state()
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


def wake(tree, seed: int, scale: float = 0.05):
    """Every all-zero leaf of ``tree`` → small random values (deterministic per leaf position): the
    zero-initialised residual outputs (audio attention, MoE experts, motion modules, face locator,
    biases) start to matter, as early in training."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    key = jax.random.key(seed)
    out = [
        leaf + scale * jax.random.normal(jax.random.fold_in(key, i), leaf.shape, leaf.dtype) if leaf.size and not np.any(leaf) else leaf
        for i, leaf in enumerate(leaves)
    ]
    return jax.tree_util.tree_unflatten(treedef, out)


def export_initialised_stage(config, run_dir, seed: int = 1):
    """``RUN/<stage>/{final, config.json}`` of ``config`` with woken initial parameters, as
    `moee train` leaves a finished stage (no training: fast). Returns ``run_dir``."""
    from moee_jax.train.trainer import Trainer

    trainer = Trainer(config, run_dir)
    state = trainer.init_state()
    state = state.replace(trainable=wake(state.trainable, seed), frozen=wake(state.frozen, seed + 1))
    trainer.export_final(state)
    (pathlib.Path(run_dir) / config.stage / "config.json").write_text(config.to_json_best_effort(indent=2))
    return run_dir


def fake_batch(config, batch: int = 2, seed: int = 0) -> dict:
    """A pipeline batch (:mod:`moee_jax.data.pipeline` keys and shapes) of random content for
    ``config``'s clip layout: enough to build and run the whole system without a dataset."""
    import jax.numpy as jnp

    d, rng = config.data, np.random.default_rng(seed)
    s = int(config.video.image_size[0])
    f, m, c, n = int(d.num_frames), int(d.motion_frames), int(d.audio_context_frames), int(d.mel_bins)
    small = s // int(d.mask_downsample)
    palette = np.eye(6, dtype=np.float32)[np.arange(batch) % 6]
    out = {
        "frames": rng.integers(0, 256, (batch, f, s, s, 3)).astype(np.uint8),
        "motion_frames": rng.integers(0, 256, (batch, m, s, s, 3)).astype(np.uint8),
        "reference": rng.integers(0, 256, (batch, s, s, 3)).astype(np.uint8),
        "mel": rng.standard_normal((batch, f + 2 * c, n)).astype(np.float32),
        "face_mask": np.ones((batch, f, small, small), np.float32),
        "mouth_mask": np.zeros((batch, f, small, small), np.float32),
        "loss_mask": np.ones((batch, f, small, small), np.float32),
        "palette": palette,
        "emotion_class": np.arange(batch, dtype=np.int32) % 6,
        "drop_reference": np.zeros(batch, bool),
        "drop_audio": np.zeros(batch, bool),
        "drop_emotion": np.zeros(batch, bool),
        "emotion_drop": np.tile(np.array([[True, True, False]]), (batch, 1)),
    }
    return {k: jnp.asarray(v) for k, v in out.items()}
