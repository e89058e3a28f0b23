"""The expression reader's ceiling on fresh identities: what it reads on ground truth it never saw.

``moee eval`` reports the reader on the held-out split's ground truth beside every generated number
(:func:`moee_jax.eval.evaluate.ground_truth_ceiling`); with 8 identities that ceiling moves by one
compound clip in eight. This script measures it on many identities outside every split, for one or
more readers side by side, so that a change to the reader (more steps, another architecture, a loss
weight) is judged on the same clips:

* per identity (default: :data:`~moee_jax.eval.evaluate.FRESH_IDENTITY_SEEDS`), the seven
  classes at full intensity and each compound palette of :class:`~moee_jax.eval.evaluate.EvalSettings`
  (``happy:0.5,surprised:0.5``, ``sad:0.5,fearful:0.5``), 50 frames drawn at ``--render_size`` and
  area-shrunk to the reader's size, as the model's frames are;
* the voice: the face's own (``own``), or emotion-neutral (``neutral``: the label is the only cue,
  as in the labelled evaluation);
* judged as a generated run is (:func:`~moee_jax.eval.evaluate.fresh_identity_ceiling`), so the
  columns are those of ``metrics.json``: basic accuracy, compounds (both components present),
  per compound, the false alarms (a clip showing one component alone judged as the compound),
  AU error, lip sync and identity error.

Usage::

    python benchmarks/reader_ceiling.py --readers checkpoints/demo_cpu/reader.msgpack \\
        --seeds 50000:50024 --voices own,neutral --out reader_ceiling.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

from moee_jax.data import schema
from moee_jax.eval.evaluate import FRESH_IDENTITY_SEEDS, EvalSettings, fresh_identity_ceiling
from moee_jax.eval.reader import load_reader


def seed_range(text: str) -> list[int]:
    """``"50000:50024"`` (start:stop) or ``"1,2,5"`` → identity seeds."""
    if ":" in text:
        start, stop = (int(v) for v in text.split(":"))
        if stop <= start:
            raise ValueError("stop must exceed start")
        return list(range(start, stop))
    return [int(v) for v in text.split(",") if v]


def row(name: str, voice: str, s: dict) -> str:
    h = s["headline"]
    comp = " | ".join(f"{round(v['both_present_rate'] * v['num_clips'])}/{v['num_clips']}" for v in s["compounds"]["per_compound"].values())
    fa = h.get("compound_false_positive_rate", float("nan"))
    return (f"| {name} | {voice} | {h['emotion_accuracy']:.3f} | {comp} | {h['compound_both_present_rate']:.3f} | {fa:.3f} | "
            f"{h['au_mae']:.3f} | {h['lip_sync_pearson']:.3f} | {h['identity_mae']:.4f} |")  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--readers", required=True, help="comma-separated reader files (moee_jax.eval.reader.save_reader)")
    p.add_argument(
        "--seeds",
        default=f"{FRESH_IDENTITY_SEEDS.start}:{FRESH_IDENTITY_SEEDS.stop}",
        help="identity seeds, start:stop or a list (default: 24 outside every split)",
    )
    p.add_argument("--voices", default="own,neutral", help="own and/or neutral (comma-separated)")
    p.add_argument("--render_size", type=int, default=64, help="the size the faces are drawn at (the dataset's)")
    p.add_argument("--frames", type=int, default=50, help="frames per clip")
    p.add_argument("--out", default=None, help="write the summaries here as JSON")
    a = p.parse_args(argv)

    paths = [pathlib.Path(r) for r in a.readers.split(",") if r]
    for path in paths:
        if not path.is_file():
            p.error(f"--readers: {path} is not a file")
    voices = [v for v in a.voices.split(",") if v]
    if not voices or any(v not in ("own", "neutral") for v in voices):
        p.error(f"--voices must list own and/or neutral, got {a.voices!r}")
    try:
        seeds = seed_range(a.seeds)
    except ValueError as e:
        p.error(f"--seeds {a.seeds!r}: {e}")
    compounds = EvalSettings().compounds
    readers = {str(path): load_reader(path) for path in paths}

    results = []
    print(f"{len(seeds)} identities, {len(schema.CLASSES)} classes and {len(compounds)} compounds each, "
          f"{a.frames} frames drawn at {a.render_size}²\n")  # fmt: skip
    names = " | ".join(compounds)
    print(f"| reader | voice | accuracy | {names} | compounds | false alarms | AU MAE | lip r | identity MAE |")
    print("|---|---|---:|" + "---:|" * len(compounds) + "---:|---:|---:|---:|---:|")
    for voice in voices:
        for name, reader in readers.items():
            start = time.perf_counter()
            s = fresh_identity_ceiling(reader, seeds, compounds=compounds, voice=voice, render_size=a.render_size, num_frames=a.frames)
            print(row(name, voice, s), flush=True)
            kept = {k: v for k, v in s.items() if k in ("headline", "missed_aus", "compounds")}
            results.append({"reader": name, "voice": voice, "seconds": round(time.perf_counter() - start, 1),
                            "reader_info": reader.info, "summary": kept})  # fmt: skip
    for r in results:
        top = list(r["summary"]["missed_aus"].items())[:4]
        print(f"{r['reader']} ({r['voice']} voice) compound AUs missed most: " + ", ".join(f"{k} {v}" for k, v in top))
    if a.out:
        pathlib.Path(a.out).write_text(json.dumps({"seeds": [seeds[0], seeds[-1]], "frames": a.frames, "render_size": a.render_size,
                                                   "results": results}, indent=2, default=float))  # fmt: skip
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
