"""``moee demo``: MoEE on synthetic talking faces end to end — animate held-out people, score them.

Two ways, one result:

* **shipped checkpoint** (the default where the config names one, ``checkpoints/demo_cpu``): build
  the held-out split of the synthetic dataset, load the shipped run and its expression reader,
  animate and score. About 10 minutes on 2 CPU cores. Where the named checkpoint is not there, the
  demo trains the config's **short recipe** (``config.short_steps``) from scratch instead and says so.
* **from scratch** (``--from-scratch``, and always where the config names no checkpoint):

  1. build the ``synthetic_talking_faces`` dataset of ``config.data`` under ``OUT/data`` (held-out
     identities and the compound palettes only in ``test``);
  2. train ``vae → stage1 → stage2`` (``config.stages``) under ``OUT/run``;
  3. train the expression reader (:mod:`moee_jax.eval.reader`) on faces drawn as the dataset draws
     them and shrunk to the model's size;
  4. animate and score as above. The checkpoint in ``checkpoints/demo_cpu`` is ``OUT/run/stage2``
     and ``OUT/reader.msgpack`` of this path, so both give the same numbers.

Scoring (:func:`moee_jax.eval.evaluate.evaluate_run`): every held-out identity's neutral frame with
its neutral speech, for each basic emotion and neutral, for the compound palettes never seen in
training, and speech-only; beside each number the reader's ceiling on the ground truth. Writes
``OUT/videos/*.mp4``, ``OUT/contact_sheet.png`` (rows = emotions, columns = frames),
``OUT/metrics.json`` and ``OUT/metrics.md``; with ``config.ablate.variants``, the stage-2 ablations
(:mod:`moee_jax.eval.ablation`) under ``OUT/ablate``. Every step is resumable: a re-run reuses the
dataset, finished stages and the reader.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import pathlib
import time

from ml_collections import ConfigDict

from moee_jax import console

log = logging.getLogger("moee_jax.demo")

REPO = pathlib.Path(__file__).resolve().parents[1]


class DemoError(RuntimeError):
    """A demo that cannot run as asked; the message says what to do."""


def build_data(config: ConfigDict, data_dir: pathlib.Path, *, held_out_only: bool) -> str:
    """Build the demo's synthetic dataset (``config.data``) under ``data_dir``; ``held_out_only``: the
    ``test`` split alone (what scoring a shipped checkpoint needs). Returns its TFDS ``name/config``."""
    from moee_jax.data.builders.synthetic_talking_faces import SyntheticConfig, build

    d = {k: tuple(v) if isinstance(v, list) else v for k, v in config.data.to_dict().items()}
    name = d.pop("name") + ("_heldout" if held_out_only else "")
    if held_out_only:
        d["splits"] = ("test",)  # the same held-out identities and seeds; no training clips
    with contextlib.redirect_stdout(io.StringIO()) as said:  # TFDS prints where it builds: the log file's
        build(SyntheticConfig(name=name, **d), str(data_dir))
    for text in said.getvalue().splitlines():
        log.info("%s", text)
    return f"synthetic_talking_faces/{name}"


def shipped_checkpoint(config: ConfigDict, checkpoint: str | pathlib.Path | None = None) -> pathlib.Path | None:
    """The shipped run directory the demo scores (``checkpoint``, else ``config.checkpoint`` relative
    to the repository), or None when there is none to use."""
    path = checkpoint or config.get("checkpoint")
    if not path:
        return None
    path = pathlib.Path(path)
    return path if path.is_absolute() else REPO / path


def short_recipe(config: ConfigDict) -> ConfigDict:
    """``config`` with its stages' steps and the reader's cut to ``config.short_steps`` (the budget
    `make demo` trains when no shipped checkpoint exists)."""
    config = ConfigDict(config.to_dict())
    for stage, steps in config.short_steps.items():
        if stage == "reader":
            config.reader.steps = int(steps)
        else:
            config.stages[stage].train.steps = int(steps)
            config.stages[stage].train.warmup_steps = min(int(config.stages[stage].train.warmup_steps), max(int(steps) // 10, 1))
    return config


def run_demo(config: ConfigDict, out_dir: str | pathlib.Path, *, from_scratch: bool = False,
             checkpoint: str | pathlib.Path | None = None) -> dict:  # fmt: skip
    """Run the demo; returns the metrics written to ``OUT/metrics.json``. The terminal gets one line
    per phase with its duration (:mod:`moee_jax.console`); ``OUT/demo.log`` gets everything."""
    out = pathlib.Path(out_dir).absolute()
    shipped = None if from_scratch else shipped_checkpoint(config, checkpoint)
    short = shipped is not None and not (shipped / "stage2" / "final" / "metadata.json").exists()
    if short and (checkpoint is not None or not config.get("short_steps")):
        raise DemoError(
            f"the shipped checkpoint {shipped} holds no finished run (stage2/final); train one with "
            "`moee demo --from-scratch`, or pass --checkpoint RUN"
        )
    out.mkdir(parents=True, exist_ok=True)
    with console.log_to(out / "demo.log"):
        if short:
            config = short_recipe(config)
            console.line(
                f"note: no shipped checkpoint in {shipped}: training the short recipe from scratch instead (steps "
                f"{dict(config.short_steps)}); its numbers are not the full recipe's, which `moee demo --from-scratch` trains"
            )
            shipped = None
        return _run(config, out, shipped)


def _run(config: ConfigDict, out: pathlib.Path, shipped: pathlib.Path | None) -> dict:
    from moee_jax.eval import metrics as M
    from moee_jax.eval.ablation import run_ablations
    from moee_jax.eval.evaluate import EvalSettings, cached_reader, evaluate_run

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    d = config.data
    what = "held-out split" if shipped is not None else f"{d.train_identities} training + {d.test_identities} held-out identities"
    with console.phase("data", f"synthetic talking faces, {what} → {out / 'data'}") as p:
        name = build_data(config, out / "data", held_out_only=shipped is not None)
    timings["data_s"] = p["seconds"]

    losses: dict[str, dict] = {}
    if shipped is None:
        from moee_jax.train.trainer import Trainer

        run_dir = out / "run"
        for stage in ("vae", "stage1", "stage2"):
            c = ConfigDict(config.stages[stage].to_dict())
            c.data.data_dir = str(out / "data")
            c.data.name = name
            steps = int(c.train.steps)
            if not c.train.get("print_every"):  # about 8 progress lines per stage on the terminal; demo.log keeps all
                c.train.print_every = int(c.train.log_every) * max(1, -(-steps // (8 * int(c.train.log_every))))
            with console.phase(stage, f"{steps} steps → {run_dir / stage}" if steps else "nothing to train") as p:
                result = Trainer(c, run_dir).run()
                if why := result.interruption(steps):  # a later stage must not start from a stage that did not finish
                    raise DemoError(why)
                jsonl = run_dir / stage / "metrics.jsonl"
                logged = [json.loads(line) for line in jsonl.read_text().splitlines()] if jsonl.exists() else []
                if logged:
                    losses[stage] = {"first_logged": logged[0]["loss"], "last_logged": logged[-1]["loss"], "steps": result.final_step}
                    if "shuffle_gap" in logged[-1]:
                        losses[stage]["last_shuffle_gap"] = logged[-1]["shuffle_gap"]
                    p["note"] = f"loss {logged[-1]['loss']:.4f}"
            timings[f"{stage}_s"] = p["seconds"]
        reader_path = out / "reader.msgpack"
    else:
        run_dir = shipped
        reader_path = shipped / "reader.msgpack"
        if not reader_path.is_file():
            reader_path = out / "reader.msgpack"

    size = int(config.stages.stage2.video.image_size[0])
    r = config.reader
    state = "load" if reader_path.is_file() else f"train {int(r.steps)} steps"
    with console.phase("reader", f"expression reader ({state}) → {reader_path}") as p:
        reader = cached_reader(reader_path, size, int(r.steps), render_size=int(r.get("render_size", config.data.size)),
                               blend_fraction=float(r.get("blend_fraction", 0.4)), augment=r.get("augment"))  # fmt: skip
    timings["reader_s"] = p["seconds"]

    settings = EvalSettings.from_config(config.animate, seed=int(config.seed))
    with console.phase("animate and score", f"held-out identities → {out / 'videos'}") as p, \
            console.progress(None, "clips", unit="clip") as bar:  # fmt: skip
        summary = evaluate_run(run_dir, reader, data_dir=out / "data", dataset=name, settings=settings, videos_dir=out / "videos",
                               sheet_path=out / "contact_sheet.png", batch_size=int(config.animate.get("batch_size", 16)),
                               progress=console.bar_progress(bar))  # fmt: skip
    timings["animate_and_score_s"] = p["seconds"]

    if config.get("ablate") and config.ablate.variants:
        with console.phase("ablations", ", ".join(config.ablate.variants)) as p:
            ablation = run_ablations(run_dir, out / "ablate", reader, variants=tuple(config.ablate.variants), settings=settings)
        summary["ablation"] = {v: ablation[v]["headline"] for v in config.ablate.variants}
        summary["ablation_table"] = ablation["table"]
        timings["ablation_s"] = p["seconds"]

    summary["run"] = {"dir": str(run_dir), "shipped_checkpoint": shipped is not None}
    summary["training"] = losses
    summary["timings_s"] = {k: round(v, 1) for k, v in timings.items()} | {"total": round(time.perf_counter() - t0, 1)}
    summary["reader"] = reader.info
    (out / "metrics.json").write_text(json.dumps(summary, indent=2, default=float))
    markdown = M.to_markdown(summary)
    if "ablation_table" in summary:
        markdown += "\n## Ablations (stage 2 from the same stage 1, same steps)\n\n" + summary["ablation_table"]
    (out / "metrics.md").write_text(markdown)
    outputs = {"videos": out / "videos", "contact sheet": out / "contact_sheet.png", "metrics": out / "metrics.md",
               "run": run_dir, "full log": out / "demo.log"}  # fmt: skip
    if "ablation_table" in summary:
        outputs["ablations"] = out / "ablate"
    console.summary(outputs)
    return summary
