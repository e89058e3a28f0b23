"""Training stages on the tiny config with synthetic data: losses fall, freezing holds."""

from __future__ import annotations

import pathlib
import re

import jax
import numpy as np
import pytest

from tests.train_helpers import _leaves, _train_and_measure, single_device_trainer, stage_config

REPO = pathlib.Path(__file__).resolve().parent.parent


# measured 0.56 and 0.79; the KL VAE's 40 steps take about a CPU minute: the slow suite
@pytest.mark.parametrize("stage, factor", [pytest.param("vae", 0.7, marks=pytest.mark.slow), ("embedder", 0.9)])
def test_autoencoder_and_embedder_stages_reduce_their_loss(stage, factor, synthetic_tfds, tmp_path):
    data_dir, _ = synthetic_tfds
    trainer = single_device_trainer(stage_config(stage, data_dir, steps=25), tmp_path)
    before, after, result = _train_and_measure(trainer, 25)
    assert result.final_step == 25 and not result.interrupted
    assert after["loss"] < factor * before["loss"], (before, after)
    assert (tmp_path / stage / "final" / "params").exists()


@pytest.fixture(scope="module")
def two_stages(synthetic_tfds, tmp_path_factory):
    """stage1 then stage2 (15 steps each) in one run directory, with fixed-batch losses."""
    data_dir, _ = synthetic_tfds
    run = tmp_path_factory.mktemp("run")
    out = {}
    for stage in ("stage1", "stage2"):
        trainer = single_device_trainer(stage_config(stage, data_dir, steps=15, learning_rate=2e-3), run)
        init = trainer.init_state()
        out[stage] = {"init": (_leaves(init.trainable), _leaves(init.frozen))}
        del init
        before, after, result = _train_and_measure(trainer, 15)
        out[stage].update(before=before, after=after, result=result, trainer=trainer,
                          final=(_leaves(trainer.state.trainable), _leaves(trainer.state.frozen)))  # fmt: skip
    return out


@pytest.mark.slow  # about 5 min of CPU (stage 1 + stage 2): `make test-slow`
def test_stage1_and_stage2_reduce_the_denoising_loss(two_stages):
    # Fixed batch, fixed noise and timesteps; measured 0.572 → 0.227 (stage 1) and 0.227 → 0.204 (stage 2).
    for stage, factor in (("stage1", 0.7), ("stage2", 0.95)):
        before, after = two_stages[stage]["before"], two_stages[stage]["after"]
        assert after["latent"] < factor * before["latent"], (stage, before, after)
        assert np.isfinite(after["spatial"])


@pytest.mark.slow  # about 5 min of CPU (stage 1 + stage 2): `make test-slow`
def test_stage2_freezes_the_backbone_bit_for_bit_and_trains_the_emotion_parts(two_stages):
    s1_train, s1_frozen = two_stages["stage1"]["final"]
    s1 = {**s1_train, **s1_frozen}
    init_train, init_frozen = two_stages["stage2"]["init"]
    end_train, end_frozen = two_stages["stage2"]["final"]
    # stage 2 starts from stage 1's final parameters, part by part
    for path, value in {**init_train, **init_frozen}.items():
        if path in s1 and not path.startswith("conditioning/latents"):
            np.testing.assert_array_equal(value, s1[path], err_msg=path)
    assert all("/emotion/" in p or p.startswith(("conditioning/latents", "discriminator")) for p in end_train)
    assert any("/emotion/" in p for p in end_train) and any(p.startswith("conditioning/latents") for p in end_train)
    for path, value in end_frozen.items():  # frozen: bit-identical
        np.testing.assert_array_equal(value, init_frozen[path], err_msg=path)
    changed = [p for p in end_train if not np.array_equal(end_train[p], init_train[p])]
    assert len(changed) > 0.5 * len(end_train)
    # no optimizer state for frozen parameters: Adam's moments cover exactly the trainable leaves
    trainer = two_stages["stage2"]["trainer"]
    moments = [x for x in jax.tree_util.tree_leaves(trainer.state.opt_state) if np.ndim(x) > 0]
    assert sum(int(np.size(x)) for x in moments) == 2 * sum(v.size for v in end_train.values())


@pytest.mark.slow  # about 5 min of CPU (stage 1 + stage 2): `make test-slow`
def test_stage1_freezes_the_vae_and_the_emotion_experts(two_stages):
    init_train, init_frozen = two_stages["stage1"]["init"]
    end_train, end_frozen = two_stages["stage1"]["final"]
    assert any(p.startswith("vae/") for p in end_frozen) and any("/emotion/" in p for p in end_frozen)
    assert not any(p.startswith("vae/") or "/emotion/" in p for p in end_train)
    for path, value in end_frozen.items():
        np.testing.assert_array_equal(value, init_frozen[path], err_msg=path)


def test_the_terminal_gets_every_print_every_th_progress_line_and_the_log_file_gets_them_all(synthetic_tfds, tmp_path, capsys):
    from moee_jax import console

    data_dir, _ = synthetic_tfds
    c = stage_config("embedder", data_dir, steps=6)
    c.train.log_every, c.train.print_every = 1, 3
    with console.log_to(tmp_path / "train.log"):
        single_device_trainer(c, tmp_path / "run").run()
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step")]
    assert [line.split("|")[0].split()[1] for line in printed] == ["3/6", "6/6"]
    logged = re.findall(r"step +(\d+)/6 \|", (tmp_path / "train.log").read_text())
    assert logged == ["1", "2", "3", "4", "5", "6"]
