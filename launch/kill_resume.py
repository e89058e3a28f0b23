#!/usr/bin/env python
"""Crash-resume at random moments: train a stage straight through once, then again while killing it
with SIGKILL at ``--kills`` random moments (every other one while an asynchronous Orbax checkpoint
write is in flight) and resuming each time. Passes when the killed run ends exactly as the straight
one: every step logged once in ``metrics.jsonl``, the same loss at every step (so the same batches
— the data iterator neither repeated nor skipped a sample), no checkpoint set aside as damaged,
and bit-identical final parameters.

    python launch/kill_resume.py --data_dir data/tfds --out /tmp/kill --kills 50 --steps 120

Prints one JSON summary line; exit status 0 when every check holds. ``tests/test_train_runtime.py``
runs it with 10 kills.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent


def _losses(stage_dir: pathlib.Path) -> dict[int, float]:
    path = stage_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # a line cut short by the kill
            continue
        out[row["step"]] = row["loss"]
    return out


def _command(run_dir: pathlib.Path, args) -> list[str]:
    return [sys.executable, "-m", "moee_jax.cli", "train", f"--config={args.config}", f"--run_dir={run_dir}",
            f"--config.data.data_dir={args.data_dir}", f"--config.train.steps={args.steps}", "--config.train.log_every=1",
            f"--config.checkpoint.every_steps={args.every}", "--config.checkpoint.async_save=True"]  # fmt: skip


def kill_and_resume(args) -> dict:
    out = pathlib.Path(args.out)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run(_command(out / "straight", args), env=env, check=True, capture_output=True, timeout=args.timeout)
    command, stage = _command(out / "killed", args), out / "killed" / args.stage
    rng = np.random.default_rng(args.seed)
    kills, during_write = 0, 0
    while kills < args.kills:
        done = max(_losses(stage), default=0)
        if done >= args.steps - 2:
            break  # too close to the end for another kill
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        target = done + 1 + int(rng.integers(0, 3))  # one to three steps past the last one logged
        in_write = kills % 2 == 1  # every other kill waits for a checkpoint write in flight
        started = time.time()
        while time.time() - started < args.timeout and proc.poll() is None:
            logged = max(_losses(stage), default=0) >= target
            writing = any("tmp" in p.name for p in (stage / "checkpoints").glob("*"))  # an Orbax write in flight
            if logged and (writing or not in_write or time.time() - started > 120):
                during_write += writing
                break
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    final = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)  # to the end
    logged = [json.loads(line)["step"] for line in (stage / "metrics.jsonl").read_text().splitlines()]
    checks = {
        "finished": final.returncode == 0,
        "every_step_logged_once": logged == list(range(1, args.steps + 1)),
        "same_loss_every_step": _losses(stage) == _losses(out / "straight" / args.stage),
        "no_damaged_checkpoint": not list(stage.glob("checkpoints/damaged.*")),
        "final_params_bit_identical": final.returncode == 0 and _same_params(out, args.stage),
    }
    return {"kills": kills, "kills_during_a_checkpoint_write": during_write, "checks": checks, "passed": all(checks.values()),
            "stderr_tail": final.stderr[-2000:] if final.returncode else ""}  # fmt: skip


def _same_params(out: pathlib.Path, stage: str) -> bool:
    import jax

    from moee_jax.checkpoint.orbax import restore_params

    a, b = (restore_params(out / run / stage / "final") for run in ("straight", "killed"))
    leaves_a, leaves_b = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    return len(leaves_a) == len(leaves_b) and all(
        pa == pb and np.array_equal(np.asarray(va), np.asarray(vb)) for (pa, va), (pb, vb) in zip(leaves_a, leaves_b)
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_dir", required=True, help="TFDS data dir holding the config's dataset")
    p.add_argument("--out", required=True, help="folder for the two runs (must not hold them yet)")
    p.add_argument("--config", default=str(REPO / "configs" / "vae.py") + ":tiny")
    p.add_argument("--stage", default="vae", help="the config's stage (its folder in the run)")
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--every", type=int, default=2, help="checkpoint every this many steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=int, default=900, help="seconds for one training process")
    args = p.parse_args(argv)
    if args.kills < 1 or args.steps < args.kills + 3 or args.every < 1:
        p.error("need --kills >= 1, --steps >= kills + 3 and --every >= 1")
    result = kill_and_resume(args)
    print(json.dumps(result))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
