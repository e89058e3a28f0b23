"""What a ``moee`` command prints, and the full log it keeps.

The terminal gets what a person reads: one line when a phase starts and one with its duration when it
ends (:func:`phase`), progress bars over work that takes minutes (:func:`progress`), each warning
once, and a closing summary of where the outputs are (:func:`summary`). Library INFO records
(absl, Orbax, TFDS, this package) stay off the terminal unless ``--verbosity=1`` (``-v``); every
record, the phase lines and the training progress lines go to a log file in the run directory
(:func:`log_to`), so a long run can be read afterwards in full.

::

    console.configure(verbose=False)
    with console.log_to(out / "demo.log"), console.phase("stage1", "500 steps"):
        ...
    console.summary({"videos": out / "videos", "metrics": out / "metrics.md"})
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import sys
import time
from collections.abc import Callable, Iterator, Mapping

_FORMAT = "%(asctime)s %(levelname).1s %(name)s: %(message)s"
_files: list[logging.Handler] = []  # the open log files (log_to), which also take the console's lines


# Third-party warnings that say nothing to act on: kept in the log file, off the terminal.
_FILE_ONLY = ("Using custom data configuration",)


class _Once(logging.Filter):
    """Passes each warning text once per process (a stage's warning repeated by the next stage is noise)."""

    def __init__(self):
        super().__init__()
        self.seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.getMessage())
        if key in self.seen or key[1].startswith(_FILE_ONLY) or _disk_full(record):
            return False
        self.seen.add(key)
        return True


def _disk_full(record: logging.LogRecord) -> bool:
    """A record of a write that found the disk full: Orbax and asyncio log one per array and task;
    the command's own message says it once."""
    text = record.getMessage() + (str(record.exc_info[1]) if record.exc_info else "")
    return "No space left on device" in text or "RESOURCE_EXHAUSTED: Error writing" in text


class _LogFile(logging.FileHandler):
    """A log file that stays quiet when it cannot be written (a full disk): the run goes on."""

    def handleError(self, record: logging.LogRecord) -> None:
        """Nothing to print: logging's default would print a traceback per record to stderr."""


class _Short(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = f"{record.levelname.lower()}: {record.getMessage()}"
        return text + "\n" + self.formatException(record.exc_info) if record.exc_info else text


def quiet_native_logs() -> None:
    """Keep XLA's C++ log (e.g. the "Very slow compile?" alarm of a minutes-long CPU compile) off the
    terminal; a value the user set wins. Must run before JAX initialises its backend."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


class _Terminal(logging.StreamHandler):
    """stderr as it is when a record comes (a test's capture, a redirected stream), not at start-up."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


_terminal = _Terminal()
_terminal.addFilter(_Once())


def _closed_loop_hook(hook):
    """``sys.excepthook`` without the "Event loop is closed" errors that TensorStore's callbacks
    print once Orbax has shut its event loop after a failed or abandoned asynchronous read or write
    (one per pending array; the command reports the failure itself)."""

    def excepthook(kind, value, tb):
        if issubclass(kind, RuntimeError) and str(value) == "Event loop is closed":
            logging.getLogger("moee_jax.console").info("ignored after a failed asynchronous checkpoint I/O: %s", value)
            return
        hook(kind, value, tb)

    excepthook.quiets_closed_loops = True
    return excepthook


def configure(verbose: bool = False) -> None:
    """Route records: WARNING and above to the terminal, each once (INFO too when ``verbose``); every
    record at INFO and above to the log files of :func:`log_to`. Replaces absl's own stderr handler,
    which ``absl.app.run`` installs."""
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.INFO)  # records are made; the handlers choose where they go
    root = logging.getLogger()
    if absl_logging.get_absl_handler() in root.handlers:
        root.removeHandler(absl_logging.get_absl_handler())
    _terminal.setLevel(logging.INFO if verbose else logging.WARNING)
    # "warning: …" rather than absl's "W1202 07:04:47.696508 1402… file.py:73] …", unless verbose.
    _terminal.setFormatter(absl_logging.PythonFormatter() if verbose else _Short())
    if _terminal not in root.handlers:
        root.addHandler(_terminal)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)  # Python warnings become records: once on the terminal, all in the file
    if not getattr(sys.excepthook, "quiets_closed_loops", False):
        sys.excepthook = _closed_loop_hook(sys.excepthook)
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # the backends it did not find
    if not verbose:
        with contextlib.suppress(ImportError):
            import tensorflow_datasets as tfds

            tfds.disable_progress_bar()  # per-example bars; the phase line says what is being built


@contextlib.contextmanager
def log_to(path: str | pathlib.Path) -> Iterator[pathlib.Path]:
    """Append every INFO-and-above record and every console line to ``path`` while the block runs.

    A command that fails before writing anything else leaves nothing behind: when the block raises
    and the log is alone in a folder this call created, both go (with the other folders it created,
    if empty). A log beside other outputs, e.g. of a run that failed after hours, is kept."""
    path = pathlib.Path(path)
    created = [d for d in (path.parent, *path.parent.parents) if not d.exists()]
    existed = path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = _LogFile(path, encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter(_FORMAT))
    root = logging.getLogger()
    level = root.level
    root.setLevel(min(level, logging.INFO) if level else logging.NOTSET)  # INFO records reach the file (a notebook too)
    root.addHandler(handler)
    _files.append(handler)
    failed = False
    try:
        yield path
    except BaseException:
        failed = True
        raise
    finally:
        _files.remove(handler)
        root.removeHandler(handler)
        root.setLevel(level)
        with contextlib.suppress(OSError):  # a full disk must not hide the command's own error
            handler.close()
        if failed and not existed and created and [p.name for p in path.parent.iterdir()] == [path.name]:
            path.unlink(missing_ok=True)
            for d in created:  # innermost first
                with contextlib.suppress(OSError):
                    d.rmdir()  # only if empty


def line(text: str, *, file=None) -> None:
    """Print ``text`` (stdout unless ``file``) and add it to the open log files."""
    print(text, file=file or sys.stdout, flush=True)
    record = logging.LogRecord("moee_jax.console", logging.INFO, __file__, 0, text, None, None)
    for handler in _files:
        handler.handle(record)


def duration(seconds: float) -> str:
    """``4.2 s``, ``12m03s``, ``2h05m``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, s = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{s:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


@contextlib.contextmanager
def phase(name: str, detail: str = "") -> Iterator[dict]:
    """One line as the phase starts and one with its duration as it ends (or fails). The yielded dict
    collects a short result (``result["note"] = "loss 0.41"``) for the closing line; ``seconds`` is
    set on exit."""
    out: dict = {}
    line(f"▸ {name}" + (f": {detail}" if detail else ""))
    t0 = time.perf_counter()
    try:
        yield out
    except BaseException:
        line(f"✗ {name} failed after {duration(time.perf_counter() - t0)}")
        raise
    out["seconds"] = time.perf_counter() - t0
    note = f" ({out['note']})" if out.get("note") else ""
    line(f"✓ {name} in {duration(out['seconds'])}{note}")


def progress(total: int | None, desc: str, unit: str = "it"):
    """A tqdm bar on stderr; where stderr is not a terminal (a log, CI) it redraws at most every 60 s."""
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, mininterval=0.5 if tty else 60.0, dynamic_ncols=True)


def bar_progress(bar):
    """A ``progress(done, total)`` callback that moves ``bar`` (the form the library functions take)."""

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    return progress


@contextlib.contextmanager
def progress_callback(desc: str, unit: str = "it") -> Iterator[Callable[[int, int], None]]:
    """A ``progress(done, total)`` callback whose bar (:func:`progress`) appears at its first call, so
    several phases of one library call (sampling, then writing) each get a bar in turn; closed at exit."""
    bars = []

    def update(done: int, total: int) -> None:
        if not bars:
            bars.append(progress(total, desc, unit))
        bars[0].total = total
        bars[0].update(done - bars[0].n)

    try:
        yield update
    finally:
        for bar in bars:
            bar.close()


def summary(outputs: Mapping[str, object]) -> None:
    """The closing lines: where every output is."""
    width = max((len(k) for k in outputs), default=0)
    line("outputs:")
    for name, where in outputs.items():
        line(f"  {name.ljust(width)}  {where}")
