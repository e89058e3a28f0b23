"""The trainer as a long-running job: non-finite steps, other meshes, preemption, several processes."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moee_jax.parallel.sharding import to_global
from moee_jax.train.trainer import Trainer, TrainingError
from tests.train_helpers import _leaves, single_device_trainer, stage_config

REPO = pathlib.Path(__file__).resolve().parent.parent



@pytest.mark.slow  # trains a tiny stage to a non-finite loss (~1 CPU minute)
def test_non_finite_steps_are_skipped_then_stop_the_run(synthetic_tfds, tmp_path):
    data_dir, _ = synthetic_tfds
    trainer = Trainer(stage_config("vae", data_dir, steps=10, nan_patience=3), tmp_path)
    loss = trainer.stage.loss
    trainer.stage = dataclasses.replace(trainer.stage, loss=lambda *a: (loss(*a)[0] * jnp.nan, loss(*a)[1]))
    init = _leaves(trainer.init_state().trainable)
    with pytest.raises(TrainingError, match="3 non-finite steps in a row"):
        trainer.run()
    assert int(trainer.state.skipped) == 3
    for path, value in _leaves(trainer.state.trainable).items():
        np.testing.assert_array_equal(value, init[path])


@pytest.mark.slow  # trains on one mesh, restores on another (~1.5 CPU minutes); the sharded step is checked below
def test_restore_onto_a_different_mesh(synthetic_tfds, tmp_path):
    data_dir, _ = synthetic_tfds
    c = stage_config("vae", data_dir, steps=6)
    c.checkpoint.every_steps = 3
    first = Trainer(c, tmp_path)
    first.run(max_steps=3)
    saved = _leaves(first.state.trainable)
    c2 = stage_config("vae", data_dir, steps=6)
    c2.mesh.shape = (2, 2, 2)
    second = Trainer(c2, tmp_path)
    from moee_jax.checkpoint import run as run_lib

    manager = run_lib.stage_manager(second.layout, "vae", every_steps=3, keep=3)
    restored = run_lib.restore_state(manager, 3, second.abstract_state, iter(second.pipeline()))
    manager.close()
    for path, value in _leaves(restored.trainable).items():
        np.testing.assert_array_equal(value, saved[path])
    assert restored.trainable["vae"]["encoder"]["conv_in"]["kernel"].sharding.mesh.shape == {"data": 2, "fsdp": 2, "tensor": 2}
    result = second.run()  # and training continues from there on the new mesh
    assert result.final_step == 6





# ---- the CLI as a process: preemption and multi-host -------------------------------------------------------


def _moee_train(run_dir, data_dir, *extra, env=None, stage="vae"):
    args = [sys.executable, "-m", "moee_jax.cli", "train", f"--config={REPO}/configs/{stage}.py:tiny", f"--run_dir={run_dir}",
            f"--config.data.data_dir={data_dir}", "--config.train.log_every=1", "--config.checkpoint.async_save=False", *extra]  # fmt: skip
    base = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}  # conftest's XLA_FLAGS: 8 devices
    return args, {**base, **(env or {})}


def _losses(run_dir, stage="vae") -> dict[int, float]:
    lines = (pathlib.Path(run_dir) / stage / "metrics.jsonl").read_text().splitlines()
    return {json.loads(line)["step"]: json.loads(line)["loss"] for line in lines}


@pytest.mark.slow  # several training subprocesses (2–4 CPU minutes)
def test_sigkill_then_resume_repeats_the_uninterrupted_losses_step_for_step(synthetic_tfds, tmp_path):
    data_dir, _ = synthetic_tfds
    common = ("--config.train.steps=12", "--config.checkpoint.every_steps=4")
    args, env = _moee_train(tmp_path / "straight", data_dir, *common)
    subprocess.run(args, env=env, check=True, capture_output=True, timeout=600)
    reference = _losses(tmp_path / "straight")

    args, env = _moee_train(tmp_path / "killed", data_dir, *common)
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    checkpoints = tmp_path / "killed" / "vae" / "checkpoints"
    deadline = time.time() + 600
    while time.time() < deadline:  # kill after step 6 is logged (checkpoint at 4, not yet at 8)
        if (tmp_path / "killed" / "vae" / "metrics.jsonl").exists() and 6 in _losses(tmp_path / "killed"):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (checkpoints / "4").exists() and not (checkpoints / "12").exists()
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    resumed = {}
    for line in (tmp_path / "killed" / "vae" / "metrics.jsonl").read_text().splitlines():
        resumed[json.loads(line)["step"]] = json.loads(line)["loss"]  # later lines (after the resume) win
    assert sorted(resumed) == sorted(reference)
    for step in reference:
        assert resumed[step] == reference[step], (step, resumed[step], reference[step])


@pytest.mark.slow  # twelve training processes (5–10 CPU minutes); the script takes more kills for longer runs
def test_ten_random_sigkills_then_resumes_give_the_uninterrupted_run_bit_for_bit(synthetic_tfds, tmp_path):
    data_dir, _ = synthetic_tfds
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, str(REPO / "launch" / "kill_resume.py"), f"--data_dir={data_dir}", f"--out={tmp_path}",
                          "--kills=10", "--steps=30"], env=env, capture_output=True, text=True, timeout=3600)  # fmt: skip
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["kills"] == 10 and result["kills_during_a_checkpoint_write"] >= 1, result
    assert all(result["checks"].values()), result  # each step once, same losses, nothing damaged, same final bits
    assert out.returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MB tmpfs (needs root and CAP_SYS_ADMIN, as in CI's container; skipped elsewhere)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN)")
    yield disk
    subprocess.run(["umount", str(disk)], capture_output=True)


@pytest.mark.slow  # two training processes (1–3 CPU minutes)
def test_a_full_disk_during_a_save_stops_with_one_message_and_the_run_resumes_once_space_is_freed(synthetic_tfds, small_disk):
    data_dir, _ = synthetic_tfds
    run = small_disk / "run"
    args, env = _moee_train(run, data_dir, "--config.train.steps=40", "--config.checkpoint.every_steps=4")
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    checkpoints = run / "vae" / "checkpoints"
    deadline = time.time() + 600
    while time.time() < deadline and not ((checkpoints / "4").is_dir() and not list(checkpoints.glob("*tmp*"))):
        time.sleep(0.02)
    filler = small_disk / "filler"
    free_kb = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize // 1024
    subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=1k", f"count={free_kb - 200}"], capture_output=True)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 1
    assert err.strip().splitlines()[-1].startswith("moee train: vae: no space left on the disk of "), err[-3000:]
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 3, err[-3000:]  # one message, not one per array
    filler.unlink()  # space again: the same command resumes from the newest complete checkpoint and finishes
    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(_losses(run)) == list(range(1, 41))


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(synthetic_tfds, tmp_path):
    data_dir, _ = synthetic_tfds
    args, env = _moee_train(tmp_path, data_dir, "--config.train.steps=100000", "--config.checkpoint.every_steps=100000")
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    while time.time() < deadline and not ((tmp_path / "vae" / "metrics.jsonl").exists() and _losses(tmp_path)):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "interrupted (SIGTERM), checkpoint saved" in out
    steps = sorted(int(p.name) for p in (tmp_path / "vae" / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and steps[-1] >= max(_losses(tmp_path))
    # The console: progress lines and warnings, no library INFO records; those are in the run's log file.
    assert re.search(r"^step +1/100000 \|", out, re.M), out[-3000:]
    assert not re.search(r"^I\d{4} ", out, re.M), out[-3000:]
    assert re.search(r"^warning: SIGTERM: saved vae at step \d+ and stopped$", out, re.M), out[-3000:]
    log = (tmp_path / "vae" / "train.log").read_text()
    assert re.search(r" I absl: .*[Ss]av", log) and re.search(r"moee_jax.console: step +1/100000 \|", log), log[-3000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # several training subprocesses (2–4 CPU minutes)
def test_two_processes_train_save_and_resume_on_disjoint_shards(synthetic_tfds, tmp_path):
    data_dir, _ = synthetic_tfds

    def launch(steps):
        address = f"127.0.0.1:{_free_port()}"
        procs = []
        for i in range(2):
            args, env = _moee_train(tmp_path, data_dir, f"--config.train.steps={steps}", "--config.checkpoint.every_steps=2", env={
                "MOEE_COORDINATOR_ADDRESS": address, "MOEE_NUM_PROCESSES": "2", "MOEE_PROCESS_ID": str(i),
                "XLA_FLAGS": os.environ["XLA_FLAGS"].replace("device_count=8", "device_count=2")})  # fmt: skip
            procs.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        for proc in procs:
            out, _ = proc.communicate(timeout=600)
            assert proc.returncode == 0, out[-3000:]

    launch(4)
    assert (tmp_path / "vae" / "checkpoints" / "4").exists()
    launch(6)  # resumes at 4 from the saved state and data-iterator states of both processes
    assert sorted(_losses(tmp_path)) == [1, 2, 3, 4, 5, 6]
    shards = [json.loads((tmp_path / "vae" / "data_shards" / f"process_{i}.json").read_text()) for i in range(2)]
    (lo0, hi0), (lo1, hi1) = shards[0]["record_keys"], shards[1]["record_keys"]
    assert lo0 == 0 and hi0 <= lo1 and hi1 > lo1


@pytest.mark.slow
def test_sharded_stage1_step_equals_the_single_device_step(synthetic_tfds, tmp_path):
    _sharded_vs_single("stage1", synthetic_tfds[0], tmp_path)


def test_sharded_vae_step_equals_the_single_device_step(synthetic_tfds, tmp_path):
    _sharded_vs_single("vae", synthetic_tfds[0], tmp_path)


def _sharded_vs_single(stage, data_dir, tmp_path):
    """The step's loss and gradients (the optimiser is elementwise after them) on both meshes."""
    import flax.linen as nn

    from moee_jax.parallel.rules import DEFAULT_RULES
    from moee_jax.train.partition import merge_params

    results = {}
    for name, shape, devices in (("mesh", (2, 2, 2), 8), ("single", (1, 1, 1), 1)):
        c = stage_config(stage, data_dir, steps=1)
        c.mesh.shape = shape
        trainer = Trainer(c, tmp_path / name) if devices == 8 else single_device_trainer(c, tmp_path / name)
        state = trainer.init_state()
        batch = to_global(trainer.example, trainer.batch_shardings)

        def loss(trainable, frozen, batch, stage=trainer.stage):
            return stage.loss(merge_params(trainable, frozen), batch, jax.random.key(0), {})[0]

        with jax.set_mesh(trainer.mesh), nn.logical_axis_rules(DEFAULT_RULES):
            value, grads = jax.jit(jax.value_and_grad(loss))(state.trainable, state.frozen, batch)
        results[name] = (float(value), _leaves(grads), _leaves(state.trainable))
    (mesh_loss, mesh_grads, mesh_init), (single_loss, single_grads, single_init) = results["mesh"], results["single"]
    for path, value in single_init.items():  # the same initial parameters, however sharded
        np.testing.assert_array_equal(mesh_init[path], value)
    assert abs(mesh_loss - single_loss) <= 1e-5 * abs(single_loss)
    # An attention key bias shifts every logit of a query equally, so softmax makes its gradient
    # analytically zero: those leaves hold only rounding noise and are not compared. The others'
    # error is scaled by their own size, but at least 1e-4 of the largest gradient anywhere.
    floor = 1e-4 * max(np.abs(v).max() for v in single_grads.values())
    for path, value in single_grads.items():
        if path.endswith("to_k/bias"):
            assert np.abs(value).max() <= floor and np.abs(mesh_grads[path]).max() <= floor, path
            continue
        err = np.abs(mesh_grads[path] - value).max() / max(np.abs(value).max(), floor)
        assert err < 1e-5, (path, err)
