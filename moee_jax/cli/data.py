"""``moee convert``, ``moee prepare`` and ``moee features``: weights and data in."""

from __future__ import annotations

import pathlib
import shutil
import sys

from absl import flags

from moee_jax.cli.common import config_flag, log_file


def convert() -> None:
    config = config_flag("backbone.py:sd15")
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


def prepare() -> None:
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
            with log_file(f"{out.value}/prepare.log"):
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


def features() -> None:
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
