"""`benchmarks/unet_step.py`'s summary: with several rounds, the ratio column is the median of the
rounds' own ratios (each round times PyTorch and ours back to back), shown with their range, so a slow
spell that hits one round counts once instead of skewing one side's median."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def unet_step(load_benchmark):
    return load_benchmark("unet_step")


# (step ms, forward ms) per round; round 2 is a slow spell for both sides.
ROUNDS = [
    {"ours": (90.0, 20.0), "torch": (100.0, 25.0)},
    {"ours": (180.0, 40.0), "torch": (150.0, 50.0)},
    {"ours": (85.0, 18.0), "torch": (100.0, 20.0)},
]


def test_the_ratio_is_the_median_of_the_rounds_ratios_with_their_range(unet_step):
    ours, ref, ratio, lowest, highest = unet_step.summarise(ROUNDS, 0)
    assert (ours, ref) == (90.0, 100.0)
    assert ratio == pytest.approx(0.9)  # ratios 0.9, 1.2, 0.85
    assert (lowest, highest) == (pytest.approx(0.85), pytest.approx(1.2))
    assert unet_step.summarise(ROUNDS, 1)[2] == pytest.approx(0.8)  # forward: 0.8, 0.8, 0.9


def row(rounds):
    return {"name": "mid", "batch": 2, "frames": 1, "side": 32, "ours": {"params": 35e6, "flops": 43e9}, "rounds": rounds}


def test_the_table_shows_the_range_only_when_there_were_several_rounds(unet_step):
    several = unet_step.table([row(ROUNDS)], None).splitlines()[-1]
    assert "| 90.0 | 100.0 | 0.90 (0.85–1.20) |" in several
    assert "| 0.80 (0.80–0.90) |" in several
    assert "| 43.00 | 477.8 |" in several  # GFLOP/s from the median step
    one = unet_step.table([row(ROUNDS[:1])], None).splitlines()[-1]
    assert "| 90.0 | 100.0 | 0.90 | 20.0 | 25.0 | 0.80 |" in one
