"""Throughput and memory of a generation run: ``moee animate --benchmark`` and ``benchmarks/device_suite.py``.

:func:`peak_memory` is the most memory the process has held so far: the first local device's
``peak_bytes_in_use`` where the runtime reports it (GPU, TPU), else the process's maximum resident
set size (a CPU backend, whose arrays live in host memory). Neither can be reset, so it is a running
maximum since the process started.

:class:`AnimateBenchmark` times one ``moee animate`` command::

    bench = AnimateBenchmark(started=time.monotonic())       # at the command's start
    animation = animate_to_file(..., progress=bench.progress(bar_callback))
    print(bench.line(animation.plan.num_frames, animation.settings["sampling_seconds"]))

which prints one line such as ``benchmark: 13 frames; sampling 1.90 s (6.84 frames/s, 0.146 s/frame;
0.021 s/frame after the first clip); end to end 9.2 s (1.41 frames/s, 0.708 s/frame); peak memory
1.31 GiB (max RSS)``. "Sampling" is the clip loop (conditions, the sampler and the decoder of every
clip: :meth:`~moee_jax.inference.animator.Animator.render_job`), the jit compilation of the first
clip included; "after the first clip" leaves that compilation out (runs of two clips or more);
"end to end" is the whole command (model loading, compilation, writing the MP4).
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable

GIB = 2.0**30


def peak_memory() -> tuple[int, str]:
    """``(bytes, source)``: the peak device memory in use since the process started (``source =
    "device"``) where the first local device reports ``peak_bytes_in_use``, else the process's
    maximum resident set size (``"max RSS"``)."""
    try:
        import jax

        stats = jax.local_devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - a backend without memory statistics: fall back to the host's figure
        stats = {}
    if stats.get("peak_bytes_in_use"):
        return int(stats["peak_bytes_in_use"]), "device"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return int(rss if sys.platform == "darwin" else rss * 1024), "max RSS"


def format_bytes(n: float) -> str:
    """``1.31 GiB`` (``MiB`` below one GiB)."""
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2.0**20:.0f} MiB"


class AnimateBenchmark:
    """The timings of one ``moee animate`` command (see the module docstring). ``started``: the
    command's start on the :func:`time.monotonic` clock (default: now); ``clock`` for tests."""

    def __init__(self, started: float | None = None, *, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.started = clock() if started is None else float(started)
        self.clip_done: list[float] = []  # clock() after each finished clip
        self.clip_frames = 0

    def progress(self, inner: Callable[[int, int], None] | None = None) -> Callable[[int, int], None]:
        """A per-clip ``progress(done, total)`` callback that records when each clip finished and then
        calls ``inner`` (e.g. the progress bar's)."""

        def update(done: int, total: int) -> None:
            self.clip_done.append(self.clock())
            if inner is not None:
                inner(done, total)

        return update

    def steady_seconds_per_frame(self, clip_frames: int) -> float | None:
        """Seconds per frame over the clips after the first (whose time holds the compilation), from
        the recorded clip times and ``clip_frames`` (F) frames per clip; None with fewer than two clips."""
        if len(self.clip_done) < 2 or clip_frames < 1:
            return None
        return (self.clip_done[-1] - self.clip_done[0]) / ((len(self.clip_done) - 1) * clip_frames)

    def line(self, frames: int, sampling_seconds: float, *, clip_frames: int = 0) -> str:
        """The one-line summary for ``frames`` frames generated in ``sampling_seconds`` of sampling,
        end to end from ``started`` until now, with the peak memory so far."""
        if frames < 1:
            raise ValueError(f"AnimateBenchmark.line: frames={frames}; a finished run generated at least one frame")
        total = self.clock() - self.started
        peak, source = peak_memory()
        steady = self.steady_seconds_per_frame(clip_frames)
        after = "" if steady is None else f"; {steady:.3g} s/frame after the first clip"
        return (
            f"benchmark: {frames} frames; sampling {sampling_seconds:.2f} s ({_rate(frames, sampling_seconds)} frames/s, "
            f"{sampling_seconds / frames:.3g} s/frame{after}); end to end {total:.1f} s ({_rate(frames, total)} frames/s, "
            f"{total / frames:.3g} s/frame); peak memory {format_bytes(peak)} ({source})"
        )


def _rate(frames: int, seconds: float) -> str:
    return f"{frames / seconds:.3g}" if seconds > 0 else "inf"
