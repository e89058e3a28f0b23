"""Multi-process start-up: host lists, the choice of source, validation, and a real 2-process run."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import jax
import pytest

from moee_jax.train import distributed as D

REPO = pathlib.Path(__file__).resolve().parent.parent

_CLUSTER_VARS = (
    "MOEE_COORDINATOR_ADDRESS", "MOEE_NUM_PROCESSES", "MOEE_PROCESS_ID", "MOEE_COORDINATOR_PORT",
    "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST",
    "SLURM_STEP_NUM_NODES", "SLURM_JOB_NUM_NODES", "SLURM_NNODES", "SLURM_GPUS_PER_TASK", "CUDA_VISIBLE_DEVICES",
    "TPU_WORKER_HOSTNAMES", "TPU_WORKER_ID", "CLOUD_TPU_TASK_ID", "JAX_LOCAL_DEVICE_IDS",
)  # fmt: skip


@pytest.fixture
def clean_env(monkeypatch):
    """No cluster variables from the machine running the tests, and no cached initialisation."""
    for name in _CLUSTER_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(D, "_INFO", None)
    return monkeypatch


@pytest.fixture
def recorder(clean_env):
    """``jax.distributed.initialize`` replaced by a recorder of its keyword arguments."""
    calls = []
    clean_env.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    clean_env.setattr(jax.distributed, "is_initialized", lambda: False)
    return calls


# --- host lists -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "hostlist, hosts",
    [
        ("gpu5", ["gpu5"]),
        ("node[01-03,7],gpu5", ["node01", "node02", "node03", "node7", "gpu5"]),
        ("a-[1-2]-b", ["a-1-b", "a-2-b"]),
        ("n[08-10]", ["n08", "n09", "n10"]),
        ("n[8-10]", ["n8", "n9", "n10"]),
        ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
        ("x[3],y[000-001],z", ["x3", "y000", "y001", "z"]),
        ("10.0.0.[1-2]", ["10.0.0.1", "10.0.0.2"]),
    ],
)
def test_hostlist_expands_like_scontrol(hostlist, hosts):
    assert D.expand_hostlist(hostlist) == hosts


@pytest.mark.parametrize(
    "hostlist, message",
    [
        ("node[]", "not a number"),
        ("n[3-1]", "backwards"),
        ("n[1-2", "without"),
        ("a,,b", "empty host"),
        ("n[[1]]", "nested"),
        ("", "empty"),
    ],
)
def test_malformed_hostlist_is_named(hostlist, message):
    with pytest.raises(ValueError, match=message):
        D.expand_hostlist(hostlist)


# --- choice of source ----------------------------------------------------------------------------


def test_no_cluster_variables_is_a_single_process_and_initialises_nothing(recorder):
    info = D.initialize_distributed()
    assert info == D.DistributedInfo(0, 1, None, "single")
    assert recorder == []


def test_explicit_settings_win_over_environment(recorder, clean_env):
    clean_env.setenv("MOEE_COORDINATOR_ADDRESS", "10.0.0.9:1")
    clean_env.setenv("MOEE_NUM_PROCESSES", "8")
    clean_env.setenv("MOEE_PROCESS_ID", "7")
    info = D.initialize_distributed({"coordinator_address": "h0:4000", "num_processes": 4, "process_id": 2})
    assert info == D.DistributedInfo(2, 4, "h0:4000", "explicit")
    assert recorder == [dict(coordinator_address="h0:4000", num_processes=4, process_id=2, cluster_detection_method="deactivate")]


def test_moee_environment_variables(recorder, clean_env):
    clean_env.setenv("MOEE_COORDINATOR_ADDRESS", "127.0.0.1:5555")
    clean_env.setenv("MOEE_NUM_PROCESSES", "2")
    clean_env.setenv("MOEE_PROCESS_ID", "1")
    clean_env.setenv("SLURM_NTASKS", "16")  # the MOEE_* variables come first
    info = D.initialize_distributed()
    assert info == D.DistributedInfo(1, 2, "127.0.0.1:5555", "env")
    assert recorder == [dict(coordinator_address="127.0.0.1:5555", num_processes=2, process_id=1, cluster_detection_method="deactivate")]


def _slurm(env, ntasks, procid, nodes, nodelist="gpu[003-004]", **extra):
    env.setenv("SLURM_NTASKS", str(ntasks))
    env.setenv("SLURM_PROCID", str(procid))
    env.setenv("SLURM_STEP_NUM_NODES", str(nodes))
    env.setenv("SLURM_STEP_NODELIST", nodelist)
    env.setenv("SLURM_JOB_NODELIST", "other[1-9]")
    for k, v in extra.items():
        env.setenv(k, v)


def test_slurm_one_task_per_node_sees_all_its_gpus(recorder, clean_env):
    _slurm(clean_env, ntasks=2, procid=1, nodes=2, SLURM_LOCALID="0", CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7")
    info = D.initialize_distributed()
    assert info == D.DistributedInfo(1, 2, "gpu003:12355", "slurm")
    assert recorder == [dict(coordinator_address="gpu003:12355", num_processes=2, process_id=1, cluster_detection_method="deactivate")]


def test_slurm_port_and_job_nodelist_fallback(recorder, clean_env):
    _slurm(clean_env, ntasks=4, procid=0, nodes=4, MOEE_COORDINATOR_PORT="23456")
    clean_env.delenv("SLURM_STEP_NODELIST")
    assert D.initialize_distributed().coordinator_address == "other1:23456"


def test_slurm_tasks_sharing_a_nodes_gpus_take_one_each(recorder, clean_env):
    _slurm(clean_env, ntasks=16, procid=11, nodes=2, SLURM_LOCALID="3", CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7")
    info = D.initialize_distributed()
    assert info.local_device_ids == (3,)
    assert recorder[0]["local_device_ids"] == [3] and recorder[0]["process_id"] == 11


@pytest.mark.parametrize(
    "binding",
    [
        {"CUDA_VISIBLE_DEVICES": "3"},
        {"CUDA_VISIBLE_DEVICES": "6,7"},
        {"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7", "SLURM_GPUS_PER_TASK": "1"},
    ],
)
def test_slurm_tasks_given_their_own_gpus_keep_them(recorder, clean_env, binding):
    _slurm(clean_env, ntasks=8, procid=3, nodes=2, SLURM_LOCALID="3", **binding)
    assert D.initialize_distributed().local_device_ids is None
    assert "local_device_ids" not in recorder[0]


def test_single_slurm_task_is_a_single_process(recorder, clean_env):
    _slurm(clean_env, ntasks=1, procid=0, nodes=1)
    assert D.initialize_distributed().source == "single"
    assert recorder == []


@pytest.mark.parametrize(
    "variables",
    [{"TPU_WORKER_HOSTNAMES": "t1k-w-0,t1k-w-1,t1k-w-2,t1k-w-3"}, {"TPU_WORKER_ID": "0"}, {"CLOUD_TPU_TASK_ID": "2"}],
)
def test_tpu_pod_initialises_without_arguments(recorder, clean_env, variables):
    for k, v in variables.items():
        clean_env.setenv(k, v)
    clean_env.setattr(jax, "process_index", lambda: 2)
    clean_env.setattr(jax, "process_count", lambda: 4)
    info = D.initialize_distributed()
    assert recorder == [{}]
    assert info == D.DistributedInfo(2, 4, None, "tpu")


def test_single_tpu_host_is_a_single_process(recorder, clean_env):
    clean_env.setenv("TPU_WORKER_HOSTNAMES", "localhost")
    assert D.initialize_distributed().source == "single"
    assert recorder == []


def test_second_call_returns_the_same_info_without_initialising_again(recorder):
    settings = {"coordinator_address": "h0:4000", "num_processes": 2, "process_id": 0}
    first = D.initialize_distributed(settings)
    assert D.initialize_distributed() is first
    assert D.initialize_distributed(settings) is first
    assert len(recorder) == 1
    with pytest.raises(RuntimeError, match="already initialised"):
        D.initialize_distributed({**settings, "process_id": 1})


@pytest.fixture
def no_cpu_collectives():
    """The CPU collectives option unset, as older JAX versions leave it; the options it touches are
    restored afterwards (the backends of this process exist already, so nothing else changes)."""
    before = jax.config.jax_cpu_collectives_implementation, jax.config.jax_platforms
    jax.config.update("jax_cpu_collectives_implementation", None)
    yield
    jax.config.update("jax_cpu_collectives_implementation", before[0])
    jax.config.update("jax_platforms", before[1])


@pytest.mark.parametrize("platforms, chosen", [("cpu", "gloo"), ("", "gloo"), ("cuda", None)])
def test_gloo_collectives_are_chosen_when_the_platform_may_be_cpu(recorder, clean_env, no_cpu_collectives, platforms, chosen):
    jax.config.update("jax_platforms", platforms or None)
    clean_env.setenv("JAX_PLATFORMS", platforms)
    D.initialize_distributed({"coordinator_address": "h0:4000", "num_processes": 2, "process_id": 0})
    assert jax.config.jax_cpu_collectives_implementation == chosen


def test_a_chosen_cpu_collectives_implementation_is_kept(recorder, clean_env, no_cpu_collectives):
    jax.config.update("jax_cpu_collectives_implementation", "mpi")
    D.initialize_distributed({"coordinator_address": "h0:4000", "num_processes": 2, "process_id": 0})
    assert jax.config.jax_cpu_collectives_implementation == "mpi"


def test_failed_initialisation_names_the_process_and_coordinator(clean_env):
    def refuse(**kwargs):
        raise RuntimeError("jax.distributed.initialize() must be called before any JAX computations are executed.")

    clean_env.setattr(jax.distributed, "initialize", refuse)
    clean_env.setattr(jax.distributed, "is_initialized", lambda: False)
    with pytest.raises(RuntimeError, match=r"process 1 of 2, coordinator h0:4000.*before any JAX computations"):
        D.initialize_distributed({"coordinator_address": "h0:4000", "num_processes": 2, "process_id": 1})
    assert D._INFO is None


# --- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "variables, message",
    [
        ({"MOEE_PROCESS_ID": "3", "MOEE_NUM_PROCESSES": "2"}, r"MOEE_PROCESS_ID=3 is not < MOEE_NUM_PROCESSES=2"),
        ({"MOEE_PROCESS_ID": "-1"}, r"MOEE_PROCESS_ID=-1 must be at least 0"),
        ({"MOEE_NUM_PROCESSES": "0"}, r"MOEE_NUM_PROCESSES=0 must be at least 1"),
        ({"MOEE_NUM_PROCESSES": "two"}, r"MOEE_NUM_PROCESSES='two' is not an integer"),
        ({"MOEE_COORDINATOR_ADDRESS": "localhost"}, r"MOEE_COORDINATOR_ADDRESS='localhost' must be host:port"),
        ({"MOEE_COORDINATOR_ADDRESS": "h:99999"}, r"MOEE_COORDINATOR_ADDRESS='h:99999' must be host:port"),
        ({"MOEE_PROCESS_ID": ""}, r"MOEE_COORDINATOR_ADDRESS, MOEE_NUM_PROCESSES set but MOEE_PROCESS_ID not"),
    ],
)
def test_bad_moee_variables_are_named(clean_env, variables, message):
    env = {"MOEE_COORDINATOR_ADDRESS": "127.0.0.1:5555", "MOEE_NUM_PROCESSES": "2", "MOEE_PROCESS_ID": "0", **variables}
    with pytest.raises(ValueError, match=message):
        D.resolve_distributed(environ=env)


@pytest.mark.parametrize(
    "variables, message",
    [
        ({"SLURM_PROCID": "4"}, r"SLURM_PROCID=4 is not < SLURM_NTASKS=4"),
        ({"SLURM_PROCID": ""}, r"SLURM_PROCID is not set: start each task with srun"),
        ({"SLURM_STEP_NODELIST": ""}, r"neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST"),
        ({"SLURM_STEP_NODELIST": "n[1-"}, r"SLURM_STEP_NODELIST: .*'\[' without '\]'"),
        ({"MOEE_COORDINATOR_PORT": "70000"}, r"MOEE_COORDINATOR_PORT=70000 is not a port number"),
    ],
)
def test_bad_slurm_variables_are_named(variables, message):
    env = {"SLURM_NTASKS": "4", "SLURM_PROCID": "0", "SLURM_STEP_NODELIST": "n[1-4]", **variables}
    with pytest.raises(ValueError, match=message):
        D.resolve_distributed(environ=env)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"coordinator_address": "h:1", "num_processes": 2}, r"missing \['process_id'\]"),
        ({"coordinator_address": "h:1", "num_processes": 2, "process_id": 0, "rank": 0}, r"unknown key\(s\) \['rank'\]"),
        ({"coordinator_address": "h:1", "num_processes": 2, "process_id": 2}, r"process_id=2 is not < num_processes=2"),
        ({"coordinator_address": "h:1", "num_processes": 2, "process_id": 0, "local_device_ids": "0,x"}, r"local_device_ids='x'"),
    ],
)
def test_bad_explicit_settings_are_named(settings, message):
    with pytest.raises(ValueError, match=message):
        D.resolve_distributed(settings, environ={})


def test_explicit_local_device_ids_are_passed_on(recorder):
    settings = {"coordinator_address": "h:1", "num_processes": 2, "process_id": 0, "local_device_ids": "0,1"}
    assert D.initialize_distributed(settings).local_device_ids == (0, 1)
    assert recorder[0]["local_device_ids"] == [0, 1]


# --- a real run of two processes -----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_WORKER = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp
    from jax.experimental import multihost_utils
    from moee_jax.train.distributed import initialize_distributed
    info = initialize_distributed()
    assert initialize_distributed() is info
    ids = multihost_utils.process_allgather(jnp.asarray(jax.process_index()))
    print(json.dumps({"info": [info.process_id, info.num_processes, info.source], "gathered": [int(i) for i in ids]}))
    jax.distributed.shutdown()
""")


def _cluster_env(source: str, process: int, port: int) -> dict[str, str]:
    if source == "env":
        return {"MOEE_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "MOEE_NUM_PROCESSES": "2", "MOEE_PROCESS_ID": str(process)}
    return {"SLURM_JOB_ID": "77", "SLURM_NTASKS": "2", "SLURM_PROCID": str(process), "SLURM_LOCALID": str(process),
            "SLURM_STEP_NUM_NODES": "1", "SLURM_STEP_NODELIST": "127.0.0.[1]", "MOEE_COORDINATOR_PORT": str(port)}  # fmt: skip


@pytest.mark.parametrize("source", ["env", "slurm"])
def test_two_processes_initialise_and_allgather_their_ids(source):
    env = {k: v for k, v in os.environ.items() if k not in _CLUSTER_VARS and not k.startswith("SLURM_")}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONPATH=str(REPO))
    port = _free_port()
    procs = [
        subprocess.Popen([sys.executable, "-c", _WORKER], env={**env, **_cluster_env(source, i, port)}, cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]  # fmt: skip
    outs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err[-3000:]
            outs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert [o["info"] for o in outs] == [[0, 2, source], [1, 2, source]]
    assert [o["gathered"] for o in outs] == [[0, 1], [0, 1]]
