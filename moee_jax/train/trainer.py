"""``moee train``: one stage of training, sharded over a device mesh and any number of hosts.

Run directory layout (``RUN`` = ``--run_dir``; every stage writes under its own name)::

    RUN/<stage>/checkpoints/<step>/{state, data, config}   Orbax CheckpointManager (keep-N, async)
    RUN/<stage>/final/{params, metadata.json}              the stage's final parameters (next stage's init)
    RUN/<stage>/config.json                                the resolved config
    RUN/<stage>/metrics.jsonl                              one line per logged step (process 0)
    RUN/tensorboard/<stage>/                               TensorBoard event files (process 0)

A run resumes from ``RUN/<stage>/checkpoints``' latest step automatically: train state (params,
optimizer state, EMA, step, RNG) and the grain iterator state are restored, so the steps after a
resume are the steps an uninterrupted run takes. The state is restored onto the *current* mesh
(any device count or mesh shape). SIGTERM (preemption) saves a checkpoint at the current step and
returns cleanly. A fresh stage initialises from the previous stages' final parameters (``vae`` →
``embedder`` → ``stage1`` → ``stage2``), part by part.

Sharding (pjit style): the state is initialised abstractly (``jax.eval_shape``), its logical axis
annotations give ``NamedSharding``\\ s over the ``(data, fsdp, tensor)`` mesh, and the real init runs
under ``jax.jit(out_shardings=…)`` so every shard is created on its device; the step is compiled
once with explicit in/out shardings and donates the state. Each process feeds its own grain shard;
the per-process batches form the global batch (``make_array_from_process_local_data``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import re
import signal
import time
from collections.abc import Callable

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from etils import epath
from ml_collections import ConfigDict

from moee_jax.checkpoint.orbax import save_params
from moee_jax.data import pipeline as data_pipeline
from moee_jax.parallel.mesh import make_mesh
from moee_jax.parallel.rules import DEFAULT_RULES
from moee_jax.parallel.sharding import logical_sharding, tree_shardings
from moee_jax.train import metrics as metrics_lib
from moee_jax.train.optim import ema_decay, ema_update, lr_schedule, make_optimizer
from moee_jax.train.partition import count, is_trainable, merge_params, split_params
from moee_jax.train.stages import STAGES, Stage, make_stage
from moee_jax.train.state import TrainState

log = logging.getLogger("moee_jax.train")


class TrainingError(RuntimeError):
    """A run that cannot go on (diverged, bad setup); the message says what to change."""


@dataclasses.dataclass
class TrainResult:
    stage: str
    steps: int
    final_step: int
    losses: dict[int, float]
    run_dir: str
    interrupted: bool
    skipped_steps: int


# ---- pieces ------------------------------------------------------------------------------------------


def run_path(path) -> epath.Path:
    """A local or ``gs://`` path (``pathlib`` would turn ``gs://`` into ``gs:/``)."""
    text = str(path)
    return epath.Path(text) if "://" in text else epath.Path(pathlib.Path(text).absolute())


def stage_dir(run_dir, stage: str) -> epath.Path:
    return run_path(run_dir) / stage


def pipeline_config(config: ConfigDict) -> data_pipeline.PipelineConfig:
    """The grain pipeline's config from ``config.data`` (global batch → per-process batch)."""
    fields = {f.name for f in dataclasses.fields(data_pipeline.PipelineConfig)}
    values = {k: v for k, v in config.data.to_dict().items() if k in fields}
    global_batch = int(config.train.batch_size)
    if global_batch % jax.process_count():
        raise TrainingError(f"config.train.batch_size={global_batch} must be divisible by the {jax.process_count()} processes")
    values["batch_size"] = global_batch // jax.process_count()
    values["seed"] = int(config.seed)
    return data_pipeline.PipelineConfig.from_dict(values)


def batch_shardings(mesh, example: dict) -> dict:
    """Every batch array sharded over its leading (batch) axis."""
    return {k: logical_sharding(mesh, ("batch",) + (None,) * (np.ndim(v) - 1)) for k, v in example.items()}


def to_global(batch: dict, shardings: dict) -> dict:
    """Per-process NumPy batch → global ``jax.Array``\\ s (this process's rows on its devices)."""
    return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v)) for k, v in batch.items()}


def _lpips(config) -> tuple[Callable | None, dict | None]:
    """LPIPS module + params when ``config.train.perceptual`` names weights; else (None, None) + warning."""
    p = config.train.perceptual
    if not p.get("vgg"):
        if float(p.get("weight", 0.0)) > 0:
            log.warning(
                "perceptual loss disabled: config.train.perceptual.vgg is not set (give torchvision VGG16 "
                "weights and the LPIPS linear weights, .lin, to enable it); training with L1 only"
            )
        return None, None
    from moee_jax.checkpoint.convert.perceptual import load_lpips

    module, params = load_lpips(p.vgg, p.get("lin"), allow_pickle=bool(p.get("allow_pickle", False)))
    return module, params


# ---- the trainer ---------------------------------------------------------------------------------------


class Trainer:
    """One stage of training; :meth:`run` trains to ``config.train.steps`` (resuming if possible)."""

    def __init__(self, config: ConfigDict, run_dir: str | pathlib.Path, *, source=None):
        if config.stage not in STAGES:
            raise TrainingError(f"config.stage={config.stage!r}; choose one of {STAGES}")
        self.config = config
        self.run_dir = run_path(run_dir)
        self.dir = stage_dir(run_dir, config.stage)
        self.stage: Stage = make_stage(config)
        self.mesh = make_mesh(tuple(config.mesh.shape))
        self.tx = make_optimizer(config.train)
        self.schedule = lr_schedule(config.train)
        self.accum = int(config.train.grad_accum)
        self.data_cfg = pipeline_config(config)
        data_parallel = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        if int(config.train.batch_size) % data_parallel:
            raise TrainingError(
                f"config.train.batch_size={config.train.batch_size} must be divisible by the data-parallel size "
                f"{data_parallel} (mesh {dict(self.mesh.shape)}); change train.batch_size or mesh.shape"
            )
        size = tuple(config.video.image_size)
        if size[0] != size[1]:
            raise TrainingError(f"config.video.image_size={size}: training uses square face crops")
        if self.data_cfg.batch_size % self.accum:
            raise TrainingError(f"per-process batch {self.data_cfg.batch_size} must be divisible by train.grad_accum={self.accum}")
        self.source = source if source is not None else data_pipeline.open_source(config.data.data_dir, config.data.name, config.data.split)
        self.lpips_module, lpips_params = _lpips(config)
        self.extra = {} if lpips_params is None else {"lpips": jax.device_put(lpips_params)}

        example = next(iter(self._pipeline()))
        self.batch_shardings = batch_shardings(self.mesh, example)
        self.example = example
        self._build_state()
        self._compiled = None

    def _pipeline(self) -> data_pipeline.Pipeline:
        return data_pipeline.make_pipeline(self.source, self.data_cfg)

    # -- state --------------------------------------------------------------------------------------------
    def _make_state(self, rng: jax.Array, example: dict) -> TrainState:
        boxed = self.stage.init(rng, example)
        trainable, frozen = split_params(boxed, self.stage.trainable, self.stage.frozen)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            trainable=trainable,
            frozen=frozen,
            opt_state=self.tx.init(trainable),
            ema=jax.tree_util.tree_map(jnp.copy, trainable) if float(self.config.train.ema_decay) > 0 else None,
            rng=jax.random.key_data(jax.random.fold_in(rng, 1)),
            bad_steps=jnp.zeros((), jnp.int32),
            skipped=jnp.zeros((), jnp.int32),
        )

    def _build_state(self) -> None:
        one = {k: v[:1] for k, v in self.example.items()}
        rng = jax.random.key(int(self.config.seed))
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(DEFAULT_RULES):
            abstract = jax.eval_shape(self._make_state, rng, one)
        self.state_shardings = tree_shardings(abstract, self.mesh, DEFAULT_RULES)
        self.abstract_state = jax.tree_util.tree_map(
            lambda leaf, sh: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sh), nn.unbox(abstract), self.state_shardings
        )
        self.num_trainable = count(abstract.trainable)
        self.num_frozen = count(abstract.frozen)

    def _init_state(self) -> TrainState:
        one = {k: v[:1] for k, v in self.example.items()}
        rng = jax.random.key(int(self.config.seed))
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(DEFAULT_RULES):
            state = jax.jit(lambda r, ex: nn.unbox(self._make_state(r, ex)), out_shardings=self.state_shardings)(rng, one)
        return self._load_previous_stages(state)

    def _load_previous_stages(self, state: TrainState) -> TrainState:
        """Fill parts from earlier stages' final params (``config.train.init_from`` or the run's own)."""
        sources = list(self.config.train.get("init_from") or [])
        if not sources:
            earlier = STAGES[: STAGES.index(self.config.stage)]
            sources = [str(stage_dir(self.run_dir, s) / "final") for s in reversed(earlier)]
        params = merge_params(state.trainable, state.frozen)
        shardings = merge_params(self.state_shardings.trainable, self.state_shardings.frozen)
        filled: dict[str, str] = {}
        for src in sources:
            path = run_path(src)
            if not (path / "params").exists():
                if self.config.train.get("init_from"):
                    raise TrainingError(f"config.train.init_from: {src} holds no final params (params/ missing)")
                continue
            stored_parts = json.loads((path / "metadata.json").read_text()).get("parts", [])
            wanted = [part for part in stored_parts if part in params and part not in filled]
            if wanted:  # one read of the checkpoint for every part it fills
                restored = _restore_parts(path, {k: params[k] for k in wanted}, {k: shardings[k] for k in wanted}, self._trainable_here)
                for part, (values, fresh) in restored.items():
                    params[part] = values
                    filled[part] = str(path) + (f" ({len(fresh)} new trainable tensors initialised)" if fresh else "")
            for part in stored_parts:
                if part == "embedder" and "embedder" in params.get("conditioning", {}) and "conditioning/embedder" not in filled:
                    # The embedder stage's module is the conditioning's embedder in stage 2.
                    sub = params["conditioning"]["embedder"]
                    abstract = {"embedder": jax.tree_util.tree_map(_struct, sub, shardings["conditioning"]["embedder"])}
                    params["conditioning"] = dict(params["conditioning"], embedder=_restore_subtree(path, abstract)["embedder"])
                    filled["conditioning/embedder"] = str(path)
        skip = tuple(self.config.train.get("init_skip") or ())
        if skip and filled:  # leaves the earlier stages must not fill keep their fresh initialisation
            from flax import traverse_util

            fresh = traverse_util.flatten_dict(merge_params(state.trainable, state.frozen))
            flat = traverse_util.flatten_dict(params)
            kept = [path for path in flat if any(re.search(p, "/".join(path)) for p in skip)]
            for path in kept:
                flat[path] = fresh[path]
            params = traverse_util.unflatten_dict(flat)
            log.info("train.init_skip: %d tensors keep their fresh initialisation (%s)", len(kept), ", ".join(skip))
        if filled:
            log.info("initialised from earlier stages: %s", ", ".join(f"{k} ← {v}" for k, v in filled.items()))
        self.initialised_from = filled
        trainable, frozen = split_params(params, self.stage.trainable, self.stage.frozen)
        # A copy, not the same buffers: the step donates the state, and XLA refuses a buffer donated twice.
        ema = jax.tree_util.tree_map(jnp.copy, trainable) if state.ema is not None else None
        opt_state = jax.jit(self.tx.init, out_shardings=self.state_shardings.opt_state)(trainable)
        return state.replace(trainable=trainable, frozen=frozen, ema=ema, opt_state=opt_state)

    def _trainable_here(self, path: str) -> bool:
        return is_trainable(path, self.stage.trainable, self.stage.frozen)

    # -- the step -----------------------------------------------------------------------------------------
    def _step_fn(self):
        stage, tx, accum, schedule = self.stage, self.tx, self.accum, self.schedule
        decay = float(self.config.train.ema_decay)
        lpips_module = self.lpips_module

        def loss_fn(trainable, frozen, batch, rng, extra):
            fns = {}
            if lpips_module is not None:
                fns["lpips"] = lambda a, b: lpips_module.apply({"params": extra["lpips"]}, a, b)
            return stage.loss(merge_params(trainable, frozen), batch, rng, fns)

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

        def step(state: TrainState, batch: dict, extra: dict):
            rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
            if accum == 1:
                (loss, terms), grads = grad_fn(state.trainable, state.frozen, batch, rng, extra)
            else:
                micro = jax.tree_util.tree_map(lambda x: x.reshape((accum, x.shape[0] // accum) + x.shape[1:]), batch)

                def body(carry, xs):
                    i, mb = xs
                    (l, t), g = grad_fn(state.trainable, state.frozen, mb, jax.random.fold_in(rng, i), extra)
                    acc_l, acc_t, acc_g = carry
                    return (acc_l + l, jax.tree_util.tree_map(jnp.add, acc_t, t), jax.tree_util.tree_map(jnp.add, acc_g, g)), None

                zeros_g = jax.tree_util.tree_map(jnp.zeros_like, state.trainable)
                (_, t0), _ = jax.eval_shape(
                    grad_fn, state.trainable, state.frozen, jax.tree_util.tree_map(lambda x: x[0], micro), rng, extra
                )
                zeros_t = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), t0)
                (loss, terms, grads), _ = jax.lax.scan(body, (jnp.zeros(()), zeros_t, zeros_g), (jnp.arange(accum), micro))
                loss, terms = loss / accum, jax.tree_util.tree_map(lambda x: x / accum, terms)
                grads = jax.tree_util.tree_map(lambda g: g / accum, grads)
            grad_norm = optax.global_norm(grads)
            finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
            trainable = optax.apply_updates(state.trainable, updates)
            ema = None if state.ema is None else ema_update(state.ema, trainable, ema_decay(decay, state.step))

            def pick(new, old):
                return jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)

            new_state = state.replace(
                step=state.step + 1,
                trainable=pick(trainable, state.trainable),
                opt_state=pick(opt_state, state.opt_state),
                ema=None if ema is None else pick(ema, state.ema),
                bad_steps=jnp.where(finite, 0, state.bad_steps + 1),
                skipped=state.skipped + (~finite).astype(jnp.int32),
            )
            out = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step), **terms}
            return new_state, out

        return step

    def compile(self, state: TrainState, batch: dict):
        """Lower and compile the step once (explicit shardings, donated state); FLOPs from XLA."""
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        extra_sh = jax.tree_util.tree_map(lambda _: replicated, self.extra)
        jitted = jax.jit(
            self._step_fn(),
            in_shardings=(self.state_shardings, self.batch_shardings, extra_sh),
            out_shardings=(self.state_shardings, replicated),
            donate_argnums=(0,),
        )
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(DEFAULT_RULES):
            lowered = jitted.lower(state, batch, self.extra)
            self._compiled = lowered.compile()
        # Counted before SPMD partitioning: the model's FLOPs per step over all devices.
        self.step_flops = metrics_lib.compiled_flops(lowered)
        return self._compiled

    def eval_loss(self, state: TrainState, batch: dict, seed: int = 0, *, use_ema: bool = False) -> dict:
        """The stage's loss terms on ``batch`` (a global batch) with a fixed RNG: comparable across steps."""
        if not hasattr(self, "_eval"):
            stage, module = self.stage, self.lpips_module

            def fn(trainable, frozen, batch, rng, extra):
                fns = {} if module is None else {"lpips": lambda a, b: module.apply({"params": extra["lpips"]}, a, b)}
                loss, terms = stage.loss(merge_params(trainable, frozen), batch, rng, fns)
                return {"loss": loss, **terms}

            self._eval = jax.jit(fn)
        trainable = state.ema if use_ema and state.ema is not None else state.trainable
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(DEFAULT_RULES):
            out = self._eval(trainable, state.frozen, batch, jax.random.key(seed), self.extra)
        return {k: float(v) for k, v in jax.device_get(out).items()}

    # -- checkpoints --------------------------------------------------------------------------------------
    def _manager(self) -> ocp.CheckpointManager:
        c = self.config.checkpoint
        options = ocp.CheckpointManagerOptions(
            max_to_keep=int(c.keep), save_interval_steps=int(c.every_steps), enable_async_checkpointing=bool(c.get("async_save", True)),
        )  # fmt: skip
        return ocp.CheckpointManager(self.dir / "checkpoints", item_names=("state", "data", "config"), options=options)

    def _save(self, manager, step: int, state, iterator, force: bool = False) -> bool:
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(iterator),
            config=ocp.args.JsonSave(json.loads(self.config.to_json_best_effort())),
        )
        return manager.save(step, args=args, force=force)

    def _restore(self, manager, step: int, iterator) -> TrainState:
        args = ocp.args.Composite(state=ocp.args.StandardRestore(self.abstract_state), data=grain.checkpoint.CheckpointRestore(iterator))
        return manager.restore(step, args=args).state

    def export_final(self, state: TrainState) -> epath.Path:
        """Write ``RUN/<stage>/final``: merged params (EMA'd trainables when EMA is on, else raw)."""
        final = self.dir / "final"
        if (final / "params").exists():
            if jax.process_index() == 0:
                final.rmtree()  # a re-run of a finished stage replaces its export
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices("moee_export_final_cleared")
        trainable = state.ema if (state.ema is not None and self.config.checkpoint.get("export_ema", False)) else state.trainable
        params = merge_params(trainable, state.frozen)
        if self.stage.finalize is not None:
            params = self._finalize(params)
        meta = {"stage": self.config.stage, "parts": sorted(params), "step": int(state.step), "config": self.config.get("variant", "")}
        save_params(final, params, meta)
        return final

    def _finalize(self, params: dict) -> dict:
        """The stage's post-training measurement (e.g. latent statistics) over
        ``train.finalize_batches`` fresh batches, each new leaf placed like the one it replaces."""
        iterator = iter(self._pipeline())
        batches = [next(iterator) for _ in range(int(self.config.train.get("finalize_batches", 8)))]
        new = self.stage.finalize(jax.device_get(params), batches)
        return jax.tree_util.tree_map(lambda value, old: jax.device_put(np.asarray(value, old.dtype), old.sharding), new, params)

    def diagnose(self, state: TrainState, batch: dict, step: int) -> dict:
        """The stage's diagnostics (e.g. the shuffled-emotion loss gap) on ``batch``, same RNG for every variant."""
        if self.stage.diagnostics is None:
            return {}
        if not hasattr(self, "_diagnose"):
            stage = self.stage
            self._diagnose = jax.jit(lambda tr, fr, b, r: stage.diagnostics(merge_params(tr, fr), b, r))
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(DEFAULT_RULES):
            out = self._diagnose(state.trainable, state.frozen, batch, jax.random.fold_in(jax.random.key(int(self.config.seed) + 1), step))
        return {k: float(v) for k, v in jax.device_get(out).items()}

    # -- the loop -----------------------------------------------------------------------------------------
    def run(self, *, max_steps: int | None = None) -> TrainResult:
        """Train until ``config.train.steps`` (or ``max_steps`` more steps); resume if checkpoints exist."""
        cfg, t = self.config, self.config.train
        self.dir.mkdir(parents=True, exist_ok=True)
        if jax.process_index() == 0:
            (self.dir / "config.json").write_text(self.config.to_json_best_effort(indent=2))
        total = int(t.steps)
        manager = self._manager()
        pipeline = self._pipeline()
        iterator = iter(pipeline)
        shards = self.dir / "data_shards"
        shards.mkdir(exist_ok=True)
        (shards / f"process_{jax.process_index()}.json").write_text(json.dumps({
            "process": jax.process_index(), "record_keys": list(pipeline.key_range), "usable_clips": pipeline.num_usable,
            "skipped_clips": pipeline.num_skipped}))  # fmt: skip
        latest = manager.latest_step()
        if latest is not None:
            state = self._restore(manager, latest, iterator)
            log.info("resumed %s at step %d from %s", cfg.stage, latest, self.dir / "checkpoints")
        else:
            state = self._init_state()
        self.state = state
        start = int(state.step)
        stop_at = total if max_steps is None else min(total, start + max_steps)

        interrupted = {"flag": False}
        previous = signal.getsignal(signal.SIGTERM)

        def on_term(signum, frame):
            interrupted["flag"] = True

        if _main_thread():
            signal.signal(signal.SIGTERM, on_term)
        writer = metrics_lib.MetricsWriter(
            str(self.run_dir / "tensorboard" / cfg.stage), enabled=jax.process_index() == 0, purge_step=start if start else None
        )  # a resumed run drops points an interrupted attempt logged after its checkpoint
        progress = metrics_lib.ProgressLine(total)
        jsonl = (self.dir / "metrics.jsonl").open("a") if jax.process_index() == 0 else None
        losses: dict[int, float] = {}
        log_every, patience = int(t.log_every), int(t.nan_patience)
        examples = int(t.batch_size)
        peak = metrics_lib.peak_flops_per_device(jax.devices()[0], cfg.dtype)
        try:
            if start >= stop_at:
                if start == total and not (self.dir / "final" / "params").exists():
                    self.export_final(state)  # a stage with nothing to train (steps = 0) still exports
                return TrainResult(cfg.stage, 0, start, losses, str(self.run_dir), False, int(state.skipped))
            t_last, steps_since = time.perf_counter(), 0
            step = start
            while step < stop_at:
                batch = to_global(next(iterator), self.batch_shardings)
                if self._compiled is None:
                    self.compile(state, batch)
                state, out = self._compiled(state, batch, self.extra)
                self.state = state
                step += 1
                steps_since += 1
                if step % log_every == 0 or step == stop_at:
                    values = {k: float(v) for k, v in jax.device_get(out).items()}
                    bad = int(state.bad_steps)
                    now = time.perf_counter()
                    sps = steps_since / max(now - t_last, 1e-9)
                    values.update(steps_per_s=sps, examples_per_s=sps * examples)
                    values.update(self.diagnose(state, batch, step))
                    t_last, steps_since = time.perf_counter(), 0  # the diagnostics' time is not a step's
                    mfu = metrics_lib.mfu(self.step_flops, sps, jax.device_count(), peak)
                    if mfu is not None:
                        values["mfu"] = mfu
                    losses[step] = values["loss"]
                    writer.scalars(step, values)
                    if jsonl is not None:
                        jsonl.write(json.dumps({"step": step, **values}) + "\n")
                        jsonl.flush()
                    if jax.process_index() == 0:
                        print(progress.format(step, values), flush=True)
                    if bad >= patience:
                        manager.wait_until_finished()
                        raise TrainingError(
                            f"{cfg.stage}: {bad} non-finite steps in a row at step {step} (updates skipped; last "
                            f"finite checkpoint in {self.dir / 'checkpoints'}). Lower train.learning_rate, raise "
                            "train.warmup_steps or check the data."
                        )
                self._save(manager, step, state, iterator)
                if interrupted["flag"]:
                    if manager.latest_step() != step:
                        self._save(manager, step, state, iterator, force=True)
                    manager.wait_until_finished()
                    log.warning("SIGTERM: saved %s at step %d and stopped", cfg.stage, step)
                    return TrainResult(cfg.stage, step - start, step, losses, str(self.run_dir), True, int(state.skipped))
            if manager.latest_step() != step:
                self._save(manager, step, state, iterator, force=True)
            manager.wait_until_finished()
            if step == total:
                self.export_final(state)
            return TrainResult(cfg.stage, step - start, step, losses, str(self.run_dir), False, int(state.skipped))
        finally:
            manager.wait_until_finished()
            manager.close()
            writer.close()
            if jsonl is not None:
                jsonl.close()
            if _main_thread():
                signal.signal(signal.SIGTERM, previous)


def _struct(leaf, sharding):
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)


def _restore_parts(
    path, current: dict[str, dict], shardings: dict[str, dict], trainable_here: Callable[[str], bool]
) -> dict[str, tuple[dict, list[str]]]:
    """The parts named in ``current`` from the params checkpoint at ``path``, leaf by leaf onto
    ``current``'s shardings, in one read.

    A leaf the checkpoint lacks, or holds with another shape, keeps its fresh initialisation when this
    stage trains it (a stage-2 ablation whose emotion module differs from stage 1's); for a leaf this
    stage would freeze that is an error naming the leaves. Returns ``{part: (params, fresh leaf paths)}``.
    """
    from flax import traverse_util

    cur = {part: traverse_util.flatten_dict(tree) for part, tree in current.items()}
    shard = {part: traverse_util.flatten_dict(tree) for part, tree in shardings.items()}
    with ocp.StandardCheckpointer() as ckptr:
        stored = ckptr.metadata(path / "params").item_metadata.tree
        absent = sorted(set(current) - set(stored))
        if absent:
            raise TrainingError(f"{path}: no {absent} params in this checkpoint (it holds {sorted(stored)})")
        any_sharding = jax.tree_util.tree_leaves(shardings)[0]
        replicated = jax.sharding.NamedSharding(any_sharding.mesh, jax.sharding.PartitionSpec())

        def target_of(p, m):
            part, key = p[0], p[1:]
            if part in cur and key in cur[part] and tuple(cur[part][key].shape) == tuple(m.shape):
                return jax.ShapeDtypeStruct(m.shape, cur[part][key].dtype, sharding=shard[part][key])
            return jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=replicated)

        flat_stored = traverse_util.flatten_dict(stored)
        target = traverse_util.unflatten_dict({p: target_of(p, m) for p, m in flat_stored.items()})
        restored_all = ckptr.restore(path / "params", target)
    out, missing = {}, []
    for part, leaves in cur.items():
        restored = traverse_util.flatten_dict(restored_all[part])
        values, fresh = {}, []
        for key, leaf in leaves.items():
            name = "/".join((part, *key))
            if key in restored and tuple(restored[key].shape) == tuple(leaf.shape):
                values[key] = restored[key]
            elif trainable_here(name):
                values[key] = leaf
                fresh.append(name)
            else:
                have = f"shape {tuple(restored[key].shape)}" if key in restored else "absent"
                missing.append(f"{name} (model {tuple(leaf.shape)}, checkpoint {have})")
        if fresh:
            log.info("%s: %d tensors of %r not in the checkpoint, trained from their initialisation: %s", path, len(fresh), part,
                     ", ".join(fresh[:5]) + (" …" if len(fresh) > 5 else ""))  # fmt: skip
        out[part] = (traverse_util.unflatten_dict(values), fresh)
    if missing:
        raise TrainingError(f"{path}: frozen parameters this checkpoint cannot fill: " + "; ".join(missing[:10])
                            + (f" … and {len(missing) - 10} more" if len(missing) > 10 else ""))  # fmt: skip
    return out


def _restore_subtree(path, abstract: dict) -> dict:
    """Restore the parts in ``abstract`` (ShapeDtypeStructs with shardings) from a params checkpoint.

    Parts the checkpoint holds but ``abstract`` does not name are read replicated and dropped, so
    this works on any number of hosts without knowing how the checkpoint was sharded.
    """
    with ocp.StandardCheckpointer() as ckptr:
        stored = ckptr.metadata(path / "params").item_metadata.tree
        missing = sorted(set(abstract) - set(stored))
        if missing:
            raise TrainingError(f"{path}: no {missing} params in this checkpoint (it holds {sorted(stored)})")
        any_sharding = jax.tree_util.tree_leaves(abstract)[0].sharding
        replicated = jax.sharding.NamedSharding(any_sharding.mesh, jax.sharding.PartitionSpec())
        target = {
            part: abstract[part] if part in abstract else jax.tree_util.tree_map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=replicated), sub)
            for part, sub in stored.items()
        }  # fmt: skip
        restored = ckptr.restore(path / "params", target)
    return {part: restored[part] for part in abstract}


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def train(config: ConfigDict, run_dir: str | pathlib.Path, *, max_steps: int | None = None) -> TrainResult:
    """Train ``config.stage`` under ``run_dir``; see the module docstring."""
    return Trainer(config, run_dir).run(max_steps=max_steps)
