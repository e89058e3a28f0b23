"""Paired comparisons: the same held-out clips rendered by several sampler settings (:func:`run_study`)
or several trained runs (:func:`compare_runs`), scored, and compared *clip by clip* with the first.

Performance 3/5 asks for the smallest number of DPM-Solver++(2M) steps whose emotion accuracy,
compound score and lip sync stay within 0.02 of 40-step DDIM. Read as two independent accuracies,
that needs a standard error near 0.01, i.e. a thousand clips per setting. But every setting here
renders the *same* items (portrait, speech, emotion request) from the *same* noise (``seed``), so
the question is paired: on how many clips does the judgement change when only the sampler changes?
The difference of two accuracies on the same clips is the mean of per-clip differences
``d_i = correct_i(setting) − correct_i(reference)`` ∈ {−1, 0, 1}, whose standard error
``std(d) / √n`` is small when the two settings agree on almost every clip, however hard the clips
are. :func:`paired_difference` gives those differences (accuracy, compounds both present, lip-sync
r), their standard errors, and the share of clips whose read class changed at all. "Within" is
read as quality kept: a setting qualifies when no measure *loses* more than the tolerance
(:func:`within`); with ``n`` basic clips one changed clip moves the accuracy by ``1/n``.

:func:`run_study` renders and judges each setting (:func:`moee_jax.eval.evaluate.render_items`,
:func:`~moee_jax.eval.evaluate.judge_items`) and times it: seconds per generated frame over the
batches after the first of each setting (the first compiles that setting's sampler), and over all
of them. ``benchmarks/sampler_steps.py`` is its command line.

The same pairing judges a change to the model: :func:`compare_runs` renders the items with each run's
animator under the same ``EvalSettings`` and seed (so from the same noise), reads them with one
reader, and pairs every run with the first. A change that moves a handful of clips out of 56 is then read
against the spread of per-clip changes rather than against two independent accuracies.
``benchmarks/compare_runs.py`` is its command line.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import time
from collections.abc import Callable, Sequence

import numpy as np

from moee_jax.eval import evaluate as E


@dataclasses.dataclass(frozen=True)
class Setting:
    """One sampler setting: ``sampler`` (``ddim`` | ``dpmpp_2m``) and its number of ``steps``."""

    sampler: str
    steps: int

    @classmethod
    def parse(cls, text: str) -> Setting:
        """``"ddim:40"`` → ``Setting("ddim", 40)``."""
        from moee_jax.diffusion import SAMPLERS

        name, _, steps = text.strip().partition(":")
        if name not in SAMPLERS or not steps.isdigit() or int(steps) < 1:
            raise ValueError(f"sampler setting {text!r}: expected SAMPLER:STEPS with SAMPLER one of {', '.join(SAMPLERS)} and STEPS ≥ 1")
        return cls(name, int(steps))

    def __str__(self) -> str:
        return f"{self.sampler}:{self.steps}"


def _mean_se(d: Sequence[float]) -> tuple[float | None, float | None, int]:
    d = np.asarray(d, np.float64)
    if d.size == 0:
        return None, None, 0
    se = float(d.std(ddof=1) / np.sqrt(d.size)) if d.size > 1 else None
    return float(d.mean()), se, int(d.size)


def _key(j: dict) -> tuple[str, str, str]:
    return j["speaker"], j["tag"], j["kind"]


def paired_difference(reference: Sequence[dict], candidate: Sequence[dict]) -> dict:
    """Clip-by-clip comparison of two :func:`~moee_jax.eval.evaluate.judge_items` lists of the same
    items (matched by speaker, tag and kind; an item missing from either is an error).

    Returns, for ``emotion`` (basic clips: correct or not), ``compounds`` (both components present
    or not) and ``lip_sync`` (Pearson r): ``delta`` (candidate − reference, the difference of the two
    means), ``se`` (its paired standard error, ``std(d)/√n``) and ``n``; plus
    ``emotion.changed``, the share of basic clips whose read class differs, and
    ``compounds.changed``, the share of compound clips whose both-present judgement differs.
    """
    ref = {_key(j): j for j in reference}
    cand = {_key(j): j for j in candidate}
    if ref.keys() != cand.keys():
        missing = sorted(ref.keys() ^ cand.keys())
        raise ValueError(f"the two renders judged different items: {missing[:3]}{' …' if len(missing) > 3 else ''}")
    keys = sorted(ref)
    basic = [k for k in keys if k[2] == "basic"]
    compound = [k for k in keys if k[2] == "compound"]
    synced = [k for k in keys if "lip_sync" in ref[k]]

    def correct(j):
        return float(j["predicted"] == j["target"])

    out = {}
    mean, se, n = _mean_se([correct(cand[k]) - correct(ref[k]) for k in basic])
    out["emotion"] = {"delta": mean, "se": se, "n": n,
                      "changed": float(np.mean([cand[k]["predicted"] != ref[k]["predicted"] for k in basic])) if basic else None}  # fmt: skip
    both = [(float(ref[k]["compound"]["both_present"]), float(cand[k]["compound"]["both_present"])) for k in compound]
    mean, se, n = _mean_se([c - r for r, c in both])
    out["compounds"] = {"delta": mean, "se": se, "n": n, "changed": float(np.mean([r != c for r, c in both])) if both else None}
    mean, se, n = _mean_se([cand[k]["lip_sync"]["pearson"] - ref[k]["lip_sync"]["pearson"] for k in synced])
    out["lip_sync"] = {"delta": mean, "se": se, "n": n}
    return out


def compact(judged: Sequence[dict]) -> list[dict]:
    """The fields of :func:`~moee_jax.eval.evaluate.judge_items` entries that :func:`paired_difference`
    reads, JSON-ready: a study's rows keep them (``clips``) so any two settings can be compared later."""
    out = []
    for j in judged:
        c = {k: j[k] for k in ("speaker", "tag", "kind", "target") if k in j}
        if "predicted" in j:
            c["predicted"] = j["predicted"]
        if "compound" in j:
            c["compound"] = {"both_present": bool(j["compound"]["both_present"])}
        if "lip_sync" in j:
            c["lip_sync"] = {"pearson": float(j["lip_sync"]["pearson"])}
        out.append(c)
    return out


def within(diff: dict, tolerance: float) -> bool:
    """No measured difference of a :func:`paired_difference` is a loss of more than ``tolerance``:
    every ``delta`` ≥ −``tolerance`` (all three measures are better when higher). A gain is not a
    miss: fewer steps that read one more clip right than the reference still keep its quality."""
    return all(diff[m]["delta"] is None or diff[m]["delta"] >= -tolerance for m in ("emotion", "compounds", "lip_sync"))


def fewest_steps(rows: Sequence[dict], sampler: str, tolerance: float) -> int | None:
    """The smallest step count of ``sampler`` among ``rows`` (:func:`run_study`'s, after the
    reference) whose paired difference from the reference is :func:`within` ``tolerance``, and with
    every larger step count of that sampler also within it (a count that only passes by chance
    between failing ones is not chosen); None when none qualifies."""
    runs = sorted((r["steps"], within(r["paired"], tolerance)) for r in rows if r["sampler"] == sampler and r.get("paired"))
    best = None
    for steps, ok in reversed(runs):
        if not ok:
            break
        best = steps
    return best


def _frames_per_second(marks: Sequence[tuple[float, int]], t0: float) -> tuple[float | None, float]:
    """Seconds per frame after the first batch (None with one batch) and over all, from progress
    ``marks`` of (time, frames done so far)."""
    total = (marks[-1][0] - t0) / max(marks[-1][1], 1)
    if len(marks) < 2:
        return None, total
    return (marks[-1][0] - marks[0][0]) / max(marks[-1][1] - marks[0][1], 1), total


def render_and_judge(animator, reader, items: Sequence[E.EvalItem], settings: E.EvalSettings, *, batch_size: int = 16,
                     videos_dir: str | pathlib.Path | None = None) -> dict:  # fmt: skip
    """Render ``items`` with ``animator`` and ``settings`` and judge them: ``headline``
    (:func:`~moee_jax.eval.evaluate.score_items`'s), ``s_per_frame`` (batches after the first, which
    compiles), ``s_per_frame_all``, ``frames``, ``seconds`` and ``clips`` (:func:`compact`).
    ``videos_dir``: also write every clip there as ``moee eval`` does (``<speaker>_<tag>.mp4``)."""
    marks: list[tuple[float, int]] = []  # (time, items done) after each batch
    t0 = time.perf_counter()
    if videos_dir is not None:
        videos_dir = pathlib.Path(videos_dir)
        videos_dir.mkdir(parents=True, exist_ok=True)
    videos = E.render_items(animator, items, settings, batch_size=batch_size, videos_dir=videos_dir,
                            progress=lambda done, total: marks.append((time.perf_counter(), done)))  # fmt: skip
    seconds = time.perf_counter() - t0
    per_item = [len(v) for v in videos]
    marks = [(t, sum(per_item[:done])) for t, done in marks]
    warm, overall = _frames_per_second(marks, t0)
    judged = E.judge_items(reader, items, videos, animator.fps)
    summary = E.score_items(reader, items, videos, animator.fps, judged=judged)
    return {"headline": summary["headline"], "s_per_frame": warm, "s_per_frame_all": overall, "frames": int(sum(per_item)),
            "seconds": round(seconds, 1), "clips": compact(judged)}  # fmt: skip


def _paired_rows(variants, render: Callable[[object], dict], on_row: Callable[[dict], None]) -> list[dict]:
    """``render(variant)`` → row for each variant in order; every row after the first gets ``paired``
    against the first's clips."""
    rows: list[dict] = []
    for variant in variants:
        row = render(variant)
        if rows:
            row["paired"] = paired_difference(rows[0]["clips"], row["clips"])
        rows.append(row)
        on_row(row)
    return rows


def run_study(animator, reader, items: Sequence[E.EvalItem], settings: Sequence[Setting], base: E.EvalSettings, *,
              batch_size: int = 16, on_row: Callable[[dict], None] | None = None) -> list[dict]:  # fmt: skip
    """Render and judge ``items`` once per setting (the first is the reference), with ``base``'s
    guidance, seed and motion; returns one row per setting: ``sampler``, ``steps`` and
    :func:`render_and_judge`'s fields, and, after the first, ``paired`` (:func:`paired_difference`
    from the reference). ``on_row`` is called with each row as it is done (default: print it as a
    :func:`format_row` line)."""

    def render(setting: Setting) -> dict:
        s = dataclasses.replace(base, sampler=setting.sampler, steps=setting.steps)
        return {"sampler": setting.sampler, "steps": setting.steps, **render_and_judge(animator, reader, items, s, batch_size=batch_size)}

    return _paired_rows(settings, render, on_row or (lambda row: print(format_row(row), flush=True)))


def compare_runs(animators: Sequence[tuple[str, object]], reader, items: Sequence[E.EvalItem], settings: E.EvalSettings, *,
                 batch_size: int = 16, on_row: Callable[[dict], None] | None = None,
                 videos_dir: str | pathlib.Path | None = None) -> list[dict]:  # fmt: skip
    """Render and judge ``items`` with each ``(name, animator)`` (the first is the reference), all with
    ``settings`` (the same sampler, guidance and seed: the same noise); returns one row per run:
    ``run`` (its name) and :func:`render_and_judge`'s fields, and, after the first, ``paired``
    against it. ``on_row`` as in :func:`run_study` (default: print a :func:`format_row` line).
    ``videos_dir``: each run's clips are also written to ``videos_dir/<i>_<name>/`` (``i`` its place
    in ``animators``, the name with anything but letters, digits, ``.``, ``_`` and ``-`` replaced),
    a folder :func:`~moee_jax.eval.coupling.coupling_rows` reads."""

    def render(indexed) -> dict:
        i, (name, animator) = indexed
        videos = None if videos_dir is None else pathlib.Path(videos_dir) / run_folder(i, name)
        return {"run": name, **render_and_judge(animator, reader, items, settings, batch_size=batch_size, videos_dir=videos)}

    return _paired_rows(list(enumerate(animators)), render, on_row or (lambda row: print(format_row(row), flush=True)))


def run_folder(index: int, name: str) -> str:
    """The folder name of run ``index`` (its place in the comparison) called ``name``, e.g. a path."""
    return f"{index}_" + re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")


def _f(v, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _d(block: dict | None) -> str:
    if not block or block["delta"] is None:
        return "(reference)"
    return f"{block['delta']:+.3f} ± {_f(block['se'])}"


TABLE_HEADER = ("| setting or run | emotion acc. | Δ (paired ± se) | class changed | compounds | Δ | lip r | Δ | s/frame | s/frame incl. compile |\n"
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")  # fmt: skip


def format_row(row: dict) -> str:
    h, p = row["headline"], row.get("paired") or {}
    changed = _f((p.get("emotion") or {}).get("changed"))
    name = row["run"] if "run" in row else f"{row['sampler']}:{row['steps']}"
    return (f"| {name} | {_f(h.get('emotion_accuracy'))} | {_d(p.get('emotion'))} | {changed} "
            f"| {_f(h.get('compound_both_present_rate'))} | {_d(p.get('compounds'))} | {_f(h.get('lip_sync_pearson'))} "
            f"| {_d(p.get('lip_sync'))} | {_f(row['s_per_frame'], 2)} | {_f(row['s_per_frame_all'], 2)} |")  # fmt: skip
