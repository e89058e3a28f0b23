"""Training-step and forward time of our U-Net against diffusers' ``UNet2DConditionModel`` and, for
the video U-Net, ``UNetMotionModel`` (the U-Net with AnimateDiff's ``MotionAdapter``).

Both models get the same topology and the same weights: the PyTorch model is built at random,
saved with ``save_pretrained`` and converted by :func:`moee_jax.checkpoint.convert.unet.convert_unet`
(the U-Net folder, plus the motion adapter's folder for a video config). No audio attention, no
reference or emotion parts: the backbone the two libraries share.

* **spatial** configs (``tiny``, ``mid``, ``sd15``): one frame per clip, ``(B, 1, H, W, 4)`` for ours
  and ``(B, 4, H, W)`` for PyTorch, context ``(B, 77, D_ctx)``.
* **video** configs (``tiny-video``, ``mid-video``): the same U-Net with motion modules after every
  ResNet/attention pair and in the middle block, ``F`` frames per clip: ``(B, F, H, W, 4)`` for ours,
  ``(B, 4, F, H, W)`` for ``UNetMotionModel``, whose context is per frame ``(B·F, 77, D_ctx)``.

A training step is the gradient of an MSE loss on the output with respect to every parameter
(``jax.value_and_grad`` jitted; ``loss.backward()``). Times are medians over ``--iters`` calls
after ``--warmup`` calls. FLOPs are XLA's count for our compiled step. On a CPU each side is measured
in ``--rounds`` rounds (default 3), PyTorch then ours back to back, and the ratio is the median of the
rounds' ratios with their range: on a shared machine a slow spell then hits both sides of one ratio
(the same code's step varied by ±20 % between runs minutes apart on the 2-core host).

    python benchmarks/unet_step.py                         # tiny, mid, tiny-video, mid-video, fp32
    python benchmarks/unet_step.py --configs mid,mid-video --iters 20
    python benchmarks/unet_step.py --sd15 --dtype bfloat16 # adds SD1.5 at 64×64 latents

``--dtype bfloat16`` means mixed precision for both: fp32 parameters, bf16 compute (our
``VideoUNet(dtype=bfloat16)``; PyTorch ``autocast(bfloat16)``).

PyTorch runs in child processes of its own, all before JAX starts in this one: sharing a process
with XLA's CPU thread pool made multi-threaded PyTorch 2–5× slower, and on a GPU the two
allocators would compete for memory (JAX reserves most of it when it starts).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import multiprocessing
import os
import pathlib
import platform
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

_ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from tests.reference_models import TINY_UNET  # noqa: E402

CONTEXT_TOKENS = 77

_SD_BLOCKS = dict(
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)

# name → (diffusers UNet2DConditionModel kwargs, latent side, default batch)
CONFIGS = {
    "tiny": (TINY_UNET, 16, 2),
    "mid": (
        dict(
            block_out_channels=(64, 128, 256, 256),
            layers_per_block=2,
            attention_head_dim=8,  # diffusers' SD naming: the number of heads
            cross_attention_dim=256,
            norm_num_groups=32,
            in_channels=4,
            out_channels=4,
            sample_size=32,
            **_SD_BLOCKS,
        ),
        32,
        2,
    ),
    "sd15": (
        dict(
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            attention_head_dim=8,
            cross_attention_dim=768,
            norm_num_groups=32,
            in_channels=4,
            out_channels=4,
            sample_size=64,
            **_SD_BLOCKS,
        ),
        64,
        2,
    ),
}

# Video configs: name → (spatial config, frames per clip, batch of clips, diffusers MotionAdapter kwargs).
VIDEO = {
    "tiny-video": ("tiny", 4, 1, dict(motion_num_attention_heads=4, motion_norm_num_groups=8)),
    "mid-video": ("mid", 8, 1, dict(motion_num_attention_heads=8, motion_norm_num_groups=32)),
}
ALL_CONFIGS = sorted(CONFIGS) + sorted(VIDEO)


def setup_of(name: str) -> tuple[dict, int, int, int, dict | None]:
    """``(diffusers U-Net kwargs, latent side, batch, frames, MotionAdapter kwargs or None)``."""
    if name in VIDEO:
        base, frames, batch, motion = VIDEO[name]
        kwargs, side, _ = CONFIGS[base]
        adapter = dict(
            block_out_channels=tuple(kwargs["block_out_channels"]),
            motion_layers_per_block=kwargs["layers_per_block"],
            motion_max_seq_length=32,
            **motion,
        )
        return kwargs, side, batch, frames, adapter
    kwargs, side, batch = CONFIGS[name]
    return kwargs, side, batch, 1, None


def _gpu_visible() -> bool:
    return os.path.exists("/dev/nvidia0") or shutil.which("nvidia-smi") is not None


def median_ms(fn, sync, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        sync(fn())
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def make_inputs(kwargs: dict, side: int, batch: int, frames: int = 1) -> dict:
    """Channels-last numpy inputs: ``sample``/``target`` (B, F, H, W, C), ``context``, ``timesteps``."""
    rng = np.random.default_rng(0)
    return {
        "sample": rng.standard_normal((batch, frames, side, side, kwargs["in_channels"]), np.float32),
        "target": rng.standard_normal((batch, frames, side, side, kwargs["out_channels"]), np.float32),
        "context": rng.standard_normal((batch, CONTEXT_TOKENS, kwargs["cross_attention_dim"]), np.float32),
        "timesteps": rng.integers(0, 1000, (batch,)).astype(np.int32),
    }


def torch_side(
    kwargs: dict, adapter: dict | None, inputs: dict, weights_dir: str | None, dtype: str, threads: int, warmup: int, iters: int
) -> dict:
    """Child process: build the diffusers U-Net (with ``adapter``: ``UNetMotionModel`` from it and a
    ``MotionAdapter``), save the weights under ``weights_dir/{unet,motion_adapter}`` (unless ``None``:
    a later round rebuilds the same seeded weights), time it, return times and its forward output
    (channels last)."""
    import diffusers
    import torch
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

    torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = UNet2DConditionModel(**kwargs)
    if weights_dir is not None:
        model.save_pretrained(f"{weights_dir}/unet", safe_serialization=True)
    if adapter is not None:
        motion = MotionAdapter(**adapter)
        if weights_dir is not None:
            motion.save_pretrained(f"{weights_dir}/motion_adapter", safe_serialization=True)
        model = UNetMotionModel.from_unet2d(model, motion)
    model = model.to(device)

    def to_torch(a):
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)

    frames = inputs["sample"].shape[1]
    if adapter is None:  # (B, 1, H, W, C) → (B, C, H, W)
        x = to_torch(inputs["sample"][:, 0].transpose(0, 3, 1, 2))
        y = to_torch(inputs["target"][:, 0].transpose(0, 3, 1, 2))
        c = to_torch(inputs["context"])
    else:  # (B, F, H, W, C) → (B, C, F, H, W); UNetMotionModel takes one context per frame
        x = to_torch(inputs["sample"].transpose(0, 4, 1, 2, 3))
        y = to_torch(inputs["target"].transpose(0, 4, 1, 2, 3))
        c = to_torch(np.repeat(inputs["context"], frames, axis=0))
    t = to_torch(inputs["timesteps"].astype(np.int64))

    def channels_last(a):
        a = a.float().cpu().numpy()
        return a.transpose(0, 2, 3, 1)[:, None] if a.ndim == 4 else a.transpose(0, 2, 3, 4, 1)

    autocast_dtype = {"float32": None, "bfloat16": torch.bfloat16}[dtype]

    def autocast():
        return torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)

    def sync(_):
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step():
        model.zero_grad(set_to_none=True)
        with autocast():
            out = model(x, t, c).sample
        loss = torch.mean(torch.square(out.float() - y))
        loss.backward()
        return loss

    def forward():
        with torch.no_grad(), autocast():
            return model(x, t, c).sample

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model.train()
    step_ms = median_ms(step, sync, warmup, iters)
    model.eval()
    fwd_ms = median_ms(forward, sync, warmup, iters)
    return {
        "step": step_ms,
        "fwd": fwd_ms,
        "out": channels_last(forward()),
        "params": sum(p.numel() for p in model.parameters()),
        "peak": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
        "versions": f"torch {torch.__version__} on {device}"
        + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else "")
        + f"; diffusers {diffusers.__version__}",
        "threads": f"torch {torch.get_num_threads()} intra-op / {torch.get_num_interop_threads()} inter-op",
    }


def ours_config(diffusers_kwargs: dict, attention: str, adapter: dict | None = None):
    """Our config equal to a diffusers ``UNet2DConditionModel`` config (spatial only), or with
    ``adapter`` (``MotionAdapter`` kwargs) to the ``UNetMotionModel`` built from the two."""
    from moee_jax.models.unet import UNetConfig

    d = diffusers_kwargs
    motion = {}
    if adapter is not None:
        motion = dict(
            motion_num_attention_heads=adapter["motion_num_attention_heads"],
            motion_norm_num_groups=adapter["motion_norm_num_groups"],
            motion_max_seq_length=adapter["motion_max_seq_length"],
        )
    return UNetConfig(
        in_channels=d["in_channels"],
        out_channels=d["out_channels"],
        block_out_channels=tuple(d["block_out_channels"]),
        down_attention=tuple(t.startswith("CrossAttn") for t in d["down_block_types"]),
        layers_per_block=d["layers_per_block"],
        num_attention_heads=d["attention_head_dim"],
        cross_attention_dim=d["cross_attention_dim"],
        norm_num_groups=d["norm_num_groups"],
        motion_modules=adapter is not None,
        audio_dim=None,
        attention_implementation=attention,
        **motion,
    )


def flops_of(compiled) -> float | None:
    """XLA's FLOP count of a compiled computation (``cost_analysis`` is a dict or a list of them)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return None if not cost or "flops" not in cost else float(cost["flops"])


def jax_side(
    kwargs: dict, adapter: dict | None, inputs: dict, weights_dir: str, dtype: str, attention: str, warmup: int, iters: int
) -> dict:
    """Convert the saved weights into our U-Net, compile and time its step and forward."""
    import jax
    import jax.numpy as jnp

    from moee_jax.checkpoint.convert.unet import convert_unet
    from moee_jax.models.unet import VideoUNet
    from moee_jax.xla_options import compiler_options

    unet = VideoUNet(ours_config(kwargs, attention, adapter), dtype=jnp.dtype(dtype))
    motion = f"{weights_dir}/motion_adapter" if adapter is not None else None
    params = jax.device_put(convert_unet(f"{weights_dir}/unet", unet, motion_adapter=motion).params)
    x, y, c, t = (jax.device_put(inputs[k]) for k in ("sample", "target", "context", "timesteps"))

    def forward(p, x, t, c):
        return unet.apply({"params": p}, x, t, c)

    def loss(p, x, t, c, y):
        return jnp.mean(jnp.square(forward(p, x, t, c).astype(jnp.float32) - y))

    start = time.perf_counter()
    options = compiler_options()  # as the project compiles (on a CPU: YNNPACK for dots only)
    step = jax.jit(jax.value_and_grad(loss)).lower(params, x, t, c, y).compile(compiler_options=options)
    fwd = jax.jit(forward).lower(params, x, t, c).compile(compiler_options=options)
    compile_s = time.perf_counter() - start

    def timed() -> tuple[float, float]:
        return (
            median_ms(lambda: step(params, x, t, c, y), jax.block_until_ready, warmup, iters),
            median_ms(lambda: fwd(params, x, t, c), jax.block_until_ready, warmup, iters),
        )

    step_ms, fwd_ms = timed()
    stats = jax.devices()[0].memory_stats() or {}
    return {
        "step": step_ms,
        "fwd": fwd_ms,
        "timed": timed,
        "out": np.asarray(fwd(params, x, t, c), np.float32),
        "params": sum(a.size for a in jax.tree_util.tree_leaves(params)),
        "flops": flops_of(step),
        "compile_s": compile_s,
        "peak": stats.get("peak_bytes_in_use"),
    }


def bench(names: list[str], args) -> list[dict]:
    """All PyTorch runs (each in a fresh child process) first, then ours, on the same weights; then
    ``args.rounds − 1`` more rounds per config, PyTorch (a fresh child again) and ours back to back.

    Each row keeps every round's medians; the table gives the median over rounds and the median of
    the per-round ratios, so a slow spell on a shared machine hits both sides of one ratio.
    """
    setups = {}
    for name in names:
        kwargs, side, batch, frames, adapter = setup_of(name)
        batch = args.batch or batch
        setups[name] = (kwargs, adapter, side, batch, frames, make_inputs(kwargs, side, batch, frames))
    spawn = multiprocessing.get_context("spawn")

    def torch_run(name, weights_dir):
        kwargs, adapter, _, _, _, inputs = setups[name]
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
            return pool.submit(
                torch_side, kwargs, adapter, inputs, weights_dir, args.dtype, args.torch_threads, args.warmup, args.iters
            ).result()

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        refs = {name: torch_run(name, f"{tmp}/{name}") for name in setups}
        for name, (kwargs, adapter, side, batch, frames, inputs) in setups.items():
            ours = jax_side(kwargs, adapter, inputs, f"{tmp}/{name}", args.dtype, args.attention, args.warmup, args.iters)
            ref = refs[name]
            if ours["params"] != ref["params"]:
                raise RuntimeError(f"{name}: ours has {ours['params']} parameters, diffusers {ref['params']}")
            rel = float(np.linalg.norm(ours["out"] - ref["out"]) / np.linalg.norm(ref["out"]))
            rounds = [{"ours": (ours["step"], ours["fwd"]), "torch": (ref["step"], ref["fwd"])}]
            for _ in range(args.rounds - 1):
                again = torch_run(name, None)
                rounds.append({"torch": (again["step"], again["fwd"]), "ours": ours["timed"]()})
            results.append({"name": name, "batch": batch, "frames": frames, "side": side, "ours": ours, "torch": ref,
                            "rel_err": rel, "rounds": rounds})  # fmt: skip
    return results


def summarise(rounds: list[dict], i: int) -> tuple[float, float, float, float, float]:
    """``(ours ms, torch ms, ratio, lowest ratio, highest ratio)`` of column ``i`` (0 step, 1 forward):
    medians over rounds, and the per-round ratios' median and range."""
    ours = [r["ours"][i] for r in rounds]
    ref = [r["torch"][i] for r in rounds]
    ratios = [o / t for o, t in zip(ours, ref)]
    return statistics.median(ours), statistics.median(ref), statistics.median(ratios), min(ratios), max(ratios)


def table(results, peak_tflops: float | None) -> str:
    cols = [
        "config", "params (M)", "ours fwd+bwd (ms)", "torch fwd+bwd (ms)", "ratio",
        "ours fwd (ms)", "torch fwd (ms)", "ratio", "XLA GFLOP/step", "ours GFLOP/s",
    ]  # fmt: skip
    if peak_tflops:
        cols.append("MFU")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]

    def ratio(mid: float, lo: float, hi: float, rounds: int) -> str:
        return f"{mid:.2f}" if rounds == 1 else f"{mid:.2f} ({lo:.2f}–{hi:.2f})"

    for r in results:
        o = r["ours"]
        step_ours, step_torch, *step_ratio = summarise(r["rounds"], 0)
        fwd_ours, fwd_torch, *fwd_ratio = summarise(r["rounds"], 1)
        gflop = None if o["flops"] is None else o["flops"] / 1e9
        rate = None if gflop is None else gflop / (step_ours / 1e3)
        row = [
            f"{r['name']} (B={r['batch']}{'' if r['frames'] == 1 else ' × F=' + str(r['frames'])}, {r['side']}²)",
            f"{o['params'] / 1e6:.2f}",
            f"{step_ours:.1f}",
            f"{step_torch:.1f}",
            ratio(*step_ratio, len(r["rounds"])),
            f"{fwd_ours:.1f}",
            f"{fwd_torch:.1f}",
            ratio(*fwd_ratio, len(r["rounds"])),
            "n/a" if gflop is None else f"{gflop:.2f}",
            "n/a" if rate is None else f"{rate:.1f}",
        ]
        if peak_tflops:
            row.append("n/a" if rate is None else f"{rate / (1e3 * peak_tflops):.1%}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _cpu_name() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gib(b) -> str:
    return "n/a" if b is None else f"{b / 2**30:.2f} GiB"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="tiny,mid,tiny-video,mid-video", help=f"comma-separated, from {ALL_CONFIGS}")
    parser.add_argument("--sd15", action="store_true", help="also run SD1.5 at 64×64 latents (slow on CPU)")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=None, help="override every config's batch size")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--attention", choices=("xla", "cudnn", "pallas", "blockwise"), default="xla", help="our attention kernel")
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count(), help="torch intra-op threads (CPU)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak, adds an MFU column")
    parser.add_argument("--rounds", type=int, default=None,
                        help="times each side is measured, PyTorch then ours back to back; the ratio is the median of "
                             "the rounds' ratios, with their range (default 3 on a CPU, 1 with a GPU)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 1 if _gpu_visible() else 3
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    names = [n for n in args.configs.split(",") if n] + (["sd15"] if args.sd15 else [])
    unknown = [n for n in names if n not in CONFIGS and n not in VIDEO]
    if unknown:
        parser.error(f"unknown config(s) {unknown}; choose from {ALL_CONFIGS}")
    names = list(dict.fromkeys(names))

    # Before jax initialises its backends. Without a GPU, pin CPU so a CUDA-enabled jax does not
    # fail looking for one; with a GPU, let jax choose.
    if "JAX_PLATFORMS" not in os.environ and not _gpu_visible():
        os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

    load_before = os.getloadavg()
    results = bench(names, args)
    load_after = os.getloadavg()

    import jax

    device = jax.devices()[0]
    print(f"# U-Net step benchmark, {datetime.date.today().isoformat()}")
    print(f"machine: {_cpu_name()}, {os.cpu_count()} CPUs, {platform.system()} {platform.machine()}")
    print(f"jax {jax.__version__} on {device.platform} ({device.device_kind}); {results[0]['torch']['versions']}")
    print(f"threads: {results[0]['torch']['threads']} (own process); XLA CPU: own pool over {os.cpu_count()} cores")
    print(f"dtype {args.dtype}, our attention {args.attention!r}, median of {args.iters} after {args.warmup} warm-up"
          f"{'' if args.rounds == 1 else f' in each of {args.rounds} rounds (ratio: median of the rounds, their range)'}, "
          f"{CONTEXT_TOKENS} context tokens; spatial rows one frame per clip, video rows F frames with motion modules\n")  # fmt: skip
    print(table(results, args.peak_tflops))
    print()
    # Other processes on the machine distort CPU timings; the load average says how much.
    print(f"1-min load average: {load_before[0]:.2f} before, {load_after[0]:.2f} after ({os.cpu_count()} CPUs)")
    for r in results:
        o, t = r["ours"], r["torch"]
        mem = ""
        if o["peak"] is not None or t["peak"] is not None:
            mem = f"; peak memory ours {_gib(o['peak'])}, torch {_gib(t['peak'])}"
        print(f"{r['name']}: our compile {o['compile_s']:.1f} s (step + forward); "
              f"forward rel. error vs diffusers {r['rel_err']:.1e}{mem}")  # fmt: skip


if __name__ == "__main__":
    main()
