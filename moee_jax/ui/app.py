"""``moee serve``: a Gradio page around one loaded model.

The model is restored and compiled once, at start (:func:`serve` renders one short warm-up clip),
and every request reuses it. Requests are queued: one generation at a time per device and at most
``queue_size`` waiting; past that Gradio answers "queue is full". Everything the page writes (the
uploads Gradio keeps, the MP4s and their settings JSON) stays in one private folder, removed on exit.

A request goes through the same code as ``moee animate`` (:func:`moee_jax.inference.outputs.animate_to_file`):
its checks, its messages (shown in the page, never a traceback), its atomic MP4 writing. The emotion
is one of

* a **label** with an intensity (``happy`` at 0.7 is ``happy:0.7,neutral:0.3``: the happiness
  expert's gate at 0.7),
* a **palette**: six sliders over :data:`moee_jax.emotions.EMOTIONS`, with the compound presets of
  :data:`moee_jax.emotions.COMPOUND_EMOTIONS` as buttons (MoEE's soft combination of experts),
* **text** (models with a text source and a T5 encoder), **from the speech** (models with a speech
  source, or the DICE-Talk embedder), or a **reference clip** (embedder models),

offered only where the model has that source (:meth:`Modes.of`).

Gradio is the optional ``ui`` extra and is imported only here.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import tempfile
import threading
import time

import numpy as np

from moee_jax.emotions import ADJECTIVE, COMPOUND_EMOTIONS, EMOTIONS

LABELS = ("neutral",) + tuple(ADJECTIVE[e] for e in EMOTIONS)
MODE_LABEL, MODE_PALETTE, MODE_TEXT, MODE_SPEECH, MODE_VIDEO = "label", "palette", "text", "from the speech", "reference clip"


class Cancelled(Exception):
    """The user pressed cancel; raised from the sampler's progress callback between clips."""


@dataclasses.dataclass(frozen=True)
class Modes:
    """The emotion modes a model offers, in the order the page lists them."""

    names: tuple[str, ...]

    @classmethod
    def of(cls, animator) -> Modes:
        emotion = animator.emotion
        if emotion.uses_embedder:
            return cls((MODE_VIDEO, MODE_SPEECH))
        names = []
        if "label" in emotion.sources:
            names += [MODE_LABEL, MODE_PALETTE]
        if "text" in emotion.sources and animator.encoders.text_folder is not None:
            names.append(MODE_TEXT)
        if "speech" in emotion.sources:
            names.append(MODE_SPEECH)
        return cls(tuple(names))


def palette_spec(weights) -> str:
    """Six slider values → a palette spec (``happy:0.5,surprised:0.5``); all zero is an error."""
    from moee_jax.inference.inputs import InputError

    values = [float(w or 0.0) for w in weights]
    if len(values) != len(EMOTIONS) or any(not np.isfinite(v) or v < 0 for v in values):
        raise InputError(f"palette: six weights in [0, 1] over {', '.join(EMOTIONS)}, got {values}")
    if sum(values) <= 0:
        raise InputError("palette: every slider is at 0; move at least one above 0 (or choose the label 'neutral')")
    return ",".join(f"{ADJECTIVE[e]}:{v:g}" for e, v in zip(EMOTIONS, values) if v > 0)


def emotion_spec(mode: str, label: str, intensity: float, weights, text: str, video: str | None):
    """The page's emotion inputs → :class:`~moee_jax.inference.inputs.EmotionSpec` (InputError when
    they do not make one)."""
    from moee_jax.inference.inputs import InputError, parse_emotion

    if mode == MODE_LABEL:
        if label not in LABELS:
            raise InputError(f"label: choose one of {', '.join(LABELS)}")
        if label == "neutral":
            return parse_emotion("neutral")
        if not 0 < float(intensity) <= 1:
            raise InputError(f"intensity: a value in (0, 1], got {intensity}")
        s = float(intensity)
        # The model has no intensity input (its palettes sum to one); an intensity is the label mixed
        # with neutral, the all-zero palette: sad at 0.5 sets the sadness expert's gate to 0.5.
        return parse_emotion(label if s == 1 else f"{label}:{s:g},neutral:{1 - s:g}")
    if mode == MODE_PALETTE:
        return parse_emotion(palette_spec(weights))
    if mode == MODE_TEXT:
        if not (text or "").strip():
            raise InputError("emotion text: describe the emotion, e.g. 'a joyful person, slightly surprised'")
        return parse_emotion(emotion_text=text.strip())
    if mode == MODE_SPEECH:
        return parse_emotion(emotion_from_audio=True)
    if mode == MODE_VIDEO:
        if not video:
            raise InputError("reference clip: upload a short video of a face showing the emotion")
        return parse_emotion(emotion_video=video)
    raise InputError(f"emotion mode {mode!r}: choose one of {MODE_LABEL}, {MODE_PALETTE}, {MODE_TEXT}, {MODE_SPEECH}, {MODE_VIDEO}")


class Generator:
    """One model behind a lock: :meth:`generate` renders one request into ``folder``."""

    def __init__(self, animator, folder: pathlib.Path):
        self.animator, self.folder = animator, folder
        self.lock = threading.Lock()  # one generation at a time on the device
        self.cancel = threading.Event()
        self.count = 0

    def generate(self, image, audio, spec, *, steps: int, seed: int, guidance: dict, detect: bool, progress=None):
        """→ ``(mp4 path, settings json path, one-line summary)``; InputError / RunError for bad input.

        The settings JSON also records ``compiled_programs`` (the model's compiled sampler programs
        after this request: a second request with the same shapes adds none) and ``finished``."""
        from moee_jax.inference.inputs import InputError
        from moee_jax.inference.outputs import check_outputs, save_animation

        if not image:
            raise InputError("portrait: upload a photo (or pick an example)")
        if not audio:
            raise InputError("speech: upload a recording or record one with the microphone")
        with self.lock:
            self.cancel.clear()
            self.count += 1
            out = self.folder / f"moee_{self.count:04d}.mp4"

            def on_clip(done: int, total: int) -> None:
                if self.cancel.is_set():
                    raise Cancelled()
                if progress is not None:
                    progress((done, total), desc="clips", unit="clip")

            check_outputs(out)
            animation = self.animator.animate(image, audio, spec, progress=on_clip, steps=steps, seed=seed, guidance=guidance,
                                              detect=detect)  # fmt: skip
            animation.settings.update(compiled_programs=self.animator.compiled_programs(), finished=time.time())
            save_animation(animation, out)
        summary = f"{animation.plan.num_frames} frames ({animation.settings['audio_seconds']:.2f} s) in {animation.settings['seconds']:.1f} s"
        for warning in animation.warnings:
            summary += f"\nwarning: {warning}"
        return str(out), str(out.with_suffix(".json")), summary


def build_app(animator, folder: pathlib.Path, *, examples: list[str] = (), queue_size: int = 8):
    """The page (a ``gr.Blocks``) for ``animator``; outputs go to ``folder``."""
    import gradio as gr

    from moee_jax.checkpoint.run import RunError
    from moee_jax.inference.inputs import InputError, load_image

    gen = Generator(animator, folder)
    modes = Modes.of(animator)
    defaults = animator.config.get("animate", {}) or {}
    guidance_defaults = {**dict(animator.config.guidance), **{k: v for k, v in dict(defaults.get("guidance", {})).items() if v is not None}}
    steps_default = int(defaults.get("steps", animator.config.sampler.num_steps))

    with gr.Blocks(title="MoEE talking heads", analytics_enabled=False) as page:
        gr.Markdown("# MoEE: emotional talking heads\nA portrait, a speech clip and an emotion in; an MP4 of that face speaking out.")
        with gr.Row():
            with gr.Column():
                # A file input, not gr.Image: a file that is not an image then reaches the same check and
                # message as `moee animate --image` (gr.Image would fail in its own decoding first).
                image = gr.File(label="portrait (PNG, JPEG, WebP, BMP)", file_types=["image"], type="filepath", elem_id="portrait")
                preview = gr.Image(label="portrait", interactive=False, height=200, elem_id="preview")
                if examples:
                    gr.Examples(examples=[[e] for e in examples], inputs=[image], label="held-out synthetic portraits")
                detect = gr.Checkbox(value=True, label="find the face in the photo (off: the image is already a face crop)", elem_id="detect")
                audio = gr.Audio(label="speech", type="filepath", sources=["upload", "microphone"], elem_id="speech")
            with gr.Column():
                mode = gr.Radio(list(modes.names), value=modes.names[0], label="emotion from", elem_id="mode")
                first = modes.names[0]
                with gr.Group(visible=first == MODE_LABEL) as label_box:
                    label = gr.Dropdown(list(LABELS), value="happy", label="label", elem_id="label")
                    intensity = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="intensity", elem_id="intensity")
                with gr.Group(visible=first == MODE_PALETTE) as palette_box:
                    sliders = [gr.Slider(0.0, 1.0, value=0.0, step=0.05, label=ADJECTIVE[e], elem_id=f"palette_{e}") for e in EMOTIONS]
                    with gr.Row():
                        presets = {name: gr.Button(name.replace("_", " "), size="sm", elem_id=f"preset_{name}") for name in COMPOUND_EMOTIONS}
                text = gr.Textbox(label="emotion text", visible=first == MODE_TEXT, elem_id="emotion_text")
                video = gr.Video(label="reference clip", visible=first == MODE_VIDEO, sources=["upload"], elem_id="reference_clip")
                with gr.Accordion("sampling", open=False):
                    steps = gr.Slider(1, 100, value=steps_default, step=1, label="steps", elem_id="steps")
                    seed = gr.Number(value=0, precision=0, label="seed", elem_id="seed")
                    cfg = {k: gr.Slider(0.0, 10.0, value=float(guidance_defaults.get(k, 1.0)), step=0.1, label=f"guidance: {k}",
                                        elem_id=f"cfg_{k}") for k in ("reference", "audio", "emotion")}  # fmt: skip
                with gr.Row():
                    go = gr.Button("generate", variant="primary", elem_id="generate")
                    stop = gr.Button("cancel", elem_id="cancel")
        result = gr.Video(label="result", elem_id="result", autoplay=False)
        settings = gr.File(label="settings (JSON)", elem_id="settings")
        status = gr.Textbox(label="status", interactive=False, elem_id="status")

        def show(m):
            return (gr.update(visible=m == MODE_LABEL), gr.update(visible=m == MODE_PALETTE), gr.update(visible=m == MODE_TEXT),
                    gr.update(visible=m == MODE_VIDEO))  # fmt: skip

        def look(path):
            if not path:
                return None
            try:
                return load_image(path, flag="portrait")
            except InputError as e:
                raise gr.Error(str(e), duration=None) from None

        image.change(look, image, preview, queue=False)
        mode.change(show, mode, [label_box, palette_box, text, video], queue=False)
        for name, button in presets.items():
            parts = COMPOUND_EMOTIONS[name]
            button.click(lambda parts=parts: [0.5 if e in parts else 0.0 for e in EMOTIONS], None, sliders, queue=False)

        def run(image, detect, audio, mode, label, intensity, happiness, sadness, anger, disgust, fear, surprise, text, video, steps,
                seed, cfg_reference, cfg_audio, cfg_emotion, progress=gr.Progress()):  # noqa: B008 (how Gradio injects its progress tracker)  # fmt: skip
            try:
                spec = emotion_spec(mode, label, intensity, (happiness, sadness, anger, disgust, fear, surprise), text, video)
                guidance = {"reference": cfg_reference, "audio": cfg_audio, "emotion": cfg_emotion}
                return gen.generate(image, audio, spec, steps=int(steps), seed=int(seed or 0), guidance=guidance, detect=bool(detect),
                                    progress=progress)  # fmt: skip
            except Cancelled:
                raise gr.Error("cancelled", duration=None) from None
            except (InputError, RunError, ValueError) as e:
                raise gr.Error(str(e), duration=None) from None

        go.click(run, [image, detect, audio, mode, label, intensity, *sliders, text, video, steps, seed, *cfg.values()],
                 [result, settings, status], concurrency_limit=1, api_name="generate")  # fmt: skip
        # The running render stops at its next clip (Cancelled); queued requests are not touched.
        stop.click(lambda: gen.cancel.set(), None, None, queue=False)
    page.queue(default_concurrency_limit=1, max_size=queue_size)
    return page


def example_portraits(folder: pathlib.Path, count: int = 3, size: int = 256) -> list[str]:
    """PNG portraits of held-out synthetic identities (neutral, first frame) written to ``folder``."""
    from PIL import Image

    from moee_jax.data import synthetic

    out = []
    for k in range(count):
        clip = synthetic.generate_clip(90_000 + k, "neutral", seed=k, num_frames=1, size=size)
        path = folder / f"example_{k}.png"
        Image.fromarray(clip.frames[0]).save(path)
        out.append(str(path))
    return out


def warm_up(animator, folder: pathlib.Path) -> float:
    """Render one short clip so that the first request does not pay for compilation. → seconds."""
    from moee_jax.data.synthetic import generate_clip
    from moee_jax.inference.inputs import Speech, parse_emotion

    t0 = time.perf_counter()
    clip = generate_clip(90_000, "neutral", seed=0, num_frames=int(animator.clip_frames), size=animator.size)
    speech = Speech(np.asarray(clip.audio, np.float32), folder / "warm_up.wav")
    spec = parse_emotion(emotion_from_audio=True) if animator.emotion.uses_embedder else parse_emotion(_first_mode_emotion(animator))
    animator.animate(clip.frames[0], speech, spec, detect=False)
    return time.perf_counter() - t0


def _first_mode_emotion(animator) -> str:
    return "happy" if "label" in animator.emotion.sources else "neutral"


def serve(checkpoint: str, *, host: str = "127.0.0.1", port: int = 7860, share: bool = False, queue_size: int = 8,
          max_upload_mb: float = 20.0, warmup: bool = True, text_encoder: str | None = None, audio_encoder: str | None = None) -> None:  # fmt: skip
    """Load the model, compile it, and serve the page until interrupted; the private folder is removed on exit."""
    folder = pathlib.Path(tempfile.mkdtemp(prefix="moee_serve_"))
    os.environ.setdefault("GRADIO_TEMP_DIR", str(folder / "uploads"))  # Gradio's copies of uploads stay in the folder too
    try:
        from moee_jax.inference.animator import Animator

        animator = Animator.from_run(checkpoint, text_encoder=text_encoder, audio_encoder=audio_encoder)
        if warmup:
            print(f"moee serve: compiled the model in {warm_up(animator, folder):.1f} s", flush=True)
        page = build_app(animator, folder, examples=example_portraits(folder), queue_size=queue_size)
        page.launch(server_name=host, server_port=port, share=share, max_file_size=f"{max_upload_mb:g}mb", prevent_thread_lock=True,
                    allowed_paths=[str(folder)], show_error=True, quiet=True)  # fmt: skip
        print(f"moee serve: {page.local_url} (Ctrl-C stops it)", flush=True)
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            print("moee serve: stopped; the page's files are removed", flush=True)
        finally:
            page.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)

