"""Multi-process start-up: one ``jax.distributed`` initialisation per process, chosen from the environment.

Every process of a multi-host run (one per TPU host, one per GPU node or per GPU) must call
:func:`initialize_distributed` once, before anything asks JAX for devices. The first source that
applies wins:

1. ``explicit`` — a dict with ``coordinator_address``, ``num_processes``, ``process_id`` (and
   optionally ``local_device_ids``), e.g. from the config;
2. ``env`` — ``MOEE_COORDINATOR_ADDRESS`` (``host:port``), ``MOEE_NUM_PROCESSES``,
   ``MOEE_PROCESS_ID``: local multi-process runs (``NPROC=2 launch/local.sh``) and clusters whose
   scheduler is not SLURM;
3. ``slurm`` — ``SLURM_NTASKS > 1`` (inside ``srun``): process ``SLURM_PROCID`` of
   ``SLURM_NTASKS``, coordinator the first host of ``SLURM_STEP_NODELIST`` (or
   ``SLURM_JOB_NODELIST``) on port ``MOEE_COORDINATOR_PORT`` (default 12355);
4. ``tpu`` — a Cloud TPU pod slice (``TPU_WORKER_HOSTNAMES`` with more than one host, or
   ``CLOUD_TPU_TASK_ID`` / ``TPU_WORKER_ID`` set): ``jax.distributed.initialize()`` with no
   arguments, which reads the TPU metadata itself;
5. ``single`` — none of these: one process, nothing to initialise.

For the first three, JAX's own cluster auto-detection is switched off: with SLURM present it
would restrict each process to the single GPU ``SLURM_LOCALID``, which silently leaves 7 of 8 GPUs
idle in the usual one-task-per-node layout. Instead a process sees every GPU it is given
(``CUDA_VISIBLE_DEVICES``), except when several SLURM tasks share one node's GPUs, where each takes
GPU ``SLURM_LOCALID``. ``JAX_LOCAL_DEVICE_IDS`` (read by JAX) overrides both.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
from collections.abc import Mapping

import jax

DEFAULT_COORDINATOR_PORT = 12355

_ENV_KEYS = ("MOEE_COORDINATOR_ADDRESS", "MOEE_NUM_PROCESSES", "MOEE_PROCESS_ID")
_EXPLICIT_KEYS = ("coordinator_address", "num_processes", "process_id")
_SOURCE_NAMES = {"explicit": "explicit settings", "env": "the MOEE_* variables", "slurm": "the SLURM variables"}


@dataclasses.dataclass(frozen=True)
class DistributedInfo:
    """Where this process sits in the run.

    ``source`` says which rule chose it: ``"single"``, ``"explicit"``, ``"env"``, ``"slurm"`` or
    ``"tpu"``. ``coordinator_address`` is ``host:port`` (``None`` for a single process and on TPU,
    where JAX finds it). ``local_device_ids`` are the accelerator ordinals this process was
    restricted to (``None``: all it can see).
    """

    process_id: int
    num_processes: int
    coordinator_address: str | None
    source: str
    local_device_ids: tuple[int, ...] | None = None


_INFO: DistributedInfo | None = None


def expand_hostlist(hostlist: str) -> list[str]:
    """SLURM's compressed host list → host names, in order.

    ``"node[01-03,7],gpu5"`` → ``["node01", "node02", "node03", "node7", "gpu5"]``;
    ``"a-[1-2]-b"`` → ``["a-1-b", "a-2-b"]``; several brackets in one name expand as a product,
    leftmost slowest (``"r[1-2]n[1-2]"`` → ``r1n1, r1n2, r2n1, r2n2``). A range keeps the zero
    padding of its lower bound (``"n[08-10]"`` → ``n08, n09, n10``), as ``scontrol show hostnames`` does.
    """
    text = hostlist.strip()
    if not text:
        raise ValueError("empty SLURM host list")
    hosts: list[str] = []
    for name in _split_top_level(text, hostlist):
        pieces = re.split(r"\[([^\]]*)\]", name)  # literal, bracket body, literal, ...
        parts = [_expand_ranges(p, hostlist) if i % 2 else [p] for i, p in enumerate(pieces)]
        hosts.extend("".join(p) for p in itertools.product(*parts))
    return hosts


def _split_top_level(text: str, original: str) -> list[str]:
    """Split on commas outside brackets."""
    names, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"SLURM host list {original!r}: nested brackets")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"SLURM host list {original!r}: ']' without '['")
        elif ch == "," and depth == 0:
            names.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"SLURM host list {original!r}: '[' without ']'")
    names.append(text[start:])
    if any(not n.strip() for n in names):
        raise ValueError(f"SLURM host list {original!r}: empty host name between commas")
    return [n.strip() for n in names]


def _expand_ranges(body: str, original: str) -> list[str]:
    """``"01-03,7"`` → ``["01", "02", "03", "7"]``."""
    out = []
    for item in body.split(","):
        item = item.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if not m:
            raise ValueError(f"SLURM host list {original!r}: {item!r} is not a number or a range like 01-08")
        lo, hi = m.group(1), m.group(2)
        if hi is None:
            out.append(lo)
            continue
        if int(hi) < int(lo):
            raise ValueError(f"SLURM host list {original!r}: range {item!r} runs backwards")
        out.extend(str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1))
    return out


def _int(value: str | int, name: str) -> int:
    try:
        return int(str(value).strip())
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None


def _check_counts(process_id: int, num_processes: int, pid_name: str, num_name: str) -> None:
    if num_processes < 1:
        raise ValueError(f"{num_name}={num_processes} must be at least 1")
    if process_id < 0:
        raise ValueError(f"{pid_name}={process_id} must be at least 0")
    if process_id >= num_processes:
        raise ValueError(f"{pid_name}={process_id} is not < {num_name}={num_processes}: process ids run from 0 to {num_processes - 1}")


def _check_address(address: str, name: str) -> str:
    address = str(address).strip()
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{name}={address!r} must be host:port, e.g. 10.0.0.2:12355 (port 1-65535)")
    return address


def _port(environ: Mapping[str, str]) -> int:
    raw = environ.get("MOEE_COORDINATOR_PORT", "")
    if not raw.strip():
        return DEFAULT_COORDINATOR_PORT
    port = _int(raw, "MOEE_COORDINATOR_PORT")
    if not 0 < port < 65536:
        raise ValueError(f"MOEE_COORDINATOR_PORT={port} is not a port number (1-65535)")
    return port


def _local_device_ids(value, name: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, int):
        items = [value]
    else:
        items = list(value)
    ids = tuple(_int(v, name) for v in items)
    if not ids or min(ids) < 0:
        raise ValueError(f"{name}={value!r} must list non-negative device ordinals, e.g. 0,1,2,3")
    return ids


def _slurm_local_device_ids(environ: Mapping[str, str], num_processes: int) -> tuple[int, ...] | None:
    """Which GPUs a SLURM task drives: all it sees (``None``) with one task per node, or when srun
    gave each task GPUs of its own (``--gpus-per-task``, a single visible GPU, or fewer visible GPUs
    than the task's ``SLURM_LOCALID``); GPU ``SLURM_LOCALID`` when several tasks of a node see the
    same GPUs."""
    nodes_var = next((k for k in ("SLURM_STEP_NUM_NODES", "SLURM_JOB_NUM_NODES", "SLURM_NNODES") if environ.get(k, "").strip()), None)
    if nodes_var is not None and num_processes <= _int(environ[nodes_var], nodes_var):
        return None
    if environ.get("SLURM_GPUS_PER_TASK", "").strip() or not environ.get("SLURM_LOCALID", "").strip():
        return None
    local_id = _int(environ["SLURM_LOCALID"], "SLURM_LOCALID")
    visible = [d for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if visible and (len(visible) == 1 or local_id >= len(visible)):
        return None
    return (local_id,)


def _is_tpu_pod(environ: Mapping[str, str]) -> bool:
    hosts = [h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    return len(hosts) > 1 or "CLOUD_TPU_TASK_ID" in environ or "TPU_WORKER_ID" in environ


def resolve_distributed(explicit: Mapping | None = None, environ: Mapping[str, str] | None = None) -> DistributedInfo:
    """The decision of :func:`initialize_distributed`, without initialising anything.

    For ``source == "tpu"`` the process id and count are not known before JAX has asked the TPU
    metadata; they are ``0`` and ``1`` here and filled in by :func:`initialize_distributed`.
    Raises ``ValueError`` naming the variable (or key) whose value is unusable.
    """
    environ = os.environ if environ is None else environ
    if explicit is not None:
        unknown = sorted(set(explicit) - set(_EXPLICIT_KEYS) - {"local_device_ids"})
        missing = [k for k in _EXPLICIT_KEYS if explicit.get(k) is None]
        if unknown:
            raise ValueError(
                f"distributed settings: unknown key(s) {unknown}; expected {list(_EXPLICIT_KEYS)} and optionally local_device_ids"
            )
        if missing:
            raise ValueError(f"distributed settings: missing {missing}; give all of {list(_EXPLICIT_KEYS)} or none")
        num = _int(explicit["num_processes"], "num_processes")
        pid = _int(explicit["process_id"], "process_id")
        _check_counts(pid, num, "process_id", "num_processes")
        address = _check_address(explicit["coordinator_address"], "coordinator_address")
        local = _local_device_ids(explicit.get("local_device_ids"), "local_device_ids")
        return DistributedInfo(pid, num, address, "explicit", local)

    present = [k for k in _ENV_KEYS if environ.get(k, "").strip()]
    if present:
        if len(present) < len(_ENV_KEYS):
            missing = [k for k in _ENV_KEYS if k not in present]
            raise ValueError(f"{', '.join(present)} set but {', '.join(missing)} not: set all of {', '.join(_ENV_KEYS)} or none")
        num = _int(environ["MOEE_NUM_PROCESSES"], "MOEE_NUM_PROCESSES")
        pid = _int(environ["MOEE_PROCESS_ID"], "MOEE_PROCESS_ID")
        _check_counts(pid, num, "MOEE_PROCESS_ID", "MOEE_NUM_PROCESSES")
        address = _check_address(environ["MOEE_COORDINATOR_ADDRESS"], "MOEE_COORDINATOR_ADDRESS")
        return DistributedInfo(pid, num, address, "env")

    if environ.get("SLURM_NTASKS", "").strip() and _int(environ["SLURM_NTASKS"], "SLURM_NTASKS") > 1:
        num = _int(environ["SLURM_NTASKS"], "SLURM_NTASKS")
        if not environ.get("SLURM_PROCID", "").strip():
            raise ValueError(f"SLURM_NTASKS={num} but SLURM_PROCID is not set: start each task with srun")
        pid = _int(environ["SLURM_PROCID"], "SLURM_PROCID")
        _check_counts(pid, num, "SLURM_PROCID", "SLURM_NTASKS")
        name = next((k for k in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST") if environ.get(k, "").strip()), None)
        if name is None:
            raise ValueError(f"SLURM_NTASKS={num} but neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST is set: start each task with srun")
        try:
            host = expand_hostlist(environ[name])[0]
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        address = f"{host}:{_port(environ)}"
        return DistributedInfo(pid, num, address, "slurm", _slurm_local_device_ids(environ, num))

    if _is_tpu_pod(environ):
        return DistributedInfo(0, 1, None, "tpu")
    return DistributedInfo(0, 1, None, "single")


def _platforms() -> list[str]:
    configured = jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "")
    return [p.strip().lower() for p in configured.split(",") if p.strip()]


def _enable_cpu_collectives() -> None:
    """Cross-process collectives on the CPU backend need an implementation (gloo); older JAX has
    none by default. A choice the user made (e.g. ``mpi``) is kept."""
    platforms = _platforms()
    if platforms and "cpu" not in platforms:
        return
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


def initialize_distributed(explicit: Mapping | None = None) -> DistributedInfo:
    """Initialise ``jax.distributed`` for this process as the environment says (see the module doc).

    Call it first, before any JAX call that touches devices (``jax.devices()``, creating arrays,
    ``jax.process_index()``). Calling it again returns the same :class:`DistributedInfo`; asking a
    second time for different ``explicit`` settings is an error.
    """
    global _INFO
    if _INFO is not None:
        if explicit is not None and resolve_distributed(explicit) != _INFO:
            raise RuntimeError(f"distributed JAX is already initialised as {_INFO}; it cannot be re-initialised with {dict(explicit)}")
        return _INFO
    if jax.distributed.is_initialized():
        raise RuntimeError(
            "jax.distributed was initialised outside initialize_distributed; call only initialize_distributed "
            "so that the run's process layout is known"
        )

    plan = resolve_distributed(explicit)
    if plan.source == "single":
        _INFO = plan
        return _INFO

    _enable_cpu_collectives()
    if plan.source == "tpu":
        kwargs = {}
    else:
        kwargs = dict(
            coordinator_address=plan.coordinator_address,
            num_processes=plan.num_processes,
            process_id=plan.process_id,
            cluster_detection_method="deactivate",
        )
        if plan.local_device_ids is not None:
            kwargs["local_device_ids"] = list(plan.local_device_ids)
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:
        where = (
            "a Cloud TPU pod (no arguments)"
            if plan.source == "tpu"
            else f"process {plan.process_id} of {plan.num_processes}, coordinator {plan.coordinator_address} "
            f"(from {_SOURCE_NAMES[plan.source]})"
        )
        raise RuntimeError(f"jax.distributed.initialize failed for {where}: {e}") from e

    if plan.source == "tpu":
        plan = dataclasses.replace(plan, process_id=jax.process_index(), num_processes=jax.process_count())
    _INFO = plan
    return _INFO
