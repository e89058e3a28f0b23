"""Writing files all or nothing: write under a hidden temporary name beside the target, then rename.

A rename within one folder is atomic, so a reader sees the old file or the new one, never half of
either, and a crash or Ctrl-C leaves at most a ``.<name>.<random>.partial`` file behind (never a
truncated target). The result gets the user's umask like any other new file (``mkstemp``'s 0600 is
for the temporary name only).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable, Iterator

PARTIAL_SUFFIX = ".partial"


def umask() -> int:
    """The process umask: read from ``/proc/self/status`` where Linux gives it (nothing changes), else
    by setting and restoring it at once (another thread creating a file in that instant would get mode
    0666/0777 — acceptable where the kernel offers no read-only way)."""
    with contextlib.suppress(OSError):
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> pathlib.Path:
    """Call ``write(temporary_path)`` to produce the file, then rename it to ``path``; on any error
    the temporary file is removed and ``path`` is untouched. → ``path``."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> pathlib.Path:
    return atomic_write(path, lambda tmp: pathlib.Path(tmp).write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> pathlib.Path:
    return atomic_write(path, lambda tmp: pathlib.Path(tmp).write_text(text))


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[pathlib.Path]:
    """A temporary folder beside ``path`` to fill; renamed to ``path`` (which must be absent or an
    empty folder) when the block ends without error, removed otherwise."""
    target = pathlib.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=PARTIAL_SUFFIX))
    try:
        os.chmod(staging, 0o777 & ~umask())
        yield staging
        if target.exists():
            target.rmdir()
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
