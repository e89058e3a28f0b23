"""``moee demo``: train MoEE on synthetic talking faces end to end, animate held-out people, score them.

Steps (each resumable: a re-run reuses the dataset, finished stages and the cached reader):

1. build the ``synthetic_talking_faces`` dataset of ``config.data`` under ``OUT/data`` (held-out
   identities and the compound emotions only in ``test``);
2. train ``vae → embedder → stage1 → stage2`` (``config.stages``) under ``OUT/run``;
3. train the expression reader (:mod:`moee_jax.eval.reader`) on generator ground truth;
4. animate the held-out identities with their held-out speech for each basic emotion and neutral,
   for the compound palettes never seen in training and speech-only, and score every clip
   (:func:`moee_jax.eval.evaluate.evaluate_run`): ``OUT/videos/*.mp4``, ``OUT/contact_sheet.png``
   (rows = emotions, columns = frames);
5. when ``config.ablate.variants`` is set, train and score the stage-2 ablations
   (:mod:`moee_jax.eval.ablation`) under ``OUT/ablate``;
6. write ``OUT/metrics.json`` and ``OUT/metrics.md``.
"""

from __future__ import annotations

import json
import logging
import pathlib
import time

from ml_collections import ConfigDict

from moee_jax.emotions import EMOTIONS

log = logging.getLogger("moee_jax.demo")


def _build_data(config: ConfigDict, data_dir: pathlib.Path) -> str:
    from moee_jax.data.builders.synthetic_talking_faces import SyntheticConfig, build

    d = config.data.to_dict()
    build(SyntheticConfig(name=d.pop("name"), **{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}), str(data_dir))
    return f"synthetic_talking_faces/{config.data.name}"


def run_demo(config: ConfigDict, out_dir: str | pathlib.Path) -> dict:
    """Run the whole demo; returns the metrics written to ``OUT/metrics.json``."""
    from moee_jax.eval import metrics as M
    from moee_jax.eval.ablation import run_ablations
    from moee_jax.eval.evaluate import EvalSettings, cached_reader, evaluate_run
    from moee_jax.train.trainer import Trainer

    out = pathlib.Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    name = _build_data(config, out / "data")
    timings["data_s"] = time.perf_counter() - t0

    losses: dict[str, dict] = {}
    for stage in ("vae", "embedder", "stage1", "stage2"):
        t = time.perf_counter()
        c = ConfigDict(config.stages[stage].to_dict())
        c.data.data_dir = str(out / "data")
        c.data.name = name
        result = Trainer(c, out / "run").run()
        jsonl = out / "run" / stage / "metrics.jsonl"
        logged = [json.loads(line) for line in jsonl.read_text().splitlines()] if jsonl.exists() else []
        if logged:
            losses[stage] = {"first_logged": logged[0]["loss"], "last_logged": logged[-1]["loss"], "steps": result.final_step}
        timings[f"{stage}_s"] = time.perf_counter() - t

    t = time.perf_counter()
    size = int(config.stages.stage2.video.image_size[0])
    reader = cached_reader(out / "reader.msgpack", size, int(config.reader.steps))
    timings["reader_s"] = time.perf_counter() - t

    t = time.perf_counter()
    settings = EvalSettings.from_config(config.animate, seed=int(config.seed))
    summary = evaluate_run(out / "run", reader, data_dir=out / "data", dataset=name, settings=settings,
                           videos_dir=out / "videos", sheet_path=out / "contact_sheet.png")  # fmt: skip
    timings["animate_and_score_s"] = time.perf_counter() - t

    if config.get("ablate") and config.ablate.variants:
        t = time.perf_counter()
        ablation = run_ablations(out / "run", out / "ablate", reader, variants=tuple(config.ablate.variants),
                                 settings=settings)  # fmt: skip
        summary["ablation"] = {v: ablation[v]["headline"] for v in config.ablate.variants}
        summary["ablation_table"] = ablation["table"]
        timings["ablation_s"] = time.perf_counter() - t

    summary["training"] = losses
    summary["timings_s"] = {k: round(v, 1) for k, v in timings.items()} | {"total": round(time.perf_counter() - t0, 1)}
    summary["reader"] = reader.info
    (out / "metrics.json").write_text(json.dumps(summary, indent=2, default=float))
    markdown = M.to_markdown(summary)
    if "ablation_table" in summary:
        markdown += "\n## Ablations (stage 2 from the same stage 1, same steps)\n\n" + summary["ablation_table"]
    (out / "metrics.md").write_text(markdown)
    log.info("demo finished in %.0f s: %s", timings.get("total", time.perf_counter() - t0), out)
    return summary


__all__ = ["run_demo", "EMOTIONS"]
