"""Score a trained run on the held-out part of a synthetic_talking_faces dataset (``moee eval RUN``).

For every held-out identity of the dataset's ``test`` split, its neutral test frame is animated
with its own held-out speech:

* for each basic emotion and neutral (``--emotion <label>``);
* for the compound palettes of ``settings.compounds`` (never seen in training);
* speech-only (``--emotion_from_audio``) with the audio of its emotional test clips
  (``settings.speech_only_emotions``).

Each generated clip is read by the expression reader (:mod:`moee_jax.eval.reader`) and scored
with :mod:`moee_jax.eval.metrics`: emotion accuracy, action-unit error against the target
emotion's static AUs, both components of a compound present, lip sync (generated mouth opening vs
the audio envelope) and identity drift against the generator's identity parameters.

The dataset is found from the run's own ``stage2/config.json`` (``data.data_dir``, ``data.name``)
unless given.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from collections.abc import Sequence

import numpy as np
from PIL import Image

from moee_jax.data import schema, synthetic
from moee_jax.eval import metrics as M


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """How the held-out clips are generated."""

    steps: int = 8
    sampler: str = "ddim"
    guidance: dict = dataclasses.field(default_factory=lambda: {"reference": 1.5, "audio": 2.0, "emotion": 3.0})
    compounds: dict = dataclasses.field(
        default_factory=lambda: {"happily_surprised": "happy:0.5,surprised:0.5", "sadly_fearful": "sad:0.5,fearful:0.5"}
    )
    speech_only_emotions: tuple[str, ...] = ("anger", "sadness")
    seed: int = 0

    @classmethod
    def from_config(cls, c, seed: int = 0) -> EvalSettings:
        """From a ``configs/demo.py`` ``animate`` block."""
        return cls(
            steps=int(c.steps), sampler=str(c.sampler), guidance=dict(c.guidance), compounds=dict(c.compounds),
            speech_only_emotions=tuple(c.speech_only_emotions), seed=seed,
        )  # fmt: skip


def held_out_clips(data_dir: str | pathlib.Path, name: str) -> dict[str, dict[str, dict]]:
    """``speaker → emotion → record`` of the dataset's ``test`` split (held-out identities)."""
    from moee_jax.data.pipeline import open_source

    source = open_source(data_dir, name, "test")
    out: dict[str, dict[str, dict]] = {}
    for i in range(len(source)):
        r = source[i]
        out.setdefault(r["speaker"].decode(), {})[r["emotion"].decode()] = r
    missing = [s for s, clips in out.items() if "neutral" not in clips]
    if missing:
        raise ValueError(f"{data_dir}/{name}: test speakers {missing} have no neutral clip to take the portrait from")
    return out


def run_dataset(run_dir: str | pathlib.Path) -> tuple[str, str]:
    """``(data_dir, name)`` the run's stage 2 was trained on (``RUN/stage2/config.json``)."""
    path = pathlib.Path(run_dir) / "stage2" / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found; pass --data_dir and --dataset, or a run directory with a finished stage2")
    data = json.loads(path.read_text()).get("data", {})
    if not data.get("data_dir") or not data.get("name"):
        raise ValueError(f"{path}: data.data_dir / data.name are not set; pass --data_dir and --dataset")
    return data["data_dir"], data["name"]


def cached_reader(path: str | pathlib.Path, size: int, steps: int):
    """The expression reader at ``path`` (a ``save_reader`` file), trained and saved there first if absent."""
    from moee_jax.eval.reader import load_reader, save_reader, train_reader

    path = pathlib.Path(path)
    if path.is_file():
        reader = load_reader(path)
        if reader.size == size:
            return reader
    reader = train_reader(size, steps=steps)
    save_reader(reader, path)
    return reader


def _resize(frame: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(frame).resize((size, size), Image.Resampling.BOX))


def evaluate_run(
    run_dir: str | pathlib.Path,
    reader,
    *,
    data_dir: str | pathlib.Path | None = None,
    dataset: str | None = None,
    settings: EvalSettings | None = None,
    videos_dir: str | pathlib.Path | None = None,
    sheet_path: str | pathlib.Path | None = None,
    speakers: Sequence[str] | None = None,
) -> dict:
    """Animate and score the held-out clips; returns a :func:`metrics.summarize` dict plus
    ``speech_only`` (accuracy of speech-derived emotion), ``held_out_identities`` and ``seconds``.

    ``videos_dir``: also write every clip as ``<speaker>_<emotion>.mp4`` (+ JSON sidecar);
    ``sheet_path``: a contact sheet of the first speaker (rows = emotions, columns = frames).
    """
    from moee_jax.inference.animate import Animator, save_animation
    from moee_jax.inference.inputs import InputError, Speech, parse_emotion

    t0 = time.perf_counter()
    settings = settings or EvalSettings()
    if data_dir is None or dataset is None:
        data_dir, dataset = run_dataset(run_dir)
    animator = Animator.from_run(run_dir)
    size = int(animator.config.video.image_size[0])
    if reader.size != size:
        raise ValueError(f"the reader reads {reader.size}² frames but {run_dir} generates {size}²")
    fps = float(animator.config.video.fps)
    tests = held_out_clips(data_dir, dataset)
    try:
        animator.check_emotion(parse_emotion(emotion_from_audio=True))
        takes_speech_emotion = True
    except InputError:
        takes_speech_emotion = False
    speakers = sorted(tests) if speakers is None else list(speakers)
    videos = pathlib.Path(videos_dir) if videos_dir is not None else None
    if videos is not None:
        videos.mkdir(parents=True, exist_ok=True)

    def render(speaker, tag, spec, record):
        portrait = _resize(schema.decode_frames(tests[speaker]["neutral"]["frames"], [0])[0], size)
        audio = np.asarray(record["audio"], np.float32)
        speech = Speech(audio, pathlib.Path(f"{speaker}/{record['id'].decode()}"))
        anim = animator.animate(
            portrait, speech, spec, steps=settings.steps, sampler=settings.sampler, guidance=dict(settings.guidance),
            seed=settings.seed, detect=False,
        )  # fmt: skip
        if videos is not None:
            save_animation(anim, videos / f"{speaker}_{tag}.mp4")
        return anim.frames, reader.predict(anim.frames), audio

    probs, targets, aus, compounds, sync, identity = [], [], [], [], [], []
    speech_probs, speech_targets = [], []
    sheet: list[tuple[str, np.ndarray]] = []
    for speaker in speakers:
        clips = tests[speaker]
        truth = np.asarray(clips["neutral"]["identity"], np.float32)
        for emotion in schema.CLASSES:
            frames, pred, audio = render(speaker, emotion, parse_emotion(emotion), clips["neutral"])
            probs.append(pred["probs"])
            targets.append(emotion)
            aus.append(M.au_error(pred["aus"], synthetic.resolve_emotion(emotion, 1.0)[2]))
            sync.append(M.lip_sync(pred["mouth"], audio, fps))
            identity.append(M.identity_error(pred["identity"], truth))
            if speaker == speakers[0]:
                sheet.append((emotion, frames))
        for compound, spec in settings.compounds.items():
            frames, pred, audio = render(speaker, compound, parse_emotion(spec), clips["neutral"])
            compounds.append(M.compound_components(pred["aus"], compound, probs=pred["probs"]))
            sync.append(M.lip_sync(pred["mouth"], audio, fps))
            identity.append(M.identity_error(pred["identity"], truth))
            if speaker == speakers[0]:
                sheet.append((compound, frames))
        if takes_speech_emotion:
            for emotion in settings.speech_only_emotions:
                if emotion not in clips:
                    continue
                _, pred, _ = render(speaker, f"speech_{emotion}", parse_emotion(emotion_from_audio=True), clips[emotion])
                speech_probs.append(pred["probs"])
                speech_targets.append(emotion)

    summary = M.summarize(emotion=M.emotion_accuracy(probs, targets), action_units=aus, compounds=compounds, lip_sync=sync,
                          identity=identity)  # fmt: skip
    if speech_probs:
        speech = M.emotion_accuracy(speech_probs, speech_targets)
        summary["speech_only"] = {k: v for k, v in speech.items() if k != "predictions"}
        summary["headline"]["speech_only_accuracy"] = speech["accuracy"]
    summary["held_out_identities"] = speakers
    summary["settings"] = dataclasses.asdict(settings)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    if sheet_path is not None:
        contact_sheet(sheet, sheet_path)
    return summary


def contact_sheet(rows: Sequence[tuple[str, np.ndarray]], path: str | pathlib.Path, columns: int = 8) -> None:
    """Rows = emotions, columns = ``columns`` frames evenly spaced over each clip ``(F, S, S, 3)``."""
    if not rows:
        return
    tiles = []
    for _, frames in rows:
        idx = np.linspace(0, len(frames) - 1, columns).round().astype(int)
        tiles.append(np.concatenate([frames[i] for i in idx], axis=1))
    Image.fromarray(np.concatenate(tiles, axis=0)).save(path)
