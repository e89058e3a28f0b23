"""Sampler steps against quality (Performance 3/5, the step-count study): a run's held-out clips
rendered with each ``--settings`` (the first is the reference, 40-step DDIM by default), scored,
and compared clip by clip with the reference (:mod:`moee_jax.eval.paired`). Prints one
markdown table and writes a JSON file; names the fewest DPM-Solver++(2M) steps whose emotion
accuracy, compounds-both-present rate and lip-sync r lose no more than ``--tolerance`` against the
reference (a gain is not a miss; :func:`moee_jax.eval.paired.within`).

Every setting renders the same items from the same noise, so each difference is paired: its
standard error is that of the per-clip changes, not of two independent accuracies.

    python benchmarks/sampler_steps.py --run checkpoints/demo_cpu --data_dir outputs/demo/data \\
        --dataset synthetic_talking_faces/demo_cpu_heldout --speakers 4     # the shipped CPU demo
    python benchmarks/sampler_steps.py --settings ddim:40,dpmpp_2m:10,dpmpp_2m:20 --out steps.json

The labelled and compound items of ``moee eval`` are rendered (speech-only ones are not: their
emotion comes from the voice, which the sampler does not change). ``--speakers N`` takes the first
N held-out identities (sorted), and the batch is sized so the batches are equal (the first batch
of each setting compiles its sampler; seconds per frame are read from the others).
"""

from __future__ import annotations

import argparse
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

DEFAULT_SETTINGS = "ddim:40,ddim:10,dpmpp_2m:5,dpmpp_2m:10,dpmpp_2m:20"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="checkpoints/demo_cpu", help="run directory with a finished stage2 (default: the shipped CPU demo)")
    p.add_argument("--reader", default=None, help="expression-reader file (default: RUN/reader.msgpack)")
    p.add_argument("--data_dir", default=None, help="TFDS data dir of the held-out split (default: the run's)")
    p.add_argument("--dataset", default=None, help="TFDS name/config (default: the run's)")
    p.add_argument("--settings", default=DEFAULT_SETTINGS, help=f"SAMPLER:STEPS,… the first is the reference (default {DEFAULT_SETTINGS})")
    p.add_argument("--speakers", type=int, default=0, help="the first N held-out identities (default 0: all)")
    p.add_argument("--batches", type=int, default=3, help="equal batches per setting (default 3; the first compiles)")
    p.add_argument("--tolerance", type=float, default=0.02, help="the largest paired loss accepted on each measure (default 0.02)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed, the same for every setting")
    p.add_argument("--out", default="sampler_steps.json", help="the JSON file written")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from moee_jax.eval import evaluate as E
    from moee_jax.eval import paired as S

    try:
        settings = [S.Setting.parse(t) for t in args.settings.split(",") if t.strip()]
    except ValueError as e:
        sys.exit(f"sampler_steps: --settings: {e}")
    if len(settings) < 2:
        sys.exit("sampler_steps: --settings: give a reference and at least one setting to compare with it")
    if args.speakers < 0 or args.batches < 1 or args.tolerance < 0:
        sys.exit("sampler_steps: --speakers ≥ 0, --batches ≥ 1 and --tolerance ≥ 0 are required")

    from moee_jax.configs import demo
    from moee_jax.eval.reader import load_reader
    from moee_jax.inference.animator import Animator

    run = pathlib.Path(args.run)
    reader_path = pathlib.Path(args.reader) if args.reader else run / "reader.msgpack"
    if not reader_path.is_file():
        sys.exit(f"sampler_steps: {reader_path}: no reader file (train one with `moee eval {run}` or pass --reader)")
    data_dir, dataset = (args.data_dir, args.dataset) if args.data_dir and args.dataset else E.run_dataset(run)
    animator = Animator.from_run(run)
    reader = load_reader(reader_path)
    tests = E.held_out_clips(data_dir, dataset)
    speakers = sorted(tests)[: args.speakers or None]
    base = E.EvalSettings.from_config(demo.get_config("cpu").animate, seed=args.seed)
    items = E.held_out_items(tests, animator.size, base, speakers, speech_only=False)
    batch_size = math.ceil(len(items) / args.batches)
    print(f"{len(items)} clips ({len(speakers)} held-out identities), batches of {batch_size}, guidance {base.guidance}, seed {args.seed}")
    print(S.TABLE_HEADER)
    meta = {"date": datetime.date.today().isoformat(), "machine": platform.platform(), "cpus": os.cpu_count(), "run": str(run),
            "dataset": f"{data_dir}/{dataset}", "speakers": speakers, "clips": len(items), "batch_size": batch_size,
            "reference": str(settings[0]), "tolerance": args.tolerance}  # fmt: skip
    rows: list[dict] = []
    t0 = time.perf_counter()

    def write(verdict: str | None = None, fewest: int | None = None) -> None:  # after every setting: a stopped run keeps its rows
        meta["seconds"] = round(time.perf_counter() - t0, 1)
        result = {"meta": meta, "rows": rows, "fewest_dpmpp_2m_steps": fewest, "verdict": verdict}
        pathlib.Path(args.out).write_text(json.dumps(result, indent=2, default=float))

    def on_row(row: dict) -> None:
        rows.append(row)
        print(S.format_row(row), flush=True)
        write()

    S.run_study(animator, reader, items, settings, base, batch_size=batch_size, on_row=on_row)
    fewest = S.fewest_steps(rows[1:], "dpmpp_2m", args.tolerance)
    verdict = (f"fewest DPM-Solver++(2M) steps losing at most {args.tolerance} against {settings[0]} on every measure: "
               + (str(fewest) if fewest is not None else "none of those tried"))  # fmt: skip
    print(verdict)
    write(verdict, fewest)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
