"""`moee demo`: the built-in main job (synthetic data → stages → animate → score), from the shipped
checkpoint or from scratch."""

from __future__ import annotations

import json

import pytest

from moee_jax.configs import demo


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_every_stage_trains_on_the_demo_dataset_at_one_frame_size(variant):
    c = demo.get_config(variant)
    size = c.stages.stage2.video.image_size
    for stage in ("vae", "stage1", "stage2"):
        s = c.stages[stage]
        assert s.stage == stage and s.data.name == f"synthetic_talking_faces/{c.data.name}"
        assert tuple(s.video.image_size) == tuple(size) and s.data.image_size == size[0]
    palettes = set(c.animate.compounds.values())
    assert c.data.test_identities >= 6 and c.data.train_identities >= 64
    assert palettes <= set(c.data.compounds) and not c.data.get("compounds_in_train", False)  # compounds held out of training
    assert set(c.ablate.variants) <= {"full", "no_moe", "no_global", "no_masked_noisy"}
    assert variant == "cpu" or len(c.ablate.variants) == 4
    assert c.reader.render_size == c.data.size  # the reader reads what the model sees


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_a_run_of_the_recipe_animates_with_the_settings_the_demo_scores_with(variant):
    from moee_jax.diffusion import make_schedule
    from moee_jax.inference.sampling import sampling_settings

    c = demo.get_config(variant)
    for stage in ("vae", "stage1", "stage2"):  # what `moee animate` and the UI take when given no flags
        chosen = sampling_settings(c.stages[stage], make_schedule(**c.stages[stage].diffusion.to_dict()))
        assert (chosen["name"], chosen["steps"]) == (c.animate.sampler, c.animate.steps)
        assert chosen["scales"] == dict(c.animate.guidance)


def test_the_shipped_checkpoint_stores_the_settings_the_demo_scores_it_with():
    import pathlib

    c = demo.get_config("cpu")
    stored = json.loads((pathlib.Path(__file__).parents[1] / c.checkpoint / "stage2" / "config.json").read_text())
    assert (stored["sampler"]["name"], stored["sampler"]["num_steps"]) == (c.animate.sampler, c.animate.steps)
    assert stored["guidance"] == dict(c.animate.guidance)


def test_an_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="unknown demo variant"):
        demo.get_config("tpu")


def test_a_missing_shipped_checkpoint_is_a_clear_error(tmp_path):
    from moee_jax.demo import DemoError, run_demo

    c = demo.get_config("cpu")
    with pytest.raises(DemoError, match="--from-scratch"):
        run_demo(c, tmp_path / "demo", checkpoint=tmp_path / "nothing_here")
    assert not (tmp_path / "demo").exists()  # nothing created for a failed command


def test_an_interrupted_stage_stops_the_demo_with_how_to_resume_instead_of_starting_the_next(tmp_path, monkeypatch):
    import moee_jax.demo as D
    from moee_jax.train import trainer

    started = []

    class Interrupted:
        def __init__(self, config, run_dir):
            started.append(config.stage)
            self.run_dir = run_dir

        def run(self):
            n = len(started)
            return trainer.TrainResult(started[-1], 10, 3 if n == 2 else 10, {}, str(self.run_dir), interrupted=n == 2, skipped_steps=0)

    monkeypatch.setattr(D, "build_data", lambda config, data_dir, held_out_only: "synthetic_talking_faces/x")
    monkeypatch.setattr(trainer, "Trainer", Interrupted)
    with pytest.raises(D.DemoError, match=r"stage1 was interrupted at step 3 of 7000; .*run/stage1: run the same command again to resume"):
        D.run_demo(demo.get_config("cpu"), tmp_path / "demo", from_scratch=True)
    assert started == ["vae", "stage1"]  # stage2 never started


def test_without_the_shipped_checkpoint_the_demo_trains_the_short_recipe():
    from moee_jax.demo import short_recipe

    c = demo.get_config("cpu")
    short = short_recipe(c)
    assert short.stages.stage1.train.steps == c.short_steps["stage1"] < c.stages.stage1.train.steps
    assert short.stages.stage2.train.steps == c.short_steps["stage2"] and short.reader.steps == c.short_steps["reader"]
    assert short.stages.stage1.train.warmup_steps <= c.short_steps["stage1"] // 10
    assert c.stages.stage1.train.steps == 7000  # the full recipe is untouched


def test_the_shipped_checkpoint_restores_and_animates_a_held_out_face_with_the_asked_emotion(tmp_path):
    """checkpoints/demo_cpu (the full recipe's stage 2 and its expression reader) restores with the
    current code; a held-out identity's neutral portrait and neutral speech, animated with the label
    "happiness" (8 of 8 such clips read right in the recipe's evaluation), read as happiness."""
    import numpy as np

    from moee_jax.data import schema
    from moee_jax.demo import build_data, shipped_checkpoint
    from moee_jax.eval.evaluate import EvalSettings, held_out_clips, held_out_items, render_items
    from moee_jax.eval.reader import load_reader
    from moee_jax.inference.animator import Animator

    c = demo.get_config("cpu")
    ship = shipped_checkpoint(c)
    assert (ship / "stage2" / "final" / "metadata.json").is_file() and (ship / "reader.msgpack").is_file()
    name = build_data(c, tmp_path / "data", held_out_only=True)
    tests = held_out_clips(tmp_path / "data", name)
    settings = EvalSettings.from_config(c.animate, seed=c.seed)
    size = int(c.stages.stage2.video.image_size[0])
    speaker = sorted(tests)[0]
    item = next(it for it in held_out_items(tests, size, settings, [speaker], speech_only=False) if it.tag == "happiness")
    (video,) = render_items(Animator.from_run(ship), [item], settings)
    assert video.shape[1:] == (size, size, 3) and video.dtype == np.uint8
    probs = load_reader(ship / "reader.msgpack").predict(video)["probs"].mean(axis=0)
    assert schema.CLASSES[int(np.argmax(probs))] == "happiness", dict(zip(schema.CLASSES, np.round(probs, 3)))


@pytest.mark.slow  # several CPU minutes: `make test-slow`
def test_demo_runs_end_to_end_from_scratch_and_a_rerun_reuses_everything(tmp_path, capsys):
    from moee_jax.demo import run_demo

    c = demo.get_config("cpu")
    c.data.update(train_identities=3, test_identities=1, num_frames=24)
    for stage in ("vae", "stage1", "stage2"):
        c.stages[stage].train.steps = 0 if stage == "vae" else 2
        c.stages[stage].checkpoint.every_steps = 2
    c.reader.steps = 5
    c.animate.steps = 2
    c.ablate.variants = ("full", "no_moe")
    summary = run_demo(c, tmp_path / "demo", from_scratch=True)
    out = tmp_path / "demo"
    printed = capsys.readouterr().out.splitlines()  # the console: a line per phase start and end, a summary
    assert len(printed) <= 60, printed
    for phase in ("data", "vae", "stage1", "stage2", "reader", "animate and score", "ablations"):
        assert any(line.startswith(f"✓ {phase} in ") for line in printed), (phase, printed)
    log = (out / "demo.log").read_text()
    assert "✓ stage2 in " in log and " I absl: " in log  # the full log, library records included
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["emotion"]["num_clips"] == 7 and metrics["compounds"]["num_clips"] == len(c.animate.compounds)
    assert metrics["ceiling"]["emotion"]["num_clips"] == 7  # the instrument's ceiling beside the generated numbers
    assert set(metrics["training"]) == {"stage1", "stage2"}
    assert set(metrics["ablation"]) == {"full", "no_moe"} and "| w/o MoE (one expert) |" in metrics["ablation_table"]
    assert (out / "contact_sheet.png").exists() and "Ablations" in (out / "metrics.md").read_text()
    speaker = metrics["held_out_identities"][0]
    assert (out / "videos" / f"{speaker}_happiness.mp4").exists() and (out / "videos" / f"{speaker}_sadly_fearful.mp4").exists()
    assert summary["headline"] == metrics["headline"]
    logged = (out / "run" / "stage1" / "metrics.jsonl").read_text()
    scored = (out / "ablate" / "no_moe" / "metrics.json").read_text()
    again = run_demo(c, out, from_scratch=True)
    assert (out / "run" / "stage1" / "metrics.jsonl").read_text() == logged  # finished stages are not retrained
    assert again["timings_s"]["stage1_s"] < summary["timings_s"]["stage1_s"]
    assert (out / "ablate" / "no_moe" / "metrics.json").read_text() == scored  # nor are scored ablation variants
    assert again["ablation"] == summary["ablation"]
