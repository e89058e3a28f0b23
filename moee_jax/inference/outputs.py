"""Writing a generated video: the MP4 (speech muxed in), its JSON settings sidecar, optional PNG frames.

Outputs are all-or-nothing (:mod:`moee_jax.atomic`): the MP4 and its sidecar are written under
temporary names and renamed; PNG frames go to a temporary folder renamed at the end; on any error
nothing is left behind. Every file gets the user's umask.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
from collections.abc import Callable, Iterable, Iterator

import numpy as np
from PIL import Image

from moee_jax import checks
from moee_jax.atomic import atomic_directory, atomic_write_text
from moee_jax.data.audio import SAMPLE_RATE
from moee_jax.inference import inputs as inputs_lib
from moee_jax.inference.animator import Animator
from moee_jax.inference.inputs import EmotionSpec, InputError, Speech
from moee_jax.inference.job import Animation


def check_outputs(out: str | os.PathLike, frames_dir: str | os.PathLike | None = None) -> None:
    """Refuse, before any work, outputs that could not be written: ``out`` not an ``.mp4`` path or a
    directory, or in a place where nothing can be written (:func:`moee_jax.checks.writable_location`);
    ``frames_dir`` an existing non-empty folder or a file."""
    out = pathlib.Path(out)
    if out.suffix.lower() != ".mp4":
        raise InputError(f"--out {out}: the video is written as MP4; give a path ending in .mp4")
    if out.is_dir():
        raise InputError(f"--out {out}: is a directory; give a file path ending in .mp4")
    try:
        checks.writable_location(out, "--out")
        if frames_dir is not None:
            checks.writable_location(frames_dir, "--frames_dir", kind="folder")
    except checks.UsageError as e:
        raise InputError(str(e)) from None
    if frames_dir is not None:
        d = pathlib.Path(frames_dir)
        if d.exists() and (not d.is_dir() or any(d.iterdir())):
            raise InputError(f"--frames_dir {d}: exists and is not an empty folder; choose a new folder")


def sidecar_path(out: str | os.PathLike) -> pathlib.Path:
    """Where the settings of ``out.mp4`` go: ``out.json``."""
    return pathlib.Path(out).with_suffix(".json")


def save_animation(
    animation: Animation,
    out: str | os.PathLike,
    *,
    frames_dir: str | os.PathLike | None = None,
    paste: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, str]:
    """Write ``out`` (MP4 with the speech muxed in), ``out.json`` (settings) and, with ``frames_dir``,
    one PNG per frame; ``paste=True`` writes the animated face pasted back into the whole photo
    (:func:`~moee_jax.inference.inputs.iter_paste_back`) instead of the square crop. Frames stream
    to the encoder (and the PNGs) one at a time, so peak memory does not grow with the video's length;
    ``progress(frames_written, total)`` is called after each. All or nothing. → the paths written."""
    from moee_jax.data.video_io import write_video

    out = pathlib.Path(out)
    check_outputs(out, frames_dir)
    frames = animation.frames
    if paste:  # one whole-photo frame at a time: memory for one photo, whatever the video's length
        frames = inputs_lib.iter_paste_back(animation.portrait.image, frames, animation.portrait.box)
    settings = dict(animation.settings, output=str(out), paste_back=bool(paste))
    sidecar = sidecar_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    written: list[pathlib.Path] = []
    try:
        with contextlib.ExitStack() as stack:
            if frames_dir is not None:
                staging = stack.enter_context(atomic_directory(frames_dir))  # renamed into place when all is written
                frames = _saving_pngs(frames, staging)
                settings["frames_dir"] = str(frames_dir)
            write_video(out, _counted(frames, len(animation.frames), progress), animation.fps, animation.audio, SAMPLE_RATE)
            written.append(out)
            atomic_write_text(sidecar, json.dumps(settings, indent=2))
            written.append(sidecar)
    except BaseException:
        for path in written:
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        raise
    return {"video": str(out), "settings": str(sidecar), **({"frames_dir": str(frames_dir)} if frames_dir is not None else {})}


def _saving_pngs(frames: Iterable[np.ndarray], folder: pathlib.Path) -> Iterator[np.ndarray]:
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"{i:06d}.png")
        yield frame


def _counted(frames: Iterable[np.ndarray], total: int, progress: Callable[[int, int], None] | None) -> Iterator[np.ndarray]:
    for i, frame in enumerate(frames):
        yield frame
        if progress is not None:
            progress(i + 1, total)


def animate_to_file(
    animator: Animator,
    image: str | os.PathLike | np.ndarray,
    audio: str | os.PathLike | Speech,
    emotion: EmotionSpec,
    out: str | os.PathLike,
    *,
    frames_dir: str | os.PathLike | None = None,
    paste: bool = False,
    progress: Callable[[int, int], None] | None = None,
    write_progress: Callable[[int, int], None] | None = None,
    **options,
) -> Animation:
    """Check the outputs, animate (``options``: see :meth:`Animator.animate`; ``progress`` per clip)
    and save (:func:`save_animation`; ``write_progress`` per frame written): on any error — a bad
    input, a failed write — no output exists."""
    check_outputs(out, frames_dir)
    animation = animator.animate(image, audio, emotion, progress=progress, **options)
    save_animation(animation, out, frames_dir=frames_dir, paste=paste, progress=write_progress)
    return animation
