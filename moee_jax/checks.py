"""Checks of what a user passes, done before any model is loaded or any loop starts.

Every command checks its inputs and outputs here, so the commands cannot drift apart: each check
raises :class:`UsageError` (a ``ValueError``) whose message starts with the flag and the value, then
says what would be accepted. Nothing is created by a check.
"""

from __future__ import annotations

import math
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterable


class UsageError(ValueError):
    """A flag, file or field the command cannot use; the message names it and what would do."""


def number(value, flag: str, *, minimum: float | None = None, maximum: float | None = None, integer: bool = False,
           above: float | None = None):  # fmt: skip
    """``value`` if it is a finite number within the bounds (``above``: strictly greater), else
    :class:`UsageError`. ``None`` passes through (a flag left to its default)."""
    if value is None:
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{flag} {value!r}: not a number") from None
    if not math.isfinite(x):
        raise UsageError(f"{flag} {value}: must be a finite number")
    if integer and x != int(x):
        raise UsageError(f"{flag} {value}: must be a whole number")
    if minimum is not None and x < minimum:
        raise UsageError(f"{flag} {value}: must be >= {minimum:g}")
    if maximum is not None and x > maximum:
        raise UsageError(f"{flag} {value}: must be <= {maximum:g}")
    if above is not None and not x > above:
        raise UsageError(f"{flag} {value}: must be > {above:g}")
    return value


def one_of(value, flag: str, allowed: Iterable[str]):
    """``value`` (or each item of a list) if it is among ``allowed``, else :class:`UsageError`."""
    allowed = tuple(allowed)
    for item in value if isinstance(value, (list, tuple)) else [value]:
        if item not in allowed:
            raise UsageError(f"{flag} {item!r}: unknown; choose from {', '.join(allowed)}")
    return value


def input_file(path, flag: str) -> pathlib.Path:
    """``path`` if it is an existing, readable, non-empty file."""
    p = pathlib.Path(path)
    if not p.exists():
        raise UsageError(f"{flag} {p}: no such file")
    if p.is_dir():
        raise UsageError(f"{flag} {p}: is a folder; give a file")
    if not os.access(p, os.R_OK):
        raise UsageError(f"{flag} {p}: not readable (permissions)")
    if p.stat().st_size == 0:
        raise UsageError(f"{flag} {p}: the file is empty")
    return p


def _nearest_existing(p: pathlib.Path) -> pathlib.Path:
    p = p.absolute()
    while not p.exists():
        p = p.parent
    return p


def writable_location(path, flag: str, *, kind: str = "file", min_free_mb: float = 50.0) -> pathlib.Path:
    """``path`` if it can be written: not the wrong kind of thing already (a folder for a file or
    the reverse), every existing ancestor a folder, the nearest existing one writable with at least
    ``min_free_mb`` MB free. Creates nothing (a probe file is made and removed at once). ``gs://`` paths pass (checked by the writer)."""
    if str(path).startswith("gs://"):
        return path
    p = pathlib.Path(path)
    if p.exists() and kind == "file" and p.is_dir():
        raise UsageError(f"{flag} {p}: is a folder; give a file path")
    if p.exists() and kind == "folder" and not p.is_dir():
        raise UsageError(f"{flag} {p}: is a file; give a folder")
    base = _nearest_existing(p if kind == "folder" else p.parent)
    if not base.is_dir():
        raise UsageError(f"{flag} {p}: {base} is a file, so nothing can be created under it")
    try:  # a probe, not os.access: root passes os.access on read-only mounts and /proc
        tempfile.NamedTemporaryFile(dir=base, prefix=".moee-write-check-").close()  # created, then removed
    except OSError:
        raise UsageError(f"{flag} {p}: {base} is not writable; choose another location") from None
    try:
        free = shutil.disk_usage(base).free / 2**20
    except OSError:
        free = math.inf
    if free < min_free_mb:
        raise UsageError(f"{flag} {p}: only {free:.0f} MB free on that disk; at least {min_free_mb:.0f} MB are needed")
    return p
