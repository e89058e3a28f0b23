"""MoEE's ablations on synthetic data (``moee ablate``), in the form of the paper's ablation table.

Every variant is a stage-2 run that starts from the same stage-1 (and VAE / embedder) final
parameters of a finished run and trains for the same number of steps with the same seed; only the
ablated piece differs. The emotion parts (the Emotion MoE of every block, Emotion-to-Latents) start
fresh in every variant (``train.init_skip``), also where the run's stage 1 trained them jointly
(the CPU demo's warm-up), so no variant inherits what another did not learn:

=====================  =========================================================================
``full``               MoEE (the run's own ``stage2`` is reused when its stage 1 trained no
                       emotion parts and the steps match)
``no_moe``             one emotion cross-attention instead of six experts (``moe_variant=single``)
``no_global``          no global soft assignment: every expert weighted ``1/6`` (``no_global``)
``no_masked_noisy``    no masked noisy emotion sampling (``data.noisy_p = 0``; classes still
                       drawn balanced, so only the noisy swap and its mouth loss mask go)
=====================  =========================================================================

Each variant is then scored by :func:`moee_jax.eval.evaluate.evaluate_run` on the held-out
identities. A palette cannot steer the ``single`` variant (it has no experts to mix), so there the
compound weights reach the label MLP only (:mod:`moee_jax.inference.animator`).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from collections.abc import Sequence

from ml_collections import ConfigDict

from moee_jax.atomic import atomic_write_text
from moee_jax.eval.evaluate import EvalSettings, evaluate_run

ABLATIONS: dict[str, tuple[str, dict]] = {
    "full": ("MoEE (full)", {}),
    "no_moe": ("w/o MoE (one expert)", {"model.emotion.moe_variant": "single"}),
    "no_global": ("w/o global gate", {"model.emotion.moe_variant": "no_global"}),
    "no_masked_noisy": ("w/o masked noisy sampling", {"data.noisy_p": 0.0, "data.class_balanced": True}),
}

# What every variant trains from its own initialisation (see the module docstring).
EMOTION_PARTS = (r"/emotion/", r"^conditioning/latents/")

# (summary path, column title, better) of the table's columns.
COLUMNS = (
    (("headline", "emotion_accuracy"), "Emo-Acc ↑", "high"),
    (("headline", "au_mae"), "AU-MAE ↓", "low"),
    (("headline", "compound_both_present_rate"), "Compound both ↑", "high"),
    (("headline", "compound_false_positive_rate"), "Compound false alarms ↓", "low"),
    (("headline", "lip_sync_pearson"), "Sync r ↑", "high"),
    (("headline", "identity_mae"), "ID-MAE ↓", "low"),
)


def variant_config(stage2: ConfigDict, run_dir: pathlib.Path, variant: str, steps: int | None = None) -> ConfigDict:
    """The stage-2 config of ``variant``: the run's own, the ablation's overrides applied, initialised
    from ``run_dir``'s earlier stages."""
    if variant not in ABLATIONS:
        raise ValueError(f"unknown ablation {variant!r}; choose from {list(ABLATIONS)}")
    if not (run_dir / "stage1" / "final" / "params").exists():
        raise ValueError(
            f"{run_dir}: no finished stage1 (a shipped checkpoint holds stage 2 only); the ablations retrain stage 2 from "
            "the run's stage 1: give a run trained from scratch (`moee demo --from-scratch` writes OUT/run)"
        )
    c = ConfigDict(stage2.to_dict())
    for dotted, value in ABLATIONS[variant][1].items():
        *parents, leaf = dotted.split(".")
        node = c
        for p in parents:
            node = node[p]
        node[leaf] = value
    earlier = [run_dir / s / "final" for s in ("stage1", "embedder", "vae")]
    c.train.init_from = tuple(str(p) for p in earlier if (p / "params").exists())
    c.train.init_skip = EMOTION_PARTS
    if steps is not None:
        c.train.steps = int(steps)
    return c


def run_ablations(
    run_dir: str | pathlib.Path,
    out_dir: str | pathlib.Path,
    reader,
    *,
    variants: Sequence[str] = tuple(ABLATIONS),
    steps: int | None = None,
    settings: EvalSettings | None = None,
) -> dict:
    """Train (or reuse) and score each variant (``settings``: default :class:`EvalSettings`); writes ``OUT/ablation.json`` and ``OUT/ablation.md``.

    ``run_dir`` must hold finished ``stage1`` and ``stage2`` stages. Variant runs go to
    ``OUT/<variant>/`` and resume like any run. Returns ``{variant: summary}`` plus ``table`` (markdown).
    """
    from moee_jax.checkpoint.run import load_run_config, resolve_checkpoint
    from moee_jax.train.trainer import Trainer, TrainingError

    settings = settings or EvalSettings()
    run_dir, out = pathlib.Path(run_dir).absolute(), pathlib.Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    stage2 = load_run_config(resolve_checkpoint(run_dir))
    results: dict = {}
    for variant in variants:
        t0 = time.perf_counter()
        c = variant_config(stage2, run_dir, variant, steps)
        joint = _stage1_trained_emotion(run_dir)
        if variant == "full" and not joint and (steps is None or int(steps) == int(stage2.train.steps)):
            variant_run = run_dir
        else:
            variant_run = out / variant
            # an unfinished variant must not be scored (and its score kept as if it had finished)
            if why := Trainer(c, variant_run).run().interruption(int(c.train.steps)):
                raise TrainingError(f"ablation {variant}: {why}; the variants already scored are kept")
        train_s = time.perf_counter() - t0
        scored = out / variant / "metrics.json"  # a variant scored with these settings is not scored again
        summary = json.loads(scored.read_text()) if scored.is_file() else None
        if summary is None or summary.get("settings") != json.loads(json.dumps(dataclasses.asdict(settings))):
            summary = evaluate_run(variant_run, reader, settings=settings)
            summary["train_seconds"] = round(train_s, 1)
            summary["run_dir"] = str(variant_run)
            atomic_write_text(scored, json.dumps(summary, indent=2, default=float))
        results[variant] = summary
    table = ablation_markdown(results)
    (out / "ablation.json").write_text(json.dumps(results, indent=2, default=float))
    (out / "ablation.md").write_text(table)
    return results | {"table": table}


def _stage1_trained_emotion(run_dir: pathlib.Path) -> bool:
    """Whether the run's stage 1 trained the emotion parts with the backbone (``train.joint_emotion``)."""
    path = run_dir / "stage1" / "config.json"
    return path.exists() and bool(json.loads(path.read_text()).get("train", {}).get("joint_emotion", False))


def ablation_markdown(results: dict) -> str:
    """The paper's ablation table: one row per variant, one column per metric, best value in bold."""

    def value(summary, path):
        for k in path:
            summary = summary.get(k) if isinstance(summary, dict) else None
        return summary

    variants = [v for v in results if v in ABLATIONS]
    best = {}
    for path, _, better in COLUMNS:
        vals = [value(results[v], path) for v in variants]
        vals = [x for x in vals if x is not None]
        if vals:
            best[path] = max(vals) if better == "high" else min(vals)
    lines = ["| Method | " + " | ".join(c[1] for c in COLUMNS) + " |", "|---|" + "---:|" * len(COLUMNS)]
    for v in variants:
        cells = []
        for path, _, _ in COLUMNS:
            x = value(results[v], path)
            cell = "–" if x is None else f"{x:.3f}"
            cells.append(f"**{cell}**" if x is not None and x == best.get(path) else cell)
        lines.append(f"| {ABLATIONS[v][0]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
