"""Checkpoint integrity: checksum manifests on final exports, read tests of training checkpoints.

A stage's final export (``RUN/<stage>/final``) is written once and read many times (the next stage's
initialisation, ``moee animate``, ``moee eval``), so it carries a manifest, ``checksums.json``: the
SHA-256 and size of every file of the export. Every read verifies it first, and a damaged export is
refused naming the file (:func:`check_export`), instead of surfacing as a TensorStore decompression
error from deep inside a restore.

Training checkpoints (``RUN/<stage>/checkpoints/<step>``) are written asynchronously by Orbax and
kept N at a time; they carry no manifest, so they are checked by reading them (:func:`read_test`).
The trainer resumes from the newest *readable* one (:func:`moee_jax.checkpoint.run.restore_newest`).

``moee verify RUN`` (:func:`verify_run`) reports both, per stage.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

from etils import epath

MANIFEST = "checksums.json"
_CHUNK = 1 << 22


def _files(root: epath.Path) -> list[str]:
    """Every file under ``root`` (relative, sorted), the manifest itself excluded."""
    out = []
    for folder, _, names in root.walk():
        for name in names:
            rel = str(epath.Path(folder) / name)[len(str(root)) + 1 :]
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def _digest(path: epath.Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(export: epath.Path) -> epath.Path:
    """Write ``export/checksums.json`` over every file of a finished export. → its path."""
    export = epath.Path(export)
    files = {rel: {"sha256": _digest(export / rel), "bytes": (export / rel).stat().length} for rel in _files(export)}
    tmp = export / f".{MANIFEST}.partial"
    tmp.write_text(json.dumps({"algorithm": "sha256", "files": files}, indent=1, sort_keys=True))
    tmp.rename(export / MANIFEST)
    return export / MANIFEST


class DamagedCheckpoint(ValueError):
    """An export whose files do not match its manifest; the message names the first damaged file."""


def ensure_intact(export) -> None:
    """Raise :class:`DamagedCheckpoint` naming the damaged file(s) of ``export``; an export without
    a manifest passes (it is read as it is)."""
    problems = check_export(epath.Path(export))
    if problems:
        more = f" (and {len(problems) - 1} more damaged file(s))" if len(problems) > 1 else ""
        raise DamagedCheckpoint(
            f"{export} is damaged: {problems[0]}{more}. Re-export or copy it again; `moee verify <RUN>` lists every damaged file"
        )


def check_export(export: epath.Path) -> list[str] | None:
    """The damaged files of an export, each as ``"<path>: <what is wrong>"`` (``[]``: intact), or
    ``None`` when the export has no manifest (written before manifests existed)."""
    export = epath.Path(export)
    manifest = export / MANIFEST
    if not manifest.exists():
        return None
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"{manifest}: unreadable manifest ({e})"]
    problems = []
    for rel, want in sorted(files.items()):
        path = export / rel
        if not path.exists():
            problems.append(f"{path}: missing")
            continue
        size = path.stat().length
        if size != want["bytes"]:
            problems.append(f"{path}: {size} bytes, {want['bytes']} expected (truncated or overwritten)")
        elif _digest(path) != want["sha256"]:
            problems.append(f"{path}: checksum mismatch (the bytes changed since the export was written)")
    present = set(_files(export))
    for rel in sorted(present - set(files)):
        if rel.startswith("params/"):
            problems.append(f"{export / rel}: not part of the export as written")
    return problems


def read_test(step_dir: epath.Path) -> str | None:
    """Read every array of a training checkpoint's train state to host memory. → ``None`` when it
    reads, else the reason it does not (the exception's type and first line)."""
    import orbax.checkpoint as ocp

    try:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.restore(epath.Path(step_dir) / "state")
    except Exception as e:  # noqa: BLE001 - TensorStore, Orbax and the OS raise many types for damaged bytes
        return describe_error(e)
    return None


def describe_error(error: BaseException) -> str:
    """An exception as ``"Type: first line"`` (at most 300 characters of it), for one-line reports."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {first[:300]}"


@dataclasses.dataclass(frozen=True)
class StageReport:
    """What ``moee verify`` found for one stage: its export and each training checkpoint."""

    stage: str
    export: str  # "intact (N files)", "no manifest: reads", "DAMAGED", "absent"
    export_problems: tuple[str, ...]
    checkpoints: tuple[tuple[int, str | None], ...]  # (step, None if readable else the reason)

    @property
    def ok(self) -> bool:
        return not self.export_problems and all(reason is None for _, reason in self.checkpoints)

    def lines(self) -> list[str]:
        out = [f"{self.stage}: final export {self.export}"]
        out += [f"  {p}" for p in self.export_problems]
        for step, reason in self.checkpoints:
            out.append(f"  checkpoint {step}: " + ("readable" if reason is None else f"UNREADABLE ({reason})"))
        return out


def verify_export(export: epath.Path) -> tuple[str, tuple[str, ...]]:
    """``(status, problems)`` of one final export (see :class:`StageReport`)."""
    export = epath.Path(export)
    if not (export / "params").exists():
        return "absent", ()
    problems = check_export(export)
    if problems is None:  # an export from before manifests: read it instead
        reason = _read_params(export)
        return ("no manifest; reads", ()) if reason is None else ("DAMAGED", (f"{export / 'params'}: {reason}",))
    if problems:
        return "DAMAGED", tuple(problems)
    return f"intact ({len(_files(export))} files, sha256)", ()


def _read_params(export: epath.Path) -> str | None:
    import orbax.checkpoint as ocp

    try:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.restore(export / "params")
    except Exception as e:  # noqa: BLE001 - see read_test
        return describe_error(e)
    return None


def verify_run(run_dir, stages: tuple[str, ...]) -> list[StageReport]:
    """Every stage of ``run_dir`` that has an export or checkpoints, in ``stages`` order."""
    root = epath.Path(run_dir)
    reports = []
    for stage in stages:
        stage_dir = root / stage
        if not stage_dir.exists():
            continue
        status, problems = verify_export(stage_dir / "final")
        checkpoints = stage_dir / "checkpoints"
        steps = sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) if checkpoints.exists() else []
        reports.append(StageReport(stage, status, problems, tuple((s, read_test(checkpoints / str(s))) for s in steps)))
    return reports
