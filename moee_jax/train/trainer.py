"""``moee train``: one stage of training, sharded over a device mesh and any number of hosts.

The run directory is :mod:`moee_jax.checkpoint.run`'s (``RUN/<stage>/{checkpoints, final,
config.json, metrics.jsonl}``). A run resumes from the stage's latest checkpoint automatically:
train state (params, optimizer state, EMA, step, RNG) and the grain iterator state are restored,
so the steps after a resume are the steps an uninterrupted run takes. The state is restored onto
the *current* mesh (any device count or mesh shape). SIGTERM (preemption) and Ctrl-C save a
checkpoint at the current step and return cleanly. A fresh stage initialises from the previous
stages' final parameters (``vae`` → ``embedder`` → ``stage1`` → ``stage2``), part by part.

Sharding (pjit style): the state is initialised abstractly (``jax.eval_shape``), its logical axis
annotations give ``NamedSharding``\\ s over the ``(data, fsdp, tensor)`` mesh (rules:
``config.sharding_rules``, else the default table), and the real init runs under
``jax.jit(out_shardings=…)`` so every shard is created on its device; the step
(:mod:`moee_jax.train.step`) is compiled once with explicit in/out shardings and donates the state.
Each process feeds its own grain shard; the per-process batches form the global batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import pathlib
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from ml_collections import ConfigDict

from moee_jax.checkpoint import run as run_lib
from moee_jax.configs import training as training_configs
from moee_jax.data import feature_cache
from moee_jax.data import pipeline as data_pipeline
from moee_jax.parallel.mesh import make_mesh
from moee_jax.parallel.rules import rules_from_config
from moee_jax.parallel.sharding import batch_shardings, to_global, tree_shardings
from moee_jax.train import metrics as metrics_lib
from moee_jax.train import stop_signals
from moee_jax.train.optim import lr_schedule, make_optimizer
from moee_jax.train.partition import count, is_trainable, merge_params, split_params
from moee_jax.train.stages import Stage, make_stage
from moee_jax.train.state import TrainState
from moee_jax.train.step import make_step, stage_loss
from moee_jax.xla_options import compiler_options

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

    def interruption(self, total_steps: int) -> str | None:
        """None when the stage ran to its end; else what stopped where and how to resume (SIGTERM or
        Ctrl-C saved the checkpoint), for a caller that must not go on from an unfinished stage."""
        if not self.interrupted:
            return None
        return (f"{self.stage} was interrupted at step {self.final_step} of {total_steps}; its checkpoint is saved in "
                f"{pathlib.Path(self.run_dir) / self.stage}: run the same command again to resume")


def _lpips(config) -> tuple[Callable | None, dict | None]:
    """LPIPS module + params when ``config.train.perceptual`` names weights; else (None, None) + warning."""
    p = config.train.get("perceptual")
    if p is None or not p.get("vgg"):
        if p is not None and float(p.get("weight", 0.0)) > 0:
            log.warning(
                "perceptual loss disabled: config.train.perceptual.vgg is not set (give torchvision VGG16 "
                "weights and the LPIPS linear weights, .lin, to enable it); training with L1 only"
            )
        return None, None
    from moee_jax.checkpoint.convert.perceptual import load_lpips

    return load_lpips(p.vgg, p.get("lin"), allow_pickle=bool(p.get("allow_pickle", False)))


class Trainer:
    """One stage of training; :meth:`run` trains to ``config.train.steps`` (resuming if possible).
    ``source`` replaces the dataset of ``config.data`` (any ``tfds.data_source``-like object)."""

    def __init__(self, config: ConfigDict, run_dir: str | pathlib.Path, *, source=None):
        if config.stage not in run_lib.STAGES:
            raise TrainingError(f"config.stage={config.stage!r}; choose one of {run_lib.STAGES}")
        training_configs.check(config)  # numbers in range, before anything is built
        self.config = config
        self.layout = run_lib.RunDir.of(run_dir)
        self.run_dir, self.dir = self.layout.root, self.layout.stage(config.stage)
        self.stage: Stage = make_stage(config)
        self.rules = rules_from_config(config)
        self.mesh = make_mesh(tuple(config.mesh.shape))
        self.tx, self.schedule = make_optimizer(config.train), lr_schedule(config.train)
        self.accum = int(config.train.grad_accum)
        try:
            self.data_cfg = data_pipeline.PipelineConfig.from_config(config, jax.process_count())
        except ValueError as e:
            raise TrainingError(str(e)) from None
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
        try:  # the feature cache (data.features) holds this split, with the widths the model takes
            self.features = feature_cache.check_training_config(config, num_records=len(self.source) if source is None else None)
        except feature_cache.FeatureCacheError as e:
            raise TrainingError(str(e)) from None
        self.lpips_module, lpips_params = _lpips(config)
        self.extra = {} if lpips_params is None else {"lpips": jax.device_put(lpips_params)}
        self.example = next(iter(self.pipeline()))
        self.batch_shardings = batch_shardings(self.mesh, self.example)
        self._build_state()
        self._compiled = None

    def pipeline(self) -> data_pipeline.Pipeline:
        """A fresh pass over this stage's data, as training reads it."""
        return data_pipeline.make_pipeline(self.source, self.data_cfg)

    @contextlib.contextmanager
    def _scope(self):
        """The mesh and logical-axis rules every trace of the trainer runs under."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    # -- state --------------------------------------------------------------------------------------------
    def _make_state(self, rng: jax.Array, example: dict) -> TrainState:
        boxed = self.stage.init(rng, example)
        trainable, frozen = split_params(boxed, self.stage.trainable, self.stage.frozen)
        return TrainState(
            step=jnp.zeros((), jnp.int32), trainable=trainable, frozen=frozen, opt_state=self.tx.init(trainable),
            ema=jax.tree_util.tree_map(jnp.copy, trainable) if float(self.config.train.ema_decay) > 0 else None,
            rng=jax.random.key_data(jax.random.fold_in(rng, 1)), bad_steps=jnp.zeros((), jnp.int32), skipped=jnp.zeros((), jnp.int32),
        )  # fmt: skip

    def _build_state(self) -> None:
        one = {k: v[:1] for k, v in self.example.items()}
        with self._scope():
            abstract = jax.eval_shape(self._make_state, jax.random.key(int(self.config.seed)), one)
        self.state_shardings = tree_shardings(abstract, self.mesh, self.rules)
        self.abstract_state = jax.tree_util.tree_map(
            lambda leaf, sh: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sh), nn.unbox(abstract), self.state_shardings
        )
        self.num_trainable, self.num_frozen = count(abstract.trainable), count(abstract.frozen)

    def init_state(self) -> TrainState:
        """A fresh state, its parts filled from earlier stages' final exports where they hold them."""
        named = list(self.config.train.get("init_from") or [])
        sources = named or [str(p) for p in self.layout.earlier_finals(self.config.stage)]
        try:
            for src in sources:  # an earlier diffusion stage's audio projection takes its audio features
                stage_dir = run_lib.run_path(src).parent
                if stage_dir.name in ("stage1", "stage2") and (run_lib.run_path(src) / "params").exists():
                    feature_cache.check_earlier_stage(self.features, stage_dir, features=str(self.config.data.get("features", "")))
        except feature_cache.FeatureCacheError as e:
            raise TrainingError(str(e)) from None
        one = {k: v[:1] for k, v in self.example.items()}
        with self._scope():
            state = jax.jit(lambda r, ex: nn.unbox(self._make_state(r, ex)), out_shardings=self.state_shardings)(
                jax.random.key(int(self.config.seed)), one
            )
        shardings = merge_params(self.state_shardings.trainable, self.state_shardings.frozen)
        try:
            params, self.initialised_from = run_lib.fill_from_earlier_stages(
                merge_params(state.trainable, state.frozen), shardings, sources, self._trainable_here, required=bool(named),
                skip=tuple(self.config.train.get("init_skip") or ()),
            )  # fmt: skip
        except run_lib.RunError as e:
            raise TrainingError(str(e)) from None
        trainable, frozen = split_params(params, self.stage.trainable, self.stage.frozen)
        # A copy, not the same buffers: the step donates the state, and XLA refuses a buffer donated twice.
        ema = jax.tree_util.tree_map(jnp.copy, trainable) if state.ema is not None else None
        opt_state = jax.jit(self.tx.init, out_shardings=self.state_shardings.opt_state)(trainable)
        return state.replace(trainable=trainable, frozen=frozen, ema=ema, opt_state=opt_state)

    def _trainable_here(self, path: str) -> bool:
        return is_trainable(path, self.stage.trainable, self.stage.frozen)

    # -- compiled functions -------------------------------------------------------------------------------
    def compile(self, state: TrainState, batch: dict):
        """Lower and compile the step once (explicit shardings, donated state); FLOPs from XLA."""
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        step = make_step(self.stage, self.tx, self.schedule, accum=self.accum, ema=float(self.config.train.ema_decay),
                         lpips_module=self.lpips_module)  # fmt: skip
        jitted = jax.jit(
            step,
            in_shardings=(self.state_shardings, self.batch_shardings, jax.tree_util.tree_map(lambda _: replicated, self.extra)),
            out_shardings=(self.state_shardings, replicated),
            donate_argnums=(0,),
        )
        with self._scope():
            lowered = jitted.lower(state, batch, self.extra)
            self._compiled = lowered.compile(compiler_options=compiler_options())
        self.step_flops = metrics_lib.compiled_flops(lowered)  # before SPMD partitioning: over all devices
        return self._compiled

    def eval_loss(self, state: TrainState, batch: dict, seed: int = 0, *, use_ema: bool = False) -> dict:
        """The stage's loss terms on ``batch`` (a global batch) with a fixed RNG: comparable across steps."""
        if not hasattr(self, "_eval"):
            loss = stage_loss(self.stage, self.lpips_module)

            def fn(trainable, frozen, batch, rng, extra):
                total, terms = loss(trainable, frozen, batch, rng, extra)
                return {"loss": total, **terms}

            self._eval = jax.jit(fn)
        trainable = state.ema if use_ema and state.ema is not None else state.trainable
        with self._scope():
            out = self._eval(trainable, state.frozen, batch, jax.random.key(seed), self.extra)
        return {k: float(v) for k, v in jax.device_get(out).items()}

    def diagnose(self, state: TrainState, batch: dict, step: int) -> dict:
        """The stage's diagnostics (e.g. the shuffled-emotion loss gap) on ``batch``, same RNG for every variant."""
        if self.stage.diagnostics is None:
            return {}
        if not hasattr(self, "_diagnose"):
            stage = self.stage
            self._diagnose = jax.jit(lambda tr, fr, b, r: stage.diagnostics(merge_params(tr, fr), b, r))
        with self._scope():
            out = self._diagnose(state.trainable, state.frozen, batch, jax.random.fold_in(jax.random.key(int(self.config.seed) + 1), step))
        return {k: float(v) for k, v in jax.device_get(out).items()}

    # -- export ---------------------------------------------------------------------------------------------
    def export_final(self, state: TrainState):
        """Write ``RUN/<stage>/final``: merged params (EMA'd trainables with ``export_ema``, else raw),
        after the stage's post-training measurement (e.g. latent statistics)."""
        use_ema = state.ema is not None and self.config.checkpoint.get("export_ema", False)
        params = merge_params(state.ema if use_ema else state.trainable, state.frozen)
        if self.stage.finalize is not None:
            iterator = iter(self.pipeline())
            batches = [next(iterator) for _ in range(int(self.config.train.get("finalize_batches", 8)))]
            new = self.stage.finalize(jax.device_get(params), batches)
            if jax.process_count() > 1:  # one measurement for every process: process 0's, on its shard's batches
                new = multihost_utils.broadcast_one_to_all(new)
            params = jax.tree_util.tree_map(lambda value, old: jax.device_put(np.asarray(value, old.dtype), old.sharding), new, params)
        meta = {"stage": self.config.stage, "parts": sorted(params), "step": int(state.step), "config": self.config.get("variant", "")}
        return run_lib.export_final(self.layout.final(self.config.stage), params, meta)

    # -- the loop -----------------------------------------------------------------------------------------
    def run(self, *, max_steps: int | None = None) -> TrainResult:
        """Train until ``config.train.steps`` (or ``max_steps`` more steps); resume if checkpoints exist."""
        cfg, t = self.config, self.config.train
        self.dir.mkdir(parents=True, exist_ok=True)
        if jax.process_index() == 0:
            self.layout.config(cfg.stage).write_text(cfg.to_json_best_effort(indent=2))
            feature_cache.record_in_run(self.dir, self.features)  # RUN/<stage>/features.json: what the model takes
        total = int(t.steps)
        c = cfg.checkpoint
        manager = run_lib.stage_manager(self.layout, cfg.stage, every_steps=int(c.every_steps), keep=int(c.keep),
                                        async_save=bool(c.get("async_save", True)))  # fmt: skip
        config_json = json.loads(cfg.to_json_best_effort())
        pipeline = self.pipeline()
        iterator = iter(pipeline)
        shards = self.layout.data_shards(cfg.stage)
        shards.mkdir(exist_ok=True)
        (shards / f"process_{jax.process_index()}.json").write_text(json.dumps({
            "process": jax.process_index(), "record_keys": list(pipeline.key_range), "usable_clips": pipeline.num_usable,
            "skipped_clips": pipeline.num_skipped}))  # fmt: skip
        latest = manager.latest_step()
        if latest is not None:
            try:  # the newest readable checkpoint; damaged ones are set aside and named in the log
                state, latest, _ = run_lib.restore_newest(manager, self.abstract_state, iterator)
            except run_lib.RunError as e:
                manager.close()
                raise TrainingError(str(e)) from None
            log.info("resumed %s at step %d from %s", cfg.stage, latest, self.layout.checkpoints(cfg.stage))
        else:
            state = self.init_state()
        self.state = state
        start = int(state.step)
        stop_at = total if max_steps is None else min(total, start + max_steps)
        log_every, patience, examples = int(t.log_every), int(t.nan_patience), int(t.batch_size)
        step_log = metrics_lib.StepLog(self.layout.tensorboard(cfg.stage), self.layout.metrics(cfg.stage), start=start, total=total,
                                       print_every=int(t.get("print_every", 0)) or log_every, enabled=jax.process_index() == 0)  # fmt: skip
        losses: dict[int, float] = {}
        peak = metrics_lib.peak_flops_per_device(jax.devices()[0], cfg.dtype)
        failing = False
        with stop_signals.catch() as stop:  # SIGTERM / Ctrl-C: save at the end of the step and stop
            try:
                if start >= stop_at:
                    if start == total and not (self.layout.final(cfg.stage) / "params").exists():
                        self.export_final(state)  # a stage with nothing to train (steps = 0) still exports
                    return TrainResult(cfg.stage, 0, start, losses, str(self.run_dir), False, int(state.skipped))
                t_last, steps_since, step = time.perf_counter(), 0, start
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
                        sps = steps_since / max(time.perf_counter() - t_last, 1e-9)
                        values.update(steps_per_s=sps, examples_per_s=sps * examples)
                        values.update(self.diagnose(state, batch, step))
                        t_last, steps_since = time.perf_counter(), 0  # the diagnostics' time is not a step's
                        mfu = metrics_lib.mfu(self.step_flops, sps, jax.device_count(), peak)
                        if mfu is not None:
                            values["mfu"] = mfu
                        losses[step] = values["loss"]
                        step_log(step, values, last=step == stop_at)
                        bad = int(state.bad_steps)
                        if bad >= patience:
                            manager.wait_until_finished()
                            raise TrainingError(
                                f"{cfg.stage}: {bad} non-finite steps in a row at step {step} (updates skipped; last "
                                f"finite checkpoint in {self.layout.checkpoints(cfg.stage)}). Lower train.learning_rate, raise "
                                "train.warmup_steps or check the data."
                            )
                    run_lib.save_state(manager, step, state, iterator, config_json)
                    if stop:
                        if manager.latest_step() != step:
                            run_lib.save_state(manager, step, state, iterator, config_json, force=True)
                        manager.wait_until_finished()
                        log.warning("%s: saved %s at step %d and stopped", stop.name, cfg.stage, step)
                        return TrainResult(cfg.stage, step - start, step, losses, str(self.run_dir), True, int(state.skipped))
                if manager.latest_step() != step:
                    run_lib.save_state(manager, step, state, iterator, config_json, force=True)
                manager.wait_until_finished()
                if step == total:
                    self.export_final(state)
                return TrainResult(cfg.stage, step - start, step, losses, str(self.run_dir), False, int(state.skipped))
            except BaseException as e:
                failing = True
                if run_lib.is_disk_full(e):
                    raise TrainingError(run_lib.disk_full_message(self.layout, cfg.stage)) from None
                raise
            finally:
                try:  # a save that failed in the background surfaces here
                    manager.wait_until_finished()
                    manager.close()
                except Exception as e:
                    if not failing and run_lib.is_disk_full(e):
                        raise TrainingError(run_lib.disk_full_message(self.layout, cfg.stage)) from None
                    if not failing:
                        raise
                step_log.close()


def train(config: ConfigDict, run_dir: str | pathlib.Path, *, max_steps: int | None = None) -> TrainResult:
    """Train ``config.stage`` under ``run_dir``; see the module docstring."""
    return Trainer(config, run_dir).run(max_steps=max_steps)
