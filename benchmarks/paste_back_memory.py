"""Peak memory and time of writing a pasted-back video (``moee animate --paste_back``) against its length.

The animated crops (256², what the model renders) are pasted back into a large photo and encoded,
as :func:`moee_jax.inference.outputs.save_animation` does after sampling. Each length runs in a fresh
process, which reports its own peak resident memory (``ru_maxrss``); the sampling itself is
left out (its memory does not depend on the photo). Prints a table; the acceptance bound is that the
longest video needs at most 1.5× the shortest one's peak.

    python benchmarks/paste_back_memory.py                      # 12 MP photo, 3 s and 40 s of speech
    python benchmarks/paste_back_memory.py --seconds 3 10 --megapixels 2
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time


def _child(seconds: float, megapixels: float, out: str) -> None:
    import numpy as np

    from moee_jax.data.audio import SAMPLE_RATE
    from moee_jax.inference import inputs as inputs_lib
    from moee_jax.inference.job import Animation
    from moee_jax.inference.long_audio import plan_clips
    from moee_jax.inference.outputs import save_animation

    width = int(round((megapixels * 1e6 * 4 / 3) ** 0.5))
    height = int(round(width * 3 / 4))
    from PIL import Image

    rng = np.random.default_rng(0)  # a smooth random photo (coarse noise, bicubic-enlarged)
    coarse = Image.fromarray(rng.integers(0, 256, (height // 64, width // 64, 3), dtype=np.uint8))
    photo = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC))
    side = height // 3
    portrait = inputs_lib.Portrait(photo[:256, :256].copy(), (width / 2, height / 2, side), photo, True)
    samples = int(seconds * SAMPLE_RATE)
    plan = plan_clips(samples, 25.0, 16, 4, 2)
    crops = np.repeat(portrait.crop[None], plan.num_frames, axis=0)  # the model's output: (T, 256, 256, 3)
    audio = (0.1 * np.sin(np.arange(samples) / 20.0)).astype(np.float32)
    animation = Animation(crops, audio, 25.0, portrait, plan, {"frames": plan.num_frames}, [])
    started = time.monotonic()
    save_animation(animation, out, paste=True)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"frames": plan.num_frames, "write_s": time.monotonic() - started, "size": [height, width], "peak_mib": peak_mib}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, nargs="+", default=[3.0, 40.0])
    parser.add_argument("--megapixels", type=float, default=12.0)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.seconds[0], args.megapixels, args.out)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seconds in args.seconds:
            proc = subprocess.run(
                [sys.executable, __file__, "--child", "--seconds", str(seconds), "--megapixels", str(args.megapixels), "--out", f"{tmp}/v{seconds}.mp4"],
                check=True, capture_output=True, text=True,
            )  # fmt: skip
            rows.append(dict(json.loads(proc.stdout.strip().splitlines()[-1]), seconds=seconds))
    print(f"paste-back writing, {rows[0]['size'][1]}×{rows[0]['size'][0]} photo ({args.megapixels:g} MP), 256² crops, libx264 crf 18")
    print(f"{'speech s':>9} {'frames':>7} {'peak RSS MiB':>13} {'write s':>8} {'× shortest':>11}")
    for row in rows:
        print(f"{row['seconds']:9.1f} {row['frames']:7d} {row['peak_mib']:13.0f} {row['write_s']:8.1f} {row['peak_mib'] / rows[0]['peak_mib']:11.2f}")


if __name__ == "__main__":
    main()
