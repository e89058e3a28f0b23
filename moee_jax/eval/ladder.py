"""The diagnostic ladder (``moee ladder RUN``): climb from the instrument to the held-out goal.

A generated number means nothing until the rungs below it hold, so each rung is a few CPU minutes
with a printed pass / fail, in order:

=====  ==============================  ===============================================================
rung   what                            passes when
=====  ==============================  ===============================================================
0      instrument ceilings             the reader on held-out ground truth, through the model's resize
                                       (and latent round trip): emotion ≥ 0.95, compounds both present
                                       ≥ 0.8, lip-sync r ≥ 0.85
1      overfit one clip                the run's architecture, trained from scratch on one emotional
                                       training clip, regenerates it: PSNR ≥ 25 dB, reader class right
2      training identities,            emotion ≥ 0.9, lip-sync r ≥ 0.8 — portrait and speech from the
       same-clip reference             target clip itself (the easy case: the face already shows it)
3      held-out identities,            the same, on identities never trained on
       same-clip reference
4      training identities,            emotion ≥ 0.9 from a *neutral* portrait and neutral speech, and
       neutral reference               the shuffled-label loss gap on training batches > 0: the label
                                       carries the emotion
5      held-out identities,            basic emotions ≥ 0.9, then the unseen compound palettes both
       neutral reference               present ≥ 0.8 (what ``moee eval`` scores)
=====  ==============================  ===============================================================

Rungs 2–5 score the run's model (:mod:`moee_jax.eval.evaluate`) on ``identities`` identities of each
split; rung 1 trains its own small model.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import tempfile
import time
from collections.abc import Callable, Sequence

import numpy as np

from moee_jax.data import schema
from moee_jax.eval.evaluate import (
    EvalItem,
    EvalSettings,
    ground_truth_ceiling,
    held_out_clips,
    held_out_items,
    render_items,
    resize_frame,
    score_items,
)
from moee_jax.xla_options import compiler_options

RUNGS = ("ceiling", "overfit", "train_same_clip", "held_out_same_clip", "train_neutral", "held_out")


@dataclasses.dataclass
class Rung:
    """One rung's outcome: ``figures`` measured, ``goals`` (name → (figure key, bound, "≥" | ">"))."""

    index: int
    name: str
    passed: bool
    figures: dict
    goals: dict
    seconds: float

    def line(self) -> str:
        shown = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in self.figures.items())
        return f"rung {self.index} {self.name:<20} {'PASS' if self.passed else 'FAIL'}  {shown}  ({self.seconds:.0f} s)"


def _judge(figures: dict, goals: dict[str, tuple[float, str]]) -> bool:
    ok = True
    for key, (bound, op) in goals.items():
        value = figures.get(key)
        ok &= value is not None and (value >= bound if op == "≥" else value > bound)
    return bool(ok)


def _split_clips(data_dir, name: str, split: str) -> dict[str, dict[str, dict]]:
    """``speaker → emotion → record`` of ``split`` (the first clip of each emotion)."""
    from moee_jax.data.pipeline import open_source

    source = open_source(data_dir, name, split)
    out: dict[str, dict[str, dict]] = {}
    for i in range(len(source)):
        r = source[i]
        out.setdefault(r["speaker"].decode(), {}).setdefault(r["emotion"].decode(), r)
    return out


def same_clip_items(clips: dict[str, dict[str, dict]], size: int, speakers: Sequence[str]) -> list[EvalItem]:
    """Each speaker's basic-emotion clips driven by themselves: the clip's first frame as the portrait,
    its own speech, its own label."""
    from moee_jax.inference.inputs import parse_emotion

    items = []
    for speaker in speakers:
        for emotion in schema.CLASSES:
            record = clips[speaker].get(emotion)
            if record is None:
                continue
            portrait = resize_frame(schema.decode_frames(record["frames"], [0])[0], size)
            truth = np.asarray(record["identity"], np.float32)
            items.append(EvalItem(speaker, emotion, "basic", parse_emotion(emotion), portrait, record, truth, emotion))
    return items


def _figures(summary: dict) -> dict:
    h = summary["headline"]
    keys = ("emotion_accuracy", "compound_both_present_rate", "lip_sync_pearson", "identity_mae")
    return {k: h[k] for k in keys if k in h}


def run_ladder(
    run_dir: str | pathlib.Path,
    reader,
    *,
    data_dir: str | pathlib.Path,
    dataset: str,
    settings: EvalSettings | None = None,
    rungs: Sequence[str] = RUNGS,
    identities: int = 4,
    overfit_steps: int = 300,
    batch_size: int = 16,
    log: Callable[[str], None] = print,
) -> list[Rung]:
    """Climb the ladder for a finished run; prints one line per rung through ``log``."""
    from moee_jax.inference.animator import Animator

    settings = settings or EvalSettings()
    animator = Animator.from_run(run_dir)
    size, fps = animator.size, animator.fps
    held_out = held_out_clips(data_dir, dataset)
    test_speakers = sorted(held_out)[:identities]
    out: list[Rung] = []

    def record(index, name, figures, goals, t0):
        rung = Rung(index, name, _judge(figures, goals), figures, {k: f"{op} {b}" for k, (b, op) in goals.items()},
                    round(time.perf_counter() - t0, 1))  # fmt: skip
        out.append(rung)
        log(rung.line())

    for name in rungs:
        t0 = time.perf_counter()
        index = RUNGS.index(name)
        if name == "ceiling":
            c = ground_truth_ceiling(reader, held_out, size, settings, fps=fps,
                                     round_trip=None if animator.lossless_latents else animator.round_trip)  # fmt: skip
            record(index, name, _figures(c), {"emotion_accuracy": (0.95, "≥"), "compound_both_present_rate": (0.8, "≥"),
                                              "lip_sync_pearson": (0.85, "≥")}, t0)  # fmt: skip
        elif name == "overfit":
            record(index, name, overfit_one_clip(animator.config, reader, data_dir, dataset, steps=overfit_steps, settings=settings),
                   {"psnr_db": (25.0, "≥"), "class_right": (1.0, "≥")}, t0)  # fmt: skip
        elif name in ("train_same_clip", "held_out_same_clip"):
            clips = _split_clips(data_dir, dataset, "train") if name == "train_same_clip" else held_out
            items = same_clip_items(clips, size, sorted(clips)[:identities])
            summary = score_items(reader, items, render_items(animator, items, settings, batch_size=batch_size), fps)
            record(index, name, _figures(summary), {"emotion_accuracy": (0.9, "≥"), "lip_sync_pearson": (0.8, "≥")}, t0)
        elif name == "train_neutral":
            clips = _split_clips(data_dir, dataset, "train")
            items = held_out_items(clips, size, dataclasses.replace(settings, compounds={}), sorted(clips)[:identities],
                                   speech_only=False)  # fmt: skip
            figures = _figures(score_items(reader, items, render_items(animator, items, settings, batch_size=batch_size), fps))
            figures["shuffle_gap"] = shuffle_gap(run_dir)
            record(index, name, figures, {"emotion_accuracy": (0.9, "≥"), "shuffle_gap": (0.0, ">")}, t0)
        elif name == "held_out":
            items = held_out_items(held_out, size, settings, test_speakers, speech_only=False)
            summary = score_items(reader, items, render_items(animator, items, settings, batch_size=batch_size), fps)
            record(index, name, _figures(summary), {"emotion_accuracy": (0.9, "≥"), "compound_both_present_rate": (0.8, "≥")}, t0)
        else:
            raise ValueError(f"unknown rung {name!r}; choose from {RUNGS}")
    return out


def shuffle_gap(run_dir: str | pathlib.Path, batches: int = 4) -> float:
    """The stage-2 diagnostics' ``shuffle_gap`` (:mod:`moee_jax.train.stages`) of the run's final
    model, averaged over ``batches`` training batches: the latent loss with labels shuffled across
    the batch minus the loss with the true labels, on the same noise."""
    import jax

    from moee_jax.checkpoint.run import load_run_config, resolve_checkpoint, restore_final
    from moee_jax.train.trainer import Trainer

    checkpoint = resolve_checkpoint(run_dir)
    config = load_run_config(checkpoint)
    params = restore_final(checkpoint.final)
    trainer = Trainer(config, tempfile.mkdtemp(prefix="moee_ladder_"))
    fn = jax.jit(trainer.stage.diagnostics, compiler_options=compiler_options())
    it = iter(trainer.pipeline())
    gaps = [float(fn(params, {k: np.asarray(v) for k, v in next(it).items()}, jax.random.key(i))["shuffle_gap"]) for i in range(batches)]
    return float(np.mean(gaps))


class _OneRecord:
    """A data source holding one record of another (the overfitting rung's whole dataset)."""

    def __init__(self, source, key: int):
        self._record, self._repr = source[key], f"OneRecord({source!r}, {key})"

    def __len__(self) -> int:
        return 1

    def __getitem__(self, key: int):
        return self._record

    def __repr__(self) -> str:
        return self._repr


def overfit_one_clip(config, reader, data_dir, dataset: str, *, steps: int = 300, settings: EvalSettings | None = None) -> dict:
    """Train the run's architecture (its stage-1 config, emotion parts jointly) from scratch on one
    emotional training clip, then regenerate that clip from its own first frame, speech and label:
    ``{"psnr_db", "class_right", "emotion"}`` against the clip's frames at the model's size."""
    from ml_collections import ConfigDict

    from moee_jax.data.pipeline import open_source
    from moee_jax.inference.animator import Animator
    from moee_jax.inference.inputs import Speech, parse_emotion
    from moee_jax.train.partition import merge_params
    from moee_jax.train.trainer import Trainer

    settings = settings or EvalSettings()
    source = open_source(data_dir, dataset, "train")
    key = next(i for i in range(len(source)) if source[i]["emotion"].decode() == "happiness")
    record = source[key]
    c = ConfigDict(config.to_dict())
    c.stage = "stage1"
    c.train.update(dict(steps=steps, joint_emotion=True, learning_rate=1e-3, warmup_steps=20, schedule="constant", ema_decay=0.0,
                        log_every=max(steps // 5, 1), init_from=(), init_skip=()))  # fmt: skip
    c.data.update(dict(reference_neutral_p=0.0, reference_other_p=0.0, reference_min_distance=0, motion_as_reference_p=0.5,
                       emotion_speech_p=0.0, emotion_text_p=0.0, drop_emotion_p=0.0, drop_all_p=0.0, drop_reference_p=0.0,
                       drop_audio_p=0.0, noisy_p=0.0, class_balanced=False))  # fmt: skip
    c.checkpoint.update(dict(every_steps=10**9, async_save=False))
    with tempfile.TemporaryDirectory(prefix="moee_overfit_") as tmp:
        vae = ConfigDict(c.to_dict())
        vae.stage, vae.train.steps = "vae", 0 if c.model.vae.get("kind") == "space_to_depth" else 100
        Trainer(vae, tmp, source=_OneRecord(source, key)).run()
        trainer = Trainer(c, tmp, source=_OneRecord(source, key))
        trainer.run()
        params = merge_params(trainer.state.trainable, trainer.state.frozen)
    animator = Animator(c, params)
    truth = np.stack([resize_frame(f, animator.size) for f in schema.decode_frames(record["frames"])])
    anim = animator.animate(truth[0], Speech(np.asarray(record["audio"], np.float32), pathlib.Path("overfit")),
                            parse_emotion("happy"), steps=settings.steps, sampler=settings.sampler,
                            guidance=dict(settings.guidance), seed=settings.seed, detect=False)  # fmt: skip
    mse = float(np.mean((anim.frames.astype(np.float64) - truth.astype(np.float64)) ** 2))
    psnr = 10 * np.log10(255.0**2 / max(mse, 1e-12))
    predicted = schema.CLASSES[int(np.argmax(reader.predict(anim.frames)["probs"].mean(0)))]
    return {"psnr_db": float(psnr), "class_right": float(predicted == "happiness"), "emotion": predicted}


def ladder_json(rungs: Sequence[Rung]) -> str:
    return json.dumps([dataclasses.asdict(r) for r in rungs], indent=2, default=float)
