"""`moee demo`: the built-in main job (synthetic data → four stages → animate → score)."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent


def _demo_config(variant: str):
    spec = importlib.util.spec_from_file_location("cfg_demo", REPO / "configs" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_every_stage_trains_on_the_demo_dataset_at_one_frame_size(variant):
    c = _demo_config(variant)
    size = c.stages.stage2.video.image_size
    for stage in ("vae", "embedder", "stage1", "stage2"):
        s = c.stages[stage]
        assert s.stage == stage and s.data.name == f"synthetic_talking_faces/{c.data.name}"
        assert tuple(s.video.image_size) == tuple(size) and s.data.image_size == size[0]
    assert c.data.test_identities >= 1 and set(c.animate.compounds) <= set(c.data.compounds)  # compounds held out of training
    assert not c.data.get("compounds_in_train", False)
    assert set(c.ablate.variants) <= {"full", "no_moe", "no_global", "no_masked_noisy"}
    assert variant == "cpu" or len(c.ablate.variants) == 4


def test_an_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="unknown demo variant"):
        _demo_config("tpu")


@pytest.mark.slow  # several CPU minutes: `make test-slow`
def test_demo_runs_end_to_end_and_a_rerun_reuses_everything(tmp_path):
    from moee_jax.inference.demo import run_demo

    c = _demo_config("cpu")
    c.data.update(train_identities=3, test_identities=1, num_frames=24)
    for stage in ("vae", "embedder", "stage1", "stage2"):
        c.stages[stage].train.steps = 2
        c.stages[stage].checkpoint.every_steps = 2
    c.reader.steps = 5
    c.animate.steps = 2
    c.ablate.variants = ("full", "no_moe")
    summary = run_demo(c, tmp_path / "demo")
    out = tmp_path / "demo"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["emotion"]["num_clips"] == 7 and metrics["compounds"]["num_clips"] == len(c.animate.compounds)
    assert set(metrics["training"]) == {"vae", "embedder", "stage1", "stage2"}
    assert set(metrics["ablation"]) == {"full", "no_moe"} and "| w/o MoE (one expert) |" in metrics["ablation_table"]
    assert (out / "contact_sheet.png").exists() and "Ablations" in (out / "metrics.md").read_text()
    speaker = metrics["held_out_identities"][0]
    assert (out / "videos" / f"{speaker}_happy.mp4").exists() and (out / "videos" / f"{speaker}_sadly_fearful.mp4").exists()
    assert summary["headline"] == metrics["headline"]
    logged = (out / "run" / "stage1" / "metrics.jsonl").read_text()
    again = run_demo(c, out)
    assert (out / "run" / "stage1" / "metrics.jsonl").read_text() == logged  # finished stages are not retrained
    assert again["timings_s"]["stage1_s"] < summary["timings_s"]["stage1_s"]
