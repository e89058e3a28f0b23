"""`benchmarks/device_suite.py`: the smoke run fills every section of the JSON and prints the table;
the budget skips what does not fit and the table says so.

The smoke run is the device run's code on the tiny configs at 32² × 4 frames (CPU, float32). To keep
the default suite short it runs a reduced grid: remat none with the default attention, cuDNN (skipped
on a CPU, with the reason) and no other attention, the batch not doubled (its row is the stage-1
case), one step per case. It still traces, lowers and compiles a stage-1 and a stage-2 training step
and three sampler programs: about 3.5 CPU minutes (measured 2026-12-02 on 2 shared cores; the
compilation cache saves XLA's part, not the tracing and lowering).
"""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def suite(load_benchmark):
    return load_benchmark("device_suite")


def test_smoke_run_measures_every_section_and_prints_the_table(suite, tmp_path, capsys):
    out = tmp_path / "suite.json"
    doc = suite.main(["--smoke", "--out", str(out), "--remats", "none", "--attentions", "blockwise,cudnn", "--ddim_steps", "2",
                      "--max_batch", "1", "--steps", "1", "--warmup", "0"])  # fmt: skip
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["table"] == doc["table"] and data["table"] in printed
    assert printed.count("| section | case |") == 1  # one table
    for section in ("inference", "stage2", "stage1", "batch"):
        assert data[section], f"no {section} rows"
    rows = [r for s in ("inference", "stage2", "stage1", "batch") for r in data[s]]
    ran = [r for r in rows if r["status"] == "ok"]
    assert all(r["status"] == "ok" or r["status"].startswith("skipped (cudnn needs an NVIDIA GPU") for r in rows), rows
    for r in ran:
        assert r["compile_s"] > 0 and r["wall_s"] > 0 and r["peak_bytes"] > 0, r
        assert f"| {r['section']} | {r['case']} |" in data["table"]
    for r in ran:
        if r["section"] in ("stage1", "stage2", "batch"):
            assert r["step_s"] > 0 and r["examples_per_s"] > 0 and r["flops_per_step"] > 0 and r["mfu"] > 0, r
            assert r["xla_plan_bytes"] > 0 and r["loss"] == r["loss"], r  # a finite loss
    samplers = {r["case"]: r for r in data["inference"]}
    for name, steps in (("ddim 2 steps", 2), ("dpmpp_2m 2 steps", 2)):
        r = samplers[name]
        assert r["steps"] == steps and r["frames"] == 4 and r["clips"] == 1 and r["cfg_branches"] >= 2
        assert r["seconds_per_frame"] >= r["sampling_seconds_per_frame"] > 0
    conditions = samplers["conditions (ReferenceNet once per clip)"]
    assert conditions["conditions_s"] > 0 and conditions["calls_per_clip"] == 1 and 0 < conditions["share_of_clip"]
    assert [r["batch"] for r in data["batch"]] == [1] and data["batch"][0]["reused"]  # batch 1: the stage-1 case
    assert data["largest_batch"] == {"batch": 1, "setting": "blockwise, remat none", "stopped": "--max_batch 1"}
    assert data["stage2"][0]["goal_bytes"] == 40e9
    meta = data["meta"]
    assert meta["smoke"] and meta["variant"] == "tiny" and meta["peak_flops"] > 0 and meta["devices_used"] == 1


def test_budget_estimates_from_the_longest_case_so_far(suite):
    now = [0.0]
    budget = suite.Budget(100.0, clock=lambda: now[0])
    assert budget.fits("stage1") and budget.estimate("stage1") == 0.0  # nothing measured: the first case runs
    budget.record("inference", 30.0)
    assert budget.estimate("stage1") == 30.0  # another section's time until this one has its own
    budget.record("stage1", 50.0)
    budget.record("stage1", 20.0)
    assert budget.estimate("stage1") == 50.0
    now[0] = 40.0
    assert budget.fits("stage1")  # 50 s of 60 left
    now[0] = 60.0
    assert not budget.fits("stage1") and budget.fits("inference")  # 40 s left: 50 does not fit, 30 does
    now[0] = 101.0
    assert not budget.fits("inference")


def test_skipped_and_failed_cases_are_rows_of_the_table(suite):
    rows = [
        {"section": "stage1", "case": "xla, remat full", "batch": 1, "status": "skipped (budget)"},
        {"section": "batch", "case": "blockwise, remat dots, batch 64", "batch": 64, "status": "out of memory"},
    ]
    meta = dict(date="2026-12-02", device_kind="cpu", platform="cpu", host="x86_64, 2 CPUs", variant="tiny", size=32, frames=4,
                motion_frames=2, dtype="float32", peak_flops=None, peak_source="n/a", elapsed_s=1.0, budget_s=2.0)  # fmt: skip
    table = suite.format_table(meta, rows)
    assert "| stage1 | xla, remat full | 1 | | | | | | | | skipped (budget) |" in table
    assert "| out of memory |" in table and len(table.splitlines()) == 5
    assert suite.out_of_memory(RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 81.2GiB"))
    assert not suite.out_of_memory(ValueError("shapes do not match"))
