"""``moee eval``, ``moee ablate``, ``moee ladder`` and ``moee verify``: a run scored and checked."""

from __future__ import annotations

import pathlib
import sys

from absl import flags

from moee_jax.cli.common import log_file


def _eval_settings_flags():
    """The sampling and reader flags of eval / ablate / ladder. Unset, they are the CPU demo's
    (``configs/demo.py``'s ``animate`` and ``reader`` blocks), so ``moee eval`` on the demo's run
    reproduces the demo's numbers."""
    return {
        "steps": flags.DEFINE_integer("steps", None, "Sampler steps per clip (default: the demo's)."),
        "sampler": flags.DEFINE_string("sampler", None, "Sampler, ddim | dpmpp_2m (default: the demo's)."),
        "cfg_reference": flags.DEFINE_float("cfg_reference", None, "Guidance scale of the reference image (default: the demo's)."),
        "cfg_audio": flags.DEFINE_float("cfg_audio", None, "Guidance scale of the speech (default: the demo's)."),
        "cfg_emotion": flags.DEFINE_float("cfg_emotion", None, "Guidance scale of the emotion (default: the demo's)."),
        "seed": flags.DEFINE_integer("seed", 0, "Sampling seed."),
        "reader": flags.DEFINE_string(
            "reader",
            None,
            "Expression-reader file (moee_jax.eval.reader); trained and saved there if absent (default: RUN/reader.msgpack).",
        ),  # fmt: skip
        "reader_steps": flags.DEFINE_integer("reader_steps", None, "Training steps of a new reader (default: the demo's)."),
    }


def _demo_defaults():
    from moee_jax.configs import demo

    return demo.get_config("cpu")


def _check_eval_flags(f, command: str, **extra) -> None:
    """The sampler and reader flags of eval / ablate / ladder (and ``extra``: flag → (value, bounds
    or allowed names)), checked before the run is read; exits with the flag named."""
    from moee_jax import checks
    from moee_jax.diffusion import SAMPLERS

    try:
        if f["steps"].value is not None:
            checks.number(f["steps"].value, "--steps", minimum=1, integer=True)
        if f["sampler"].value is not None:
            checks.one_of(f["sampler"].value, "--sampler", SAMPLERS)
        for name in ("cfg_reference", "cfg_audio", "cfg_emotion"):
            if f[name].value is not None:
                checks.number(f[name].value, f"--{name}", minimum=0.0)
        checks.number(f["seed"].value, "--seed", minimum=0, integer=True)
        if f["reader_steps"].value is not None:
            checks.number(f["reader_steps"].value, "--reader_steps", minimum=1, integer=True)
        if f["reader"].value is not None and pathlib.Path(f["reader"].value).exists():
            checks.input_file(f["reader"].value, "--reader")
        for flag, (value, rule) in extra.items():
            if isinstance(rule, dict):
                checks.number(value, flag, **rule)
            else:
                checks.one_of(value, flag, rule)
    except checks.UsageError as e:
        sys.exit(f"moee {command}: {e}")


def _settings(f):
    import dataclasses

    from moee_jax.eval.evaluate import EvalSettings

    settings = EvalSettings.from_config(_demo_defaults().animate, seed=f["seed"].value)
    guidance = {k: v if f[f"cfg_{k}"].value is None else f[f"cfg_{k}"].value for k, v in settings.guidance.items()}
    return dataclasses.replace(settings, steps=f["steps"].value or settings.steps, sampler=f["sampler"].value or settings.sampler,
                               guidance=guidance)  # fmt: skip


def _run_message(error: BaseException) -> str:
    """A run-directory error as eval / ablate / ladder take the run (an argument or --run_dir, not
    animate's --checkpoint)."""
    return str(error).replace("--checkpoint: ", "RUN: ").replace("--checkpoint ", "RUN ")


def _run_dir_arg(argv, flag, command: str) -> str:
    run_dir = flag.value or (argv[1] if len(argv) > 1 else None)
    if not run_dir:
        sys.exit(f"moee {command}: give the run directory: moee {command} RUN")
    return run_dir


def _reader(f, run_dir: str, data_dir: str | None = None, dataset: str | None = None):
    """The run's expression reader: ``--reader``, else RUN/reader.msgpack, else the demo's beside RUN;
    trained there first when absent or drawn at another size than the dataset's frames."""
    import pathlib

    from moee_jax.checkpoint.run import load_run_config, resolve_checkpoint
    from moee_jax.eval.evaluate import cached_reader, dataset_frame_size, run_dataset

    size = int(load_run_config(resolve_checkpoint(run_dir)).video.image_size[0])
    if data_dir is None or dataset is None:
        data_dir, dataset = run_dataset(run_dir)
    path = f["reader"].value
    if path is None:  # the run's own reader, else the demo's (OUT/reader.msgpack next to OUT/run), else a new one
        own, demo = pathlib.Path(run_dir) / "reader.msgpack", pathlib.Path(run_dir).parent / "reader.msgpack"
        path = demo if demo.is_file() and not own.is_file() else own
    r = _demo_defaults().reader
    steps = f["reader_steps"].value or int(r.steps)
    return cached_reader(path, size, steps, render_size=dataset_frame_size(data_dir, dataset), blend_fraction=float(r.blend_fraction),
                         augment=r.get("augment"))  # fmt: skip


def evaluate() -> None:
    run_flag = flags.DEFINE_string("run_dir", None, "Run directory with a finished stage2 (or give it as the argument).")
    data_dir = flags.DEFINE_string("data_dir", None, "TFDS data dir of the synthetic dataset (default: the run's stage-2 config).")
    dataset = flags.DEFINE_string("dataset", None, "TFDS name/config, e.g. synthetic_talking_faces/demo_cpu (default: the run's).")
    out = flags.DEFINE_string("out", None, "Write metrics.json, metrics.md, videos/ and contact_sheet.png here (default: RUN/eval).")
    f = _eval_settings_flags()

    def main(argv):
        import json
        import pathlib

        from moee_jax import console
        from moee_jax.checkpoint.run import resolve_checkpoint
        from moee_jax.eval import metrics as M
        from moee_jax.eval.evaluate import evaluate_run
        from moee_jax.inference.inputs import InputError

        run_dir = _run_dir_arg(argv, run_flag, "eval")
        _check_eval_flags(f, "eval")
        out_dir = pathlib.Path(out.value or pathlib.Path(run_dir) / "eval")
        try:
            resolve_checkpoint(run_dir)  # a missing or unfinished run fails before anything is written
            with console.log_to(out_dir / "eval.log"):
                with console.phase("reader"):
                    reader = _reader(f, run_dir, data_dir.value, dataset.value)
                with console.phase("animate and score", f"held-out identities → {out_dir / 'videos'}"), \
                        console.progress(None, "clips", unit="clip") as bar:  # fmt: skip
                    summary = evaluate_run(run_dir, reader, data_dir=data_dir.value, dataset=dataset.value, settings=_settings(f),
                                           videos_dir=out_dir / "videos", sheet_path=None, progress=console.bar_progress(bar))  # fmt: skip
        except (InputError, FileNotFoundError, ValueError) as e:
            sys.exit(f"moee eval: {_run_message(e)}")
        (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2, default=float))
        (out_dir / "metrics.md").write_text(M.to_markdown(summary))
        print(M.to_markdown(summary))
        print(f"wrote {out_dir}/metrics.json")

    return main


def ablate() -> None:
    run_flag = flags.DEFINE_string("run_dir", None, "Run directory with finished stage1 and stage2 (or give it as the argument).")
    out = flags.DEFINE_string("out", None, "Variant runs, ablation.json and ablation.md go here (default: RUN/ablate).")
    variants = flags.DEFINE_list("variants", ["full", "no_moe", "no_global", "no_masked_noisy"], "Ablations to run.")
    steps = flags.DEFINE_integer("train_steps", None, "Stage-2 steps per variant (default: the run's stage-2 steps).")
    f = _eval_settings_flags()

    def main(argv):
        import pathlib

        from moee_jax.checkpoint.run import resolve_checkpoint
        from moee_jax.eval.ablation import run_ablations
        from moee_jax.inference.inputs import InputError
        from moee_jax.train.trainer import TrainingError

        run_dir = _run_dir_arg(argv, run_flag, "ablate")
        from moee_jax.eval.ablation import ABLATIONS

        _check_eval_flags(f, "ablate", **{"--variants": (variants.value, tuple(ABLATIONS)),
                                          "--train_steps": (steps.value, dict(minimum=1, integer=True))})  # fmt: skip
        out_dir = pathlib.Path(out.value or pathlib.Path(run_dir) / "ablate")
        try:
            resolve_checkpoint(run_dir)  # a missing or unfinished run fails before anything is written
            with log_file(out_dir / "ablate.log"):
                reader = _reader(f, run_dir)
                result = run_ablations(run_dir, out_dir, reader, variants=variants.value, steps=steps.value, settings=_settings(f))
        except (InputError, TrainingError, FileNotFoundError, ValueError) as e:
            sys.exit(f"moee ablate: {_run_message(e)}")
        print(result["table"])

    return main


def ladder() -> None:
    run_flag = flags.DEFINE_string("run_dir", None, "Run directory with a finished stage2 (or give it as the argument).")
    data_dir = flags.DEFINE_string("data_dir", None, "TFDS data dir of the synthetic dataset (default: the run's stage-2 config).")
    dataset = flags.DEFINE_string("dataset", None, "TFDS name/config (default: the run's).")
    rungs = flags.DEFINE_list("rungs", ["ceiling", "overfit", "train_same_clip", "held_out_same_clip", "train_neutral", "held_out"],
                              "Rungs to climb, in order.")  # fmt: skip
    identities = flags.DEFINE_integer("identities", 4, "Identities per split scored by rungs 2-5.")
    overfit_steps = flags.DEFINE_integer("overfit_steps", 300, "Training steps of rung 1 (overfitting one clip).")
    out = flags.DEFINE_string("out", None, "Write ladder.json here (default: RUN/ladder.json).")
    f = _eval_settings_flags()

    def main(argv):
        import pathlib

        from moee_jax.eval.evaluate import run_dataset
        from moee_jax.eval.ladder import ladder_json, run_ladder
        from moee_jax.inference.inputs import InputError
        from moee_jax.train.trainer import TrainingError

        run_dir = _run_dir_arg(argv, run_flag, "ladder")
        from moee_jax.eval.ladder import RUNGS

        _check_eval_flags(f, "ladder", **{"--rungs": (rungs.value, RUNGS), "--identities": (identities.value, dict(minimum=1, integer=True)),
                                          "--overfit_steps": (overfit_steps.value, dict(minimum=1, integer=True))})  # fmt: skip
        try:
            d, n = (data_dir.value, dataset.value) if data_dir.value and dataset.value else run_dataset(run_dir)
            with log_file(pathlib.Path(run_dir) / "ladder.log"):
                reader = _reader(f, run_dir, d, n)
                result = run_ladder(run_dir, reader, data_dir=d, dataset=n, settings=_settings(f), rungs=rungs.value,
                                    identities=identities.value, overfit_steps=overfit_steps.value)  # fmt: skip
        except (InputError, TrainingError, FileNotFoundError, ValueError) as e:
            sys.exit(f"moee ladder: {_run_message(e)}")
        path = pathlib.Path(out.value or pathlib.Path(run_dir) / "ladder.json")
        path.write_text(ladder_json(result))
        print(f"{sum(r.passed for r in result)}/{len(result)} rungs pass; wrote {path}")
        sys.exit(0 if all(r.passed for r in result) else 1)

    return main


def verify() -> None:
    run_flag = flags.DEFINE_string("run_dir", None, "Run directory of `moee train` (or give it as the argument).")

    def main(argv):
        import pathlib

        from moee_jax.checkpoint.integrity import verify_run
        from moee_jax.checkpoint.run import STAGES

        run_dir = _run_dir_arg(argv, run_flag, "verify")
        if not pathlib.Path(run_dir).is_dir():
            sys.exit(f"moee verify: RUN {run_dir}: directory not found; pass the run directory of `moee train`")
        reports = verify_run(run_dir, STAGES)
        if not reports:
            sys.exit(f"moee verify: RUN {run_dir}: no stage folder ({', '.join(STAGES)}) here; is this a run directory?")
        for report in reports:
            print("\n".join(report.lines()))
        bad = [r.stage for r in reports if not r.ok]
        print(f"{run_dir}: " + (f"damaged: {', '.join(bad)}" if bad else "every checkpoint intact"))
        sys.exit(1 if bad else 0)

    return main
