"""``moee animate`` and ``moee serve``: a trained model's videos."""

from __future__ import annotations

import sys
import time

from absl import flags


def animate() -> None:
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
    compound_mixing = flags.DEFINE_enum(
        "compound_mixing", None, ["guidance", "gate"],
        "How a palette of several emotions is made (default: the config's): guidance mixes one guided prediction per "
        "emotion, gate opens the experts together (MoEE's palette).",
    )  # fmt: skip
    motion = flags.DEFINE_enum(
        "motion", "chain", ["chain", "reference"],
        "Motion frames of every clip after the first: the last generated frames (chain: the video continues across clips), or the portrait "
        "repeated as for the first clip (reference: no drift of the expression along the video, a seam every clip).",
    )  # fmt: skip
    frames_dir = flags.DEFINE_string("frames_dir", None, "Also write every frame as PNG into this new folder.")
    no_detect = flags.DEFINE_bool("no_detect", False, "The image is already a face crop: skip face detection.")
    paste_back = flags.DEFINE_bool("paste_back", False, "Paste the animated face back into the whole photo.")
    batch = flags.DEFINE_string("batch", None, "Manifest CSV (image, audio, emotion, out); bad rows are skipped and reported.")
    report = flags.DEFINE_string("report", None, "Batch report JSON (default: <manifest>.report.json).")
    benchmark = flags.DEFINE_bool(
        "benchmark", False, "At the end, print one line: frames, frames/s and s/frame (sampling; end to end), peak memory."
    )

    def main(argv):
        del argv
        started = time.monotonic()
        from moee_jax import checks, console
        from moee_jax.checkpoint.run import RunError
        from moee_jax.inference.animator import Animator
        from moee_jax.inference.batch import animate_batch
        from moee_jax.inference.benchmark import AnimateBenchmark
        from moee_jax.inference.inputs import InputError, parse_emotion
        from moee_jax.inference.outputs import animate_to_file, check_outputs

        bench = AnimateBenchmark(started) if benchmark.value else None
        options = dict(
            steps=steps.value, sampler=sampler.value, seed=seed.value, detect=not no_detect.value, motion=motion.value,
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
                animator.compound_mixing = compound_mixing.value or animator.compound_mixing
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
                if bench is not None:
                    print(bench.line(sum(e["frames"] for e in result["done"]), sum(e["sampling_seconds"] for e in result["done"])))
                return
            missing = [name for name in ("--image", "--audio", "--out") if single[name] is None]
            if missing:
                raise InputError(f"{', '.join(missing)} required (or --batch manifest.csv)")
            spec = parse_emotion(emotion.value, emotion_text=emotion_text.value, emotion_from_audio=emotion_from_audio.value,
                                 emotion_video=emotion_video.value)  # fmt: skip
            check_outputs(out.value, frames_dir.value)
            animator = Animator.from_run(checkpoint.value, text_encoder=text_encoder.value, audio_encoder=audio_encoder.value)
            animator.compound_mixing = compound_mixing.value or animator.compound_mixing
            with console.progress_callback("animate", unit="clip") as clips, console.progress_callback("write", unit="frame") as frames:
                animation = animate_to_file(
                    animator, image.value, audio.value, spec, out.value, frames_dir=frames_dir.value, paste=paste_back.value,
                    progress=clips if bench is None else bench.progress(clips), write_progress=frames, **options,
                )  # fmt: skip
            for warning in animation.warnings:
                print(f"moee animate: warning: {warning}", file=sys.stderr)
        except (InputError, RunError) as e:
            sys.exit(f"moee animate: {e}")
        print(
            f"wrote {out.value}: {animation.plan.num_frames} frames ({animation.settings['audio_seconds']:.2f} s) "
            f"in {time.monotonic() - started:.1f} s (sampling {animation.settings['seconds']:.1f} s)"
        )
        if bench is not None:
            print(bench.line(animation.plan.num_frames, animation.settings["sampling_seconds"], clip_frames=animation.plan.clip_frames))

    return main


def serve() -> None:
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
