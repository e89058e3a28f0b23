"""The whole analysis of a run, written to a folder (``python -m moee_jax.analysis RUN --out DIR``).

:func:`analyze_run` extracts the latents of a dataset split (:mod:`.extract`) and writes

* ``clustering.md`` — DICE-Talk Table 5 in kind (:mod:`.clustering`): the embedder's clustering
  strength per emotion from audio, video and both, within each speaker (the paper's protocol),
  then pooled over speakers, then for the stage-2 emotion tokens; ``clustering.json`` — the same
  numbers (``null`` where undefined, ``"inf"`` where ``d_intra = 0``);
* ``explained_variance.md`` — how many principal components reach each share of the variance of
  each latent set (EMOPortraits Fig. 3); ``analysis.json`` — those counts, the mean global gate per
  clip emotion, and what was analysed;
* figures (PNG): ``clustering``, ``projection_pca``, ``projection_tsne``, ``explained_variance``,
  ``global_gates``, ``local_gates``, ``layer_gates``, and for models with a label emotion source
  ``interpolation_latent`` / ``interpolation_palette`` with their videos (``.mp4``, the renders
  side by side, α from left to right).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from collections.abc import Callable

import numpy as np

from moee_jax.analysis import clustering, extract, figures, gates, interpolation, projection
from moee_jax.analysis.animator import AnalysisAnimator
from moee_jax.emotions import EMOTIONS

FIGURE_NAMES = ("clustering", "projection_pca", "projection_tsne", "explained_variance", "global_gates", "local_gates", "layer_gates")


@dataclasses.dataclass(frozen=True)
class AnalysisSettings:
    """What :func:`analyze_run` analyses and renders."""

    split: str = "test"
    windows_per_clip: int = 4
    max_clips: int | None = None
    timestep: int | None = None
    interpolate: bool = True
    pair: tuple[str, str] = ("happy", "sad")
    alphas: int = 5
    steps: int | None = None
    seconds: float | None = 2.0
    seed: int = 0


def latent_sets(latents: extract.ClipLatents) -> dict[str, np.ndarray]:
    """The latent sets the figures show, name → ``(N, ...)``: the embedder's ``μ`` (both
    modalities) when the run has an embedder, and the emotion tokens of each condition."""
    sets = {"embedder μ (audio+video)": latents.mu["both"]} if "both" in latents.mu else {}
    sets.update({f"tokens ({kind})": t for kind, t in latents.tokens.items()})
    return sets


def clustering_tables(latents: extract.ClipLatents) -> dict[str, dict]:
    """``within_speaker`` and ``pooled`` embedder tables and the ``tokens`` table (within speaker)."""
    return {
        "within_speaker": clustering.clustering_table(latents, within_speaker=True),
        "pooled": clustering.clustering_table(latents, within_speaker=False),
        "tokens": clustering.clustering_table(latents, within_speaker=True, source="tokens"),
    }


def clustering_report(tables: dict[str, dict], *, split: str, rows: int) -> str:
    """The markdown of ``clustering.md`` (see the module docstring)."""
    parts = [
        f"Clustering strength d_inter / d_intra of the emotion embedder's μ per emotion (DICE-Talk Table 5), "
        f"split `{split}`, {rows} windows, within each speaker:\n",
        clustering.clustering_markdown(tables["within_speaker"]) or "(this run has no emotion embedder)\n",
    ]
    if tables["pooled"]:
        parts += ["\nPooled over speakers (identity differences count as spread):\n", clustering.clustering_markdown(tables["pooled"])]
    if tables["tokens"]:
        parts += [
            "\nStage-2 emotion tokens, within each speaker:\n",
            clustering.clustering_markdown(tables["tokens"], first_column="latents"),
        ]
    return "".join(parts)


def components_markdown(curves: dict[str, np.ndarray], thresholds=(0.5, 0.8, 0.9, 0.95, 0.99)) -> str:
    """A markdown table: for each latent set (name → explained-variance ratios), the number of
    principal components that reach each share of ``thresholds`` (EMOPortraits Fig. 3, right)."""
    lines = ["| latents | " + " | ".join(f"{t:.0%}" for t in thresholds) + " |", "|---|" + "---|" * len(thresholds)]
    for title, explained in curves.items():
        reach = projection.components_to_reach(explained, thresholds)
        lines.append(f"| {title} | " + " | ".join(str(reach[float(t)]) for t in thresholds) + " |")
    return "\n".join(lines) + "\n"


def analyze_run(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    data_dir: str | os.PathLike | None = None,
    dataset: str | None = None,
    settings: AnalysisSettings = AnalysisSettings(),
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Analyse ``run_dir`` on its dataset (``RUN/stage2/config.json`` unless given) into ``out_dir``
    (see the module docstring) → ``{"clustering": tables, "files": [written paths], ...}``."""
    import matplotlib.pyplot as plt

    say = progress or (lambda message: None)
    out = pathlib.Path(out_dir)
    if data_dir is None or dataset is None:
        data_dir, dataset = extract.run_dataset(run_dir)
    animator = AnalysisAnimator.from_run(run_dir)  # a missing or unfinished run fails here, before anything is written
    out.mkdir(parents=True, exist_ok=True)
    say(f"extracting latents of {dataset} [{settings.split}]")
    latents = extract.extract_latents(
        run_dir, data_dir=data_dir, dataset=dataset, split=settings.split, windows_per_clip=settings.windows_per_clip,
        max_clips=settings.max_clips, timestep=settings.timestep, seed=settings.seed, animator=animator,
    )  # fmt: skip
    files: list[pathlib.Path] = []

    def keep(fig, name):
        files.append(figures.save(fig, out, name))
        plt.close(fig)

    tables = clustering_tables(latents)
    files.append(_write(out / "clustering.md", clustering_report(tables, split=settings.split, rows=len(latents))))
    files.append(_write(out / "clustering.json", json.dumps(jsonable(tables), indent=2)))
    keep(figures.clustering_bars(tables["within_speaker"]), "clustering")

    sets = latent_sets(latents)
    for method in ("pca", "tsne"):
        keep(figures.projections(latents, sets, method), f"projection_{method}")
    curves = {title: projection.explained_variance(x[latents.basic]) for title, x in sets.items()}
    keep(figures.explained_variance(curves), "explained_variance")
    files.append(_write(out / "explained_variance.md", components_markdown(curves)))

    summary: dict = {"run_dir": str(run_dir), "dataset": dataset, "split": settings.split, "windows": len(latents),
                     "timestep": latents.timestep, "layers": list(latents.layers), "clustering": tables,
                     "components_to_reach": {t: projection.components_to_reach(c) for t, c in curves.items()}}  # fmt: skip
    if latents.layers:
        names, matrix = gates.global_gate_matrix(latents)
        summary["global_gates"] = {n: dict(zip(EMOTIONS, row.tolist())) for n, row in zip(names, matrix)}
        keep(figures.global_gates(names, matrix), "global_gates")
        keep(figures.gate_overlays(latents), "local_gates")
        keep(figures.layer_maps(latents, 0), "layer_gates")

    if settings.interpolate and not animator.uses_embedder and "label" in animator.emotion.sources:
        from moee_jax.inference.inputs import parse_emotion

        face, speech = interpolation.portrait_and_speech(data_dir, dataset, animator.size, split=settings.split, seconds=settings.seconds)
        a, b = (parse_emotion(e) for e in settings.pair)
        for mode in interpolation.MODES:
            say(f"rendering the {mode} interpolation {settings.pair[0]} → {settings.pair[1]}")
            interp = interpolation.interpolate(animator, face, speech, a, b, alphas=settings.alphas, mode=mode, steps=settings.steps,
                                               seed=settings.seed)  # fmt: skip
            keep(figures.strip(interp), f"interpolation_{mode}")
            files.append(interpolation.save_video(interp, out / f"interpolation_{mode}.mp4"))
    files.append(_write(out / "analysis.json", json.dumps(jsonable(summary), indent=2)))
    summary["files"] = [str(f) for f in files]
    return summary


def _write(path: pathlib.Path, text: str) -> pathlib.Path:
    path.write_text(text)
    return path


def jsonable(value):
    """NaN → None and ±inf → "inf" / "-inf" (strict JSON), numpy scalars → Python numbers."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return None if math.isnan(v) else ("inf" if v == math.inf else "-inf" if v == -math.inf else v)
    if isinstance(value, np.integer):
        return int(value)
    return value
