"""``moee analyze RUN [--out DIR]`` (= ``python -m moee_jax.analysis``): the latent-space analysis of a run into a folder.

Writes ``clustering.md`` (the README's clustering-strength table), ``clustering.json``,
``analysis.json``, the figures and the interpolation videos (see :mod:`moee_jax.analysis.report`);
``DIR`` defaults to ``RUN/analysis``.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys

from moee_jax import checks, console
from moee_jax.analysis.report import AnalysisSettings, analyze_run
from moee_jax.emotions import canonical_emotion


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moee analyze", description="The latent-space analysis of a run, written to a folder.")
    defaults = AnalysisSettings()
    p.add_argument("run_dir", help="run directory of `moee train` / `moee demo` (holds stage2/, and embedder/ when trained)")
    p.add_argument("--out", help="output folder (default: RUN/analysis)")
    p.add_argument("--data_dir", help="TFDS data_dir (default: the run's stage2/config.json data.data_dir)")
    p.add_argument("--dataset", help="TFDS name, e.g. synthetic_talking_faces/demo_cpu (default: the run's)")
    p.add_argument("--split", default=defaults.split, help="dataset split to analyse (default: %(default)s)")
    p.add_argument("--windows_per_clip", type=int, default=defaults.windows_per_clip, help="windows per clip (default: %(default)s)")
    p.add_argument("--max_clips", type=int, help="analyse only the first N clips of the split")
    p.add_argument("--timestep", type=int, help="diffusion timestep of the gate pass (default: half the schedule)")
    p.add_argument("--pair", default=",".join(defaults.pair), help="the two emotions to interpolate, A,B (default: %(default)s)")
    p.add_argument("--alphas", type=int, default=defaults.alphas, help="interpolation steps from A to B (default: %(default)s)")
    p.add_argument("--steps", type=int, help="sampler steps of the interpolation renders (default: the run's)")
    p.add_argument("--seconds", type=float, default=defaults.seconds, help="speech seconds of the renders (default: %(default)s)")
    p.add_argument("--no_interpolation", action="store_true", help="skip rendering the interpolations")
    p.add_argument("--seed", type=int, default=defaults.seed)
    return p


def main(argv: list[str] | None = None) -> int:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    args = parser().parse_args(argv)
    pair = tuple(e.strip() for e in args.pair.split(","))
    try:  # every flag before the run is read or anything is written
        if len(pair) != 2:
            raise checks.UsageError(f"--pair {args.pair!r}: give two emotions, e.g. happy,sad")
        for emotion in pair:
            try:
                canonical_emotion(emotion)
            except ValueError as e:
                raise checks.UsageError(f"--pair {args.pair!r}: {e}") from None
        checks.number(args.windows_per_clip, "--windows_per_clip", minimum=1, integer=True)
        checks.number(args.max_clips, "--max_clips", minimum=1, integer=True)
        checks.number(args.timestep, "--timestep", minimum=0, integer=True)
        checks.number(args.alphas, "--alphas", minimum=2, integer=True)
        checks.number(args.steps, "--steps", minimum=1, integer=True)
        checks.number(args.seconds, "--seconds", above=0)
        checks.number(args.seed, "--seed", minimum=0, integer=True)
    except checks.UsageError as e:
        print(f"moee analyze: {e}", file=sys.stderr)
        return 1
    settings = dataclasses.replace(
        AnalysisSettings(), split=args.split, windows_per_clip=args.windows_per_clip, max_clips=args.max_clips, timestep=args.timestep,
        interpolate=not args.no_interpolation, pair=pair, alphas=args.alphas, steps=args.steps, seconds=args.seconds, seed=args.seed,
    )  # fmt: skip
    out = pathlib.Path(args.out) if args.out else pathlib.Path(args.run_dir) / "analysis"
    if not pathlib.Path(args.run_dir).is_dir():
        print(f"moee analyze: RUN {args.run_dir}: directory not found; pass the run directory of `moee train`", file=sys.stderr)
        return 1
    from moee_jax.checkpoint.run import RunError

    try:
        with console.log_to(out / "analyze.log"):
            summary = analyze_run(args.run_dir, out, data_dir=args.data_dir, dataset=args.dataset, settings=settings,
                                  progress=lambda message: console.line(message, file=sys.stderr))  # fmt: skip
    except (RunError, FileNotFoundError, ValueError) as e:
        print(f"moee analyze: {str(e).replace('--checkpoint ', 'RUN ')}", file=sys.stderr)
        return 1
    print((out / "clustering.md").read_text())
    print("wrote:\n  " + "\n  ".join(summary["files"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
