"""``moee train`` and ``moee demo``."""

from __future__ import annotations

import contextlib
import sys

from absl import flags

from moee_jax.cli.common import config_flag, log_file


def demo() -> None:
    config = config_flag("demo.py:cpu")
    out = flags.DEFINE_string("out", "outputs/demo", "Output directory (re-runs reuse its data, stages and reader).")
    scratch = flags.DEFINE_bool("from_scratch", False, "Train every stage and the reader instead of scoring the shipped checkpoint.")
    checkpoint = flags.DEFINE_string("checkpoint", None, "Score this run directory instead of the config's shipped checkpoint.")

    def main(argv):
        del argv
        from moee_jax import checks
        from moee_jax.demo import DemoError, run_demo

        try:
            checks.writable_location(out.value, "--out", kind="folder", min_free_mb=500)
        except checks.UsageError as e:
            sys.exit(f"moee demo: {e}")
        try:
            summary = run_demo(config.value, out.value, from_scratch=scratch.value, checkpoint=checkpoint.value)
        except DemoError as e:
            sys.exit(f"moee demo: {e}")
        head, ceiling = summary.get("headline", {}), summary.get("ceiling", {}).get("headline", {})
        print(f"wrote {out.value} (generated, ceiling = the reader on the ground truth as the model sees it):")
        for k, v in head.items():
            if isinstance(v, float):
                print(f"  {k:28s} {v:7.3f}" + (f"   ceiling {ceiling[k]:.3f}" if isinstance(ceiling.get(k), float) else ""))
        print(f"total {summary['timings_s']['total']} s; see {out.value}/metrics.md")

    return main


def train() -> None:
    config = config_flag("stage1.py:tiny")
    run_dir = flags.DEFINE_string("run_dir", None, "Run directory (local path or gs://); every stage writes RUN/<stage>/.", required=True)
    max_steps = flags.DEFINE_integer("max_steps", None, "Stop after this many steps of this invocation (resume later).")

    def main(argv):
        del argv
        # Multi-host set-up must come before anything touches JAX's backends.
        from moee_jax import checks
        from moee_jax.configs import training as training_configs
        from moee_jax.train.distributed import initialize_distributed

        try:  # before anything is built or written
            training_configs.check(config.value)
            checks.number(max_steps.value, "--max_steps", minimum=1, integer=True)
            checks.writable_location(run_dir.value, "--run_dir", kind="folder")
        except checks.UsageError as e:
            sys.exit(f"moee train: {e}")
        info = initialize_distributed()
        from moee_jax.train.trainer import TrainingError, train

        log_path = f"{run_dir.value}/{config.value.stage}/train.log" if info.process_id == 0 else None
        try:
            with log_file(log_path) if log_path else contextlib.nullcontext():
                result = train(config.value, run_dir.value, max_steps=max_steps.value)
        except (TrainingError, FileNotFoundError, ValueError) as e:
            sys.exit(f"moee train: {e}")
        state = "interrupted (SIGTERM), checkpoint saved" if result.interrupted else "done"
        if info.process_id == 0:
            print(
                f"{result.stage}: {state} at step {result.final_step}; {result.skipped_steps} non-finite step(s) skipped; "
                f"run directory {result.run_dir}; full log {log_path}"
            )

    return main
