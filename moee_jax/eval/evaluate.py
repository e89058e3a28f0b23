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
from collections.abc import Callable, Sequence

import jax
import numpy as np
from PIL import Image

from moee_jax.data import schema, synthetic
from moee_jax.data.pipeline import resize_frames
from moee_jax.emotions import palette_name, parse_palette
from moee_jax.eval import metrics as M


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """How the held-out clips are generated. The defaults are the CPU demo's (``configs/demo.py``)."""

    steps: int = 5
    sampler: str = "dpmpp_2m"
    guidance: dict = dataclasses.field(default_factory=lambda: {"reference": 1.0, "audio": 4.0, "emotion": 3.0})
    compounds: dict = dataclasses.field(
        default_factory=lambda: {"happily_surprised": "happy:0.5,surprised:0.5", "sadly_fearful": "sad:0.5,fearful:0.5"}
    )
    speech_only_emotions: tuple[str, ...] = ("anger", "sadness")
    seed: int = 0
    motion: str = "chain"  # where clips after the first take their motion frames (moee_jax.inference.long_audio)

    @classmethod
    def from_config(cls, c, seed: int = 0) -> EvalSettings:
        """From a ``configs/demo.py`` ``animate`` block."""
        return cls(
            steps=int(c.steps), sampler=str(c.sampler), guidance=dict(c.guidance), compounds=dict(c.compounds),
            speech_only_emotions=tuple(c.speech_only_emotions), seed=seed, motion=str(c.get("motion", "chain")),
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
    """``(data_dir, name)`` the run's stage 2 was trained on (``RUN/stage2/config.json``), or its
    held-out split alone (``<name>_heldout``, what ``moee demo`` builds to score a shipped
    checkpoint: the same ``test`` identities and seeds) where only that one was built."""
    path = pathlib.Path(run_dir) / "stage2" / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found; pass --data_dir and --dataset, or a run directory with a finished stage2")
    data = json.loads(path.read_text()).get("data", {})
    if not data.get("data_dir") or not data.get("name"):
        raise ValueError(f"{path}: data.data_dir / data.name are not set; pass --data_dir and --dataset")
    data_dir, name = data["data_dir"], data["name"]
    if not (pathlib.Path(data_dir) / name).exists() and (pathlib.Path(data_dir) / f"{name}_heldout").exists():
        name = f"{name}_heldout"
    return data_dir, name


def cached_reader(path: str | pathlib.Path, size: int, steps: int, *, render_size: int | None = None, blend_fraction: float = 0.4,
                  augment=None):  # fmt: skip
    """The expression reader at ``path`` (a ``save_reader`` file) when it reads ``size``² frames drawn
    at ``render_size`` (default ``size``) and was trained for ``steps`` with the training-frame
    degradations ``augment`` (:class:`~moee_jax.eval.reader.Augment` fields as a dict or ``ConfigDict``, None for none); else one
    trained (``steps``, ``blend_fraction``, ``augment``) and saved there."""
    from moee_jax.eval.reader import Augment, load_reader, save_reader, train_reader

    path = pathlib.Path(path)
    render_size = int(render_size or size)
    wanted = Augment.from_dict(augment)
    if path.is_file():
        reader = load_reader(path)
        trained = int(reader.info.get("steps", steps))
        had = Augment.from_dict(reader.info.get("augment"))
        if reader.size == size and int(reader.info.get("render_size", reader.size)) == render_size and trained == steps and had == wanted:
            return reader
    reader = train_reader(size, steps=steps, render_size=render_size, blend_fraction=blend_fraction, augment=wanted)
    save_reader(reader, path)
    return reader


def dataset_frame_size(data_dir: str | pathlib.Path, name: str) -> int:
    """The stored frame side of a dataset's held-out split: what the reader's training frames are drawn at."""
    from moee_jax.data.pipeline import open_source

    source = open_source(data_dir, name, "test")
    return int(schema.decode_frames(source[0]["frames"], [0]).shape[1])


def resize_frame(frame: np.ndarray, size: int) -> np.ndarray:
    return resize_frames(frame[None], size)[0]


def compound_record(clips: dict[str, dict], spec: str) -> dict | None:
    """The held-out ground-truth clip of a compound palette ``spec`` (stored under its canonical
    name, :func:`moee_jax.emotions.palette_name`), or None when the test split has none."""
    return clips.get(palette_name(parse_palette(spec)))


def component_alone_judgements(basic_aus: dict[str, np.ndarray], compound: str) -> list[dict]:
    """:func:`~moee_jax.eval.metrics.compound_components` of ``compound`` on the clips that show one
    of its components alone (``basic_aus``: class → that clip's read AUs ``(F, 11)``; missing
    components are skipped): the instrument's false alarms, which must stay near 0."""
    parts = synthetic.COMPOUND_EMOTIONS[compound]
    return [M.compound_components(basic_aus[e], compound) for e in parts if e in basic_aus]


def ground_truth_ceiling(
    reader,
    tests: dict[str, dict[str, dict]],
    size: int,
    settings: EvalSettings,
    *,
    round_trip: Callable[[np.ndarray], np.ndarray] | None = None,
    speakers: Sequence[str] | None = None,
    fps: float = 25.0,
    labelled: bool = False,
) -> dict:
    """The instrument's ceiling: every metric of :func:`evaluate_run` on the held-out *ground-truth*
    clips, seen as the model sees them — area-shrunk to the model's ``size`` and, with
    ``round_trip`` (frames ``(F, S, S, 3)`` uint8 → the same, e.g. the run's latent encode/decode),
    through the latent space. A generated number can only be read against this one: no model scores
    better than the reader does on the truth.

    Basic emotions: the identity's own test clip of each class; compounds: its clip of each palette
    of ``settings.compounds`` (missing ones are skipped and listed under ``missing``). These speak
    with their own voice, whose prosody may carry the emotion too.

    ``labelled``: instead, the ground truth of exactly what the labelled and compound evaluation
    clips ask for — the identity showing each emotion while saying its *neutral* clip's words with
    the neutral voice (:func:`~moee_jax.data.builders.synthetic_talking_faces.speech_matched_clip`,
    drawn anew at the dataset's frame size; datasets it cannot redraw list every clip as missing).
    """
    speakers = sorted(tests) if speakers is None else list(speakers)
    judged, missing = [], []
    for speaker in speakers:
        clips = tests[speaker]
        truth = np.asarray(clips["neutral"]["identity"], np.float32)

        def truth_of(emotion: str, spec: str | None = None, clips=clips):
            """``(frames (F, S, S, 3), audio)`` of the ground truth, or None."""
            if labelled:
                from moee_jax.data.builders.synthetic_talking_faces import speech_matched_clip

                clip = speech_matched_clip(clips["neutral"], spec or emotion, 0.0 if emotion == schema.NEUTRAL else 1.0)
                return None if clip is None else (clip.frames, clip.audio)
            record = clips.get(emotion) if spec is None else compound_record(clips, spec)
            return None if record is None else (schema.decode_frames(record["frames"]), np.asarray(record["audio"], np.float32))

        wanted = [(emotion, None, "basic") for emotion in schema.CLASSES] + [(c, spec, "compound") for c, spec in settings.compounds.items()]
        for target, spec, kind in wanted:
            clip = truth_of(target, spec)
            if clip is None:
                missing.append(f"{speaker}/{spec or target}")
                continue
            frames = resize_frames(clip[0], size)
            if round_trip is not None:
                frames = round_trip(frames)
            judged.append(judge_clip(reader, frames, speaker=speaker, tag=target, kind=kind, target=target, audio=clip[1],
                                     identity=truth, fps=fps))  # fmt: skip
    summary = summarize_judgements(judged)
    if missing:
        summary["missing"] = missing
    return summary


FRESH_IDENTITY_SEEDS = range(50_000, 50_024)  # outside every split and the reader's training seeds


def fresh_identity_ceiling(
    reader,
    seeds: Sequence[int] = FRESH_IDENTITY_SEEDS,
    *,
    compounds: dict[str, str] | None = None,
    voice: str = "own",
    render_size: int = 64,
    num_frames: int = 50,
    fps: float = 25.0,
) -> dict:
    """The reader's ceiling on ground truth of identities it never saw, many more than a held-out split.

    :func:`ground_truth_ceiling` reads the test split's few identities (8 in the demo: one compound
    clip in eight moves its rate by 0.125); this draws, for each identity seed in ``seeds``, the
    seven classes at full intensity and each palette of ``compounds`` (default: those of
    :class:`EvalSettings`), ``num_frames`` frames at ``render_size`` area-shrunk to the reader's
    size, as the model's frames are. ``voice``: ``own`` (the face's emotion in its prosody) or
    ``neutral`` (emotion-neutral speech, the label the only cue, as in the labelled evaluation);
    the speech seed is the identity seed, so one identity says the same words in every clip.

    Returns :func:`summarize_judgements` (the columns of ``metrics.json``; per compound under
    ``compounds.per_compound``) plus ``missed_aus`` (``"compound/component/AU" → clips`` in
    which that characteristic AU was read below its required level, most first): what a better
    reader has to see.
    """
    if voice not in ("own", "neutral"):
        raise ValueError(f"voice must be 'own' or 'neutral', got {voice!r}")
    compounds = EvalSettings().compounds if compounds is None else compounds
    speech = schema.NEUTRAL if voice == "neutral" else None
    wanted = [("basic", c, c) for c in schema.CLASSES] + [("compound", name, spec) for name, spec in compounds.items()]
    judged = []
    for seed in seeds:
        for kind, target, emotion in wanted:
            intensity = 0.0 if emotion == schema.NEUTRAL else 1.0
            clip = synthetic.generate_clip(int(seed), emotion, intensity, seed=int(seed), num_frames=num_frames, fps=fps,
                                           size=render_size, speech_emotion=speech)  # fmt: skip
            judged.append(judge_clip(reader, resize_frames(clip.frames, reader.size), speaker=f"id{seed}", tag=target, kind=kind,
                                     target=target, audio=clip.audio, identity=np.asarray(schema.identity_vector(clip.identity), np.float32),
                                     fps=fps))  # fmt: skip
    summary = summarize_judgements(judged)
    missed: dict[str, int] = {}
    for j in judged:
        if j["kind"] != "compound":
            continue
        for emotion, part in j["compound"]["components"].items():
            for au, unit in part["aus"].items():
                if not unit["active"]:
                    key = f"{j['target']}/{emotion}/{au}"
                    missed[key] = missed.get(key, 0) + 1
    summary["missed_aus"] = dict(sorted(missed.items(), key=lambda kv: -kv[1]))
    return summary


@dataclasses.dataclass
class EvalItem:
    """One video to generate and score.

    ``kind``: ``basic`` (``tag`` is the target class), ``compound`` (``tag`` a compound name of
    :data:`~moee_jax.data.synthetic.COMPOUND_EMOTIONS`) or ``speech`` (speech-only; ``target`` the
    class its speech carries). ``portrait (S, S, 3)`` uint8 at the model's size; ``speech`` the
    record whose audio drives the video; ``identity (24,)`` the portrait's true identity vector.
    """

    speaker: str
    tag: str
    kind: str
    spec: object  # an inference.inputs.EmotionSpec
    portrait: np.ndarray
    speech: dict
    identity: np.ndarray
    target: str = ""


def held_out_items(tests: dict[str, dict[str, dict]], size: int, settings: EvalSettings, speakers: Sequence[str], *,
                   speech_only: bool = True) -> list[EvalItem]:  # fmt: skip
    """The evaluation's videos: every speaker's neutral frame with its neutral speech for each class
    and each compound palette of ``settings``, and (``speech_only``) with its emotional speech alone."""
    from moee_jax.inference.inputs import parse_emotion

    items = []
    for speaker in speakers:
        clips = tests[speaker]
        portrait = resize_frame(schema.decode_frames(clips["neutral"]["frames"], [0])[0], size)
        truth = np.asarray(clips["neutral"]["identity"], np.float32)
        for emotion in schema.CLASSES:
            items.append(EvalItem(speaker, emotion, "basic", parse_emotion(emotion), portrait, clips["neutral"], truth, emotion))
        for compound, spec in settings.compounds.items():
            items.append(EvalItem(speaker, compound, "compound", parse_emotion(spec), portrait, clips["neutral"], truth, compound))
        if speech_only:
            for emotion in settings.speech_only_emotions:
                if emotion in clips:
                    items.append(EvalItem(speaker, f"speech_{emotion}", "speech", parse_emotion(emotion_from_audio=True), portrait,
                                          clips[emotion], truth, emotion))  # fmt: skip
    return items


def render_items(animator, items: Sequence[EvalItem], settings: EvalSettings, *, batch_size: int = 16,
                 videos_dir: pathlib.Path | None = None, progress: Callable[[int, int], None] | None = None) -> list[np.ndarray]:  # fmt: skip
    """Every item's video ``(T, S, S, 3)`` uint8, ``batch_size`` at a time
    (:meth:`~moee_jax.inference.animator.Animator.render_jobs`); with ``videos_dir`` each is also
    written as ``<speaker>_<tag>.mp4`` (+ JSON sidecar)."""
    from moee_jax.inference.inputs import Speech
    from moee_jax.inference.job import Animation
    from moee_jax.inference.outputs import save_animation

    def job_of(item):
        record = item.speech
        speech = Speech(np.asarray(record["audio"], np.float32), pathlib.Path(f"{item.speaker}/{schema.text_field(record['id'])}"))
        return animator.prepare(item.portrait, speech, item.spec, steps=settings.steps, sampler=settings.sampler,
                                guidance=dict(settings.guidance), seed=settings.seed, detect=False,
                                motion=settings.motion)  # fmt: skip

    videos: dict[int, np.ndarray] = {}
    # Jobs whose inputs have the same structure and clip count render together, whatever the kind of
    # emotion request (a label, a palette and speech alone differ only in values): one compiled
    # sampler per batch size.
    all_jobs = [job_of(item) for item in items]
    groups: dict[tuple, list[int]] = {}
    for i, job in enumerate(all_jobs):
        groups.setdefault((jax.tree_util.tree_structure(job.emotion), job.plan.num_clips), []).append(i)
    done = 0
    for indices in groups.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            jobs = [all_jobs[i] for i in chunk]
            for i, job, frames in zip(chunk, jobs, animator.render_jobs(jobs)):
                videos[i] = frames
                if videos_dir is not None:
                    item = items[i]
                    meta = dict(job.settings, warnings=job.warnings)
                    save_animation(Animation(frames, job.speech.wave, animator.fps, job.portrait, job.plan, meta, job.warnings),
                                   pathlib.Path(videos_dir) / f"{item.speaker}_{item.tag}.mp4")  # fmt: skip
            done += len(chunk)
            if progress is not None:
                progress(done, len(items))
    return [videos[i] for i in range(len(items))]


def judge_clip(reader, frames: np.ndarray, *, speaker: str, tag: str, kind: str, target: str, audio: np.ndarray | None,
               identity: np.ndarray | None, fps: float) -> dict:  # fmt: skip
    """One video ``(F, S, S, 3)`` read once and judged on its own: ``speaker``, ``tag``, ``kind``
    (``basic`` | ``compound`` | ``speech``), ``target``, the reader's ``aus (F, 11)`` and ``probs
    (F, 7)``; ``predicted`` (the class of the mean probability, as :func:`metrics.emotion_accuracy`
    takes it) for basic and speech clips; ``action_units`` (:func:`metrics.au_error`) for basic
    clips; ``compound`` (:func:`metrics.compound_components`) for compound clips; ``lip_sync``
    (against ``audio``) and ``identity`` (against the true identity vector ``identity (24,)``) for
    every basic or compound clip."""
    pred = reader.predict(frames)
    j = {"speaker": speaker, "tag": tag, "kind": kind, "target": target, "aus": pred["aus"], "probs": pred["probs"]}
    if kind in ("basic", "speech"):
        j["predicted"] = M.CLASSES[int(np.argmax(np.asarray(pred["probs"]).mean(0)))]
    if kind == "basic":
        j["action_units"] = M.au_error(pred["aus"], synthetic.resolve_emotion(target, 1.0)[2])
    elif kind == "compound":
        j["compound"] = M.compound_components(pred["aus"], target, probs=pred["probs"])
    if kind != "speech":
        j["lip_sync"] = M.lip_sync(pred["mouth"], np.asarray(audio, np.float32), fps)
        j["identity"] = M.identity_error(pred["identity"], identity)
    return j


def judge_items(reader, items: Sequence[EvalItem], videos: Sequence[np.ndarray], fps: float) -> list[dict]:
    """:func:`judge_clip` of each item's rendered video, driven by its speech. :func:`score_items`
    sums these up; paired comparisons of two renders of the same items
    (:mod:`moee_jax.eval.paired`) read them clip by clip."""
    return [judge_clip(reader, frames, speaker=item.speaker, tag=item.tag, kind=item.kind, target=item.target,
                       audio=item.speech["audio"], identity=item.identity, fps=fps)
            for item, frames in zip(items, videos)]  # fmt: skip


def summarize_judgements(judged: Sequence[dict]) -> dict:
    """A :func:`metrics.summarize` dict of :func:`judge_clip` results (speech clips are left out):
    emotion accuracy and AU error of the basic clips, compounds, lip sync and identity of the basic
    and compound clips, and the compound check's false alarms — the basic clips of each compound's
    components (same speaker) judged as that compound."""
    basic = [j for j in judged if j["kind"] == "basic"]
    compounds = [j for j in judged if j["kind"] == "compound"]
    scored = [j for j in judged if j["kind"] != "speech"]
    basic_aus: dict[str, dict[str, np.ndarray]] = {}  # speaker → class → read AUs
    for j in basic:
        basic_aus.setdefault(j["speaker"], {})[j["target"]] = j["aus"]
    false_positives = []
    for j in compounds:
        false_positives += component_alone_judgements(basic_aus.get(j["speaker"], {}), j["target"])
    emotion = M.emotion_accuracy([j["probs"] for j in basic], [j["target"] for j in basic]) if basic else None
    return M.summarize(emotion=emotion, action_units=[j["action_units"] for j in basic], compounds=[j["compound"] for j in compounds],
                       compound_false_positives=false_positives, lip_sync=[j["lip_sync"] for j in scored],
                       identity=[j["identity"] for j in scored])  # fmt: skip


def score_items(reader, items: Sequence[EvalItem], videos: Sequence[np.ndarray], fps: float, *,
                judged: Sequence[dict] | None = None) -> dict:  # fmt: skip
    """A :func:`metrics.summarize` dict of rendered ``videos`` (one per item), plus ``label_effect``
    (mean absolute pixel change, 0–255, of each basic emotion's video against the neutral video of the
    same speaker, portrait, speech and noise) and ``speech_only`` where there are speech items. The
    basic clips of each compound's components are also judged as that compound (its false alarms,
    ``compounds.false_positive_rate``). ``judged``: the items' :func:`judge_items`, when already read."""
    judged = judge_items(reader, items, videos, fps) if judged is None else judged
    neutral = {it.speaker: v for it, v in zip(items, videos) if it.kind == "basic" and it.tag == schema.NEUTRAL}
    label_effect = [float(np.abs(frames.astype(np.float32) - neutral[item.speaker].astype(np.float32)).mean())
                    for item, frames in zip(items, videos)
                    if item.kind == "basic" and item.target != schema.NEUTRAL and item.speaker in neutral]  # fmt: skip
    summary = summarize_judgements(judged)
    speech = [j for j in judged if j["kind"] == "speech"]
    if label_effect:
        summary["label_effect"] = {"mean_abs_pixel_change": float(np.mean(label_effect)), "num_clips": len(label_effect),
                                   "units": "0-255, each emotion's video against the neutral one, same portrait, speech and noise"}  # fmt: skip
        summary["headline"]["label_pixel_change"] = summary["label_effect"]["mean_abs_pixel_change"]
    if speech:
        result = M.emotion_accuracy([j["probs"] for j in speech], [j["target"] for j in speech])
        summary["speech_only"] = {k: v for k, v in result.items() if k != "predictions"}
        summary["headline"]["speech_only_accuracy"] = result["accuracy"]
    return summary


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
    animator=None,
    batch_size: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Animate and score the held-out clips; returns a :func:`metrics.summarize` dict plus
    ``ceiling`` (the same metrics on the ground truth: :func:`ground_truth_ceiling`, through the
    resize and, unless the autoencoder is lossless, ``ceiling_round_trip`` through the run's latent
    round trip), ``ceiling_labelled`` (the ground truth of exactly what the labelled and compound
    clips ask for: each emotion saying the neutral clip's words with the neutral voice, where the
    dataset's generator can redraw it), ``label_effect`` (the mean pixel change when only the label changes, see
    :func:`score_items`), ``speech_only`` (accuracy of speech-derived emotion),
    ``held_out_identities`` and ``seconds``.

    Labelled and compound clips are driven by the identity's *neutral* clip's speech, and the model
    takes their emotion from the label alone (the speech source dropped, as in training's label
    mode): the label is what must carry the emotion. Videos are rendered ``batch_size`` at a time;
    ``animator`` reuses a loaded one.

    ``videos_dir``: also write every clip as ``<speaker>_<emotion>.mp4`` (+ JSON sidecar);
    ``sheet_path``: a contact sheet of the first speaker (rows = emotions, columns = frames).
    """
    from moee_jax.inference.animator import Animator
    from moee_jax.inference.inputs import InputError, parse_emotion

    t0 = time.perf_counter()
    settings = settings or EvalSettings()
    if data_dir is None or dataset is None:
        data_dir, dataset = run_dataset(run_dir)
    animator = animator if animator is not None else Animator.from_run(run_dir)
    size = animator.size
    if reader.size != size:
        raise ValueError(f"the reader reads {reader.size}² frames but {run_dir} generates {size}²")
    tests = held_out_clips(data_dir, dataset)
    try:
        animator.check_emotion(parse_emotion(emotion_from_audio=True))
        takes_speech_emotion = True
    except InputError:
        takes_speech_emotion = False
    speakers = sorted(tests) if speakers is None else list(speakers)
    videos_path = pathlib.Path(videos_dir) if videos_dir is not None else None
    if videos_path is not None:
        videos_path.mkdir(parents=True, exist_ok=True)

    items = held_out_items(tests, size, settings, speakers, speech_only=takes_speech_emotion)
    videos = render_items(animator, items, settings, batch_size=batch_size, videos_dir=videos_path, progress=progress)
    summary = score_items(reader, items, videos, animator.fps)
    summary["ceiling"] = ground_truth_ceiling(reader, tests, size, settings, speakers=speakers, fps=animator.fps)
    if not animator.lossless_latents:
        summary["ceiling_round_trip"] = ground_truth_ceiling(reader, tests, size, settings, speakers=speakers, fps=animator.fps,
                                                             round_trip=animator.round_trip)  # fmt: skip
    summary["ceiling_labelled"] = ground_truth_ceiling(reader, tests, size, settings, speakers=speakers, fps=animator.fps,
                                                       labelled=True)  # fmt: skip
    summary["held_out_identities"] = speakers
    summary["settings"] = dataclasses.asdict(settings)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    if sheet_path is not None:
        contact_sheet([(it.tag, v) for it, v in zip(items, videos) if it.speaker == speakers[0] and it.kind != "speech"], sheet_path)
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
