"""SIGTERM and SIGINT (Ctrl-C) during training: recorded instead of fatal, so the loop finishes its
step, saves a checkpoint and stops cleanly (a preempted TPU VM or a SLURM job gets SIGTERM first)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class StopRequest:
    """The stop signal received while :func:`catch` was active, if any."""

    def __init__(self):
        self.signal: int | None = None

    def __bool__(self) -> bool:
        return self.signal is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal is not None else ""


@contextlib.contextmanager
def catch(signals=(signal.SIGTERM, signal.SIGINT)) -> Iterator[StopRequest]:
    """Record ``signals`` in the yielded :class:`StopRequest` while the block runs; the previous
    handlers come back afterwards. Off the main thread (where Python cannot install handlers) the
    request simply never fires."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def on_signal(signum, frame):
        request.signal = signum

    previous = {s: signal.signal(s, on_signal) for s in signals}
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
