"""``moee demo``: train MoEE on synthetic talking faces end to end, animate held-out people, score them.

Steps (each resumable: a re-run reuses the dataset, finished stages and the cached reader):

1. build the ``synthetic_talking_faces`` dataset of ``config.data`` under ``OUT/data`` (held-out
   identities and the compound emotions only in ``test``);
2. train ``vae → embedder → stage1 → stage2`` (``config.stages``) under ``OUT/run``;
3. train the expression reader (:mod:`moee_jax.eval.reader`) on generator ground truth;
4. for every held-out identity: animate its neutral test frame with its own held-out speech for
   each basic emotion and neutral (label), for the compounds of ``config.animate.compounds``
   (palettes, never seen in training), and speech-only (``emotion_from_audio``) with the audio of
   its emotional test clips;
5. score every clip (emotion accuracy, AU error, compound components, lip sync, identity drift) and
   write ``OUT/videos/*.mp4``, ``OUT/contact_sheet.png`` (rows = emotions, columns = frames),
   ``OUT/metrics.json`` and ``OUT/metrics.md``.
"""

from __future__ import annotations

import json
import logging
import pathlib
import time

import numpy as np
from ml_collections import ConfigDict
from PIL import Image

from moee_jax.data import schema, synthetic
from moee_jax.emotions import EMOTIONS

log = logging.getLogger("moee_jax.demo")


def _build_data(config: ConfigDict, data_dir: pathlib.Path) -> str:
    from moee_jax.data.builders.synthetic_talking_faces import SyntheticConfig, build

    d = config.data.to_dict()
    build(SyntheticConfig(name=d.pop("name"), **{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}), str(data_dir))
    return f"synthetic_talking_faces/{config.data.name}"


def _test_clips(data_dir: pathlib.Path, name: str) -> dict[str, dict[str, dict]]:
    """``speaker → emotion → record`` of the held-out test split."""
    from moee_jax.data.pipeline import open_source

    source = open_source(data_dir, name, "test")
    out: dict[str, dict[str, dict]] = {}
    for i in range(len(source)):
        r = source[i]
        out.setdefault(r["speaker"].decode(), {})[r["emotion"].decode()] = r
    return out


def _resize(frame: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(frame).resize((size, size), Image.Resampling.BOX))


def run_demo(config: ConfigDict, out_dir: str | pathlib.Path) -> dict:
    """Run the whole demo; returns the metrics written to ``OUT/metrics.json``."""
    from moee_jax.eval import metrics as M
    from moee_jax.eval.reader import load_reader, save_reader, train_reader
    from moee_jax.inference.animate import Animator, save_animation
    from moee_jax.inference.inputs import Speech, parse_emotion
    from moee_jax.train.trainer import Trainer

    out = pathlib.Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    name = _build_data(config, out / "data")
    timings["data_s"] = time.perf_counter() - t0

    losses: dict[str, dict] = {}
    for stage in ("vae", "embedder", "stage1", "stage2"):
        t = time.perf_counter()
        c = ConfigDict(config.stages[stage].to_dict())
        c.data.data_dir = str(out / "data")
        c.data.name = name
        result = Trainer(c, out / "run").run()
        jsonl = out / "run" / stage / "metrics.jsonl"
        logged = [json.loads(line) for line in jsonl.read_text().splitlines()] if jsonl.exists() else []
        if logged:
            losses[stage] = {"first_logged": logged[0]["loss"], "last_logged": logged[-1]["loss"], "steps": result.final_step}
        timings[f"{stage}_s"] = time.perf_counter() - t

    t = time.perf_counter()
    size = int(config.stages.stage2.video.image_size[0])
    reader_path = out / "reader"
    if (reader_path / "reader.msgpack").exists() or reader_path.exists() and any(reader_path.iterdir()):
        reader = load_reader(reader_path)
    else:
        reader = train_reader(size, steps=int(config.reader.steps))
        save_reader(reader, reader_path)
    timings["reader_s"] = time.perf_counter() - t

    t = time.perf_counter()
    animator = Animator.from_run(out / "run")
    tests = _test_clips(out / "data", name)
    a = config.animate
    guidance = dict(a.guidance)
    fps = float(config.stages.stage2.video.fps)
    probs, targets, au_results, compound_results, sync_results, identity_results = [], [], [], [], [], []
    speech_probs, speech_targets = [], []
    sheet_rows: list[tuple[str, np.ndarray]] = []
    videos = out / "videos"
    videos.mkdir(exist_ok=True)

    def render(speaker, tag, spec, record):
        path = videos / f"{speaker}_{tag}.mp4"
        for p in (path, path.with_suffix(".json")):
            p.unlink(missing_ok=True)
        portrait = _resize(schema.decode_frames(tests[speaker]["neutral"]["frames"], [0])[0], size)
        speech = Speech(np.asarray(record["audio"], np.float32), pathlib.Path(f"{speaker}/{record['id'].decode()}"))
        anim = animator.animate(portrait, speech, spec, steps=int(a.steps), sampler=str(a.sampler), guidance=guidance,
                                seed=int(config.seed), detect=False)  # fmt: skip
        save_animation(anim, path)
        return anim.frames, reader.predict(anim.frames), np.asarray(record["audio"], np.float32)

    for speaker, clips in sorted(tests.items()):
        identity = np.asarray(clips["neutral"]["identity"], np.float32)
        for emotion in schema.CLASSES:
            frames, pred, audio = render(speaker, emotion, parse_emotion(emotion), clips["neutral"])
            probs.append(pred["probs"])
            targets.append(emotion)
            static = synthetic.resolve_emotion(emotion, 1.0)[2]
            au_results.append(M.au_error(pred["aus"], static))
            sync_results.append(M.lip_sync(pred["mouth"], audio, fps))
            identity_results.append(M.identity_error(pred["identity"], identity))
            if speaker == sorted(tests)[0]:
                sheet_rows.append((emotion, frames))
        for compound, spec in a.compounds.items():
            frames, pred, audio = render(speaker, compound, parse_emotion(spec), clips["neutral"])
            compound_results.append(M.compound_components(pred["aus"], compound, probs=pred["probs"]))
            sync_results.append(M.lip_sync(pred["mouth"], audio, fps))
            if speaker == sorted(tests)[0]:
                sheet_rows.append((compound, frames))
        for emotion in a.speech_only_emotions:
            frames, pred, _ = render(speaker, f"speech_{emotion}", parse_emotion(emotion_from_audio=True), clips[emotion])
            speech_probs.append(pred["probs"])
            speech_targets.append(emotion)
    timings["animate_and_score_s"] = time.perf_counter() - t

    summary = M.summarize(
        emotion=M.emotion_accuracy(probs, targets), action_units=au_results, compounds=compound_results,
        lip_sync=sync_results, identity=identity_results,
    )  # fmt: skip
    summary["speech_only"] = {k: v for k, v in M.emotion_accuracy(speech_probs, speech_targets).items() if k != "predictions"}
    summary["training"] = losses
    summary["timings_s"] = {k: round(v, 1) for k, v in timings.items()} | {"total": round(time.perf_counter() - t0, 1)}
    summary["reader"] = reader.info
    summary["held_out_identities"] = sorted(tests)
    (out / "metrics.json").write_text(json.dumps(summary, indent=2, default=float))
    (out / "metrics.md").write_text(M.to_markdown(summary))
    _contact_sheet(sheet_rows, out / "contact_sheet.png")
    return summary


def _contact_sheet(rows: list[tuple[str, np.ndarray]], path: pathlib.Path, columns: int = 8) -> None:
    """Rows = emotions, columns = ``columns`` frames evenly spaced over each clip."""
    if not rows:
        return
    tiles = []
    for _, frames in rows:
        idx = np.linspace(0, len(frames) - 1, columns).round().astype(int)
        tiles.append(np.concatenate([frames[i] for i in idx], axis=1))
    Image.fromarray(np.concatenate(tiles, axis=0)).save(path)


__all__ = ["run_demo", "EMOTIONS"]
