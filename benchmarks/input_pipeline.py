"""Input-pipeline throughput: training samples (clips) per second per host, by frame size and workers.

Builds small synthetic_talking_faces datasets (64² and 512²) in a temporary directory, then times
:func:`moee_jax.data.pipeline.make_pipeline` (PNG decode of F + M + 1 frames, landmark masks, audio
window, masked noisy sampling) for each grain worker count, after a warm-up.

    python benchmarks/input_pipeline.py [--sizes 64 512] [--workers 0 1 2] [--batches 20]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _dataset(size: int, data_dir: str):
    from moee_jax.data.builders.synthetic_talking_faces import SyntheticConfig, build

    config = SyntheticConfig(name=f"bench{size}", size=size, num_frames=48, train_identities=2, test_identities=1,
                             clips_per_emotion=1, intensities=(1.0,))  # fmt: skip
    build(config, data_dir)
    return f"synthetic_talking_faces/bench{size}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--num_frames", type=int, default=16)
    args = parser.parse_args()

    import grain

    from moee_jax.data import pipeline as P

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            t0 = time.perf_counter()
            name = _dataset(size, tmp)
            build_s = time.perf_counter() - t0
            source = P.open_source(tmp, name, "train")
            for workers in args.workers:
                cfg = P.PipelineConfig(num_frames=args.num_frames, motion_frames=2, batch_size=args.batch_size, noisy_p=0.25,
                                       worker_count=workers, worker_buffer_size=4)  # fmt: skip
                it = iter(P.make_pipeline(source, cfg, shard_options=grain.sharding.NoSharding()))
                for _ in range(3):  # warm-up: worker start-up, first reads
                    next(it)
                t = time.perf_counter()
                for _ in range(args.batches):
                    next(it)
                dt = time.perf_counter() - t
                clips = args.batches * args.batch_size
                rows.append((size, workers, clips / dt, clips * (args.num_frames + 3) / dt, build_s))
                del it

    print(f"# input pipeline, {datetime.date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    print(f"# F={args.num_frames} + M=2 + reference frames per clip, batch {args.batch_size}, noisy_p=0.25")
    print("| frame size | workers | clips/s | frames decoded/s | dataset build s |")
    print("|---:|---:|---:|---:|---:|")
    for size, workers, cps, fps, build_s in rows:
        print(f"| {size}² | {workers} | {cps:.1f} | {fps:.0f} | {build_s:.1f} |")


if __name__ == "__main__":
    main()
