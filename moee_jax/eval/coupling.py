"""Does the generated face move its upper face with the jaw the speech opens?

A speaking face opens its jaw (AU26) with every syllable. In the ground truth of a labelled request
(the identity showing the emotion while saying its neutral clip's words,
:func:`~moee_jax.data.builders.synthetic_talking_faces.speech_matched_clip`) the emotion's other
action units stay where the emotion puts them; a model that has not learned to keep them there
raises the lids (AU5) and stretches the lips (AU20) — fear's prototype, which drops the jaw — each
time the mouth opens, and the reader then calls a speaking sad face afraid.

:func:`au_coupling` measures that within one clip: the Pearson r over frames between the reader's
``driver`` AU (the jaw) and each ``watched`` AU. :func:`coupling_rows` averages it per class over
the generated clips of a ``moee eval`` / ``moee demo`` videos folder (``<speaker>_<class>.mp4``) and
over the same requests' ground truth, read by the same reader after the same resize, so the
reader's own crosstalk between AUs (the truth's r) is the baseline the generated r is read against.
``benchmarks/au_coupling.py`` is its command line.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

import numpy as np

from moee_jax.data import schema, synthetic, video_io
from moee_jax.data.pipeline import resize_frames

WATCHED = ("AU1", "AU5", "AU20", "AU15")  # inner brow raiser, upper lid raiser, lip stretcher, lip corner depressor


def _au_index(name: str) -> int:
    if name not in synthetic.ACTION_UNITS:
        raise ValueError(f"unknown action unit {name!r}; choose from {', '.join(synthetic.ACTION_UNITS)}")
    return synthetic.ACTION_UNITS.index(name)


def au_coupling(aus: np.ndarray, driver: str = "AU26", watched: Sequence[str] = WATCHED) -> dict[str, float]:
    """Pearson r over the frames of one clip between AU ``driver`` and each of ``watched``.

    ``aus``: ``(F, len(synthetic.ACTION_UNITS))`` AU intensities per frame (a reader's ``aus``).
    An AU that does not move (standard deviation below 1e-4), or a clip of fewer than 3 frames,
    gives r = 0: nothing follows the driver.
    """
    aus = np.asarray(aus, np.float64)
    if aus.ndim != 2 or aus.shape[1] != len(synthetic.ACTION_UNITS):
        raise ValueError(f"aus must be (frames, {len(synthetic.ACTION_UNITS)}), got {aus.shape}")
    x = aus[:, _au_index(driver)]
    out = {}
    for name in watched:
        y = aus[:, _au_index(name)]
        moving = len(x) >= 3 and x.std() > 1e-4 and y.std() > 1e-4
        out[name] = float(np.corrcoef(x, y)[0, 1]) if moving else 0.0
    return out


def _aus_of(reader, frames: np.ndarray, skip_frames: int) -> np.ndarray:
    return reader.predict(resize_frames(frames, reader.size))["aus"][skip_frames:]


def coupling_rows(
    reader,
    tests: dict[str, dict[str, dict]],
    videos_dir: str | pathlib.Path,
    *,
    classes: Sequence[str] = schema.CLASSES,
    speakers: Sequence[str] | None = None,
    skip_frames: int = 12,
    driver: str = "AU26",
    watched: Sequence[str] = WATCHED,
) -> tuple[list[dict], list[str]]:
    """Per class: the mean within-clip coupling and mean AUs of the generated clips and of their truth.

    ``tests``: :func:`~moee_jax.eval.evaluate.held_out_clips`; the generated clip of ``speaker`` and
    ``class`` is ``videos_dir/<speaker>_<class>.mp4``. ``skip_frames`` leaves out the first frames
    (the first generated clip starts from the neutral portrait). Returns ``(rows, skipped)``: one row
    per class with ``class``, ``clips``, ``generated`` / ``truth`` (``{"r": {au: r}, "mean": {au:
    mean}}`` over ``driver`` and ``watched``) — ``truth`` None where no clip's truth could be drawn —
    and the ``"<speaker>_<class>: why"`` of every clip left out.
    """
    from moee_jax.data.builders.synthetic_talking_faces import speech_matched_clip  # TFDS: only when rows are built

    for name in (driver, *watched):
        _au_index(name)
    speakers = sorted(tests) if speakers is None else list(speakers)
    shown = [driver, *watched]
    rows, skipped = [], []
    for cls in classes:
        generated, truth = [], []
        for speaker in speakers:
            path = pathlib.Path(videos_dir) / f"{speaker}_{cls}.mp4"
            if not path.is_file():
                skipped.append(f"{speaker}_{cls}: no {path}")
                continue
            try:
                frames = video_io.read_video(path)[0]
            except (OSError, ValueError) as e:
                skipped.append(f"{speaker}_{cls}: {e}")
                continue
            generated.append(_aus_of(reader, frames, skip_frames))
            neutral = tests[speaker].get(schema.NEUTRAL)
            clip = None if neutral is None else speech_matched_clip(neutral, cls, 0.0 if cls == schema.NEUTRAL else 1.0)
            if clip is None:
                skipped.append(f"{speaker}_{cls}: its ground truth cannot be drawn (truth column without it)")
            else:
                truth.append(_aus_of(reader, clip.frames, skip_frames))
        if not generated:
            continue
        rows.append({"class": cls, "clips": len(generated), "generated": _summary(generated, driver, watched, shown),
                     "truth": _summary(truth, driver, watched, shown) if truth else None})  # fmt: skip
    return rows, skipped


def _summary(clips: list[np.ndarray], driver: str, watched: Sequence[str], shown: Sequence[str]) -> dict:
    rs = [au_coupling(a, driver, watched) for a in clips]
    means = np.concatenate(clips).mean(0)
    return {"r": {au: float(np.mean([r[au] for r in rs])) for au in watched},
            "mean": {au: float(means[_au_index(au)]) for au in shown}}  # fmt: skip


def format_rows(rows: Sequence[dict], driver: str = "AU26", watched: Sequence[str] = WATCHED) -> str:
    """A markdown table of :func:`coupling_rows`: r with the driver, then mean AUs, generated | truth."""
    shown = [driver, *watched]
    head = (["class", "clips"] + [f"r({driver}, {a}) gen / truth" for a in watched]
            + [f"mean {a} gen / truth" for a in shown])  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]

    def pair(row, kind, au):
        g = row["generated"][kind][au]
        t = "–" if row["truth"] is None else f"{row['truth'][kind][au]:+.2f}" if kind == "r" else f"{row['truth'][kind][au]:.2f}"
        return (f"{g:+.2f}" if kind == "r" else f"{g:.2f}") + " / " + t

    for row in rows:
        cells = [row["class"], str(row["clips"])] + [pair(row, "r", a) for a in watched] + [pair(row, "mean", a) for a in shown]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
