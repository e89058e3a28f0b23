"""Two or more trained runs on the same held-out clips, compared clip by clip with the first
(:func:`moee_jax.eval.paired.compare_runs`). Prints one markdown table and writes a JSON file.

Every run renders the same items (portrait, speech, emotion request) with the same sampler, guidance
and seed, so from the same noise, and one reader reads them all; each run after the first gets the
paired differences of emotion accuracy, compounds both present and lip-sync r (mean of per-clip
changes ± their standard error) and the share of clips whose read class changed. This is how a
change to the model is judged on few clips: two independent accuracies over 56 clips differ by
0.06 by chance, a paired difference only by what the clips that changed say.

    python benchmarks/compare_runs.py --runs checkpoints/demo_cpu outputs/other/run \\
        --data_dir outputs/demo/data --dataset synthetic_talking_faces/demo_cpu_heldout --speakers 4

The reader is ``--reader`` (default: the first run's ``reader.msgpack``). The labelled and compound
items of ``moee eval`` are rendered; ``--speech_only`` adds the clips whose emotion comes from the
speech alone (their accuracy is in each row's headline, not in the paired columns). The sampler,
guidance and seed are the CPU demo's (``configs/demo.py``'s ``animate`` block) unless given.
``--videos DIR`` also writes every run's clips, as ``moee eval`` names them, to ``DIR/<i>_<name>/``
(``i`` the run's place in ``--runs``), which ``benchmarks/au_coupling.py --videos`` reads.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import pathlib
import platform
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", required=True, help="run directories with a finished stage2; the first is the reference")
    p.add_argument("--names", nargs="+", default=None, help="a label per run for the table (default: the paths)")
    p.add_argument("--reader", default=None, help="expression-reader file (default: the first run's reader.msgpack)")
    p.add_argument("--data_dir", default=None, help="TFDS data dir of the held-out split (default: the first run's)")
    p.add_argument("--dataset", default=None, help="TFDS name/config (default: the first run's)")
    p.add_argument("--speakers", type=int, default=0, help="the first N held-out identities (default 0: all)")
    p.add_argument("--speech_only", action="store_true", help="also render the clips whose emotion comes from the speech alone")
    p.add_argument("--sampler", default=None, help="ddim | dpmpp_2m (default: the demo's)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the demo's)")
    p.add_argument("--batches", type=int, default=4, help="equal batches per run (default 4; the first compiles)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed, the same for every run")
    p.add_argument("--videos", default=None, help="also write each run's clips to VIDEOS/<i>_<name>/ (for benchmarks/au_coupling.py)")
    p.add_argument("--out", default="compare_runs.json", help="the JSON file written")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> str | None:
    """The first problem with the arguments, before anything is loaded (None when there is none)."""
    from moee_jax.diffusion import SAMPLERS

    if len(args.runs) < 2:
        return "--runs: give a reference run and at least one run to compare with it"
    if args.names is not None and len(args.names) != len(args.runs):
        return f"--names: {len(args.names)} names for {len(args.runs)} runs"
    for run in args.runs:
        if not (pathlib.Path(run) / "stage2" / "config.json").is_file():
            return f"--runs {run}: no stage2/config.json there (a run directory with a finished stage 2 is needed)"
    if args.sampler is not None and args.sampler not in SAMPLERS:
        return f"--sampler {args.sampler!r}: choose one of {', '.join(SAMPLERS)}"
    if (args.steps is not None and args.steps < 1) or args.speakers < 0 or args.batches < 1 or args.seed < 0:
        return "--steps ≥ 1, --speakers ≥ 0, --batches ≥ 1 and --seed ≥ 0 are required"
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    problem = check_args(args)
    if problem:
        sys.exit(f"compare_runs: {problem}")

    from moee_jax.configs import demo
    from moee_jax.eval import evaluate as E
    from moee_jax.eval import paired as P
    from moee_jax.eval.reader import load_reader
    from moee_jax.inference.animator import Animator

    first = pathlib.Path(args.runs[0])
    reader_path = pathlib.Path(args.reader) if args.reader else first / "reader.msgpack"
    if not reader_path.is_file():
        sys.exit(f"compare_runs: {reader_path}: no reader file (pass --reader)")
    data_dir, dataset = (args.data_dir, args.dataset) if args.data_dir and args.dataset else E.run_dataset(first)
    names = args.names or args.runs
    animators = [(name, Animator.from_run(run)) for name, run in zip(names, args.runs)]
    sizes = {name: a.size for name, a in animators}
    if len(set(sizes.values())) > 1:
        sys.exit(f"compare_runs: the runs draw frames of different sizes {sizes}; only runs of one size compare clip by clip")
    reader = load_reader(reader_path)
    base = E.EvalSettings.from_config(demo.get_config("cpu").animate, seed=args.seed)
    base = dataclasses.replace(base, sampler=args.sampler or base.sampler, steps=args.steps or base.steps)
    tests = E.held_out_clips(data_dir, dataset)
    speakers = sorted(tests)[: args.speakers or None]
    items = E.held_out_items(tests, animators[0][1].size, base, speakers, speech_only=args.speech_only)
    batch_size = math.ceil(len(items) / args.batches)
    print(f"{len(items)} clips ({len(speakers)} held-out identities), {base.sampler}:{base.steps}, guidance {base.guidance}, "
          f"seed {args.seed}, batches of {batch_size}")  # fmt: skip
    print(P.TABLE_HEADER)
    meta = {"date": datetime.date.today().isoformat(), "machine": platform.platform(), "cpus": os.cpu_count(),
            "runs": dict(zip(names, args.runs)), "reader": str(reader_path), "dataset": f"{data_dir}/{dataset}",
            "speakers": speakers, "clips": len(items), "batch_size": batch_size, "videos": args.videos,
            "settings": {"sampler": base.sampler, "steps": base.steps, "guidance": base.guidance, "seed": args.seed}}  # fmt: skip
    rows: list[dict] = []
    t0 = time.perf_counter()

    def on_row(row: dict) -> None:  # the JSON after every run: a stopped comparison keeps its rows
        rows.append(row)
        print(P.format_row(row), flush=True)
        meta["seconds"] = round(time.perf_counter() - t0, 1)
        pathlib.Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=float))

    P.compare_runs(animators, reader, items, base, batch_size=batch_size, on_row=on_row, videos_dir=args.videos)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
