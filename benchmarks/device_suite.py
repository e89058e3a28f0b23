"""Device suite: the sd15 model's training-step speed, MFU and memory, its largest batch, stage-2 memory
and inference speed on one accelerator, in one command that prints one markdown table and writes a JSON file.

What is measured (``configs/stage1.py:sd15`` and ``configs/stage2.py:sd15``: SD1.5 U-Net + ReferenceNet
+ AnimateDiff motion modules + audio attention, 512² frames = 64×64 latents, F = 16 frames + M = 2
motion frames, ``--dtype`` activations (default bfloat16), fp32 parameters and AdamW state):

* **inference** — one F-frame clip of :class:`moee_jax.inference.animator.Animator` (the code ``moee
  animate`` runs) with randomly initialised stage-2 parameters: ``prepare`` (reference latent, face
  features, log-mel) and ``render_job`` (the clip's conditions — ReferenceNet, audio and emotion paths,
  once per clip — then every CFG branch batched into one U-Net call per sampler step inside a jitted
  ``lax.scan``, then the VAE decoder). 40 DDIM steps and 20 DPM-Solver++(2M) steps; seconds per
  generated frame end to end and for the clip loop alone; and, jitted on its own, the conditions
  (ReferenceNet once per clip) with their share of the clip's time.
* **stage2** — the real :class:`~moee_jax.train.trainer.Trainer` step of stage 2 (backbone frozen;
  the emotion modules trained): step time and the peak memory (goal ≤ 40 GB).
* **stage1** — the stage-1 step (ReferenceNet and U-Net trained) over attention implementations and
  activation rematerialisation: every ``--remats`` with the first ``--attentions`` (the config's
  default, ``blockwise``), then the other attentions at the fastest remat. An attention the backend
  lacks (``cudnn`` off NVIDIA GPUs, ``pallas`` off TPUs) is skipped with the reason.
* **batch** — the largest batch that fits: the batch doubled at the fastest stage-1 setting (its
  batch-1 row is that stage-1 case) until XLA reports RESOURCE_EXHAUSTED (caught), ``--max_batch``
  or the budget.

Per case: step time (median of ``--steps`` synchronised steps after ``--warmup``), examples/s, XLA
FLOPs of the step (cost analysis of the lowered program, as ``benchmarks/train_step.py``), MFU
against the device's peak (the published table of :func:`moee_jax.train.metrics.peak_flops_per_device`,
keyed by ``device_kind``: 989 TFLOP/s bf16 for an H200; ``--peak_tflops`` overrides; on a CPU the
measured fp32 GEMM peak of ``train_step.measured_gemm_peak``), the compile time (``Trainer.compile``:
tracing, lowering, XLA's compilation and the FLOP count; for inference the first call's time minus a
warm call's), XLA's planned memory of the step (arguments + outputs + temporaries − donated) and the
process's peak memory (:func:`moee_jax.inference.benchmark.peak_memory`: the device's
``peak_bytes_in_use``, else max RSS). That peak is a running maximum since the process started (no
runtime resets it), so one case of each section runs first, smallest memory first — the DDIM clip,
the stage-2 step, the default stage-1 step — each raising the peak, and then the rest: DPM-Solver++
and the conditions, the other stage-1 settings, the batch; a case that did not raise the peak is shown
as "≤ peak" (its XLA plan is its own). This order also puts the headline cases before the budget
runs out. One device only: the trainer's mesh is built over the first device. Parameters are random
(:func:`random_state`: filled on the host, so the model's ``init`` is never compiled), made when a
stage's first case needs them (the other stage's state is freed first); each case continues from the
state the last one of its stage left.

The JSON: ``{"meta", "inference": [...], "stage2": [...], "stage1": [...], "batch": [...],
"largest_batch": {"batch", "setting", "stopped"}, "table"}``, one dict per case with its status
(``ok``, ``skipped (reason)``, ``out of memory``, ``failed: ...`` with the traceback in ``error``).

**Budget.** ``--budget_s`` (default 420) is wall-clock for the whole run. Before each case the time of
the longest case of the same section so far (or of any section, before the first) is taken as its
estimate; a case whose estimate does not fit what is left is listed as "skipped (budget)" and the
run goes on to the next. The synthetic clips are rendered in memory (no dataset, no TensorFlow).
``--smoke`` runs the same code on the ``tiny`` configs at 32² × 4 frames in float32 (bf16 is
emulated on a CPU: slower to compile and to run), with few sampler steps and the batch doubled to 2.

    python benchmarks/device_suite.py                                  # one GPU / TPU: sd15, bf16, 420 s → device_suite.json
    python benchmarks/device_suite.py --sections stage1,batch --out device_suite_stage1.json   # the grid alone
    python benchmarks/device_suite.py --smoke --out /tmp/smoke.json    # CPU, tiny configs at 32² × 4 frames: the same code paths
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib
import importlib.util
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

SECTIONS = ("inference", "stage2", "stage1", "batch")
STAGE2_GOAL_BYTES = 40e9  # the goal for the stage-2 step's peak memory
FULL = dict(variant="sd15", dtype="bfloat16", size=512, frames=16, steps=5, warmup=2, ddim_steps=40, dpm_steps=20, max_batch=256, repeats=2,
            remats="none,dots,full", attentions="blockwise,cudnn,xla", record_frames=40, budget_s=420.0)  # fmt: skip
SMOKE = dict(variant="tiny", dtype="float32", size=32, frames=4, steps=2, warmup=1, ddim_steps=3, dpm_steps=2, max_batch=2, repeats=1,
             remats="none,dots,full", attentions="blockwise,cudnn,xla", record_frames=16, budget_s=1800.0)  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny configs at 32² × 4 frames in float32 (a CPU): the same code paths")
    p.add_argument("--out", default="device_suite.json", help="the JSON file written (default: device_suite.json)")
    p.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"which sections run: a comma list of {SECTIONS} (the order of the cases is fixed: see the module docstring)",
    )
    p.add_argument("--budget_s", type=float, default=None, help="wall-clock budget of the whole run (default 420; smoke 1800)")
    p.add_argument("--dtype", default=None, help="activation dtype (default bfloat16; smoke: float32, as bf16 is emulated on a CPU)")
    p.add_argument("--peak_tflops", type=float, default=0.0, help="per-device peak TFLOP/s for MFU (default: the published table)")
    p.add_argument("--remats", default=None, help="model.unet.remat values of the stage-1 grid (default none,dots,full)")
    p.add_argument("--attentions", default=None,
                   help="attention implementations, the first one the default (default blockwise,cudnn,xla)")  # fmt: skip
    for name in ("variant", "size", "frames", "steps", "warmup", "ddim_steps", "dpm_steps", "max_batch", "repeats"):
        kind = str if name == "variant" else int
        p.add_argument(f"--{name}", type=kind, default=None, help=f"default {FULL[name]} (smoke: {SMOKE[name]})")
    args = p.parse_args(argv)
    defaults = SMOKE if args.smoke else FULL
    for name, value in defaults.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown or not args.sections:
        p.error(f"--sections {','.join(args.sections)}: choose from {','.join(SECTIONS)}")
    args.remats = [r.strip() for r in args.remats.split(",") if r.strip()]
    args.attentions = [a.strip() for a in args.attentions.split(",") if a.strip()]
    bad = [r for r in args.remats if r not in ("none", "dots", "full")]
    if bad or not args.remats:
        p.error(f"--remats {bad or '(empty)'}: choose from none, dots, full")
    from moee_jax.nn.attention import IMPLEMENTATIONS

    bad = [a for a in args.attentions if a not in IMPLEMENTATIONS]
    if bad or not args.attentions:
        p.error(f"--attentions {bad or '(empty)'}: choose from {', '.join(IMPLEMENTATIONS)}")
    for name in ("size", "frames", "steps", "ddim_steps", "dpm_steps", "max_batch", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} {getattr(args, name)}: must be at least 1")
    if args.warmup < 0 or not args.budget_s > 0:
        p.error("--warmup must be >= 0 and --budget_s > 0")
    return args


# ---- the budget -------------------------------------------------------------------------------------


class Budget:
    """Wall-clock budget of the run: ``seconds`` from construction on ``clock``. :meth:`record` the
    wall time of each case by ``kind``; :meth:`estimate` is the longest case of that kind so far
    (else of any kind, else 0: the first case always runs); :meth:`fits` whether it fits what is left."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic):
        self.seconds, self.clock = float(seconds), clock
        self.start = clock()
        self.times: dict[str, list[float]] = {}

    def elapsed(self) -> float:
        return self.clock() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def record(self, kind: str, seconds: float) -> None:
        self.times.setdefault(kind, []).append(float(seconds))

    def estimate(self, kind: str) -> float:
        same = self.times.get(kind)
        if same:
            return max(same)
        every = [t for ts in self.times.values() for t in ts]
        return max(every) if every else 0.0

    def fits(self, kind: str) -> bool:
        return self.left() > 0 and self.estimate(kind) <= self.left()


# ---- data, configs, devices -----------------------------------------------------------------------


class Records:
    """Rendered synthetic_talking_faces records held in memory: a data source for the trainer
    (``len``, ``[i]``) that needs no dataset on disk and no TensorFlow."""

    def __init__(self, records: list[dict], description: str):
        self.records, self.description = records, description

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int) -> dict:
        return self.records[int(key)]

    def __repr__(self) -> str:
        return f"Records({self.description})"


def synthetic_records(size: int, num_frames: int) -> Records:
    """One identity's clips of the six emotions and neutral (intensity 1), ``num_frames`` frames of
    ``size``² pixels each, as the synthetic_talking_faces builder renders them."""
    from moee_jax.data.builders.synthetic_talking_faces import SyntheticConfig, clip_specs, render_record

    config = SyntheticConfig(name=f"suite{size}", size=size, num_frames=num_frames, train_identities=1, test_identities=0,
                             clips_per_emotion=1, intensities=(1.0,))  # fmt: skip
    return Records([render_record(spec, config) for spec in clip_specs(config, "train")], f"synthetic {size}px × {num_frames}")


def make_config(stage: str, args, *, attention: str, remat: str, batch: int):
    """``configs/<stage>.py:<variant>`` at the suite's shapes, dtype, attention, remat and batch, on one device."""
    c = importlib.import_module(f"moee_jax.configs.{stage}").get_config(args.variant)
    c.dtype = args.dtype
    c.model.unet.attention_implementation = attention
    c.model.unet.remat = remat
    c.video.image_size = (args.size, args.size)
    c.video.num_frames = args.frames
    c.data.update(image_size=args.size, num_frames=args.frames)
    c.train.batch_size = batch
    c.train.ema_decay = 0.0
    c.mesh.shape = (1, 1, 1)
    return c


@contextlib.contextmanager
def one_device() -> Iterator[None]:
    """Trainers built inside the block put their mesh on the first device only (the suite measures one
    accelerator; a host with several, or the tests' fake CPU devices, keeps the others out)."""
    import jax

    import moee_jax.train.trainer as trainer_module
    from moee_jax.parallel import mesh as mesh_lib

    original = trainer_module.make_mesh
    trainer_module.make_mesh = lambda shape: mesh_lib.make_mesh(shape, devices=jax.local_devices()[:1])
    try:
        yield
    finally:
        trainer_module.make_mesh = original


def attention_unavailable(name: str, device) -> str | None:
    """Why the attention implementation ``name`` cannot run on ``device``, or None."""
    if name == "cudnn":
        version = str(getattr(getattr(device, "client", None), "platform_version", "")).lower()
        if device.platform != "gpu" or not ("cuda" in version or "nvidia" in str(device.device_kind).lower()):
            return f"cudnn needs an NVIDIA GPU (this backend: {device.platform}, {device.device_kind})"
    if name == "pallas" and device.platform != "tpu":
        return f"pallas is the TPU kernel (this backend: {device.platform})"
    return None


def device_peak(args, device) -> tuple[float | None, str]:
    """Per-device peak FLOP/s for MFU and where it comes from."""
    from moee_jax.train import metrics

    if args.peak_tflops > 0:
        return args.peak_tflops * 1e12, "--peak_tflops"
    known = metrics.peak_flops_per_device(device, args.dtype)
    if known is not None:
        return known, f"published {args.dtype} peak of {device.device_kind}"
    if device.platform == "cpu":
        spec = importlib.util.spec_from_file_location("train_step", REPO / "benchmarks" / "train_step.py")
        train_step = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(train_step)
        return train_step.measured_gemm_peak("float32"), "measured fp32 GEMM peak (2048² matmul)"
    return None, f"unknown for {device.device_kind}: pass --peak_tflops"


def out_of_memory(error: BaseException) -> bool:
    text = f"{type(error).__name__}: {error}"
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower() or isinstance(error, MemoryError)


def xla_plan_bytes(compiled) -> int | None:
    """Device memory XLA planned for one call of ``compiled``: arguments + outputs + temporaries − donated."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - a backend without the analysis
        return None
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def shape_caching_trainer():
    """A :class:`~moee_jax.train.trainer.Trainer` subclass whose instances share, per stage, the
    abstract train state and its shardings (``jax.eval_shape`` of the stage's ``init``, the costliest
    part of building a trainer: minutes of tracing for sd15 on a slow host). The state's shapes do
    not depend on what the cases vary (attention, remat, batch: ``init`` sees one example), and every
    trainer's mesh is the same one device."""
    from moee_jax.train.trainer import Trainer

    shapes: dict[str, tuple] = {}

    class SuiteTrainer(Trainer):
        def _build_state(self) -> None:
            stage = self.config.stage
            if stage not in shapes:
                super()._build_state()
                shapes[stage] = (self.abstract_state, self.state_shardings, self.num_trainable, self.num_frozen)
            self.abstract_state, self.state_shardings, self.num_trainable, self.num_frozen = shapes[stage]

    return SuiteTrainer


def _init_leaf(path: tuple[str, ...], shape: tuple[int, ...], dtype, rng):
    """Random initial values of one parameter (host NumPy): norm scales 1, biases 0, every other
    floating leaf uniform with the variance of LeCun-normal (``1 / fan_in``; 0.02² for vectors)."""
    import numpy as np

    name = path[-1].lower()
    if not np.issubdtype(np.dtype(dtype), np.floating) or name.endswith("bias"):
        return np.zeros(shape, dtype)
    if name.endswith("scale"):
        return np.ones(shape, dtype)
    fan_in = int(np.prod(shape[:-1])) if len(shape) >= 2 else 0
    std = (1.0 / fan_in) ** 0.5 if fan_in else 0.02
    values = rng.random(shape, dtype=np.float32)  # uniform [0, 1): about ten times faster than normals
    return ((values - 0.5) * (std * 12**0.5)).astype(dtype)


def random_state(trainer, seed: int = 0, *, with_optimizer: bool = True):
    """A :class:`~moee_jax.train.state.TrainState` for ``trainer`` with randomly initialised
    parameters (:func:`_init_leaf`), filled on the host and placed leaf by leaf with the trainer's
    shardings: no compilation of the model's ``init`` and no device memory beyond the state itself.
    The optimizer state is the trainer's own ``tx.init`` (None unless ``with_optimizer``)."""
    import jax
    import numpy as np
    from flax import traverse_util

    from moee_jax.train.state import TrainState

    abstract, shardings = trainer.abstract_state, trainer.state_shardings
    rng = np.random.default_rng(seed)

    def fill(tree, where):
        places = traverse_util.flatten_dict(where)
        flat = {path: jax.device_put(_init_leaf(path, leaf.shape, leaf.dtype, rng), places[path])
                for path, leaf in traverse_util.flatten_dict(tree).items()}  # fmt: skip
        return traverse_util.unflatten_dict(flat)

    trainable, frozen = fill(abstract.trainable, shardings.trainable), fill(abstract.frozen, shardings.frozen)
    opt_state = jax.jit(trainer.tx.init, out_shardings=shardings.opt_state)(trainable) if with_optimizer else None
    scalar = {name: jax.device_put(np.zeros((), np.int32), getattr(shardings, name)) for name in ("step", "bad_steps", "skipped")}
    key = jax.device_put(np.asarray(jax.random.key_data(jax.random.key(seed))), shardings.rng)
    return TrainState(trainable=trainable, frozen=frozen, opt_state=opt_state, ema=None, rng=key, **scalar)


def _alive(tree) -> bool:
    import jax

    return all(not leaf.is_deleted() for leaf in jax.tree_util.tree_leaves(tree) if hasattr(leaf, "is_deleted"))


# ---- the suite --------------------------------------------------------------------------------------


class Suite:
    """The cases of one run and their results (``self.results``: one dict per case, in run order)."""

    def __init__(self, args, budget: Budget, workdir: pathlib.Path):
        import jax

        self.args, self.budget, self.workdir = args, budget, workdir
        self.device = jax.local_devices()[0]
        self.results: list[dict] = []
        self.records = synthetic_records(args.size, args.record_frames)
        self.peak, self.peak_source = device_peak(args, self.device)
        self._stage2 = None  # (trainer, state) built once, for inference and the stage-2 step
        self._stage1_state = None
        self._animator = None
        self._sampling_s = None  # the first sampler's clip loop: the conditions' share is of this
        self._trainer_class = shape_caching_trainer()
        self.largest_batch = None

    # -- bookkeeping ------------------------------------------------------------------------------------

    def _run(self, section: str, case: str, fields: dict, body: Callable[[dict], None]) -> dict:
        """Run one case under the budget: ``body(row)`` fills ``row``; errors become its status."""
        from moee_jax.inference.benchmark import peak_memory

        row = {"section": section, "case": case, **fields}
        if not self.budget.fits(section):
            row["status"] = "skipped (budget)"
            row["estimate_s"] = round(self.budget.estimate(section), 1)
            self.results.append(row)
            print(f"# {section} {case}: skipped (budget: ~{row['estimate_s']:.0f} s needed, {self.budget.left():.0f} s left)", flush=True)
            return row
        before, _ = peak_memory()
        t0 = time.monotonic()
        try:
            body(row)
            row["status"] = "ok"
        except Exception as e:  # noqa: BLE001 - one failed case must not end the run
            row["status"] = (
                "out of memory"
                if out_of_memory(e)
                else f"failed: {str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__}"
            )
            row["error"] = traceback.format_exc(limit=6)[-4000:]
        row["wall_s"] = time.monotonic() - t0
        self.budget.record(section, row["wall_s"])
        after, source = peak_memory()
        row.update(peak_bytes=after, peak_source=source, peak_before_bytes=before, peak_raised=after > before)
        self.results.append(row)
        print("# done:", format_row(row), flush=True)
        gc.collect()
        return row

    def skip(self, section: str, case: str, reason: str, **fields) -> None:
        self.results.append({"section": section, "case": case, "status": f"skipped ({reason})", **fields})

    # -- training ---------------------------------------------------------------------------------------

    def _trainer(self, stage: str, *, attention: str, remat: str, batch: int):
        c = make_config(stage, self.args, attention=attention, remat=remat, batch=batch)
        with one_device():
            return self._trainer_class(c, self.workdir / f"{stage}_{attention}_{remat}_{batch}", source=self.records)

    def stage2_state(self):
        """The stage-2 trainer and its randomly initialised state (the stage-1 state is freed first;
        the optimizer state is made when the stage-2 step needs it, so that it is not resident
        during inference)."""
        if self._stage1_state is not None:
            self._stage1_state = None
            gc.collect()
        if self._stage2 is None or not _alive(self._stage2[1]):
            trainer = self._trainer("stage2", attention=self.args.attentions[0], remat=self.args.remats[0], batch=1)
            self._stage2, self._animator = (trainer, random_state(trainer, with_optimizer=False)), None
        return self._stage2

    def stage1_state(self, trainer):
        """The stage-1 state (random on first use, then what the last stage-1 step left); the
        stage-2 state and the animator are freed first."""
        if self._stage2 is not None or self._animator is not None:
            self._stage2 = self._animator = None
            gc.collect()
        if self._stage1_state is None or not _alive(self._stage1_state):  # new, or consumed by a failed (donated) step
            self._stage1_state = None
            self._stage1_state = random_state(trainer)
        return self._stage1_state

    def _time_steps(self, trainer, state, row: dict):
        """Compile ``trainer``'s step for ``state`` and time it; fills ``row``; returns the new state."""
        import jax

        from moee_jax.parallel.sharding import to_global
        from moee_jax.train import metrics

        batch = to_global(trainer.example, trainer.batch_shardings)
        state = jax.device_put(state, trainer.state_shardings)  # another case's state: the same placement, this trainer's mesh
        t = time.perf_counter()
        trainer.compile(state, batch)
        row["compile_s"] = time.perf_counter() - t
        times, out = [], None
        for i in range(self.args.warmup + self.args.steps):
            t = time.perf_counter()
            state, out = trainer._compiled(state, batch, trainer.extra)
            jax.block_until_ready(out["loss"])
            if i >= self.args.warmup:
                times.append(time.perf_counter() - t)
        jax.block_until_ready(state)
        step_s = statistics.median(times)
        b = int(trainer.config.train.batch_size)
        flops = trainer.step_flops
        row.update(
            step_s=step_s, step_times_s=times, examples_per_s=b / step_s, flops_per_step=flops,
            tflops_per_s=None if flops is None else flops / step_s / 1e12,
            mfu=metrics.mfu(flops, 1.0 / step_s, 1, self.peak), xla_plan_bytes=xla_plan_bytes(trainer._compiled),
            loss=float(out["loss"]), trainable_m=trainer.num_trainable / 1e6, total_m=(trainer.num_trainable + trainer.num_frozen) / 1e6,
        )  # fmt: skip
        return state

    def run_stage2(self) -> None:
        def body(row):
            import jax

            trainer, state = self.stage2_state()
            if state.opt_state is None:
                state = state.replace(opt_state=jax.jit(trainer.tx.init, out_shardings=trainer.state_shardings.opt_state)(state.trainable))
            self._animator = None  # its parameters are the state's, which the step donates
            self._stage2 = (trainer, self._time_steps(trainer, state, row))

        a = self.args
        row = self._run(
            "stage2", f"{a.attentions[0]}, remat {a.remats[0]}", dict(attention=a.attentions[0], remat=a.remats[0], batch=1), body
        )
        if row["status"] == "ok":
            row["goal_bytes"] = STAGE2_GOAL_BYTES
            row["meets_goal"] = bool(row["peak_bytes"] <= STAGE2_GOAL_BYTES) if row["peak_source"] == "device" else None

    def _stage1_case(self, attention: str, remat: str, batch: int, section: str = "stage1") -> dict:
        fields = dict(attention=attention, remat=remat, batch=batch)
        reason = attention_unavailable(attention, self.device)
        if reason is not None:
            self.skip(section, f"{attention}, remat {remat}", reason, **fields)
            return self.results[-1]

        def body(row):
            trainer = self._trainer("stage1", attention=attention, remat=remat, batch=batch)
            self._stage1_state = self._time_steps(trainer, self.stage1_state(trainer), row)

        name = f"{attention}, remat {remat}" + (f", batch {batch}" if section == "batch" else "")
        return self._run(section, name, fields, body)

    def run_stage1_first(self) -> None:
        """The default attention at the first remat."""
        self._stage1_case(self.args.attentions[0], self.args.remats[0], 1)

    def run_stage1_rest(self) -> None:
        """The other remats with the default attention, then the other attentions at the fastest remat."""
        a = self.args
        for remat in a.remats[1:]:
            self._stage1_case(a.attentions[0], remat, 1)
        ran = [r for r in self.results if r["section"] == "stage1" and r["status"] == "ok"]
        best_remat = min(ran, key=lambda r: r["step_s"])["remat"] if ran else a.remats[0]
        for attention in a.attentions[1:]:
            self._stage1_case(attention, best_remat, 1)

    def run_batch(self) -> dict:
        """The batch doubled at the fastest stage-1 setting (batch 1: that stage-1 case, not run again)
        until out of memory, ``--max_batch`` or the budget; → ``{"batch", "setting", "stopped"}``."""
        ran = [r for r in self.results if r["section"] == "stage1" and r["status"] == "ok" and r["batch"] == 1]
        if not ran:
            self._stage1_case(self.args.attentions[0], self.args.remats[0], 1)
            ran = [r for r in self.results if r["section"] == "stage1" and r["status"] == "ok" and r["batch"] == 1]
        if not ran:
            return {"batch": None, "setting": None, "stopped": "no stage-1 case ran"}
        best = max(ran, key=lambda r: r["examples_per_s"])
        self.results.append(dict(best, section="batch", case=f"{best['case']}, batch 1 (the stage1 row)", reused=True))
        largest, stopped, batch = 1, f"--max_batch {self.args.max_batch}", 2
        while batch <= self.args.max_batch:
            row = self._stage1_case(best["attention"], best["remat"], batch, section="batch")
            if row["status"] != "ok":
                stopped = row["status"] + f" at batch {batch}"
                break
            largest, batch = batch, batch * 2
        return {"batch": largest, "setting": f"{best['attention']}, remat {best['remat']}", "stopped": stopped}

    # -- inference --------------------------------------------------------------------------------------

    def animator(self):
        if self._animator is None:
            import jax

            from moee_jax.inference.animator import Animator
            from moee_jax.train.partition import merge_params

            trainer, state = self.stage2_state()
            params = jax.device_put(merge_params(state.trainable, state.frozen), self.device)  # as a restored checkpoint: one device
            self._animator = Animator(trainer.config, params, source="device_suite")
        return self._animator

    def _clip_inputs(self):
        from moee_jax.data import schema
        from moee_jax.data.audio import SAMPLE_RATE
        from moee_jax.inference.inputs import Speech, parse_emotion

        record = self.records[1]
        image = schema.decode_frames(record["frames"], [0])[0]
        samples = int(round(self.args.frames * SAMPLE_RATE / float(record["fps"])))  # exactly one clip of F frames
        speech = Speech(record["audio"][:samples].astype("float32"), pathlib.Path("device_suite.wav"))
        return image, speech, parse_emotion("happy")

    def run_sampler(self, sampler: str, steps: int) -> None:
        self._run("inference", f"{sampler} {steps} steps", dict(sampler=sampler, steps=steps, batch=1),
                  lambda row: self._sample(row, sampler, steps))  # fmt: skip

    def run_conditions(self) -> None:
        self._run("inference", "conditions (ReferenceNet once per clip)", dict(batch=1), self._conditions)

    def plan(self) -> list[Callable[[], object]]:
        """The cases in run order: first one case of each section, smallest memory first (so that each
        raises the process's peak: inference, stage 2, stage 1), then the rest of each section."""
        a, wanted = self.args, set(self.args.sections)
        steps: list[Callable[[], object]] = []
        if "inference" in wanted:
            steps.append(lambda: self.run_sampler("ddim", a.ddim_steps))
        if "stage2" in wanted:
            steps.append(self.run_stage2)
        if "stage1" in wanted:
            steps.append(self.run_stage1_first)
        if "inference" in wanted:
            steps += [lambda: self.run_sampler("dpmpp_2m", a.dpm_steps), self.run_conditions]
        if "stage1" in wanted:
            steps.append(self.run_stage1_rest)
        if "batch" in wanted:
            steps.append(lambda: setattr(self, "largest_batch", self.run_batch()))
        return steps

    def _sample(self, row: dict, sampler: str, steps: int) -> None:
        import jax
        import numpy as np

        from moee_jax.diffusion.guidance import branch_weights
        from moee_jax.inference.sampling import CONDITION_ORDER

        animator = self.animator()
        image, speech, emotion = self._clip_inputs()

        def once():
            t0 = time.perf_counter()
            job = animator.prepare(image, speech, emotion, steps=steps, sampler=sampler, detect=False)
            jax.block_until_ready((job.ref_latents, job.face_features))
            t1 = time.perf_counter()
            frames = animator.render_job(job)
            t2 = time.perf_counter()
            return job, frames, t1 - t0, t2 - t1

        job, frames, prep, render = once()
        cold = prep + render
        warm = [once() for _ in range(_repeats(self.args))]
        total = statistics.median(p + r for _, _, p, r in warm)
        sampling = statistics.median(r for _, _, _, r in warm)
        n = int(frames.shape[0])
        scales = [job.scales[name] for name in CONDITION_ORDER]
        row.update(
            frames=n, clips=job.plan.num_clips, cfg_branches=int(np.count_nonzero(branch_weights(scales))), guidance=job.scales,
            compile_s=max(cold - total, 0.0), first_call_s=cold, clip_s=total, sampling_s=sampling,
            seconds_per_frame=total / n, sampling_seconds_per_frame=sampling / n, frames_per_s=n / total,
            mean_pixel=float(frames.mean()),
        )  # fmt: skip
        self._sampling_s = self._sampling_s or sampling

    def _conditions(self, row: dict) -> None:
        import jax
        import jax.numpy as jnp

        animator = self.animator()
        image, speech, emotion = self._clip_inputs()
        job = animator.prepare(image, speech, emotion, detect=False)
        fn = jax.jit(animator.clip_conditions)
        args = (
            animator.params,
            job.emotion,
            jnp.asarray(job.clip_audio(0)),
            job.ref_latents,
            job.face_features,
            animator.first_motion(job),
        )
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        cold = time.perf_counter() - t
        times = []
        for _ in range(_repeats(self.args)):
            t = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times.append(time.perf_counter() - t)
        warm = statistics.median(times)
        sampling = self._sampling_s
        row.update(compile_s=max(cold - warm, 0.0), conditions_s=warm, calls_per_clip=1,
                   share_of_clip=None if not sampling else warm / sampling)  # fmt: skip


def _repeats(args) -> int:
    return max(int(args.repeats), 1)


# ---- the table ----------------------------------------------------------------------------------------


def _gb(n) -> str:
    return "n/a" if n is None else f"{n / 1e9:.2f} GB"


def format_row(r: dict) -> str:
    """One markdown table row of a case (see :data:`HEADER`)."""
    status = r.get("status", "")
    if status != "ok":
        return f"| {r['section']} | {r['case']} | {r.get('batch', '')} | | | | | | | | {status} |"
    if r["section"] == "inference" and "seconds_per_frame" in r:
        time_s = f"{r['clip_s']:.3g} s/clip"
        rate = f"{r['seconds_per_frame']:.3g} s/frame ({r['sampling_seconds_per_frame']:.3g} sampling; {r['cfg_branches']} CFG branches)"
        flops = mfu = plan = "n/a"
    elif r["section"] == "inference":
        time_s = f"{r['conditions_s'] * 1e3:.3g} ms"
        rate = "once per clip" + ("" if r.get("share_of_clip") is None else f" ({100 * r['share_of_clip']:.1f} % of the clip)")
        flops = mfu = plan = "n/a"
    else:
        time_s = f"{r['step_s'] * 1e3:.4g} ms"
        rate = f"{r['examples_per_s']:.3g} ex/s"
        flops = "n/a" if r.get("flops_per_step") is None else f"{r['flops_per_step'] / 1e12:.3g}"
        mfu = "n/a" if r.get("mfu") is None else f"{100 * r['mfu']:.1f} %"
        plan = _gb(r.get("xla_plan_bytes"))
    peak = _gb(r.get("peak_bytes")) + ("" if r.get("peak_source") == "device" else " RSS")
    peak = peak if r.get("peak_raised", True) else "≤ " + peak
    return f"| {r['section']} | {r['case']} | {r.get('batch', '')} | {time_s} | {rate} | {flops} | {mfu} | {peak} | {plan} | {r.get('compile_s', 0):.1f} | ok |"


HEADER = (
    "| section | case | batch | time | rate | TFLOP/step | MFU | peak memory | XLA plan | compile s | status |\n"
    "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"
)


def format_table(meta: dict, results: list[dict]) -> str:
    peak = "n/a" if meta["peak_flops"] is None else f"{meta['peak_flops'] / 1e12:.4g} TFLOP/s ({meta['peak_source']})"
    head = (f"# device suite, {meta['date']}, {meta['device_kind']} ({meta['platform']}; {meta['host']}), {meta['variant']} "
            f"{meta['size']}² × {meta['frames']} frames + {meta['motion_frames']} motion, {meta['dtype']}, MFU vs {peak}; "
            f"{meta['elapsed_s']:.0f} of {meta['budget_s']:.0f} s budget")  # fmt: skip
    return "\n".join([head, HEADER, *[format_row(r) for r in results]])


# ---- main ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    """Run the suite (``argv`` as the command line's, without the program name); print the table,
    write ``--out``; → the JSON document."""
    args = parse_args(argv)
    budget = Budget(args.budget_s)
    import jax

    from moee_jax.atomic import atomic_write_text

    with tempfile.TemporaryDirectory(prefix="moee_device_suite_") as tmp:
        suite = Suite(args, budget, pathlib.Path(tmp))
        for step in suite.plan():
            step()
    device = suite.device
    meta = {
        "date": str(datetime.date.today()), "device_kind": device.device_kind, "platform": device.platform,
        "devices_used": 1, "devices_visible": jax.device_count(), "jax": jax.__version__,
        "host": f"{platform.machine()}, {os.cpu_count()} CPUs", "variant": args.variant, "size": args.size, "frames": args.frames,
        "motion_frames": int(make_config("stage1", args, attention="xla", remat="none", batch=1).data.motion_frames), "dtype": args.dtype, "smoke": args.smoke, "steps": args.steps, "warmup": args.warmup,
        "budget_s": args.budget_s, "elapsed_s": budget.elapsed(), "peak_flops": suite.peak, "peak_source": suite.peak_source,
        "command": "python benchmarks/device_suite.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }  # fmt: skip
    doc = {"meta": meta, **{s: [r for r in suite.results if r["section"] == s] for s in SECTIONS}, "largest_batch": suite.largest_batch}
    doc["table"] = format_table(meta, suite.results)
    print(doc["table"], flush=True)
    atomic_write_text(args.out, json.dumps(doc, indent=2, default=str))
    print(f"# wrote {args.out}", flush=True)
    return doc


if __name__ == "__main__":
    main()
