"""`moee eval` / `moee ablate`: scoring a run on held-out identities, the ablation variants and table,
and stage 2 starting from a stage 1 whose emotion module has another shape."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import traverse_util

from moee_jax.checkpoint.orbax import save_params
from moee_jax.checkpoint.run import RunError, restore_final, restore_parts
from moee_jax.data.pipeline import open_source
from moee_jax.eval import ablation as A
from moee_jax.eval import evaluate as E
from moee_jax.eval import reader as R
from tests.train_helpers import export_initialised_stage, single_device_trainer, stage_config


@pytest.fixture(scope="module")
def run_dir(tiny_run):
    """A run with a finished (initialised, not trained) tiny stage 2."""
    return tiny_run


@pytest.fixture(scope="module")
def reader():
    """A barely trained reader of the tiny config's 32² frames (scores are not the point here)."""
    return R.train_reader(32, steps=3, batch_size=8, num_clips=8, frames_per_clip=4, num_identities=8, frames_per_identity=2)


def test_the_run_names_its_dataset(run_dir, synthetic_tfds):
    assert E.run_dataset(run_dir) == synthetic_tfds


def test_held_out_clips_are_the_test_speakers_with_a_neutral_portrait_clip(synthetic_tfds):
    clips = E.held_out_clips(*synthetic_tfds)
    assert clips and all("neutral" in by_emotion for by_emotion in clips.values())
    train_speakers = {open_source(synthetic_tfds[0], synthetic_tfds[1], "train")[i]["speaker"].decode() for i in range(8)}
    assert not train_speakers & set(clips)


@pytest.mark.slow  # renders and scores 9 clips (~5 CPU minutes); `make demo` runs the same evaluation
def test_evaluate_run_scores_every_emotion_compound_and_speech_only_clip(run_dir, reader, synthetic_tfds, tmp_path):
    clips = E.held_out_clips(*synthetic_tfds)
    speaker = sorted(clips)[0]
    settings = E.EvalSettings(steps=2, compounds={"happily_surprised": "happy:0.5,surprised:0.5"}, speech_only_emotions=("anger",))
    summary = E.evaluate_run(run_dir, reader, settings=settings, speakers=[speaker], videos_dir=tmp_path / "videos",
                             sheet_path=tmp_path / "sheet.png")  # fmt: skip
    assert summary["emotion"]["num_clips"] == 7  # six emotions and neutral
    assert summary["compounds"]["per_compound"]["happily_surprised"]["num_clips"] == 1
    assert summary["lip_sync"]["num_clips"] == 8 and summary["identity"]["num_clips"] == 8
    assert ("anger" in clips[speaker]) == ("speech_only" in summary)
    for value in summary["headline"].values():
        assert np.isfinite(value)
    videos = sorted(p.name for p in (tmp_path / "videos").glob("*.mp4"))
    assert f"{speaker}_happily_surprised.mp4" in videos and f"{speaker}_neutral.mp4" in videos
    from PIL import Image

    sheet = Image.open(tmp_path / "sheet.png")
    assert sheet.size == (8 * 32, 8 * 32)  # 8 frames per row; 7 emotions + 1 compound rows
    json.dumps(summary)  # JSON-ready


def test_the_labelled_ceiling_reads_the_truth_of_each_labelled_request_and_lists_what_it_cannot_draw(reader, synthetic_tfds):
    clips = E.held_out_clips(*synthetic_tfds)
    speaker = sorted(clips)[0]
    settings = E.EvalSettings(compounds={"happily_surprised": "happy:0.5,surprised:0.5"})
    ceiling = E.ground_truth_ceiling(reader, clips, 32, settings, speakers=[speaker], labelled=True)
    assert ceiling["emotion"]["num_clips"] == 7 and "missing" not in ceiling
    assert ceiling["compounds"]["per_compound"]["happily_surprised"]["num_clips"] == 1
    # Every clip of the labelled protocol speaks the neutral clip's words: lip sync is read against that audio.
    assert ceiling["lip_sync"]["num_clips"] == 8
    # What the reader is shown is the redrawn request, not the stored clip of that emotion.
    from moee_jax.data import schema
    from moee_jax.data.builders.synthetic_talking_faces import speech_matched_clip
    from moee_jax.data.pipeline import resize_frames

    shown = []

    class Recording:
        size = reader.size

        def predict(self, frames):
            shown.append(frames)
            return reader.predict(frames)

    E.ground_truth_ceiling(Recording(), clips, 32, settings, speakers=[speaker], labelled=True)
    sad = shown[list(schema.CLASSES).index("sadness")]
    np.testing.assert_array_equal(sad, resize_frames(speech_matched_clip(clips[speaker]["neutral"], "sadness").frames, 32))
    assert not np.array_equal(sad, resize_frames(schema.decode_frames(clips[speaker]["sadness"]["frames"]), 32))
    foreign = {speaker: {e: dict(r, id=b"clip") for e, r in clips[speaker].items()}}
    unknown = E.ground_truth_ceiling(reader, foreign, 32, settings, labelled=True)
    assert len(unknown["missing"]) == 8 and "emotion" not in unknown


def test_the_fresh_identity_ceiling_reads_every_class_and_compound_of_each_identity_as_a_run_is_scored(reader, tmp_path):
    ceiling = E.fresh_identity_ceiling(reader, [50_000, 50_001], voice="neutral", num_frames=4)
    assert ceiling["emotion"]["num_clips"] == 14 and ceiling["compounds"]["num_clips"] == 4
    per_compound = ceiling["compounds"]["per_compound"]
    assert {name: c["num_clips"] for name, c in per_compound.items()} == {name: 2 for name in E.EvalSettings().compounds}
    # Each compound's components, shown alone by the same identity, are its false alarms: 2 per clip.
    assert ceiling["compounds"]["false_positive_clips"] == 8
    assert all(n >= 1 and key.split("/")[0] in E.EvalSettings().compounds for key, n in ceiling["missed_aus"].items())
    with pytest.raises(ValueError, match="voice"):
        E.fresh_identity_ceiling(reader, [50_000], voice="loud")

    # The benchmark prints one row per reader and voice, and writes the summaries.
    import pathlib
    import subprocess
    import sys

    repo = pathlib.Path(__file__).resolve().parent.parent
    path = tmp_path / "reader.msgpack"
    R.save_reader(reader, path)
    out = tmp_path / "ceiling.json"
    args = ["--readers", str(path), "--seeds", "50000", "--voices", "own", "--frames", "4", "--out", str(out)]
    done = subprocess.run([sys.executable, "benchmarks/reader_ceiling.py", *args], cwd=repo, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"| {path} | own |" in done.stdout
    assert json.loads(out.read_text())["results"][0]["summary"]["compounds"]["per_compound"]["sadly_fearful"]["num_clips"] == 1
    bad = subprocess.run([sys.executable, "benchmarks/reader_ceiling.py", "--readers", str(path), "--seeds", "5:1"],
                         cwd=repo, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert bad.returncode == 2 and "--seeds '5:1': stop must exceed start" in bad.stderr


def test_a_reader_of_another_frame_size_is_refused(run_dir):
    wrong = R.Reader(size=16, params={}, identity_mean=np.zeros(24), identity_std=np.ones(24))
    with pytest.raises(ValueError, match="16²"):
        E.evaluate_run(run_dir, wrong)


def test_each_ablation_changes_only_its_piece_and_starts_from_the_runs_stage1(synthetic_tfds, tmp_path):
    run_dir = tmp_path
    (run_dir / "stage1" / "final" / "params").mkdir(parents=True)  # only its presence matters here
    base = stage_config("stage2", synthetic_tfds[0])
    configs = {v: A.variant_config(base, run_dir, v) for v in A.ABLATIONS}
    assert configs["no_moe"].model.emotion.moe_variant == "single"
    assert configs["no_global"].model.emotion.moe_variant == "no_global"
    assert configs["no_masked_noisy"].data.noisy_p == 0.0 and configs["no_masked_noisy"].data.class_balanced
    assert base.data.noisy_p > 0  # the full method samples masked noisy emotions
    for v, c in configs.items():
        assert list(c.train.init_from) == [str(run_dir / "stage1" / "final")]
        assert tuple(c.train.init_skip) == A.EMOTION_PARTS  # every variant learns its emotion parts afresh
        changed = {k for k, x in traverse_util.flatten_dict(c.to_dict()).items() if traverse_util.flatten_dict(base.to_dict()).get(k) != x}
        expected = {("train", "init_from"), ("train", "init_skip")} | {tuple(d.split(".")) for d in A.ABLATIONS[v][1]}
        assert changed <= expected, (v, changed)
    with pytest.raises(ValueError, match="unknown ablation"):
        A.variant_config(base, run_dir, "no_reference")
    with pytest.raises(ValueError, match="no finished stage1"):  # e.g. the shipped checkpoint: stage 2 only
        A.variant_config(base, tmp_path / "shipped", "full")


def test_an_interrupted_ablation_variant_is_not_scored_and_says_how_to_resume(synthetic_tfds, tmp_path, monkeypatch):
    from moee_jax.checkpoint import run as run_lib
    from moee_jax.train import trainer

    (tmp_path / "stage1" / "final" / "params").mkdir(parents=True)
    base = stage_config("stage2", synthetic_tfds[0])
    scored = []

    class Interrupted:
        def __init__(self, config, run_dir):
            self.run_dir = run_dir

        def run(self):
            return trainer.TrainResult("stage2", 4, 4, {}, str(self.run_dir), True, 0)

    monkeypatch.setattr(run_lib, "resolve_checkpoint", lambda run_dir: run_dir)
    monkeypatch.setattr(run_lib, "load_run_config", lambda path: base)
    monkeypatch.setattr(trainer, "Trainer", Interrupted)
    monkeypatch.setattr(A, "evaluate_run", lambda *a, **k: scored.append(a) or {})
    expected = r"ablation no_moe: stage2 was interrupted at step 4 of \d+; .*no_moe/stage2: run the same"
    with pytest.raises(trainer.TrainingError, match=expected):
        A.run_ablations(tmp_path, tmp_path / "ablate", reader=None, variants=("no_moe",))
    assert not scored and not (tmp_path / "ablate" / "no_moe" / "metrics.json").exists()


def test_ablation_table_has_the_papers_form_with_the_best_value_in_bold():
    results = {
        "full": {"headline": {"emotion_accuracy": 0.9, "au_mae": 0.1, "lip_sync_pearson": 0.5, "identity_mae": 0.2}},
        "no_moe": {"headline": {"emotion_accuracy": 0.6, "au_mae": 0.3, "lip_sync_pearson": 0.6, "identity_mae": 0.2}},
    }
    table = A.ablation_markdown(results).splitlines()
    assert table[0].startswith("| Method | Emo-Acc ↑ | AU-MAE ↓")
    full, no_moe = table[2], table[3]
    assert full.startswith("| MoEE (full) | **0.900** | **0.100** |") and "| 0.500 |" in full
    assert no_moe.startswith("| w/o MoE (one expert) | 0.600 | 0.300 |") and "**0.600**" in no_moe
    assert full.count("**0.200**") == 1 and no_moe.count("**0.200**") == 1  # ties are both best
    assert "–" in full  # no compound clips scored: a dash, not a made-up number


# ---- a stage starting from an earlier stage whose module shapes differ -------------------------------------


def _toy_checkpoint(path, params):
    save_params(path, params, {"parts": sorted(params)})
    return path


def _restore(path, current, trainable_patterns):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    shardings = jax.tree_util.tree_map(lambda _: sharding, current)
    return restore_parts(path, {"unet": current}, {"unet": shardings}, lambda name: any(p in name for p in trainable_patterns))["unet"]


def test_an_earlier_stage_fills_every_weight_it_has_and_new_trainable_ones_keep_their_initialisation(tmp_path):
    stored = {"unet": {"conv": {"kernel": np.arange(6.0, dtype=np.float32).reshape(2, 3)},
                       "emotion": {"experts": np.ones((6, 4), np.float32)}}}  # fmt: skip
    path = _toy_checkpoint(tmp_path / "stage1", stored)
    current = {
        "conv": {"kernel": np.zeros((2, 3), np.float32)},
        "emotion": {"attention": np.full((4,), 7.0, np.float32)},
    }  # fmt: skip  a 'single' expert: other leaves
    params, fresh = _restore(path, current, ["/emotion/"])
    np.testing.assert_array_equal(params["conv"]["kernel"], stored["unet"]["conv"]["kernel"])  # bit-identical
    np.testing.assert_array_equal(params["emotion"]["attention"], current["emotion"]["attention"])  # its own init
    assert fresh == ["unet/emotion/attention"]


def test_a_frozen_weight_the_earlier_stage_lacks_or_shapes_differently_is_an_error_naming_it(tmp_path):
    path = _toy_checkpoint(tmp_path / "stage1", {"unet": {"conv": {"kernel": np.zeros((2, 3), np.float32)}}})
    current = {"conv": {"kernel": np.zeros((4, 3), np.float32)}, "norm": {"scale": np.ones((3,), np.float32)}}
    with pytest.raises(RunError, match=r"cannot fill: unet/conv/kernel \(model \(4, 3\), checkpoint shape \(2, 3\)\); "
                                            r"unet/norm/scale \(model \(3,\), checkpoint absent\)"):  # fmt: skip
        _restore(path, current, ["/emotion/"])


@pytest.mark.slow  # two full stage-2 initialisations: about two CPU minutes
def test_stage2_of_another_moe_variant_keeps_stage1s_weights_and_initialises_its_new_emotion_module(synthetic_tfds, tmp_path):
    run_dir = export_initialised_stage(stage_config("stage1", synthetic_tfds[0]), tmp_path / "run")
    base = stage_config("stage2", synthetic_tfds[0])
    c = A.variant_config(base, run_dir, "no_moe")
    trainer = single_device_trainer(c, tmp_path / "no_moe")
    state = trainer.init_state()
    assert "new trainable tensors initialised" in trainer.initialised_from["unet"]
    stage1 = traverse_util.flatten_dict(jax.device_get(restore_final(run_dir / "stage1" / "final")["unet"]))
    frozen = traverse_util.flatten_dict(jax.device_get(state.frozen["unet"]))
    assert frozen and all(np.array_equal(v, stage1[k]) for k, v in frozen.items())  # every frozen U-Net weight from stage 1
    trainable = traverse_util.flatten_dict(jax.device_get(state.trainable["unet"]))
    assert trainable and all("emotion" in "/".join(k) for k in trainable)


def test_a_shipped_run_is_scored_on_the_held_out_split_the_demo_built_for_it(tmp_path):
    """`moee demo` with a shipped checkpoint builds only `<name>_heldout` (the same test split):
    `moee eval` on that checkpoint finds it from the run's config."""
    config = tmp_path / "run" / "stage2" / "config.json"
    config.parent.mkdir(parents=True)
    config.write_text(json.dumps({"data": {"data_dir": str(tmp_path / "data"), "name": "synthetic_talking_faces/demo_cpu"}}))
    (tmp_path / "data" / "synthetic_talking_faces" / "demo_cpu_heldout").mkdir(parents=True)
    assert E.run_dataset(tmp_path / "run") == (str(tmp_path / "data"), "synthetic_talking_faces/demo_cpu_heldout")
    (tmp_path / "data" / "synthetic_talking_faces" / "demo_cpu").mkdir()  # the full dataset wins where it exists
    assert E.run_dataset(tmp_path / "run") == (str(tmp_path / "data"), "synthetic_talking_faces/demo_cpu")


def test_scoring_defaults_are_the_cpu_demos_so_moee_eval_reproduces_its_numbers():
    from moee_jax.configs import demo

    ours, the_demos = E.EvalSettings(), E.EvalSettings.from_config(demo.get_config("cpu").animate)
    assert (ours.steps, ours.sampler, ours.guidance, ours.compounds) == (
        the_demos.steps, the_demos.sampler, the_demos.guidance, the_demos.compounds,
    )  # fmt: skip
