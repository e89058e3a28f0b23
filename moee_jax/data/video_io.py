"""Video files: decoding to frames and audio, frame-rate resampling, and atomic H.264 + AAC writing.

Shapes at the boundaries::

    read_video(path)                       frames (T, H, W, 3) uint8, fps, audio (A,) float32 16 kHz or None
    read_audio(path)                       audio (A,) float32 mono 16 kHz (the audio track of any container)
    resample_indices(T, fps, 25)           (T',) int64 source frame of each output frame
    write_video(path, frames, fps, audio)  MP4: H.264 yuv420p video, AAC mono audio

Everything goes through PyAV (``av``, the ``prepare`` extra), imported when first needed. A file
that cannot be decoded — missing, empty, not a media file, truncated — raises :class:`VideoError`
naming the file and the reason, never a raw decoder exception. Multi-channel audio is averaged to
mono and resampled with librosa (soxr), as :func:`moee_jax.data.audio.load_audio` does.
"""

from __future__ import annotations

import contextlib
import fractions
import itertools
import os
import pathlib
from collections.abc import Iterable, Iterator

import numpy as np

from moee_jax.atomic import atomic_write
from moee_jax.data.audio import SAMPLE_RATE

# A decoded video may end this many frames short of the count in its header (encoder delay, a
# dropped last frame) without counting as truncated; more than that means data is missing.
_TRUNCATION_SLACK_FRAMES = 2
_TRUNCATION_SLACK_FRACTION = 0.02


class VideoError(ValueError):
    """A video file that cannot be used; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = pathlib.Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def _av():
    try:
        import av
    except ImportError as e:
        raise ImportError("reading and writing video needs PyAV: `pip install av` (or `pip install moee_jax[prepare]`)") from e
    return av


def _check_file(path: pathlib.Path) -> None:
    if not path.exists():
        raise VideoError(path, "file not found")
    if not path.is_file():
        raise VideoError(path, "not a file")
    if path.stat().st_size == 0:
        raise VideoError(path, "file is empty (0 bytes)")


def _describe(error: BaseException) -> str:
    # FFmpegError's str() repeats the errno and the file name; its strerror is the reason alone.
    text = str(getattr(error, "strerror", None) or error).strip()
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _sniff_container(path: pathlib.Path) -> str | None:
    """The container kind named by the first bytes of ``path`` (MP4/MOV, Matroska, AVI, ...), or None."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip"):
        return "MP4/MOV"
    if head[:4] == b"\x1aE\xdf\xa3":
        return "Matroska/WebM"
    if head[:4] == b"RIFF" and head[8:12] in (b"AVI ", b"WAVE"):
        return head[8:12].decode().strip()
    if head[:3] == b"FLV":
        return "FLV"
    if head[:4] == b"\x00\x00\x01\xba" or head[:1] == b"\x47":
        return "MPEG"
    if head[:4] == b"OggS":
        return "Ogg"
    return None


@contextlib.contextmanager
def _open_input(path: pathlib.Path):
    """``av`` input container for ``path``; open failures become :class:`VideoError`."""
    av = _av()
    _check_file(path)
    try:
        container = av.open(str(path), mode="r")
    except Exception as e:  # FFmpegError subclasses, UnicodeDecodeError on odd metadata, OSError
        kind = _sniff_container(path)
        if kind is None:
            reason = "not a video file (no known media container header)"
        else:
            reason = f"corrupt or truncated {kind} file (its header is there but the file cannot be opened)"
        raise VideoError(path, f"{reason}: {_describe(e)}") from e
    try:
        yield container
    finally:
        container.close()


def probe_video(path: str | os.PathLike) -> None:
    """Check that ``path`` opens as a media file with a video stream (headers only, no decoding).

    Raises:
      VideoError: missing, empty, not a media container, or without a video stream.
    """
    path = pathlib.Path(path)
    with _open_input(path) as container:
        if not container.streams.video:
            raise VideoError(path, "has no video stream")


class _AudioCollector:
    """Accumulates decoded audio frames of ``stream`` as mono float32 at the stream's native rate.

    AAC decodes in whole 1024-sample frames, so the last one carries padding that the container's
    stream duration excludes; the wave is cut to that duration when the container gives one.
    ``start`` is the timestamp (s) of the first decoded sample, for aligning audio to video.
    """

    def __init__(self, av, stream):
        self._resampler = av.AudioResampler(format="fltp")
        self._chunks: list[np.ndarray] = []
        self.rate: int | None = None
        self.start: float | None = None
        self._seconds = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else None

    def add(self, frame) -> None:
        if self.rate is None:
            self.rate, self.start = frame.sample_rate, frame.time
        for out in self._resampler.resample(frame):
            self._chunks.append(out.to_ndarray().mean(axis=0, dtype=np.float32))

    def finish(self, sr: int, video_start: float | None = None) -> np.ndarray | None:
        """The wave ``(A,)`` at ``sr`` Hz; with ``video_start`` (s), shifted so that sample 0 is
        at the first video frame (zeros before a late audio start, a lead cut off)."""
        for out in self._resampler.resample(None):
            self._chunks.append(out.to_ndarray().mean(axis=0, dtype=np.float32))
        if not self._chunks or self.rate is None:
            return None
        wave = np.concatenate(self._chunks)
        if self._seconds is not None:
            wave = wave[: max(1, int(np.ceil(self._seconds * self.rate - 1e-6)))]
        if video_start is not None and self.start is not None:
            shift = int(round((self.start - video_start) * self.rate))
            wave = np.concatenate([np.zeros(shift, np.float32), wave]) if shift > 0 else wave[-shift:]
        if wave.size == 0:
            return None
        if self.rate != sr:
            import librosa

            wave = librosa.resample(wave, orig_sr=self.rate, target_sr=sr)
        return np.ascontiguousarray(wave, np.float32)


def read_video(path: str | os.PathLike, *, sr: int = SAMPLE_RATE) -> tuple[np.ndarray, float, np.ndarray | None]:
    """Decode every frame and the audio track of ``path``.

    → ``frames (T, H, W, 3)`` uint8 RGB, ``fps`` (the stream's average frame rate; frames are taken
    as evenly spaced at it), ``audio (A,)`` float32 mono at ``sr`` Hz starting at the first frame's
    timestamp, or ``None`` when the file has no audio track (or the track holds no samples).
    Memory is the whole decoded video (``T·H·W·3`` bytes: ~0.9 GB for 5 s of 1080p at 30 fps).

    Raises:
      VideoError: the file is missing, empty, not a video, has no decodable frames, is corrupt, or
        decodes to clearly fewer frames than its header promises (a truncated file).
    """
    av = _av()
    path = pathlib.Path(path)
    with _open_input(path) as container:
        if not container.streams.video:
            raise VideoError(path, "has no video stream (an audio-only or data file?)")
        vstream = container.streams.video[0]
        astream = container.streams.audio[0] if container.streams.audio else None
        vstream.thread_type = "AUTO"
        rate = vstream.average_rate or vstream.guessed_rate or vstream.base_rate
        declared = int(vstream.frames or 0)
        frames: list[np.ndarray] = []
        first_frame_time: float | None = None
        audio = _AudioCollector(av, astream) if astream is not None else None
        try:
            streams = [s for s in (vstream, astream) if s is not None]
            for packet in container.demux(*streams):
                for frame in packet.decode():
                    if packet.stream.type == "video":
                        if not frames:
                            first_frame_time = frame.time
                        frames.append(frame.to_ndarray(format="rgb24"))
                    else:
                        audio.add(frame)
            wave = audio.finish(sr, first_frame_time) if audio is not None else None
        except Exception as e:  # the decoders raise FFmpegError subclasses, ValueError, EOFError, ...
            raise VideoError(path, f"corrupt or truncated ({_describe(e)} after {len(frames)} frames)") from e
    if not frames:
        raise VideoError(path, "no video frames could be decoded (corrupt or truncated file)")
    if declared and len(frames) < declared - max(_TRUNCATION_SLACK_FRAMES, _TRUNCATION_SLACK_FRACTION * declared):
        raise VideoError(path, f"truncated: decoded {len(frames)} of the {declared} frames its header declares")
    if not rate or float(rate) <= 0:
        raise VideoError(path, "the video stream has no frame rate")
    shapes = {f.shape for f in frames}
    if len(shapes) > 1:
        raise VideoError(path, f"frame size changes within the video ({sorted(shapes)})")
    return np.stack(frames), float(rate), wave


def read_audio(path: str | os.PathLike, *, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Decode the first audio track of any container PyAV reads (M4A, MP4, WAV, ...) to ``(A,)``
    float32 mono at ``sr`` Hz.

    Raises:
      VideoError: the file is missing, unreadable, corrupt, or has no audio samples.
    """
    av = _av()
    path = pathlib.Path(path)
    with _open_input(path) as container:
        if not container.streams.audio:
            raise VideoError(path, "has no audio track")
        collector = _AudioCollector(av, container.streams.audio[0])
        try:
            for frame in container.decode(audio=0):
                collector.add(frame)
            wave = collector.finish(sr)
        except Exception as e:
            raise VideoError(path, f"corrupt or truncated audio ({_describe(e)})") from e
    if wave is None:
        raise VideoError(path, "the audio track holds no samples")
    return wave


def resample_indices(num_frames: int, fps: float, target_fps: float = 25.0) -> np.ndarray:
    """Source frame ``(T',)`` int64 of each output frame when resampling ``num_frames`` at ``fps`` to
    ``target_fps``, nearest by timestamp.

    Source frame ``i`` is shown at ``i / fps``, output frame ``j`` at ``j / target_fps``; output
    frames cover the source's duration ``num_frames / fps``, so ``T' = ceil(num_frames ·
    target_fps / fps)`` (float slack 1e-6 frame). Equal rates give the identity.
    """
    if num_frames < 1 or fps <= 0 or target_fps <= 0:
        raise ValueError(f"need num_frames >= 1, fps > 0, target_fps > 0; got {num_frames}, {fps}, {target_fps}")
    count = max(1, int(np.ceil(num_frames * target_fps / fps - 1e-6)))
    times = np.arange(count) / target_fps
    # Nearest source frame, ties to the earlier one (12.5 → 25 fps repeats each frame twice); the
    # slack keeps exact ratios such as 50 → 25 fps on the grid despite float error.
    return np.minimum(np.maximum(np.ceil(times * fps - 0.5 - 1e-6), 0).astype(np.int64), num_frames - 1)


def resample_frames(frames: np.ndarray, fps: float, target_fps: float = 25.0) -> np.ndarray:
    """``frames (T, ...)`` at ``fps`` → ``(T', ...)`` at ``target_fps`` by nearest timestamp
    (frames are dropped or repeated, never blended; see :func:`resample_indices`)."""
    frames = np.asarray(frames)
    return frames[resample_indices(frames.shape[0], fps, target_fps)]


def _even(frame: np.ndarray) -> np.ndarray:
    """Pad ``(H, W, 3)`` by one replicated row / column where ``H`` / ``W`` is odd (yuv420p needs even)."""
    pad_h, pad_w = frame.shape[0] % 2, frame.shape[1] % 2
    if pad_h or pad_w:
        frame = np.pad(frame, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return frame


def write_video(
    path: str | os.PathLike,
    frames: np.ndarray | Iterable[np.ndarray],
    fps: float,
    audio: np.ndarray | None = None,
    sr: int = SAMPLE_RATE,
    *,
    crf: int = 18,
) -> pathlib.Path:
    """Write ``frames`` — ``(T, H, W, 3)`` uint8 RGB, or any iterable of ``(H, W, 3)`` uint8 frames, which
    is consumed one frame at a time (memory does not grow with the video's length) — as an H.264
    (yuv420p) MP4, with ``audio (A,)`` float32 mono at ``sr`` Hz muxed in as AAC when given.

    An odd height or width is padded by one replicated row / column (4:2:0 chroma needs even sizes).
    ``crf`` is x264's constant quality (0 lossless luma, 18 visually transparent, 23 default).
    The file is written under a temporary name in the same folder and renamed into place, so
    ``path`` is either absent or complete, even if writing is interrupted or a frame is bad. → ``path``.
    """
    av = _av()
    path = pathlib.Path(path)
    if isinstance(frames, np.ndarray) and (frames.ndim != 4 or frames.shape[0] == 0):
        raise ValueError(f"{path}: frames must be (T, H, W, 3) with T >= 1, got shape {frames.shape}")
    if not fps > 0:
        raise ValueError(f"{path}: fps must be > 0, got {fps}")
    if audio is not None:
        audio = np.asarray(audio, np.float32).reshape(-1)
        if audio.size == 0:
            raise ValueError(f"{path}: audio is empty; pass audio=None for a silent video")
        if not np.isfinite(audio).all():
            raise ValueError(f"{path}: audio contains NaN or infinite samples")
        audio = np.clip(audio, -1.0, 1.0)
    return atomic_write(path, lambda tmp: _encode(av, tmp, _checked_frames(path, frames), fps, audio, sr, crf))


def _checked_frames(path: pathlib.Path, frames: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    """Each frame checked ((H, W, 3) uint8, all of one size) and padded to even sides, as it comes."""
    size = None
    for i, frame in enumerate(frames):
        frame = np.asarray(frame)
        if frame.ndim != 3 or frame.shape[-1] != 3:
            raise ValueError(f"{path}: frames must be (T, H, W, 3) RGB; frame {i} has shape {frame.shape}")
        if frame.dtype != np.uint8:
            raise ValueError(f"{path}: frames must be uint8 RGB, got dtype {frame.dtype}")
        if size is None:
            size = frame.shape
        elif frame.shape != size:
            raise ValueError(f"{path}: frame {i} is {frame.shape[:2]}, the first frame {size[:2]}; all frames need one size")
        yield _even(frame)
    if size is None:
        raise ValueError(f"{path}: frames must be (T, H, W, 3) with T >= 1, got no frames")


def _encode(av, filename: str, frames: Iterator[np.ndarray], fps: float, audio: np.ndarray | None, sr: int, crf: int) -> None:
    rate = fractions.Fraction(fps).limit_denominator(1001)
    first = next(frames)  # the stream's size comes from the first frame
    with av.open(filename, mode="w", format="mp4") as container:
        video = container.add_stream("libx264", rate=rate)
        video.width, video.height = first.shape[1], first.shape[0]
        video.pix_fmt = "yuv420p"
        video.options = {"crf": str(crf), "preset": "medium"}
        sound = None
        if audio is not None:
            sound = container.add_stream("aac", rate=sr, layout="mono")
        for frame in itertools.chain([first], frames):
            container.mux(video.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(video.encode(None))
        if sound is not None:
            # Encode in 1024-sample frames (AAC's frame size) with explicit timestamps.
            step = sound.codec_context.frame_size or 1024
            for start in range(0, audio.size, step):
                chunk = audio[start : start + step]
                frame = av.AudioFrame.from_ndarray(chunk[None, :], format="fltp", layout="mono")
                frame.sample_rate = sr
                frame.pts = start
                frame.time_base = fractions.Fraction(1, sr)
                container.mux(sound.encode(frame))
            container.mux(sound.encode(None))
