"""Real videos → prepared clips: decoded, 25 fps, face-cropped, with landmarks, audio and metadata.

Per video (:func:`prepare_clip`)::

    read_video             frames (T0, H, W, 3) uint8 at the file's fps, audio (A0,) 16 kHz mono or None
    resample_indices       (T,) source frames at 25 fps (nearest timestamp)
    LandmarkSource         landmarks (T, K, 2) source pixels (sidecar or MediaPipe), NaN without a face
    crop_clip              frames (T, S, S, 3), landmarks (T, K, 2) crop pixels; short face gaps interpolated
    check_regions          face, lip and mouth masks exist in every frame
    audio                  the video's track or a separate file; audible; trimmed so A = floor(T·16000/25)
    write_clip             out_dir/clips/<speaker>/<name>.npz (atomic: temp file + rename)

:func:`prepare_videos` runs that over a batch: the landmark source of every video is settled
first (a missing one stops the run before any work, :class:`~moee_jax.data.landmarks.LandmarkSetupError`);
a bad video is skipped with its reason and never stops the batch; clips already on disk are not
redone (``cached``), so an interrupted run resumes; ``out_dir/report.json`` lists what was done,
cached, skipped (a known problem with the input) and failed (an unexpected error, with its
traceback). One run at a time per ``out_dir``.

A prepared clip file (:class:`PreparedClip`, NumPy ``.npz`` without pickled objects) holds exactly
what :func:`moee_jax.data.schema.make_record` needs: JPEG frames (concatenated bytes and offsets),
audio, landmarks and layout, and the metadata (speaker, emotion, intensity, text, split).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import multiprocessing
import os
import pathlib
import time
import traceback
from collections.abc import Sequence

import numpy as np

from moee_jax.atomic import PARTIAL_SUFFIX, atomic_write, atomic_write_text
from moee_jax.data import audio as audio_lib
from moee_jax.data import face_crop, schema
from moee_jax.data import landmarks as landmarks_lib
from moee_jax.data import manifest as manifest_lib
from moee_jax.data.video_io import VideoError, read_audio, read_video, resample_indices

FORMAT_VERSION = 1
CLIPS_DIR = "clips"
REPORT_FILE = "report.json"
SETTINGS_FILE = "prepare.json"


class ClipError(ValueError):
    """A video that cannot become a clip (no audio, too short, unusable face regions)."""


class PrepareSetupError(RuntimeError):
    """A problem with the whole run (not one video), found before any video is processed."""


# Known problems with one input: the video is skipped and reported with the message as its reason.
SKIPPED_ERRORS = (VideoError, audio_lib.AudioError, landmarks_lib.LandmarkError, face_crop.NoFaceError, ClipError)


@dataclasses.dataclass(frozen=True)
class PrepareOptions:
    """Settings of a preparation run; the first four are fixed per ``out_dir`` (see :func:`prepare_videos`)."""

    size: int = 512
    fps: float = schema.FPS
    margin: float = 1.6
    smooth_window: int = 0
    max_missing_face: float = 0.2
    min_frames: int = 25
    jpeg_quality: int = 95
    silence_threshold_db: float = -60.0

    def crop(self) -> face_crop.CropConfig:
        return face_crop.CropConfig(self.size, self.margin, self.max_missing_face, self.smooth_window)

    def fixed(self) -> dict[str, object]:
        """The settings every clip of one prepared directory must share."""
        return {"format_version": FORMAT_VERSION, "size": self.size, "fps": self.fps, "margin": self.margin,
                "smooth_window": self.smooth_window}  # fmt: skip


@dataclasses.dataclass
class PreparedClip:
    """One prepared clip (the contents of ``clips/<clip_id>.npz``)."""

    clip_id: str
    speaker: str
    emotion: str
    intensity: float
    text: str
    split: str
    fps: float
    frames: list[bytes]  # T JPEG images, S × S RGB
    audio: np.ndarray  # (A,) float32, 16 kHz mono, A = floor(T · 16000 / fps)
    landmarks: np.ndarray  # (T, K, 2) float32, crop pixels
    landmark_layout: str
    face_missing: np.ndarray  # (T,) bool: landmarks interpolated, no face found in the source frame
    boxes: np.ndarray  # (T, 3) float32: crop centre x, y and side in source-video pixels
    source: str  # the video file

    def record(self) -> dict[str, object]:
        """The dataset record of this clip (:func:`moee_jax.data.schema.make_record`)."""
        return schema.make_record(
            clip_id=self.clip_id, speaker=self.speaker, frames=self.frames, audio=self.audio,
            landmarks=self.landmarks, landmark_layout=self.landmark_layout, emotion=self.emotion,
            intensity=self.intensity, text=self.text, fps=self.fps, frame_format="jpeg",
        )  # fmt: skip


def clip_path(out_dir: str | os.PathLike, clip_id: str) -> pathlib.Path:
    """``out_dir/clips/<speaker>/<name>.npz`` for clip id ``<speaker>/<name>``."""
    return pathlib.Path(out_dir) / CLIPS_DIR / f"{clip_id}.npz"


def list_clips(out_dir: str | os.PathLike) -> list[pathlib.Path]:
    """The finished clip files of a prepared directory, sorted (temporary files excluded)."""
    root = pathlib.Path(out_dir) / CLIPS_DIR
    return sorted(p for p in root.glob("*/*.npz") if not p.name.startswith("."))


def write_clip(path: str | os.PathLike, clip: PreparedClip) -> pathlib.Path:
    """Save ``clip`` to ``path`` atomically: a temporary file in the same folder, then a rename."""
    path = pathlib.Path(path)
    offsets = np.cumsum([0] + [len(b) for b in clip.frames]).astype(np.int64)
    arrays = {
        "format_version": np.int64(FORMAT_VERSION),
        "frames_jpeg": np.frombuffer(b"".join(clip.frames), np.uint8),
        "frame_offsets": offsets,
        "audio": np.asarray(clip.audio, np.float32),
        "landmarks": np.asarray(clip.landmarks, np.float32),
        "face_missing": np.asarray(clip.face_missing, bool),
        "boxes": np.asarray(clip.boxes, np.float32),
        "fps": np.float32(clip.fps),
        "intensity": np.float32(clip.intensity),
        **{k: np.asarray(getattr(clip, k)) for k in ("clip_id", "speaker", "emotion", "text", "split", "landmark_layout", "source")},
    }

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    return atomic_write(path, write)


def read_clip(path: str | os.PathLike) -> PreparedClip:
    """Load a prepared clip file; a clear error naming the file if it is not one."""
    path = pathlib.Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            version = int(data["format_version"])
            if version != FORMAT_VERSION:
                raise ValueError(f"format version {version}, expected {FORMAT_VERSION}; prepare it again")
            offsets = data["frame_offsets"]
            blob = data["frames_jpeg"].tobytes()
            text = {k: str(data[k]) for k in ("clip_id", "speaker", "emotion", "text", "split", "landmark_layout", "source")}
            return PreparedClip(
                **text,
                intensity=float(data["intensity"]),
                fps=float(data["fps"]),
                frames=[blob[a:b] for a, b in zip(offsets[:-1], offsets[1:])],
                audio=data["audio"],
                landmarks=data["landmarks"],
                face_missing=data["face_missing"],
                boxes=data["boxes"],
            )
    except (OSError, KeyError, ValueError) as e:
        raise ValueError(f"{path}: not a readable prepared clip ({type(e).__name__}: {e})") from e


def _clip_audio(spec: manifest_lib.ClipSpec, stream_audio: np.ndarray | None, options: PrepareOptions) -> np.ndarray:
    wave = stream_audio
    if wave is None:
        if spec.audio is None:
            raise ClipError(f"{spec.video}: no audio track (and no separate audio file given)")
        wave = read_audio(spec.audio)
    if not np.isfinite(wave).all():
        raise audio_lib.AudioError(f"{spec.video}: audio contains NaN or infinite samples")
    if audio_lib.is_silent(wave, options.silence_threshold_db):
        raise audio_lib.AudioError(
            f"{spec.video}: audio is silent (peak {audio_lib.peak_dbfs(wave):.1f} dBFS, below {options.silence_threshold_db} dBFS)"
        )
    return wave


def prepare_clip(
    spec: manifest_lib.ClipSpec,
    out_dir: str | os.PathLike,
    source: landmarks_lib.LandmarkSource,
    options: PrepareOptions = PrepareOptions(),
) -> dict[str, object]:
    """Prepare one video into ``clip_path(out_dir, spec.clip_id)`` (see the module docstring).

    → ``{"id", "video", "frames", "seconds", "landmarks"}``.

    Raises:
      One of :data:`SKIPPED_ERRORS` for a video that cannot become a clip, with the reason.
    """
    frames, video_fps, stream_audio = read_video(spec.video)
    indices = resample_indices(frames.shape[0], video_fps, options.fps)
    wave = _clip_audio(spec, stream_audio, options)
    # Keep the frames the audio covers entirely, and the audio of those frames.
    num_frames = min(len(indices), int(np.floor(wave.size * options.fps / schema.SAMPLE_RATE + 1e-6)))
    if num_frames < options.min_frames:
        raise ClipError(
            f"{spec.video}: too short: {num_frames} frames of video with audio at {options.fps:g} fps "
            f"({num_frames / options.fps:.2f} s), need at least {options.min_frames}"
        )
    indices = indices[:num_frames]
    wave = wave[: int(np.floor(num_frames * schema.SAMPLE_RATE / options.fps + 1e-6))]
    source_landmarks, layout = source.landmarks(frames, video_fps, indices)
    try:
        cropped = face_crop.crop_clip(frames[indices], source_landmarks, layout, options.crop())
    except face_crop.NoFaceError as e:
        raise face_crop.NoFaceError(f"{spec.video}: {e}") from e
    del frames
    try:
        face_crop.check_regions(cropped.landmarks, options.size, layout)
    except ValueError as e:
        raise ClipError(f"{spec.video}: {e}") from e
    clip = PreparedClip(
        clip_id=spec.clip_id, speaker=spec.speaker, emotion=spec.emotion, intensity=spec.intensity,
        text=spec.text, split=spec.split, fps=options.fps,
        frames=[schema.encode_frame(f, "jpeg", options.jpeg_quality) for f in cropped.frames],
        audio=wave, landmarks=cropped.landmarks, landmark_layout=layout, face_missing=cropped.face_missing,
        boxes=cropped.boxes, source=str(spec.video),
    )  # fmt: skip
    write_clip(clip_path(out_dir, spec.clip_id), clip)
    return {"id": spec.clip_id, "video": str(spec.video), "frames": num_frames,
            "seconds": round(num_frames / options.fps, 3), "landmarks": source.kind}  # fmt: skip


def _run_one(spec, out_dir, source, options) -> tuple[str, dict[str, object]]:
    """``prepare_clip`` with its outcome as data: ``("done" | "skipped" | "failed", entry)``."""
    try:
        return "done", prepare_clip(spec, out_dir, source, options)
    except SKIPPED_ERRORS as e:
        return "skipped", {"id": spec.clip_id, "video": str(spec.video), "reason": str(e)}
    except Exception as e:  # an unforeseen problem with one video must not end the batch
        return "failed", {"id": spec.clip_id, "video": str(spec.video), "error": f"{type(e).__name__}: {e}",
                          "traceback": traceback.format_exc()}  # fmt: skip


def read_metadata(path: str | os.PathLike) -> dict[str, object]:
    """``clip_id``, ``speaker``, ``emotion``, ``intensity``, ``text``, ``split`` of a prepared clip,
    without loading its frames."""
    path = pathlib.Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            out: dict[str, object] = {k: str(data[k]) for k in ("clip_id", "speaker", "emotion", "text", "split")}
            out["intensity"] = float(data["intensity"])
            return out
    except (OSError, KeyError, ValueError) as e:
        raise ValueError(f"{path}: not a readable prepared clip ({type(e).__name__}: {e})") from e


def _refresh_metadata(path: pathlib.Path, spec: manifest_lib.ClipSpec, current: dict[str, object]) -> bool:
    """Rewrite a cached clip whose ``current`` metadata no longer matches its input (e.g. an edited
    split); → whether it changed."""
    wanted = {"speaker": spec.speaker, "emotion": spec.emotion, "intensity": float(np.float32(spec.intensity)),
              "text": spec.text, "split": spec.split}  # fmt: skip
    if all(current[k] == v for k, v in wanted.items()):
        return False
    write_clip(path, dataclasses.replace(read_clip(path), **wanted))
    return True


@dataclasses.dataclass
class PrepareReport:
    """Outcome of :func:`prepare_videos`; each entry names the clip id and the video."""

    out_dir: str
    done: list[dict] = dataclasses.field(default_factory=list)
    cached: list[dict] = dataclasses.field(default_factory=list)
    skipped: list[dict] = dataclasses.field(default_factory=list)
    failed: list[dict] = dataclasses.field(default_factory=list)
    interrupted: bool = False
    seconds: float = 0.0

    def to_json(self) -> dict[str, object]:
        counts = {k: len(getattr(self, k)) for k in ("done", "cached", "skipped", "failed")}
        return {"counts": counts, **dataclasses.asdict(self)}

    def summary(self) -> str:
        lines = [
            f"prepared {len(self.done)} clip(s), {len(self.cached)} already done, {len(self.skipped)} skipped, "
            f"{len(self.failed)} failed in {self.seconds:.1f} s{' (interrupted)' if self.interrupted else ''} → {self.out_dir}"
        ]
        lines += [f"  skipped: {e['reason']}" for e in self.skipped]  # every reason names its file
        lines += [f"  FAILED {e['video']}: {e['error']}" for e in self.failed]
        return "\n".join(lines)

    def write(self) -> pathlib.Path:
        return atomic_write_text(pathlib.Path(self.out_dir) / REPORT_FILE, json.dumps(self.to_json(), indent=2))


def _check_settings(out_dir: pathlib.Path, options: PrepareOptions) -> None:
    path = out_dir / SETTINGS_FILE
    fixed = options.fixed()
    if path.is_file():
        previous = json.loads(path.read_text())
        changed = {k: (previous.get(k), v) for k, v in fixed.items() if previous.get(k) != v}
        if changed and list_clips(out_dir):
            shown = ", ".join(f"{k} {old!r} → {new!r}" for k, (old, new) in changed.items())
            raise PrepareSetupError(
                f"{out_dir} holds clips prepared with other settings ({shown}); use a new output folder or the same settings"
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(fixed, indent=2))


def _remove_temporaries(out_dir: pathlib.Path) -> None:
    """Delete partial files left by an interrupted run (they never replaced a finished clip)."""
    for tmp in (out_dir / CLIPS_DIR).glob(f"*/.*{PARTIAL_SUFFIX}"):
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def prepare_videos(
    inputs: manifest_lib.Inputs | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    size: int = 512,
    fps: float = schema.FPS,
    landmark_model: str | os.PathLike | None = None,
    min_frames: int = 25,
    workers: int = 1,
    margin: float = 1.6,
    smooth_window: int = 0,
    max_missing_face: float = 0.2,
    jpeg_quality: int = 95,
    progress: bool = True,
) -> PrepareReport:
    """Prepare every clip of ``inputs`` into ``out_dir`` (see the module docstring).

    ``inputs``: :class:`~moee_jax.data.manifest.Inputs`, or a manifest CSV / folder for
    :func:`~moee_jax.data.manifest.load_inputs`. ``size``: crop side in pixels; ``fps``: output
    frame rate; ``landmark_model``: MediaPipe ``face_landmarker.task`` for videos without a sidecar;
    ``min_frames``: shortest clip kept; ``workers``: processes (1 = in this process);
    ``margin`` / ``smooth_window`` / ``max_missing_face``: see :class:`~moee_jax.data.face_crop.CropConfig`.
    → :class:`PrepareReport`, also written to ``out_dir/report.json`` (even when interrupted).

    Raises:
      LandmarkSetupError: videos without a landmark source, before any work.
      PrepareSetupError: ``out_dir`` holds clips made with another size, fps, margin or smoothing.
      ManifestError: unreadable inputs (see :func:`~moee_jax.data.manifest.load_inputs`).
    """
    from tqdm.auto import tqdm

    start = time.perf_counter()
    if not isinstance(inputs, manifest_lib.Inputs):
        inputs = manifest_lib.load_inputs(inputs)
    options = PrepareOptions(size=size, fps=fps, margin=margin, smooth_window=smooth_window, max_missing_face=max_missing_face,
                             min_frames=min_frames, jpeg_quality=jpeg_quality)  # fmt: skip
    options.crop()  # validates the crop settings before anything is touched
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    out_dir = pathlib.Path(out_dir)
    report = PrepareReport(str(out_dir))
    report.skipped += [{"source": r.source, "reason": r.reason} for r in inputs.rejected]

    todo: list[manifest_lib.ClipSpec] = []
    cached: list[tuple[manifest_lib.ClipSpec, dict[str, object]]] = []
    for spec in inputs.clips:
        path = clip_path(out_dir, spec.clip_id)
        try:
            metadata = read_metadata(path) if path.is_file() else None
        except ValueError:  # an unreadable file (e.g. an older format) is prepared again
            metadata = None
        if metadata is None:
            todo.append(spec)
        else:
            cached.append((spec, metadata))

    # Setup checks come first: nothing is written until they pass.
    sources, unreadable = landmarks_lib.plan_sources([s.video for s in todo], landmark_model)
    _check_settings(out_dir, options)
    _remove_temporaries(out_dir)
    for spec, metadata in cached:
        updated = _refresh_metadata(clip_path(out_dir, spec.clip_id), spec, metadata)
        report.cached.append({"id": spec.clip_id, "video": str(spec.video), "metadata_updated": updated})
    runnable = []
    for spec in todo:
        if spec.video in unreadable:
            report.skipped.append({"id": spec.clip_id, "video": str(spec.video), "reason": f"{spec.video}: {unreadable[spec.video]}"})
        else:
            runnable.append(spec)

    bar = tqdm(total=len(runnable), desc="prepare", unit="video", disable=not progress)
    try:
        for status, entry in _run_all(runnable, out_dir, sources, options, workers):
            getattr(report, status).append(entry)
            bar.update(1)
            bar.set_postfix(skipped=len(report.skipped), failed=len(report.failed), refresh=False)
    except KeyboardInterrupt:
        report.interrupted = True
        raise
    finally:
        bar.close()
        report.seconds = round(time.perf_counter() - start, 3)
        report.write()
    return report


def _run_all(specs: Sequence[manifest_lib.ClipSpec], out_dir, sources, options, workers):
    """Yield ``(status, entry)`` per spec, in this process or in ``workers`` processes."""
    if workers == 1 or len(specs) <= 1:
        for spec in specs:
            yield _run_one(spec, out_dir, sources[spec.video], options)
        return
    # spawn: the parent may hold threads (TensorFlow, JAX) that a forked child must not inherit.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = {pool.submit(_run_one, spec, out_dir, sources[spec.video], options): spec for spec in specs}
        try:
            for future in concurrent.futures.as_completed(futures):
                spec = futures[future]
                try:
                    yield future.result()
                except concurrent.futures.process.BrokenProcessPool as e:
                    yield "failed", {"id": spec.clip_id, "video": str(spec.video),
                                     "error": f"worker process died ({e})", "traceback": ""}  # fmt: skip
        except BaseException:
            for future in futures:
                future.cancel()
            raise
