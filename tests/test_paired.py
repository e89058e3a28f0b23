"""Paired comparisons: renders of the same clips compared clip by clip. The step-count study
(`benchmarks/sampler_steps.py`): settings parsed strictly, and the fewest DPM-Solver++ steps chosen
only where every larger count also holds. Run comparisons (`benchmarks/compare_runs.py`): every run
paired with the first."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import numpy as np
import pytest

from moee_jax.eval import paired as S

REPO = pathlib.Path(__file__).resolve().parent.parent


def judged(speaker, tag, kind, *, predicted=None, both=None, r=0.8):
    """One :func:`moee_jax.eval.evaluate.judge_items` entry with the fields the comparison reads."""
    j = {"speaker": speaker, "tag": tag, "kind": kind, "target": tag, "lip_sync": {"pearson": r}}
    if kind == "basic":
        j["predicted"] = predicted
    if kind == "compound":
        j["compound"] = {"both_present": both}
    return j


def render(correct: list[bool], both: list[bool], rs: list[float]):
    """Judgements of len(correct) basic clips ('anger' each, read right or as 'sadness'), compound clips."""
    out = [judged(f"s{i}", "anger", "basic", predicted="anger" if ok else "sadness", r=rs[i]) for i, ok in enumerate(correct)]
    out += [judged(f"s{i}", "happily_surprised", "compound", both=b, r=0.5) for i, b in enumerate(both)]
    return out


def test_a_setting_is_sampler_colon_steps_and_anything_else_names_the_text():
    assert S.Setting.parse("dpmpp_2m:10") == S.Setting("dpmpp_2m", 10)
    assert str(S.Setting.parse(" ddim:40 ")) == "ddim:40"
    for bad in ("ddim", "ddim:0", "euler:10", "ddim:ten"):
        with pytest.raises(ValueError, match=repr(bad)):
            S.Setting.parse(bad)


def test_paired_differences_count_changed_clips_and_their_standard_error():
    ref = render([True, True, False, False], [True, False], [0.8, 0.8, 0.8, 0.8])
    cand = render([True, False, True, False], [True, True], [0.9, 0.8, 0.8, 0.7])
    d = S.paired_difference(ref, cand)
    assert d["emotion"]["delta"] == 0.0 and d["emotion"]["n"] == 4
    assert d["emotion"]["changed"] == 0.5  # two clips read differently, one gained and one lost
    assert d["emotion"]["se"] == pytest.approx(np.std([0, -1, 1, 0], ddof=1) / 2)
    assert d["compounds"]["delta"] == 0.5 and d["compounds"]["changed"] == 0.5
    assert d["lip_sync"]["delta"] == pytest.approx(0.0) and d["lip_sync"]["n"] == 6


def test_identical_renders_differ_by_zero_with_zero_error_and_are_within_any_tolerance():
    ref = render([True, False, True], [False, True], [0.1, 0.5, 0.9])
    d = S.paired_difference(ref, [dict(j) for j in ref])
    assert {m: d[m]["delta"] for m in d} == {"emotion": 0.0, "compounds": 0.0, "lip_sync": 0.0}
    assert d["emotion"]["se"] == 0.0 and d["emotion"]["changed"] == 0.0
    assert S.within(d, 0.0)


def test_compact_judgements_compare_as_the_full_ones_and_are_json_ready():
    import json

    ref = render([True, False, True], [False, True], [0.1, 0.5, 0.9])
    cand = render([False, False, True], [True, True], [0.2, 0.5, 0.8])
    for j in ref + cand:
        j["aus"] = np.zeros((4, 11))  # what judge_items also carries, and compact drops
    assert S.paired_difference(S.compact(ref), S.compact(cand)) == S.paired_difference(ref, cand)
    json.dumps(S.compact(ref))


def test_renders_of_different_clips_cannot_be_compared():
    ref = render([True, True], [True], [0.8, 0.8])
    with pytest.raises(ValueError, match="different items"):
        S.paired_difference(ref, ref[:-1])


def _row(sampler, steps, emotion_delta):
    diff = {"emotion": {"delta": emotion_delta}, "compounds": {"delta": 0.0}, "lip_sync": {"delta": 0.01}}
    return {"sampler": sampler, "steps": steps, "paired": diff}


def test_the_fewest_steps_lose_no_more_than_the_tolerance_and_neither_does_any_larger_count():
    rows = [_row("dpmpp_2m", 20, 0.0), _row("dpmpp_2m", 10, -0.01), _row("dpmpp_2m", 5, -0.1), _row("ddim", 2, 0.0)]
    assert S.fewest_steps(rows, "dpmpp_2m", 0.02) == 10
    assert S.fewest_steps(rows, "dpmpp_2m", 0.2) == 5  # the loss of 0.1 at 5 steps is allowed
    lucky = [_row("dpmpp_2m", 20, 0.0), _row("dpmpp_2m", 10, -0.05), _row("dpmpp_2m", 5, 0.0)]
    assert S.fewest_steps(lucky, "dpmpp_2m", 0.02) == 20  # 5 passes between failing 10: not chosen
    assert S.fewest_steps([_row("dpmpp_2m", 5, 0.036)], "dpmpp_2m", 0.02) == 5  # a gain is not a loss of quality
    assert S.fewest_steps([_row("dpmpp_2m", 20, -0.5)], "dpmpp_2m", 0.02) is None


def test_a_row_prints_as_one_table_line_with_paired_deltas():
    row = {"sampler": "dpmpp_2m", "steps": 10, "s_per_frame": 0.1234, "s_per_frame_all": 0.2,
           "headline": {"emotion_accuracy": 0.5, "compound_both_present_rate": 0.25, "lip_sync_pearson": 0.8},
           "paired": S.paired_difference(render([True], [True], [0.8]), render([False], [True], [0.7]))}  # fmt: skip
    line = S.format_row(row)
    assert line.startswith("| dpmpp_2m:10 | 0.500 | -1.000 ± – | 1.000 | 0.250 |") and line.count("|") == S.TABLE_HEADER.splitlines()[0].count("|")
    assert "(reference)" in S.format_row({k: v for k, v in row.items() if k != "paired"})


def test_the_benchmark_refuses_a_bad_setting_before_loading_anything():
    result = subprocess.run([sys.executable, "benchmarks/sampler_steps.py", "--settings", "ddim:40,dpm:10"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert result.returncode != 0 and "--settings" in result.stderr and "'dpm:10'" in result.stderr


def test_every_run_is_paired_with_the_first_and_named_in_its_row(monkeypatch):
    renders = {"a": render([True, True], [True], [0.8, 0.8]), "b": render([True, False], [False], [0.8, 0.6])}
    folders = []
    monkeypatch.setattr(S, "render_and_judge", lambda animator, reader, items, settings, batch_size, videos_dir: folders.append(videos_dir) or {
        "headline": {"emotion_accuracy": 0.5}, "s_per_frame": 0.1, "s_per_frame_all": 0.2, "frames": 3, "seconds": 1.0,
        "clips": S.compact(renders[animator])})  # fmt: skip
    seen = []
    rows = S.compare_runs([("shipped", "a"), ("decorrelated", "b"), ("again", "a")], None, [], None, on_row=seen.append, videos_dir="v")
    assert seen == rows and [r["run"] for r in rows] == ["shipped", "decorrelated", "again"] and "paired" not in rows[0]
    assert [str(f) for f in folders] == ["v/0_shipped", "v/1_decorrelated", "v/2_again"]  # one folder per run, even for a repeated name
    assert rows[1]["paired"]["emotion"]["delta"] == -0.5 and rows[1]["paired"]["compounds"]["delta"] == -1.0
    assert rows[2]["paired"]["emotion"]["changed"] == 0.0  # paired with the first run, not with the one before
    assert S.format_row(rows[1]).startswith("| decorrelated | 0.500 | -0.500 ± 0.500 | 0.500 |")


def test_a_run_given_as_a_path_gets_a_plain_folder_name():
    assert S.run_folder(1, "/work/exp/upper/run_w3") == "1_work_exp_upper_run_w3"
    assert S.run_folder(0, "checkpoints/demo_cpu") == "0_checkpoints_demo_cpu" and S.run_folder(2, "w=3 (upper)") == "2_w_3_upper"


@pytest.mark.parametrize("args, message", [
    (["--runs", "checkpoints/demo_cpu"], "at least one run to compare"),
    (["--runs", "checkpoints/demo_cpu", "no/such/run"], "--runs no/such/run: no stage2/config.json"),
    (["--runs", "checkpoints/demo_cpu", "checkpoints/demo_cpu", "--names", "one"], "--names: 1 names for 2 runs"),
    (["--runs", "checkpoints/demo_cpu", "checkpoints/demo_cpu", "--sampler", "dpm"], "--sampler 'dpm'"),
])  # fmt: skip
def test_the_run_comparison_refuses_bad_arguments_before_loading_anything(args, message):
    result = subprocess.run([sys.executable, "benchmarks/compare_runs.py", *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and message in result.stderr


@pytest.mark.slow  # renders 8 clips twice (~4 CPU minutes)
def test_the_study_renders_each_setting_on_the_same_clips_and_pairs_them_with_the_first(tiny_run, synthetic_tfds):
    from moee_jax.eval import evaluate as E
    from moee_jax.eval import reader as R
    from moee_jax.inference.animator import Animator

    reader = R.train_reader(32, steps=3, batch_size=8, num_clips=8, frames_per_clip=4, num_identities=8, frames_per_identity=2)
    animator = Animator.from_run(tiny_run)
    tests = E.held_out_clips(*synthetic_tfds)
    base = E.EvalSettings(compounds={"happily_surprised": "happy:0.5,surprised:0.5"})
    items = E.held_out_items(tests, animator.size, base, sorted(tests)[:1], speech_only=False)
    seen = []
    rows = S.run_study(animator, reader, items, [S.Setting("ddim", 1), S.Setting("ddim", 1)], base, batch_size=4, on_row=seen.append)
    assert seen == rows and [r["steps"] for r in rows] == [1, 1] and "paired" not in rows[0]
    same = rows[1]["paired"]  # the same setting twice: the same noise gives the same clips
    assert same["emotion"]["changed"] == 0.0 and same["emotion"]["n"] == 7 and same["compounds"]["n"] == 1
    assert abs(same["lip_sync"]["delta"]) < 1e-6
    assert rows[0]["frames"] == rows[1]["frames"] > 0 and len(rows[0]["clips"]) == len(items)
    assert rows[0]["s_per_frame"] > 0  # from the second batch of 4: the first compiled the sampler


@pytest.mark.slow  # renders 8 clips twice (~4 CPU minutes)
def test_a_run_compared_with_itself_changes_no_clip(tiny_run, synthetic_tfds, tmp_path):
    from moee_jax.eval import evaluate as E
    from moee_jax.eval import reader as R
    from moee_jax.inference.animator import Animator

    reader = R.train_reader(32, steps=3, batch_size=8, num_clips=8, frames_per_clip=4, num_identities=8, frames_per_identity=2)
    animators = [("first", Animator.from_run(tiny_run)), ("second", Animator.from_run(tiny_run))]
    tests = E.held_out_clips(*synthetic_tfds)
    settings = E.EvalSettings(sampler="ddim", steps=1, compounds={"happily_surprised": "happy:0.5,surprised:0.5"})
    items = E.held_out_items(tests, animators[0][1].size, settings, sorted(tests)[:1], speech_only=False)
    rows = S.compare_runs(animators, reader, items, settings, batch_size=4, on_row=lambda row: None, videos_dir=tmp_path)
    same = rows[1]["paired"]  # the same weights and the same noise: the same clips
    written = [sorted(p.name for p in (tmp_path / folder).glob("*.mp4")) for folder in ("0_first", "1_second")]
    assert written[0] == written[1] == sorted(f"{it.speaker}_{it.tag}.mp4" for it in items)
    assert [r["run"] for r in rows] == ["first", "second"] and same["emotion"]["changed"] == 0.0 and same["emotion"]["n"] == 7
    assert abs(same["lip_sync"]["delta"]) < 1e-6 and rows[0]["headline"] == rows[1]["headline"]
