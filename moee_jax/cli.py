"""The ``moee`` command: ``moee <subcommand> [--flags]``; each subcommand is a thin wrapper over a
library function. ``moee <subcommand> --help`` lists its flags.

  convert   SD1.5 (diffusers folders) + AnimateDiff motion weights → Orbax parameter checkpoint
  demo      train MoEE on synthetic talking faces, animate held-out people, score them (no weights needed)
  train     one training stage (vae | embedder | stage1 | stage2) on a TFDS dataset, sharded, resumable
  prepare   real videos (manifest CSV or MEAD tree) → face-cropped clips → talking_face_clips TFDS dataset
  features  a dataset's wav2vec2 audio and T5 text features, computed once into a cache (data.features)
  animate   portrait + speech + emotion → talking-head MP4 with the speech muxed in (or a manifest CSV of them)
  eval      score a run on held-out synthetic identities (emotion, AUs, compounds, lip sync, identity)
  ablate    train and score MoEE's stage-2 ablations from a run's stage 1; prints the paper-form table
  ladder    the diagnostic ladder of a run: instrument ceiling → overfit one clip → … → held-out, pass / fail
  serve     a web page (Gradio) to animate portraits with a run's model, on 127.0.0.1
  verify    check a run's checkpoints: each stage's export against its checksums, each training checkpoint read
  analyze   latent-space analysis of a run: clustering strength, PCA / t-SNE, gates, interpolations
"""

from __future__ import annotations

import contextlib
import logging
import pathlib
import re
import shutil
import sys
import time

from absl import app, flags
from ml_collections import config_flags

# The configs shipped with the package (the repository's configs/): `--config stage1.py:tiny`,
# `--config configs/stage1.py:tiny` and a path of one's own all work from any folder.
CONFIGS = pathlib.Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = "backbone.py:tiny"


def resolve_config(spec: str) -> str:
    """``FILE[:variant]`` with ``FILE`` as given when it exists, else the shipped config of that name."""
    path, sep, variant = spec.partition(":")
    if pathlib.Path(path).exists() or not path.endswith(".py"):
        return spec
    shipped = CONFIGS / pathlib.Path(path).name
    return f"{shipped}{sep}{variant}" if shipped.exists() else spec


def _config_flag(default: str = DEFAULT_CONFIG):
    return config_flags.DEFINE_config_file(
        "config", resolve_config(default), "Config file and variant, e.g. stage1.py:tiny or configs/backbone.py:sd15."
    )


def _log_file(path) -> contextlib.AbstractContextManager:
    """The command's full log in ``path`` (:func:`moee_jax.console.log_to`); none for a gs:// run."""
    from moee_jax import console

    return contextlib.nullcontext() if str(path).startswith("gs://") else console.log_to(path)


def _convert() -> None:
    config = _config_flag("backbone.py:sd15")
    unet = flags.DEFINE_string("unet", None, "diffusers U-Net folder (…/unet) or .safetensors file.", required=True)
    vae = flags.DEFINE_string("vae", None, "diffusers VAE folder (…/vae) or .safetensors file.")
    motion = flags.DEFINE_string("motion_adapter", None, "AnimateDiff motion adapter folder or .safetensors file.")
    out = flags.DEFINE_string("out", None, "Output checkpoint directory (must not exist yet).", required=True)
    allow_pickle = flags.DEFINE_bool("allow_pickle", False, "Also read pickle files (.bin/.ckpt/.pt): only from trusted sources.")

    def main(argv):
        del argv
        from moee_jax import checks

        try:  # before any weights are read
            if pathlib.Path(out.value).exists() and (not pathlib.Path(out.value).is_dir() or any(pathlib.Path(out.value).iterdir())):
                raise checks.UsageError(f"--out {out.value}: exists and is not empty; choose a new directory")
            checks.writable_location(out.value, "--out", kind="folder", min_free_mb=1024)
            for flag, value in (("--unet", unet.value), ("--vae", vae.value), ("--motion_adapter", motion.value)):
                if value is not None and not pathlib.Path(value).exists():
                    raise checks.UsageError(f"{flag} {value}: no such file or folder")
        except checks.UsageError as e:
            sys.exit(f"moee convert: {e}")
        from moee_jax.checkpoint.convert.backbone import convert_backbone
        from moee_jax.checkpoint.convert.state_dict import ConversionError

        try:
            meta = convert_backbone(
                config.value, out.value, unet=unet.value, vae=vae.value, motion_adapter=motion.value, allow_pickle=allow_pickle.value
            )
        except (ConversionError, FileNotFoundError, FileExistsError) as e:
            sys.exit(f"moee convert: {e}")
        print(f"wrote {out.value}")
        for part, modules in meta["initialised"].items():
            if modules:
                print(f"  {part}: {len(modules)} module(s) not in the sources, freshly initialised, e.g. {modules[0]}")

    return main


def _demo() -> None:
    config = _config_flag("demo.py:cpu")
    out = flags.DEFINE_string("out", "outputs/demo", "Output directory (re-runs reuse its data, stages and reader).")
    scratch = flags.DEFINE_bool("from_scratch", False, "Train every stage and the reader instead of scoring the shipped checkpoint.")
    checkpoint = flags.DEFINE_string("checkpoint", None, "Score this run directory instead of the config's shipped checkpoint.")

    def main(argv):
        del argv
        from moee_jax import checks
        from moee_jax.demo import DemoError, run_demo

        try:
            checks.writable_location(out.value, "--out", kind="folder", min_free_mb=500)
        except checks.UsageError as e:
            sys.exit(f"moee demo: {e}")
        try:
            summary = run_demo(config.value, out.value, from_scratch=scratch.value, checkpoint=checkpoint.value)
        except DemoError as e:
            sys.exit(f"moee demo: {e}")
        head, ceiling = summary.get("headline", {}), summary.get("ceiling", {}).get("headline", {})
        print(f"wrote {out.value} (generated, ceiling = the reader on the ground truth as the model sees it):")
        for k, v in head.items():
            if isinstance(v, float):
                print(f"  {k:28s} {v:7.3f}" + (f"   ceiling {ceiling[k]:.3f}" if isinstance(ceiling.get(k), float) else ""))
        print(f"total {summary['timings_s']['total']} s; see {out.value}/metrics.md")

    return main


def _prepare() -> None:
    input_ = flags.DEFINE_string(
        "input", None, "Manifest .csv, or a folder of videos (with --manifest, --mead, or its own manifest.csv).", required=True
    )
    manifest = flags.DEFINE_string(
        "manifest", None, "Manifest CSV (path, speaker, emotion[, intensity, text, split]) for the --input folder."
    )
    mead = flags.DEFINE_bool("mead", False, "--input is a MEAD tree (<speaker>/video/front/<emotion>/level_<n>/<NNN>.mp4).")
    out = flags.DEFINE_string("out", None, "Prepared-clips folder (re-running resumes; report.json lists every video).", required=True)
    data_dir = flags.DEFINE_string("data_dir", None, "TFDS data dir to build talking_face_clips (ArrayRecord) into; unset: only prepare.")
    size = flags.DEFINE_integer("size", 512, "Side of the square face crops, in pixels.")
    landmark_model = flags.DEFINE_string(
        "landmark_model", None, "MediaPipe face_landmarker.task for videos without a <stem>.landmarks.npz sidecar."
    )
    workers = flags.DEFINE_integer("workers", 1, "Videos prepared in parallel (processes).")
    min_frames = flags.DEFINE_integer("min_frames", 25, "Shortest clip kept, in frames at 25 fps.")
    margin = flags.DEFINE_float("margin", 1.6, "Crop side as a multiple of the face-oval box.")
    smooth_window = flags.DEFINE_integer(
        "smooth_window", 0, "0: one crop box per clip; n: a box following the face, averaged over n frames."
    )
    max_missing_face = flags.DEFINE_float("max_missing_face", 0.2, "Largest fraction of frames without a face that is interpolated over.")
    encoders = _encoder_flags("features")

    def main(argv):
        del argv
        if (encoders["audio_encoder"].value or encoders["text_encoder"].value) and data_dir.value is None:
            sys.exit("moee prepare: --audio_encoder / --text_encoder encode the built dataset; give --data_dir too")
        from moee_jax import checks
        from moee_jax.data.landmarks import LandmarkSetupError
        from moee_jax.data.manifest import ManifestError, load_inputs
        from moee_jax.data.prepare import PrepareSetupError, prepare_videos

        try:  # the flags first, then the inputs, before any video is read
            checks.number(size.value, "--size", minimum=8, integer=True)
            checks.number(workers.value, "--workers", minimum=1, integer=True)
            checks.number(min_frames.value, "--min_frames", minimum=1, integer=True)
            checks.number(margin.value, "--margin", minimum=1)
            checks.number(smooth_window.value, "--smooth_window", minimum=0, integer=True)
            checks.number(max_missing_face.value, "--max_missing_face", minimum=0, maximum=0.999)
            if landmark_model.value is not None:
                checks.input_file(landmark_model.value, "--landmark_model")
            checks.writable_location(out.value, "--out", kind="folder", min_free_mb=200)
            if data_dir.value is not None:
                checks.writable_location(data_dir.value, "--data_dir", kind="folder", min_free_mb=200)
        except checks.UsageError as e:
            sys.exit(f"moee prepare: {e}")
        fresh = not pathlib.Path(out.value).exists()
        try:
            inputs = load_inputs(input_.value, manifest=manifest.value, mead=mead.value)
            with _log_file(f"{out.value}/prepare.log"):
                report = prepare_videos(
                    inputs, out.value, size=size.value, landmark_model=landmark_model.value, min_frames=min_frames.value,
                    workers=workers.value, margin=margin.value, smooth_window=smooth_window.value,
                    max_missing_face=max_missing_face.value,
                )  # fmt: skip
        except (ManifestError, LandmarkSetupError, PrepareSetupError, ValueError) as e:
            sys.exit(f"moee prepare: {e}")
        if not report.done and not report.cached:  # nothing to show for it: say why, leave nothing behind
            reasons = [e.get("reason") or e.get("error", "") for e in report.skipped + report.failed]
            if fresh:
                shutil.rmtree(out.value, ignore_errors=True)
            first = f": {reasons[0]}" + (f" (and {len(reasons) - 1} more)" if len(reasons) > 1 else "") if reasons else ""
            sys.exit(f"moee prepare: no clip could be prepared from --input {input_.value}{first}")
        print(report.summary())
        if data_dir.value is None:
            return
        from moee_jax.data.builders.talking_face_clips import build

        try:
            builder = build(out.value, data_dir.value)
        except (FileNotFoundError, ValueError) as e:
            sys.exit(f"moee prepare: {e}")
        splits = ", ".join(f"{name} {info.num_examples}" for name, info in builder.info.splits.items())
        print(f"built {builder.info.full_name} ({splits} clips) in {builder.data_dir}")
        if encoders["audio_encoder"].value or encoders["text_encoder"].value:
            _build_features(encoders, data_dir.value, builder.name, list(builder.info.splits), "prepare")

    return main


def _encoder_flags(folder_flag: str) -> dict:
    """The flags of a feature-cache build; ``folder_flag`` names the cache folder's flag."""
    return {
        "audio_encoder": flags.DEFINE_string(
            "audio_encoder", None, "wav2vec2 folder (transformers layout, e.g. wav2vec2-base): audio features."
        ),
        "text_encoder": flags.DEFINE_string(
            "text_encoder", None, "T5 folder (transformers layout, e.g. t5-base): features of each clip's text."
        ),
        "text_length": flags.DEFINE_integer("text_length", 32, "T5 tokens per text (the config's data.text_length)."),
        "folder": flags.DEFINE_string(folder_flag, None, "Feature cache folder (default: DATA_DIR/features/DATASET)."),
    }


def _build_features(encoders: dict, data_dir: str, dataset: str, splits: list[str], command: str) -> None:
    """Encode ``splits`` of ``dataset`` into the feature cache (:mod:`moee_jax.data.feature_cache`)."""
    from moee_jax import console
    from moee_jax.data.feature_cache import FeatureCacheError, build_feature_cache, default_folder

    folder = encoders["folder"].value or str(default_folder(data_dir, dataset))
    try:
        for split in splits:
            with console.progress(None, f"features {split}", unit="clip") as bar:
                manifest = build_feature_cache(
                    data_dir, dataset, split, folder, audio_encoder=encoders["audio_encoder"].value,
                    text_encoder=encoders["text_encoder"].value, text_length=encoders["text_length"].value,
                    progress=console.bar_progress(bar),
                )  # fmt: skip
    except (FeatureCacheError, FileNotFoundError, ValueError) as e:
        sys.exit(f"moee {command}: {e}")
    done = ", ".join(f"{name} {entry['num_records']}" for name, entry in manifest["splits"].items())
    print(f"wrote the feature cache {folder} ({done} clips); train with --config.data.features={folder}")


def _features() -> None:
    data_dir = flags.DEFINE_string("data_dir", None, "TFDS data dir holding the dataset.", required=True)
    dataset = flags.DEFINE_string("dataset", "talking_face_clips", "TFDS name[/config], e.g. synthetic_talking_faces/tiny.")
    splits = flags.DEFINE_list("splits", ["train"], "Splits to encode.")
    encoders = _encoder_flags("out")

    def main(argv):
        del argv
        if not (encoders["audio_encoder"].value or encoders["text_encoder"].value):
            sys.exit("moee features: give --audio_encoder and/or --text_encoder")
        _build_features(encoders, data_dir.value, dataset.value, splits.value, "features")

    return main


def _train() -> None:
    config = _config_flag("stage1.py:tiny")
    run_dir = flags.DEFINE_string("run_dir", None, "Run directory (local path or gs://); every stage writes RUN/<stage>/.", required=True)
    max_steps = flags.DEFINE_integer("max_steps", None, "Stop after this many steps of this invocation (resume later).")

    def main(argv):
        del argv
        # Multi-host set-up must come before anything touches JAX's backends.
        from moee_jax import checks
        from moee_jax.configs import training as training_configs
        from moee_jax.train.distributed import initialize_distributed

        try:  # before anything is built or written
            training_configs.check(config.value)
            checks.number(max_steps.value, "--max_steps", minimum=1, integer=True)
            checks.writable_location(run_dir.value, "--run_dir", kind="folder")
        except checks.UsageError as e:
            sys.exit(f"moee train: {e}")
        info = initialize_distributed()
        from moee_jax.train.trainer import TrainingError, train

        log_path = f"{run_dir.value}/{config.value.stage}/train.log" if info.process_id == 0 else None
        try:
            with _log_file(log_path) if log_path else contextlib.nullcontext():
                result = train(config.value, run_dir.value, max_steps=max_steps.value)
        except (TrainingError, FileNotFoundError, ValueError) as e:
            sys.exit(f"moee train: {e}")
        state = "interrupted (SIGTERM), checkpoint saved" if result.interrupted else "done"
        if info.process_id == 0:
            print(
                f"{result.stage}: {state} at step {result.final_step}; {result.skipped_steps} non-finite step(s) skipped; "
                f"run directory {result.run_dir}; full log {log_path}"
            )

    return main


def _animate() -> None:
    checkpoint = flags.DEFINE_string("checkpoint", None, "Run directory of `moee train` holding a finished stage2.", required=True)
    image = flags.DEFINE_string("image", None, "Portrait photo (PNG/JPEG/...; RGBA composited on white, grayscale accepted).")
    audio = flags.DEFINE_string("audio", None, "Driving speech (WAV/FLAC/OGG/MP3, any rate and channel count).")
    out = flags.DEFINE_string("out", None, "Output .mp4 (settings go to the same name with .json).")
    emotion = flags.DEFINE_string("emotion", None, "Emotion label (happy) or compound palette (happy:0.6,surprised:0.4).")
    emotion_text = flags.DEFINE_string("emotion_text", None, "Emotion as a description (models with a text source; needs --text_encoder).")
    emotion_from_audio = flags.DEFINE_bool("emotion_from_audio", False, "Take the emotion from the speech itself (label dropped).")
    emotion_video = flags.DEFINE_string("emotion_video", None, "Reference clip of the emotion (DICE-Talk embedder models).")
    text_encoder = flags.DEFINE_string("text_encoder", None, "T5 encoder folder (transformers layout) for --emotion_text.")
    audio_encoder = flags.DEFINE_string(
        "audio_encoder", None, "wav2vec2 folder of a model trained on a feature cache (default: the one recorded in the run)."
    )
    steps = flags.DEFINE_integer("steps", None, "Sampler steps (default: the config's).")
    sampler = flags.DEFINE_enum("sampler", None, ["ddim", "dpmpp_2m"], "Sampler (default: the config's).")
    seed = flags.DEFINE_integer("seed", 0, "Noise seed.")
    cfg_reference = flags.DEFINE_float("cfg_reference", None, "Guidance scale of the reference image (default: the config's).")
    cfg_audio = flags.DEFINE_float("cfg_audio", None, "Guidance scale of the speech (default: the config's).")
    cfg_emotion = flags.DEFINE_float("cfg_emotion", None, "Guidance scale of the emotion (default: the config's).")
    frames_dir = flags.DEFINE_string("frames_dir", None, "Also write every frame as PNG into this new folder.")
    no_detect = flags.DEFINE_bool("no_detect", False, "The image is already a face crop: skip face detection.")
    paste_back = flags.DEFINE_bool("paste_back", False, "Paste the animated face back into the whole photo.")
    batch = flags.DEFINE_string("batch", None, "Manifest CSV (image, audio, emotion, out); bad rows are skipped and reported.")
    report = flags.DEFINE_string("report", None, "Batch report JSON (default: <manifest>.report.json).")

    def main(argv):
        del argv
        started = time.monotonic()
        from moee_jax import checks, console
        from moee_jax.checkpoint.run import RunError
        from moee_jax.inference.animator import Animator
        from moee_jax.inference.batch import animate_batch
        from moee_jax.inference.inputs import InputError, parse_emotion
        from moee_jax.inference.outputs import animate_to_file, check_outputs

        options = dict(
            steps=steps.value, sampler=sampler.value, seed=seed.value, detect=not no_detect.value,
            guidance={"reference": cfg_reference.value, "audio": cfg_audio.value, "emotion": cfg_emotion.value},
        )  # fmt: skip
        single = {"--image": image.value, "--audio": audio.value, "--out": out.value, "--emotion": emotion.value,
                  "--emotion_text": emotion_text.value, "--emotion_video": emotion_video.value,
                  "--emotion_from_audio": emotion_from_audio.value or None, "--frames_dir": frames_dir.value}  # fmt: skip
        try:
            try:
                checks.number(seed.value, "--seed", minimum=0, integer=True)
            except checks.UsageError as e:
                raise InputError(str(e)) from None
            if batch.value is not None:
                clash = [name for name, value in single.items() if value is not None]
                if clash:
                    raise InputError(f"--batch takes every input from the manifest; drop {', '.join(clash)}")
                animator = Animator.from_run(checkpoint.value, text_encoder=text_encoder.value, audio_encoder=audio_encoder.value)
                result = animate_batch(
                    animator, batch.value, report=report.value, paste=paste_back.value,
                    on_row=lambda line, entry: print(f"line {line}: " + (f"wrote {entry['out']}" if "out" in entry else f"skipped: {entry['error']}")),
                    **options,
                )  # fmt: skip
                if result["failed"] and not result["done"]:
                    first = result["failed"][0]
                    sys.exit(f"moee animate: every row of --batch {batch.value} failed, nothing written (line {first['line']}: "
                             f"{first['error']})")  # fmt: skip
                if result["failed"]:
                    sys.exit(f"moee animate: {len(result['failed'])} of {result['rows']} manifest rows failed; see {result['report']}")
                print(f"wrote {len(result['done'])} videos; report {result['report']}")
                return
            missing = [name for name in ("--image", "--audio", "--out") if single[name] is None]
            if missing:
                raise InputError(f"{', '.join(missing)} required (or --batch manifest.csv)")
            spec = parse_emotion(emotion.value, emotion_text=emotion_text.value, emotion_from_audio=emotion_from_audio.value,
                                 emotion_video=emotion_video.value)  # fmt: skip
            check_outputs(out.value, frames_dir.value)
            animator = Animator.from_run(checkpoint.value, text_encoder=text_encoder.value, audio_encoder=audio_encoder.value)
            with console.progress_callback("animate", unit="clip") as clips, console.progress_callback("write", unit="frame") as frames:
                animation = animate_to_file(
                    animator, image.value, audio.value, spec, out.value, frames_dir=frames_dir.value, paste=paste_back.value,
                    progress=clips, write_progress=frames, **options,
                )  # fmt: skip
            for warning in animation.warnings:
                print(f"moee animate: warning: {warning}", file=sys.stderr)
        except (InputError, RunError) as e:
            sys.exit(f"moee animate: {e}")
        print(
            f"wrote {out.value}: {animation.plan.num_frames} frames ({animation.settings['audio_seconds']:.2f} s) "
            f"in {time.monotonic() - started:.1f} s (sampling {animation.settings['seconds']:.1f} s)"
        )

    return main


def _eval_settings_flags():
    return {
        "steps": flags.DEFINE_integer("steps", 8, "Sampler steps per clip."),
        "sampler": flags.DEFINE_string("sampler", "ddim", "Sampler (ddim | dpmpp_2m)."),
        "seed": flags.DEFINE_integer("seed", 0, "Sampling seed."),
        "reader": flags.DEFINE_string(
            "reader",
            None,
            "Expression-reader file (moee_jax.eval.reader); trained and saved there if absent (default: RUN/reader.msgpack).",
        ),  # fmt: skip
        "reader_steps": flags.DEFINE_integer("reader_steps", 3000, "Training steps of a new reader."),
    }


def _check_eval_flags(f, command: str, **extra) -> None:
    """The sampler and reader flags of eval / ablate / ladder (and ``extra``: flag → (value, bounds
    or allowed names)), checked before the run is read; exits with the flag named."""
    from moee_jax import checks
    from moee_jax.diffusion import SAMPLERS

    try:
        checks.number(f["steps"].value, "--steps", minimum=1, integer=True)
        checks.one_of(f["sampler"].value, "--sampler", SAMPLERS)
        checks.number(f["seed"].value, "--seed", minimum=0, integer=True)
        checks.number(f["reader_steps"].value, "--reader_steps", minimum=1, integer=True)
        if f["reader"].value is not None and pathlib.Path(f["reader"].value).exists():
            checks.input_file(f["reader"].value, "--reader")
        for flag, (value, rule) in extra.items():
            if isinstance(rule, dict):
                checks.number(value, flag, **rule)
            else:
                checks.one_of(value, flag, rule)
    except checks.UsageError as e:
        sys.exit(f"moee {command}: {e}")


def _settings(f):
    from moee_jax.eval.evaluate import EvalSettings

    return EvalSettings(steps=f["steps"].value, sampler=f["sampler"].value, seed=f["seed"].value)


def _run_message(error: BaseException) -> str:
    """A run-directory error as eval / ablate / ladder take the run (an argument or --run_dir, not
    animate's --checkpoint)."""
    return str(error).replace("--checkpoint: ", "RUN: ").replace("--checkpoint ", "RUN ")


def _run_dir_arg(argv, flag, command: str) -> str:
    run_dir = flag.value or (argv[1] if len(argv) > 1 else None)
    if not run_dir:
        sys.exit(f"moee {command}: give the run directory: moee {command} RUN")
    return run_dir


def _reader(f, run_dir: str, data_dir: str | None = None, dataset: str | None = None):
    """The run's expression reader: ``--reader``, else RUN/reader.msgpack, else the demo's beside RUN;
    trained there first when absent or drawn at another size than the dataset's frames."""
    import pathlib

    from moee_jax.checkpoint.run import load_run_config, resolve_checkpoint
    from moee_jax.eval.evaluate import cached_reader, dataset_frame_size, run_dataset

    size = int(load_run_config(resolve_checkpoint(run_dir)).video.image_size[0])
    if data_dir is None or dataset is None:
        data_dir, dataset = run_dataset(run_dir)
    path = f["reader"].value
    if path is None:  # the run's own reader, else the demo's (OUT/reader.msgpack next to OUT/run), else a new one
        own, demo = pathlib.Path(run_dir) / "reader.msgpack", pathlib.Path(run_dir).parent / "reader.msgpack"
        path = demo if demo.is_file() and not own.is_file() else own
    return cached_reader(path, size, f["reader_steps"].value, render_size=dataset_frame_size(data_dir, dataset))


def _eval() -> None:
    run_flag = flags.DEFINE_string("run_dir", None, "Run directory with a finished stage2 (or give it as the argument).")
    data_dir = flags.DEFINE_string("data_dir", None, "TFDS data dir of the synthetic dataset (default: the run's stage-2 config).")
    dataset = flags.DEFINE_string("dataset", None, "TFDS name/config, e.g. synthetic_talking_faces/demo_cpu (default: the run's).")
    out = flags.DEFINE_string("out", None, "Write metrics.json, metrics.md, videos/ and contact_sheet.png here (default: RUN/eval).")
    f = _eval_settings_flags()

    def main(argv):
        import json
        import pathlib

        from moee_jax import console
        from moee_jax.checkpoint.run import resolve_checkpoint
        from moee_jax.eval import metrics as M
        from moee_jax.eval.evaluate import evaluate_run
        from moee_jax.inference.inputs import InputError

        run_dir = _run_dir_arg(argv, run_flag, "eval")
        _check_eval_flags(f, "eval")
        out_dir = pathlib.Path(out.value or pathlib.Path(run_dir) / "eval")
        try:
            resolve_checkpoint(run_dir)  # a missing or unfinished run fails before anything is written
            with console.log_to(out_dir / "eval.log"):
                with console.phase("reader"):
                    reader = _reader(f, run_dir, data_dir.value, dataset.value)
                with console.phase("animate and score", f"held-out identities → {out_dir / 'videos'}"), \
                        console.progress(None, "clips", unit="clip") as bar:  # fmt: skip
                    summary = evaluate_run(run_dir, reader, data_dir=data_dir.value, dataset=dataset.value, settings=_settings(f),
                                           videos_dir=out_dir / "videos", sheet_path=None, progress=console.bar_progress(bar))  # fmt: skip
        except (InputError, FileNotFoundError, ValueError) as e:
            sys.exit(f"moee eval: {_run_message(e)}")
        (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2, default=float))
        (out_dir / "metrics.md").write_text(M.to_markdown(summary))
        print(M.to_markdown(summary))
        print(f"wrote {out_dir}/metrics.json")

    return main


def _ablate() -> None:
    run_flag = flags.DEFINE_string("run_dir", None, "Run directory with finished stage1 and stage2 (or give it as the argument).")
    out = flags.DEFINE_string("out", None, "Variant runs, ablation.json and ablation.md go here (default: RUN/ablate).")
    variants = flags.DEFINE_list("variants", ["full", "no_moe", "no_global", "no_masked_noisy"], "Ablations to run.")
    steps = flags.DEFINE_integer("train_steps", None, "Stage-2 steps per variant (default: the run's stage-2 steps).")
    f = _eval_settings_flags()

    def main(argv):
        import pathlib

        from moee_jax.checkpoint.run import resolve_checkpoint
        from moee_jax.eval.ablation import run_ablations
        from moee_jax.inference.inputs import InputError
        from moee_jax.train.trainer import TrainingError

        run_dir = _run_dir_arg(argv, run_flag, "ablate")
        from moee_jax.eval.ablation import ABLATIONS

        _check_eval_flags(f, "ablate", **{"--variants": (variants.value, tuple(ABLATIONS)),
                                          "--train_steps": (steps.value, dict(minimum=1, integer=True))})  # fmt: skip
        out_dir = pathlib.Path(out.value or pathlib.Path(run_dir) / "ablate")
        try:
            resolve_checkpoint(run_dir)  # a missing or unfinished run fails before anything is written
            with _log_file(out_dir / "ablate.log"):
                reader = _reader(f, run_dir)
                result = run_ablations(run_dir, out_dir, reader, variants=variants.value, steps=steps.value, settings=_settings(f))
        except (InputError, TrainingError, FileNotFoundError, ValueError) as e:
            sys.exit(f"moee ablate: {_run_message(e)}")
        print(result["table"])

    return main


def _ladder() -> None:
    run_flag = flags.DEFINE_string("run_dir", None, "Run directory with a finished stage2 (or give it as the argument).")
    data_dir = flags.DEFINE_string("data_dir", None, "TFDS data dir of the synthetic dataset (default: the run's stage-2 config).")
    dataset = flags.DEFINE_string("dataset", None, "TFDS name/config (default: the run's).")
    rungs = flags.DEFINE_list("rungs", ["ceiling", "overfit", "train_same_clip", "held_out_same_clip", "train_neutral", "held_out"],
                              "Rungs to climb, in order.")  # fmt: skip
    identities = flags.DEFINE_integer("identities", 4, "Identities per split scored by rungs 2-5.")
    overfit_steps = flags.DEFINE_integer("overfit_steps", 300, "Training steps of rung 1 (overfitting one clip).")
    out = flags.DEFINE_string("out", None, "Write ladder.json here (default: RUN/ladder.json).")
    f = _eval_settings_flags()

    def main(argv):
        import pathlib

        from moee_jax.eval.evaluate import run_dataset
        from moee_jax.eval.ladder import ladder_json, run_ladder
        from moee_jax.inference.inputs import InputError
        from moee_jax.train.trainer import TrainingError

        run_dir = _run_dir_arg(argv, run_flag, "ladder")
        from moee_jax.eval.ladder import RUNGS

        _check_eval_flags(f, "ladder", **{"--rungs": (rungs.value, RUNGS), "--identities": (identities.value, dict(minimum=1, integer=True)),
                                          "--overfit_steps": (overfit_steps.value, dict(minimum=1, integer=True))})  # fmt: skip
        try:
            d, n = (data_dir.value, dataset.value) if data_dir.value and dataset.value else run_dataset(run_dir)
            with _log_file(pathlib.Path(run_dir) / "ladder.log"):
                reader = _reader(f, run_dir, d, n)
                result = run_ladder(run_dir, reader, data_dir=d, dataset=n, settings=_settings(f), rungs=rungs.value,
                                    identities=identities.value, overfit_steps=overfit_steps.value)  # fmt: skip
        except (InputError, TrainingError, FileNotFoundError, ValueError) as e:
            sys.exit(f"moee ladder: {_run_message(e)}")
        path = pathlib.Path(out.value or pathlib.Path(run_dir) / "ladder.json")
        path.write_text(ladder_json(result))
        print(f"{sum(r.passed for r in result)}/{len(result)} rungs pass; wrote {path}")
        sys.exit(0 if all(r.passed for r in result) else 1)

    return main


def _serve() -> None:
    checkpoint = flags.DEFINE_string("checkpoint", "outputs/demo/run", "Run directory holding a finished stage2 (default: the demo's).")
    host = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0 exposes the page to your network).")
    port = flags.DEFINE_integer("port", 7860, "Port to listen on.")
    share = flags.DEFINE_bool("share", False, "Also publish a temporary public gradio.live link.")
    queue_size = flags.DEFINE_integer("queue_size", 8, "Requests that may wait behind the running one; more are told the queue is full.")
    max_upload_mb = flags.DEFINE_float("max_upload_mb", 20.0, "Largest upload accepted, in MB.")
    warmup = flags.DEFINE_bool("warmup", True, "Compile the model at start by rendering one short clip.")
    text_encoder = flags.DEFINE_string("text_encoder", None, "T5 encoder folder (models with a text emotion source).")
    audio_encoder = flags.DEFINE_string("audio_encoder", None, "wav2vec2 folder of a model trained on a feature cache.")

    def main(argv):
        del argv
        try:
            import gradio  # noqa: F401
        except ImportError:
            sys.exit("moee serve: the web page needs Gradio: pip install 'moee_jax[ui]' (or pip install gradio)")
        from moee_jax.checkpoint.run import RunError
        from moee_jax.inference.inputs import InputError
        from moee_jax.ui.app import serve

        if not 0 < port.value < 65536 or queue_size.value < 0 or not max_upload_mb.value > 0:
            sys.exit("moee serve: --port must be in 1..65535, --queue_size >= 0 and --max_upload_mb > 0")
        try:
            serve(checkpoint.value, host=host.value, port=port.value, share=share.value, queue_size=queue_size.value,
                  max_upload_mb=max_upload_mb.value, warmup=warmup.value, text_encoder=text_encoder.value,
                  audio_encoder=audio_encoder.value)  # fmt: skip
        except (InputError, RunError) as e:
            sys.exit(f"moee serve: {e}")
        except OSError as e:
            sys.exit(f"moee serve: cannot listen on {host.value}:{port.value} ({e}); choose another --port")

    return main


def _verify() -> None:
    run_flag = flags.DEFINE_string("run_dir", None, "Run directory of `moee train` (or give it as the argument).")

    def main(argv):
        import pathlib

        from moee_jax.checkpoint.integrity import verify_run
        from moee_jax.checkpoint.run import STAGES

        run_dir = _run_dir_arg(argv, run_flag, "verify")
        if not pathlib.Path(run_dir).is_dir():
            sys.exit(f"moee verify: RUN {run_dir}: directory not found; pass the run directory of `moee train`")
        reports = verify_run(run_dir, STAGES)
        if not reports:
            sys.exit(f"moee verify: RUN {run_dir}: no stage folder ({', '.join(STAGES)}) here; is this a run directory?")
        for report in reports:
            print("\n".join(report.lines()))
        bad = [r.stage for r in reports if not r.ok]
        print(f"{run_dir}: " + (f"damaged: {', '.join(bad)}" if bad else "every checkpoint intact"))
        sys.exit(1 if bad else 0)

    return main


COMMANDS = {"convert": _convert, "demo": _demo, "train": _train, "prepare": _prepare, "features": _features, "animate": _animate,
            "eval": _eval, "ablate": _ablate, "ladder": _ladder, "serve": _serve, "verify": _verify}  # fmt: skip

EXAMPLES = {
    "convert": "moee convert --unet sd15/unet --vae sd15/vae --motion_adapter mm_sd_v15_v2.safetensors --out checkpoints/sd15",
    "demo": "moee demo --out outputs/demo            # add --from_scratch to train every stage again",
    "train": "moee train --config stage1.py:tiny --run_dir runs/r1 --config.data.data_dir data/",
    "prepare": "moee prepare --input videos.csv --out prepared/ --data_dir data/",
    "features": "moee features --data_dir data/ --dataset talking_face_clips --audio_encoder wav2vec2-base/",
    "animate": "moee animate --checkpoint runs/r1 --image face.png --audio speech.wav --emotion happy:0.6,surprised:0.4 --out out.mp4",
    "eval": "moee eval runs/r1 --steps 10",
    "ablate": "moee ablate runs/r1 --variants full,no_moe",
    "ladder": "moee ladder runs/r1 --rungs ceiling,overfit",
    "serve": "moee serve --checkpoint outputs/demo/run --port 7860",
    "verify": "moee verify runs/r1",
}


def summary(command: str) -> str:
    """The one-line description of ``command`` in this module's docstring table."""
    for line in __doc__.splitlines():
        if line.strip().startswith(command + " "):
            return line.strip()[len(command) :].strip()
    return ""


def command_help(command: str, names: set[str]) -> str:
    """``moee <command> --help``: the command's own flags (``names``) with their defaults and help,
    and one example; absl's and JAX's own flags stay in ``--helpfull``."""
    lines = [f"moee {command}: {summary(command)}", "", f"usage: moee {command} [--flag=value ...]", "", "flags:"]
    for name in sorted(names):
        flag = flags.FLAGS[name]
        kind = "" if flag.boolean else "=" + flag.flag_type().split()[-1].upper()
        default = "" if flag.default is None else " (default: " + flag.default_as_str.strip("'").replace(f"{CONFIGS}/", "") + ")"
        required = " (required)" if _required(flag) else ""
        lines.append(f"  --{name}{kind}{required}{default}")
        lines.append(f"      {flag.help}")
    lines += ["", "example:", f"  {EXAMPLES[command]}", "", "absl and JAX flags: moee " + command + " --helpfull"]
    return "\n".join(lines)


def _required(flag) -> bool:
    """Whether absl's ``required=True`` validator guards ``flag``."""
    return any("must have a value other than None" in str(getattr(v, "message", "")) for v in flag.validators)


def run(argv: list[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if len(argv) > 1 else 2)
    if argv[1] not in (*COMMANDS, "analyze"):
        import difflib

        close = difflib.get_close_matches(argv[1], [*COMMANDS, "analyze"], n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        sys.exit(f"moee: unknown command {argv[1]!r}; {hint}`moee --help` lists the commands")
    command = argv[1]
    from moee_jax import console

    argv[2:] = ["--verbosity=1" if a == "-v" else a for a in argv[2:]]
    if not any(a.startswith("--verbosity") for a in argv[2:]):
        console.quiet_native_logs()
    if command == "analyze":  # argparse-based (python -m moee_jax.analysis)
        from moee_jax.analysis.__main__ import main as analyze

        console.configure(verbose=any(a.startswith("--verbosity") for a in argv[2:]))
        sys.exit(analyze([underscored(a) for a in argv[2:] if not a.startswith("--verbosity")]))
    # jax's backend probe would report every platform it did not find (TPU, GPU).
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    before = set(flags.FLAGS)
    try:  # ml_collections reads --config overrides from sys.argv as the flag is defined
        main = COMMANDS[command]()
    except Exception as e:  # noqa: BLE001 - a bad override or config file is the user's input
        sys.exit(f"moee {command}: {flag_error(e, [underscored(a) for a in argv[2:]])}")
    if any(a in ("-h", "--help") for a in argv[2:]):
        print(command_help(command, set(flags.FLAGS) - before))
        sys.exit(0)
    full = [f"moee {command}"] + _config_paths([_negated(underscored(a)) for a in argv[2:]])
    try:  # the flags (and --config with its overrides) as one line each, before absl's own parse
        remaining = flags.FLAGS(full)
        config = flags.FLAGS["config"].value if "config" in flags.FLAGS else None
        if config is not None:
            config.to_dict()  # a config file that failed to load raises its error on first use
    except Exception as e:  # noqa: BLE001 - any parse failure is the user's input, reported as such
        sys.exit(f"moee {command}: {flag_error(e, full[1:])}")

    def with_console(argv):  # after app.run's own logging set-up, which it would otherwise override
        console.configure(verbose=flags.FLAGS.verbosity >= 1)
        return main(argv)

    app.run(with_console, argv=full, flags_parser=lambda _: remaining)  # parsed above


def flag_error(error: BaseException, args: list[str] = ()) -> str:
    """One readable line for a flag or config error (``args``: the command line): ml_collections'
    suggestion ("Did you mean …") and the last line of a config file's traceback instead of the
    whole chain, with the flag it came from."""
    text = str(error).replace("\\n", "\n").replace("\\'", "'")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    unknown = re.match(r"Unknown command line flag '([^']+)'(?:\. Did you mean: ([^?]+) \?)?", lines[0])
    if unknown:
        hint = f" (did you mean --{unknown.group(2).strip()}?)" if unknown.group(2) else ""
        return f"--{unknown.group(1)}: unknown flag{hint}; `--help` lists the flags"
    if "Failed loading config file" in text:
        shipped = ", ".join(sorted(p.name for p in CONFIGS.glob("*.py") if not p.name.startswith("_")))
        return (
            f"--config: cannot read {lines[-2] if len(lines) > 1 else 'the file'} ({lines[-1]}); give a path or a shipped config: {shipped}"
        )
    hint = next((line.strip("'\"") for line in lines if "Did you mean" in line), None)
    if hint is not None:  # an unknown config field: name the override it came from
        field = lines[0].strip("'\"")
        flag = next((a.split("=")[0] for a in args if a.startswith("--config.") and a.split("=")[0].endswith("." + field)), None)
        return f"{flag or '--config'}: no config field {field!r}. {hint}"
    head = lines[0] if not lines[0].startswith("Traceback") else lines[-1]
    if "Error whilst parsing config file" in lines[0]:
        head = lines[0].split(": Error whilst")[0] + ": " + lines[-1]
    return head


def _config_paths(args: list[str]) -> list[str]:
    """Every ``--config FILE[:variant]`` value resolved by :func:`resolve_config`."""
    out = list(args)
    for i, arg in enumerate(out):
        if arg.startswith("--config="):
            out[i] = "--config=" + resolve_config(arg.removeprefix("--config="))
        elif arg == "--config" and i + 1 < len(out):
            out[i + 1] = resolve_config(out[i + 1])
    return out


def _negated(arg: str) -> str:
    """``--no_warmup`` → absl's ``--nowarmup`` for a boolean flag ``warmup`` (unless ``no_warmup``
    is itself a flag, like animate's ``--no_detect``)."""
    name = arg.removeprefix("--no_")
    if arg.startswith("--no_") and "=" not in arg and arg[2:] not in flags.FLAGS and name in flags.FLAGS \
            and isinstance(flags.FLAGS[name], flags.BooleanFlag):  # fmt: skip
        return "--no" + name
    return arg


def underscored(arg: str) -> str:
    """``--emotion-text=x`` → ``--emotion_text=x``: flags may be spelt with hyphens or underscores."""
    if not arg.startswith("--") or arg == "--":
        return arg
    name, sep, value = arg[2:].partition("=")
    return "--" + name.replace("-", "_") + sep + value


if __name__ == "__main__":
    run()
