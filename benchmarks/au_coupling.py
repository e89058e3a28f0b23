"""How much the generated upper face moves with the jaw, against the ground truth of the same requests
(:func:`moee_jax.eval.coupling.coupling_rows`). Prints one markdown table and writes a JSON file.

Reads the labelled clips a ``moee demo`` / ``moee eval`` run wrote (``<speaker>_<class>.mp4``) and
redraws each request's ground truth (the identity showing the class while saying its neutral clip's
words); one reader reads both at the reader's size. Per class: the within-clip Pearson r between the
jaw (AU26) and the brow, lid and lip AUs, and those AUs' means.

    python benchmarks/au_coupling.py --videos outputs/demo/videos \\
        --data_dir outputs/demo/data --dataset synthetic_talking_faces/demo_cpu_heldout
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--videos", required=True, help="folder of generated <speaker>_<class>.mp4 clips")
    p.add_argument("--data_dir", required=True, help="TFDS data dir of the held-out split the clips were made from")
    p.add_argument("--dataset", required=True, help="TFDS name/config, e.g. synthetic_talking_faces/demo_cpu_heldout")
    p.add_argument("--reader", default=str(REPO / "checkpoints" / "demo_cpu" / "reader.msgpack"), help="expression-reader file")
    p.add_argument("--skip_frames", type=int, default=12, help="leave out each clip's first frames (default 12: the first generated clip)")
    p.add_argument("--out", default="au_coupling.json", help="the JSON file written")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> str | None:
    """The first problem with the arguments, before anything is loaded (None when there is none)."""
    if not pathlib.Path(args.videos).is_dir():
        return f"--videos {args.videos}: not a folder"
    if not pathlib.Path(args.reader).is_file():
        return f"--reader {args.reader}: no reader file there"
    if args.skip_frames < 0:
        return "--skip_frames must be ≥ 0"
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    problem = check_args(args)
    if problem:
        sys.exit(f"au_coupling: {problem}")

    from moee_jax.eval import coupling as C
    from moee_jax.eval import evaluate as E
    from moee_jax.eval.reader import load_reader

    reader = load_reader(args.reader)
    tests = E.held_out_clips(args.data_dir, args.dataset)
    rows, skipped = C.coupling_rows(reader, tests, args.videos, skip_frames=args.skip_frames)
    if not rows:
        sys.exit(f"au_coupling: no <speaker>_<class>.mp4 of the {len(tests)} held-out identities in {args.videos}")
    print(C.format_rows(rows))
    for line in skipped:
        print(f"skipped {line}")
    pathlib.Path(args.out).write_text(json.dumps({"videos": args.videos, "dataset": f"{args.data_dir}/{args.dataset}",
                                                  "reader": args.reader, "rows": rows, "skipped": skipped}, indent=2))  # fmt: skip
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
