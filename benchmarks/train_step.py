"""Training-step throughput of the real trainer: examples/s, XLA FLOPs per step, achieved FLOP/s, MFU.

Builds a small synthetic_talking_faces dataset in a temporary directory, constructs
:class:`moee_jax.train.trainer.Trainer` for each case (stage, config variant, overrides), compiles
the sharded step once and times ``--steps`` steps after ``--warmup`` (the median of per-step times;
each step is synchronised). FLOPs come from XLA's cost analysis of the step before partitioning;
MFU needs the device's peak: known for TPUs and data-centre GPUs, or ``--peak_tflops``. On a CPU,
whose peak the runtime does not report, the peak is measured: the best fp32 throughput of a
jitted 2048² matmul on all its cores (``--peak_tflops 0``; "MFU vs GEMM").

    python benchmarks/train_step.py                       # CPU: tiny stage1/2, sd15-shaped stage2
    python benchmarks/train_step.py --cases demo:stage1 demo:stage2   # the CPU demo's own steps
    python benchmarks/train_step.py --cases sd15:stage1:512:16 --dtype bfloat16   # on a GPU
    python benchmarks/train_step.py --cases demo:stage1 --steps 3 --profile /tmp/prof   # + trace, HLO
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import pathlib
import platform
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
REPO = pathlib.Path(__file__).resolve().parent.parent


def _config(stage: str, variant: str):
    """The stage's config of a backbone variant (``configs/<stage>.py:<variant>``), or for ``demo`` /
    ``demo-gpu`` the stage as the built-in demo trains it (``configs/demo.py``: its model, frames,
    image size, batch and data options)."""
    if variant.startswith("demo"):
        spec = importlib.util.spec_from_file_location("cfg_demo", REPO / "configs" / "demo.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.get_config("gpu" if variant == "demo-gpu" else "cpu").stages[stage]
    spec = importlib.util.spec_from_file_location(f"cfg_{stage}", REPO / "configs" / f"{stage}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["tiny:stage1:32:4", "tiny:stage2:32:4", "sd15:stage2:64:2"],
                        help="variant:stage:image_size:frames; for variant demo / demo-gpu size and frames may be left out")  # fmt: skip
    parser.add_argument("--batch", type=int, default=0, help="global batch (default: one per device; demo cases: the demo's)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--remat", default="none")
    parser.add_argument("--attention", default="")
    parser.add_argument("--unet", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="model.unet overrides, e.g. layers_per_block=1 (an sd15-shaped model that fits a small host)")  # fmt: skip
    parser.add_argument("--profile", default="", metavar="DIR",
                        help="write a jax.profiler trace of the timed steps (Perfetto JSON) and each case's compiled HLO under DIR/<case>")
    parser.add_argument("--peak_tflops", type=float, default=0.0, help="per-device peak, for MFU where not known")
    args = parser.parse_args()

    import jax

    from moee_jax.data.builders.synthetic_talking_faces import SyntheticConfig, build
    from moee_jax.parallel.sharding import to_global
    from moee_jax.train import metrics
    from moee_jax.train.trainer import Trainer

    rows = []
    gemm_peak = None
    with tempfile.TemporaryDirectory() as tmp:
        cases = [_full_case(case) for case in args.cases]
        sizes = sorted({int(c.split(":")[2]) for c in cases})
        for size in sizes:
            build(SyntheticConfig(name=f"bench{size}", size=size, num_frames=40, train_identities=2, test_identities=1,
                                  clips_per_emotion=1, intensities=(1.0,)), tmp)  # fmt: skip
        for case in cases:
            variant, stage, size, frames = case.split(":")
            c = _config(stage, variant)
            demo_batch = int(c.train.batch_size) if variant.startswith("demo") else 0
            c.dtype = args.dtype
            c.model.unet.remat = args.remat
            for item in args.unet:
                field, _, value = item.partition("=")
                c.model.unet[field] = type(c.model.unet[field])(int(value) if value.lstrip("-").isdigit() else value)
            if args.attention:
                c.model.unet.attention_implementation = args.attention
            c.video.image_size = (int(size), int(size))
            c.video.num_frames = int(frames)
            c.data.update(data_dir=tmp, name=f"synthetic_talking_faces/bench{size}", num_frames=int(frames), image_size=int(size),
                          reference_min_distance=0)  # fmt: skip
            c.train.batch_size = args.batch or demo_batch or jax.device_count()
            c.train.ema_decay = 0.0
            c.mesh.shape = (-1, 1, 1)
            t0 = time.perf_counter()
            trainer = Trainer(c, pathlib.Path(tmp) / f"run_{case.replace(':', '_')}")
            state = trainer.init_state()
            batch = to_global(trainer.example, trainer.batch_shardings)
            trainer.compile(state, batch)
            compile_s = time.perf_counter() - t0
            times = []
            profile_dir = pathlib.Path(args.profile) / case.replace(":", "_") if args.profile else None
            for i in range(args.warmup + args.steps):
                if profile_dir is not None and i == args.warmup:
                    profile_dir.mkdir(parents=True, exist_ok=True)
                    (profile_dir / "step.hlo.txt").write_text(trainer._compiled.as_text())
                    jax.profiler.start_trace(str(profile_dir), create_perfetto_trace=True)
                t = time.perf_counter()
                state, out = trainer._compiled(state, batch, trainer.extra)
                jax.block_until_ready(out["loss"])
                if i >= args.warmup:
                    times.append(time.perf_counter() - t)
            if profile_dir is not None:
                jax.profiler.stop_trace()
            step_s = statistics.median(times)
            flops = trainer.step_flops
            peak = args.peak_tflops * 1e12 if args.peak_tflops else metrics.peak_flops_per_device(jax.devices()[0], args.dtype)
            if peak is None and jax.devices()[0].platform == "cpu":
                peak = gemm_peak = gemm_peak or measured_gemm_peak(args.dtype)
            mfu = metrics.mfu(flops, 1.0 / step_s, jax.device_count(), peak)
            rows.append((case, trainer.num_trainable / 1e6, (trainer.num_trainable + trainer.num_frozen) / 1e6,
                         c.train.batch_size, step_s * 1e3, c.train.batch_size / step_s, flops, mfu, compile_s))  # fmt: skip
            print("# done:", _row(rows[-1]), flush=True)
            del trainer, state, batch

    device = jax.devices()[0]
    print(f"# train step, {datetime.date.today()}, {device.device_kind} × {jax.device_count()} ({platform.machine()}, "
          f"{os.cpu_count()} CPUs), {args.dtype}, remat={args.remat}"
          + (f", MFU vs measured GEMM peak {gemm_peak / 1e9:.1f} GFLOP/s" if gemm_peak else ""))  # fmt: skip
    print(
        "| case (variant:stage:size:frames) | trainable M | total M | batch | step ms | examples/s | GFLOP/step | GFLOP/s | MFU | compile s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(_row(row))


def _full_case(case: str) -> str:
    """``demo:stage1`` → ``demo:stage1:<the demo's image size>:<its frames>``; others unchanged."""
    parts = case.split(":")
    if len(parts) == 2 and parts[0].startswith("demo"):
        c = _config(parts[1], parts[0])
        return f"{case}:{int(c.data.image_size)}:{int(c.video.num_frames)}"
    if len(parts) != 4:
        raise SystemExit(f"train_step.py: case {case!r}: expected variant:stage:image_size:frames (or demo:stage)")
    return case


def measured_gemm_peak(dtype: str = "float32", n: int = 2048, repeats: int = 7) -> float:
    """FLOP/s of the fastest of ``repeats`` jitted ``n × n`` matmuls: the practical peak of a device
    whose nominal one is not known (a CPU)."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    best = min(_timed(lambda: f(a, a).block_until_ready()) for _ in range(repeats))
    return 2 * n**3 / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _row(row) -> str:
    case, tr, tot, b, ms, eps, flops, mfu, comp = row
    gflop = "n/a" if flops is None else f"{flops / 1e9:.1f}"
    rate = "n/a" if flops is None else f"{flops / 1e9 / (ms / 1e3):.1f}"
    return (f"| {case} | {tr:.1f} | {tot:.1f} | {b} | {ms:.0f} | {eps:.2f} | {gflop} | {rate} | "
            f"{'n/a' if mfu is None else f'{100 * mfu:.1f}%'} | {comp:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
