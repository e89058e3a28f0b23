"""Checkpoints that survive damage: exports verified against their checksums before any read, training
resumed from the newest readable checkpoint, and `moee verify` naming the damaged file."""

from __future__ import annotations

import logging
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from moee_jax.checkpoint import integrity
from moee_jax.checkpoint.orbax import restore_params, save_params
from moee_jax.checkpoint.run import DAMAGED_PREFIX, RunError, restore_final
from moee_jax.train.trainer import Trainer
from tests.train_helpers import _leaves, stage_config

REPO = pathlib.Path(__file__).resolve().parent.parent


def _export(tmp_path) -> pathlib.Path:
    params = {"unet": {"conv": {"kernel": np.arange(600, dtype=np.float32).reshape(10, 60), "bias": np.ones(60, np.float32)}}}
    return pathlib.Path(save_params(tmp_path / "final", params, {"stage": "stage2", "parts": ["unet"], "step": 3}))


def _largest_data_file(folder: pathlib.Path) -> pathlib.Path:
    files = [p for p in folder.rglob("*") if p.is_file() and p.parent.name == "d"]
    return max(files, key=lambda p: p.stat().st_size)


def test_an_export_carries_checksums_and_reads_back(tmp_path):
    final = _export(tmp_path)
    assert (final / integrity.MANIFEST).exists()
    assert integrity.check_export(final) == []
    np.testing.assert_array_equal(restore_params(final)["unet"]["conv"]["bias"], np.ones(60, np.float32))


def test_a_flipped_byte_is_refused_naming_the_file_before_any_read(tmp_path):
    final = _export(tmp_path)
    victim = _largest_data_file(final / "params")
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    problems = integrity.check_export(final)
    assert len(problems) == 1 and str(victim) in problems[0] and "checksum mismatch" in problems[0]
    with pytest.raises(integrity.DamagedCheckpoint, match=victim.name):
        restore_params(final)
    with pytest.raises(RunError, match="is damaged: .*" + victim.name):
        restore_final(final)


def test_a_truncated_or_missing_file_is_named_with_what_is_wrong(tmp_path):
    final = _export(tmp_path)
    victim = _largest_data_file(final / "params")
    size = victim.stat().st_size
    with open(victim, "r+b") as f:
        f.truncate(size // 2)
    assert integrity.check_export(final) == [f"{victim}: {size // 2} bytes, {size} expected (truncated or overwritten)"]
    victim.unlink()
    assert integrity.check_export(final) == [f"{victim}: missing"]


def test_an_export_from_before_manifests_is_read_as_it_is(tmp_path):
    final = _export(tmp_path)
    (final / integrity.MANIFEST).unlink()
    assert integrity.check_export(final) is None
    assert restore_params(final)["unet"]["conv"]["kernel"].shape == (10, 60)
    assert integrity.verify_export(final) == ("no manifest; reads", ())


def _damage_state(step_dir: pathlib.Path) -> None:
    """Truncate every array data file of a training checkpoint's state (an interrupted copy)."""
    victims = [p for p in (step_dir / "state").glob("ocdbt.process_*/d/*") if p.is_file()]
    assert victims
    for victim in victims:
        with open(victim, "r+b") as f:
            f.truncate(victim.stat().st_size // 3)


@pytest.mark.slow  # trains the tiny VAE stage twice and runs `moee verify` (~1.5 CPU minutes)
def test_training_resumes_from_the_newest_readable_checkpoint_and_verify_names_the_damage(synthetic_tfds, tmp_path, caplog):
    data_dir, _ = synthetic_tfds
    c = stage_config("vae", data_dir, steps=4)
    c.checkpoint.every_steps = 2
    Trainer(c, tmp_path).run()
    checkpoints = tmp_path / "vae" / "checkpoints"
    assert {"2", "4"} <= {p.name for p in checkpoints.iterdir()}
    _damage_state(checkpoints / "4")

    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-m", "moee_jax.cli", "verify", str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stderr[-2000:]
    assert "vae: final export intact" in out.stdout
    assert "checkpoint 2: readable" in out.stdout
    assert "checkpoint 4: UNREADABLE" in out.stdout and "damaged: vae" in out.stdout

    c6 = stage_config("vae", data_dir, steps=6)
    c6.checkpoint.every_steps = 2
    resumed = Trainer(c6, tmp_path)
    with caplog.at_level(logging.INFO, logger="moee_jax"):
        result = resumed.run()
    assert result.final_step == 6
    assert any(f"{checkpoints / '4'} is damaged" in r.getMessage() for r in caplog.records)
    assert any("resumed vae at step 2" in r.getMessage() for r in caplog.records)
    assert (checkpoints / f"{DAMAGED_PREFIX}4").is_dir()  # kept for inspection
    assert {"4", "6"} <= {p.name for p in checkpoints.iterdir() if p.name.isdigit()}  # step 4 trained and saved again

    # the same 6 steps without the damage end at the same parameters: the resume replayed steps 3–4
    straight = Trainer(c6, tmp_path / "straight")
    straight.run()
    for path, value in _leaves(straight.state.trainable).items():
        np.testing.assert_array_equal(value, _leaves(resumed.state.trainable)[path])


@pytest.mark.slow  # trains the tiny VAE stage (~1 CPU minute)
def test_every_checkpoint_damaged_is_one_clear_error_and_a_rerun_starts_over(synthetic_tfds, tmp_path):
    from moee_jax.train.trainer import TrainingError

    data_dir, _ = synthetic_tfds
    c = stage_config("vae", data_dir, steps=2)
    c.checkpoint.every_steps = 2
    Trainer(c, tmp_path).run()
    for step_dir in (tmp_path / "vae" / "checkpoints").iterdir():
        _damage_state(step_dir)
    c4 = stage_config("vae", data_dir, steps=4)
    with pytest.raises(TrainingError, match="every training checkpoint is damaged"):
        Trainer(c4, tmp_path).run()
    assert Trainer(c4, tmp_path).run().final_step == 4
