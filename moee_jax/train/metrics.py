"""Training metrics: TensorBoard event files, the console progress line, FLOPs and MFU.

Event files are written with ``tensorboardX``'s protocol buffers and record writer, so TensorFlow
is never imported (``gs://`` log directories additionally need ``google-cloud-storage``).

**FLOPs of a jitted step.** ``Compiled.cost_analysis()`` analyses the executable XLA built, and for
a program partitioned over ``n`` devices (SPMD, ``num_partitions = n``) that is the *per-device*
program. Observed on CPU with 8 fake devices (``--xla_force_host_platform_device_count=8``,
jax 0.10) for ``(256, 256) @ (256, 256)`` in fp32, where ``2·256³ = 33,554,432``:

============================================  ================  ===================
inputs                                        ``Compiled``      ``Lowered``
============================================  ================  ===================
one device                                    33,554,432        33,554,432
rows sharded over 8 (``P('x', None)``)        4,194,304 (1/8)   33,554,432
contraction sharded (``P(None, 'x')`` @ …)    4,259,840         33,554,432
replicated on all 8                           33,554,432        33,554,432
============================================  ================  ===================

The contraction-sharded program also counts the ``256²`` additions of its all-reduce; a
replicated program really runs the whole matmul on every device. :func:`compiled_flops` scales the
per-device count of a ``Compiled`` by its number of devices, so it returns the FLOPs all devices
execute together: ``2·256³`` for the first two rows, ``2·256³ + 8·256²`` (1.6 % more) for the
third, ``8·2·256³`` for the replicated one. For MFU, which counts the model's FLOPs, pass the ``Lowered``
(``jax.jit(step).lower(...)``): its analysis runs before partitioning and is the global count of
the program as written, whatever the sharding. GPU back ends have at times reported ``-1`` (which
comes back as ``None``) or too-small counts for the optimised executable, with dots rewritten into
library calls (jax-ml/jax#16008, #22249): one more reason to count on the ``Lowered``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import os
import pathlib
import re
import struct
import time
from collections.abc import Iterator, Mapping

import jax
import numpy as np

from moee_jax import console
from moee_jax.atomic import atomic_write_text

# --- TensorBoard event files ---------------------------------------------------------------------

_WRITER_SERIAL = itertools.count()


class MetricsWriter:
    """Scalars and text to TensorBoard event files under ``logdir`` (local path or ``gs://``).

    Only one process of a multi-host run should write (pass ``enabled=jax.process_index() == 0``);
    a disabled writer creates no directory or file and ignores every call. Writes are synchronous
    (a record appended to a buffered file); the file is flushed by :meth:`flush`, by :meth:`close`,
    and at most ``flush_secs`` after a write.

    ``purge_step``: when a run resumes from a checkpoint at step ``s``, pass ``s``; TensorBoard (and
    :func:`read_scalars`) then drop what an earlier attempt logged for steps ``>= s``, so a
    preempted stretch is not plotted twice.
    """

    def __init__(self, logdir: str | os.PathLike, *, enabled: bool = True, flush_secs: float = 30.0, purge_step: int | None = None):
        self.logdir = os.fspath(logdir)
        self.enabled = bool(enabled)
        self._flush_secs = float(flush_secs)
        self._writer = None
        self._closed = False
        self._last_flush = time.monotonic()
        if not self.enabled:
            return
        if self.logdir.startswith("gs://"):
            try:
                import google.cloud.storage  # noqa: F401
            except ImportError:
                raise ImportError(
                    f"MetricsWriter({self.logdir!r}): writing event files to gs:// needs google-cloud-storage; "
                    "pip install google-cloud-storage, or log to a local directory"
                ) from None
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.record_writer import directory_check

        directory_check(self.logdir)
        suffix = f".{os.getpid()}.{next(_WRITER_SERIAL)}"
        self._writer = EventsWriter(os.path.join(self.logdir, "events"), filename_suffix=suffix)
        if purge_step is not None:
            from tensorboardX.proto.event_pb2 import Event, SessionLog

            self._write(Event(step=int(purge_step), wall_time=time.time(), session_log=SessionLog(status=SessionLog.START)))
        self.flush()

    def _write(self, event) -> None:
        if self._closed:
            raise RuntimeError(f"MetricsWriter({self.logdir!r}) is closed")
        self._writer.write_event(event)
        if time.monotonic() - self._last_flush >= self._flush_secs:
            self.flush()

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """One point per tag at ``step``: ``values = {"loss": 0.12, "lr": 1e-4}`` (Python or 0-d
        array values; non-finite values are written as they are)."""
        if not self.enabled:
            return
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.proto.summary_pb2 import Summary

        points = []
        for tag, value in values.items():
            array = np.asarray(value)
            if array.size != 1:
                raise ValueError(f"MetricsWriter.scalars: {tag!r} has shape {array.shape}; only single numbers can be logged")
            try:
                points.append(Summary.Value(tag=str(tag), simple_value=float(array.reshape(()))))
            except (TypeError, ValueError):
                raise TypeError(f"MetricsWriter.scalars: {tag!r}={value!r} is not a number") from None
        self._write(Event(step=int(step), wall_time=time.time(), summary=Summary(value=points)))

    def text(self, step: int, tag: str, value: str) -> None:
        """A text entry (TensorBoard's Text tab), e.g. the config at step 0."""
        if not self.enabled:
            return
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import text

        self._write(Event(step=int(step), wall_time=time.time(), summary=text(str(tag), str(value))))

    def flush(self) -> None:
        if self.enabled and not self._closed:
            self._writer.flush()
            self._last_flush = time.monotonic()

    def close(self) -> None:
        if self.enabled and not self._closed:
            self._writer.flush()
            self._writer.close()
        self._closed = True

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _events(logdir: str | os.PathLike) -> Iterator:
    """Every ``Event`` of the event files directly in ``logdir``, file by file in name (= time) order,
    checking each record's length and data CRCs."""
    from etils import epath
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.record_writer import masked_crc32c as masked

    for path in sorted(p for p in epath.Path(logdir).iterdir() if "tfevents" in p.name):
        data = path.read_bytes()
        pos = 0
        while pos + 12 <= len(data):
            header = data[pos : pos + 8]
            (length,) = struct.unpack("<Q", header)
            (header_crc,) = struct.unpack("<I", data[pos + 8 : pos + 12])
            body = data[pos + 12 : pos + 12 + length]
            if header_crc != masked(header) or len(body) < length or pos + 16 + length > len(data):
                break  # a record still being written (or a truncated file): stop at the last whole one
            (body_crc,) = struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])
            if body_crc != masked(body):
                raise ValueError(f"{path}: corrupt event record at byte {pos} (data CRC mismatch)")
            pos += 16 + length
            yield Event.FromString(body)


def read_scalars(logdir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """The scalars of the event files in ``logdir``: ``{tag: [(step, value), ...]}`` in write order.

    Applies resume purges as TensorBoard does: a ``purge_step`` marker at step ``s`` drops the points
    logged before it at steps ``>= s``. Values are float32 (TensorBoard's ``simple_value``).
    """
    from tensorboardX.proto.event_pb2 import SessionLog

    out: dict[str, list[tuple[int, float]]] = {}
    for event in _events(logdir):
        if event.HasField("session_log") and event.session_log.status == SessionLog.START:
            out = {tag: [(s, v) for s, v in points if s < event.step] for tag, points in out.items()}
        for value in event.summary.value:
            if value.WhichOneof("value") == "simple_value":
                out.setdefault(value.tag, []).append((int(event.step), float(value.simple_value)))
    return out


def read_texts(logdir: str | os.PathLike) -> dict[str, list[tuple[int, str]]]:
    """The text entries of the event files in ``logdir``: ``{tag: [(step, text), ...]}``."""
    out: dict[str, list[tuple[int, str]]] = {}
    for event in _events(logdir):
        for value in event.summary.value:
            if value.metadata.plugin_data.plugin_name == "text":
                tag = value.tag.removesuffix("/text_summary")
                out.setdefault(tag, []).append((int(event.step), value.tensor.string_val[0].decode("utf-8")))
    return out


# --- FLOPs and MFU -------------------------------------------------------------------------------


def _flops_of(analysis) -> float | None:
    """``flops`` of a cost analysis: a dict, or (older JAX) a list of dicts, one per program."""
    if analysis is None:
        return None
    entries = [analysis] if isinstance(analysis, Mapping) else list(analysis)
    values = [e.get("flops") for e in entries if isinstance(e, Mapping)]
    if not values or any(v is None for v in values):
        return None
    total = float(sum(float(v) for v in values))
    return total if math.isfinite(total) and total > 0 else None


def _num_devices(compiled) -> int:
    """Devices the executable runs on, from its input and output shardings (1 without any)."""
    shardings = jax.tree.leaves((compiled.input_shardings, compiled.output_shardings))
    return max((len(s.device_set) for s in shardings if hasattr(s, "device_set")), default=1)


def compiled_flops(compiled) -> float | None:
    """FLOPs of one call of a jitted function, all devices together (see the module doc).

    ``compiled``: a ``jax.stages.Compiled`` (per-device analysis × number of devices: the FLOPs
    executed) or a ``jax.stages.Lowered`` (analysis before partitioning: the program's FLOPs, the
    right numerator for MFU). ``None`` when the back end gives no usable count.
    """
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # some back ends and plugins do not implement cost analysis
        return None
    flops = _flops_of(analysis)
    if flops is None:
        return None
    if isinstance(compiled, jax.stages.Compiled):
        flops *= _num_devices(compiled)
    return flops


@dataclasses.dataclass(frozen=True)
class _Peak:
    pattern: str
    name: str
    flops: Mapping[str, float]


# Published peak dense FLOP/s per JAX device (one GPU; one TPU chip for v4, v5e, v5p, v6e), without
# structured sparsity. NVIDIA: the H100 / H200 / A100 / L4 data sheets and the Hopper architecture
# white paper (tensor-core bf16/fp16 and tf32; float32 = CUDA-core fp32). Google: Cloud TPU system
# architecture pages (bf16; the MXU has no published fp32 rate). Patterns match ``device.device_kind``
# (case-insensitive); more specific ones come first.
_PEAKS: tuple[_Peak, ...] = (
    _Peak(r"\bH100\b.*\bPCIe\b", "NVIDIA H100 PCIe", {"bfloat16": 756.5e12, "float16": 756.5e12, "tfloat32": 378.0e12, "float32": 51.2e12}),
    _Peak(r"\bH100\b.*\bNVL\b", "NVIDIA H100 NVL", {"bfloat16": 835.5e12, "float16": 835.5e12, "tfloat32": 417.5e12, "float32": 60.0e12}),
    _Peak(r"\bH100\b", "NVIDIA H100 SXM", {"bfloat16": 989.4e12, "float16": 989.4e12, "tfloat32": 494.7e12, "float32": 66.9e12}),
    _Peak(r"\bH200\b.*\bNVL\b", "NVIDIA H200 NVL", {"bfloat16": 835.5e12, "float16": 835.5e12, "tfloat32": 417.5e12, "float32": 60.0e12}),
    _Peak(r"\bH200\b", "NVIDIA H200 SXM", {"bfloat16": 989.4e12, "float16": 989.4e12, "tfloat32": 494.7e12, "float32": 66.9e12}),
    _Peak(r"\bA100\b", "NVIDIA A100", {"bfloat16": 312.0e12, "float16": 312.0e12, "tfloat32": 156.0e12, "float32": 19.5e12}),
    _Peak(r"\bL4\b", "NVIDIA L4", {"bfloat16": 121.0e12, "float16": 121.0e12, "tfloat32": 60.0e12, "float32": 30.3e12}),
    _Peak(r"^TPU v4$", "TPU v4", {"bfloat16": 275e12}),
    _Peak(r"^TPU v5(e| lite)$", "TPU v5e", {"bfloat16": 197e12}),
    _Peak(r"^TPU v5p?$", "TPU v5p", {"bfloat16": 459e12}),
    _Peak(r"^TPU v6(e| lite)$", "TPU v6e", {"bfloat16": 918e12}),
)
_DTYPES = ("bfloat16", "float16", "tfloat32", "float32")


def peak_flops_per_device(device, dtype="bfloat16") -> float | None:
    """Published peak dense FLOP/s of one ``device`` (a ``jax.Device``, or anything with
    ``device_kind``) for matmuls in ``dtype`` (``"bfloat16"``, ``"float16"``, ``"tfloat32"``,
    ``"float32"`` or a numpy/JAX dtype). ``None`` for CPUs, unknown devices, and rates not published."""
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    name = {"bf16": "bfloat16", "fp16": "float16", "tf32": "tfloat32", "fp32": "float32"}.get(name.lower(), name.lower())
    if name not in _DTYPES:
        raise ValueError(f"peak_flops_per_device: dtype {dtype!r} is not one of {_DTYPES}")
    kind = str(getattr(device, "device_kind", "")).strip()
    for peak in _PEAKS:
        if re.search(peak.pattern, kind, flags=re.IGNORECASE):
            return peak.flops.get(name)
    return None


def mfu(flops_per_step: float | None, steps_per_second: float, num_devices: int, peak: float | None) -> float | None:
    """Model FLOPs utilisation, a fraction: ``flops_per_step · steps_per_second / (num_devices · peak)``.

    ``flops_per_step`` counts all devices together (:func:`compiled_flops`), ``peak`` is one
    device's FLOP/s (:func:`peak_flops_per_device`). ``None`` when either is unknown or the rate is not
    positive yet.
    """
    if num_devices < 1:
        raise ValueError(f"mfu: num_devices={num_devices} must be at least 1")
    if flops_per_step is None or peak is None or flops_per_step <= 0 or peak <= 0 or not steps_per_second > 0:
        return None
    return flops_per_step * steps_per_second / (num_devices * peak)


# --- console progress line -----------------------------------------------------------------------


def format_duration(seconds: float) -> str:
    """``45s``, ``4m33s``, ``2h05m``, ``3d04h``."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


_LR_KEYS = ("lr", "learning_rate")


def format_progress(
    step: int,
    total_steps: int,
    scalars: Mapping[str, float],
    *,
    steps_per_second: float | None = None,
    examples_per_second: float | None = None,
    mfu: float | None = None,
    eta_seconds: float | None = None,
) -> str:
    """``step 120/1000 | loss 0.1234 | latent 0.1 | lr 1.0e-04 | 3.21 steps/s | 12.8 ex/s | MFU 12.3% | eta 4m33s``.

    ``loss`` first, then the other scalars in the given order (4 significant digits), the learning
    rate (``lr`` / ``learning_rate``) last; timing fields that are ``None`` are left out.
    """
    width = len(str(total_steps))
    fields = [f"step {step:>{width}d}/{total_steps}"]
    ordered = [k for k in scalars if k == "loss"] + [k for k in scalars if k != "loss" and k not in _LR_KEYS]
    fields += [f"{k} {float(scalars[k]):.4g}" for k in ordered]
    fields += [f"lr {float(scalars[k]):.1e}" for k in _LR_KEYS if k in scalars]
    if steps_per_second is not None:
        fields.append(f"{steps_per_second:.2f} steps/s")
    if examples_per_second is not None:
        fields.append(f"{examples_per_second:.1f} ex/s")
    if mfu is not None:
        fields.append(f"MFU {100 * mfu:.1f}%")
    if eta_seconds is not None:
        fields.append(f"eta {format_duration(eta_seconds)}")
    return " | ".join(fields)


TIMING_KEYS = ("steps_per_s", "examples_per_s", "mfu")


class ProgressLine:
    """One console line per log step for a run of ``total_steps``.

    Two ways to use it:

    * :meth:`format` ``(step, values)`` — the caller measured the timing: ``values`` holds the
      scalars and optionally ``steps_per_s``, ``examples_per_s`` and ``mfu`` (a fraction), which
      go to the timing fields; the ETA follows from ``steps_per_s``.
    * calling it, ``progress(step, scalars)`` — it measures the rates since its previous call
      itself: ``examples_per_step`` is the global batch; ``flops_per_step`` (all devices,
      :func:`compiled_flops`), ``num_devices`` and ``peak_flops`` (one device) give the MFU. The
      first call only starts the clock (its line has no rates), so compilation is not averaged in;
      :meth:`mark` restarts it, e.g. after an evaluation or a checkpoint save.
    """

    def __init__(
        self,
        total_steps: int,
        *,
        examples_per_step: int | None = None,
        flops_per_step: float | None = None,
        num_devices: int = 1,
        peak_flops: float | None = None,
        clock=time.perf_counter,
    ):
        self.total_steps = int(total_steps)
        self.examples_per_step = examples_per_step
        self.flops_per_step = flops_per_step
        self.num_devices = int(num_devices)
        self.peak_flops = peak_flops
        self._clock = clock
        self._mark: tuple[int, float] | None = None

    def format(self, step: int, values: Mapping[str, float]) -> str:
        """The line for ``step`` (steps done) from scalars and measured timing (see the class doc)."""
        scalars = {k: v for k, v in values.items() if k not in TIMING_KEYS}
        rate = values.get("steps_per_s")
        rate = float(rate) if rate is not None and float(rate) > 0 else None
        return format_progress(
            step,
            self.total_steps,
            scalars,
            steps_per_second=rate,
            examples_per_second=None if values.get("examples_per_s") is None else float(values["examples_per_s"]),
            mfu=None if values.get("mfu") is None else float(values["mfu"]),
            eta_seconds=None if rate is None else max(0, self.total_steps - step) / rate,
        )

    def mark(self, step: int) -> None:
        """Measure the next rate from ``step``, now."""
        self._mark = (int(step), self._clock())

    def __call__(self, step: int, scalars: Mapping[str, float]) -> str:
        """The line for ``step`` (steps done) with ``scalars``, timed since the previous call."""
        now = self._clock()
        timing: dict[str, float] = {}
        if self._mark is not None and step > self._mark[0] and now > self._mark[1]:
            rate = (step - self._mark[0]) / (now - self._mark[1])
            timing["steps_per_s"] = rate
            if self.examples_per_step is not None:
                timing["examples_per_s"] = rate * self.examples_per_step
            utilisation = mfu(self.flops_per_step, rate, self.num_devices, self.peak_flops)
            if utilisation is not None:
                timing["mfu"] = utilisation
        self._mark = (int(step), now)
        return self.format(step, {**{k: v for k, v in scalars.items() if k not in TIMING_KEYS}, **timing})


def open_jsonl(path: pathlib.Path, start: int):
    """``metrics.jsonl`` opened for appending from step ``start``: the lines of later steps (logged
    before a kill, after the checkpoint a resume goes back to) are dropped first, so that every
    step appears once and the file is what an uninterrupted run writes."""
    path = pathlib.Path(path)
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if line.strip() and _step_of(line) <= start]
        atomic_write_text(path, "".join(line + "\n" for line in kept))
    return path.open("a")


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):  # a line cut short by a kill
        return 1 << 62


class StepLog:
    """Where a logged step's numbers go: TensorBoard events (:class:`MetricsWriter`), one JSON line
    in ``metrics.jsonl`` (:func:`open_jsonl`, resumed at ``start``) and the progress line — on the
    terminal every ``print_every`` steps and at the last, in the log file (``logging``) always.
    ``enabled=False`` (processes other than 0) writes nothing."""

    def __init__(self, tensorboard: str | os.PathLike, jsonl: pathlib.Path, *, start: int, total: int, print_every: int,
                 enabled: bool = True):  # fmt: skip
        self.writer = MetricsWriter(str(tensorboard), enabled=enabled, purge_step=start if start else None)
        self.jsonl = open_jsonl(jsonl, start) if enabled else None
        self.progress, self.print_every, self.enabled = ProgressLine(total), max(int(print_every), 1), enabled

    def __call__(self, step: int, values: Mapping[str, float], *, last: bool = False) -> None:
        self.writer.scalars(step, values)
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()
        text = self.progress.format(step, values)
        if last or step % self.print_every == 0:
            console.line(text)
        else:
            logging.getLogger("moee_jax.train").info(text)  # the run's log file (console.log_to) keeps every line

    def close(self) -> None:
        self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()
