"""Launch scripts: syntax, usage text, and what they run (with stand-ins for moee, gcloud and srun)."""

from __future__ import annotations

import json
import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
SCRIPTS = ["launch/local.sh", "launch/tpu_pod.sh", "launch/gpu_slurm.sbatch"]
BASH = shutil.which("bash")
# No gcloud, sbatch, srun or scontrol: only the system's basic tools.
BASE_PATH = "/usr/bin:/bin"


def _run(args, env=None, **kwargs) -> subprocess.CompletedProcess:
    full_env = {"PATH": BASE_PATH, "HOME": os.environ.get("HOME", "/tmp"), **(env or {})}
    return subprocess.run([BASH, *args], cwd=REPO, env=full_env, capture_output=True, text=True, timeout=60, **kwargs)


def _dedent(text: str) -> str:
    return textwrap.dedent(text).lstrip()


def _fake(directory: pathlib.Path, name: str, body: str) -> pathlib.Path:
    path = directory / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)
    return path


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_parses(script):
    out = _run(["-n", script])
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_prints_usage_and_succeeds(script):
    out = _run([script, "-h"])
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("Usage:")


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck_is_clean():
    out = subprocess.run(["shellcheck", *SCRIPTS], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout


# --- launch/local.sh -----------------------------------------------------------------------------


@pytest.fixture
def fake_moee(tmp_path):
    """A stand-in for moee that prints its MOEE_* environment and arguments; process 1 fails when
    FAIL=1, the others then sleep until stopped."""
    return _fake(
        tmp_path,
        "moee",
        _dedent("""
        echo "process=$MOEE_PROCESS_ID of=$MOEE_NUM_PROCESSES at=$MOEE_COORDINATOR_ADDRESS ids=${JAX_LOCAL_DEVICE_IDS:-} args=$*"
        if [[ "${FAIL:-}" == 1 ]]; then
          [[ "$MOEE_PROCESS_ID" == 1 ]] && exit 3
          exec sleep 30
        fi
    """),
    )


def test_local_nproc_starts_processes_with_moee_variables(fake_moee):
    out = _run(
        ["launch/local.sh", "train", "--run_dir", "runs/a b"],
        env={"NPROC": "3", "DEVICES_PER_PROC": "2", "MOEE_BIN": str(fake_moee), "MOEE_COORDINATOR_PORT": "23456"},
    )
    assert out.returncode == 0, out.stderr
    lines = sorted(out.stdout.splitlines())
    assert lines == [f"process={i} of=3 at=127.0.0.1:23456 ids={2 * i},{2 * i + 1} args=train --run_dir runs/a b" for i in range(3)]


def test_local_failing_process_stops_the_others_and_sets_the_status(fake_moee):
    start = time.monotonic()
    out = _run(["launch/local.sh", "train"], env={"NPROC": "3", "FAIL": "1", "MOEE_BIN": str(fake_moee)})
    assert out.returncode == 3
    assert "stopping the others" in out.stderr
    assert time.monotonic() - start < 20  # not the 30 s the others would sleep


_JAX_WORKER = """
import json
import jax, jax.numpy as jnp
from jax.experimental import multihost_utils
from moee_jax.train.distributed import initialize_distributed
info = initialize_distributed()
ids = multihost_utils.process_allgather(jnp.asarray(jax.process_index()))
print("result", json.dumps([info.process_id, jax.process_count(), jax.device_count(), [int(i) for i in ids]]))
jax.distributed.shutdown()
"""


def test_local_nproc_runs_a_real_multi_process_jax_job(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(_JAX_WORKER)
    moee = _fake(tmp_path, "moee", f"exec {shlex.quote(sys.executable)} {shlex.quote(str(worker))}\n")
    env = {"NPROC": "2", "DEVICES_PER_PROC": "2", "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "MOEE_BIN": str(moee), "PYTHONPATH": str(REPO)}
    out = _run(["launch/local.sh", "train"], env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    results = sorted(json.loads(line.removeprefix("result ")) for line in out.stdout.splitlines() if line.startswith("result "))
    assert results == [[0, 2, 4, [0, 1]], [1, 2, 4, [0, 1]]]


def test_local_rejects_a_bad_nproc(fake_moee):
    out = _run(["launch/local.sh", "train"], env={"NPROC": "two", "MOEE_BIN": str(fake_moee)})
    assert out.returncode == 2 and "NPROC=two must be a positive integer" in out.stderr


# --- launch/tpu_pod.sh ---------------------------------------------------------------------------

TPU_ENV = {"TPU_NAME": "moee-v5p", "ZONE": "us-east5-a", "PROJECT": "proj", "RUN_DIR": "gs://bucket/run", "DRY_RUN": "1"}


def _gcloud_commands(stdout: str) -> list[list[str]]:
    return [shlex.split(line) for line in stdout.splitlines() if line.startswith("gcloud ")]


def _remote(command: list[str]) -> str:
    return command[command.index("--command") + 1]


def test_tpu_pod_runs_every_stage_on_all_workers():
    env = {**TPU_ENV, "STAGES": "vae stage1", "VARIANT": "tiny", "REMOTE_ENV": "A=1"}
    out = _run(["launch/tpu_pod.sh", "--config.train.batch_size=256"], env=env)
    assert out.returncode == 0, out.stderr
    (command,) = _gcloud_commands(out.stdout)
    assert command[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "moee-v5p"]
    assert command[-5:] == ["--zone", "us-east5-a", "--project", "proj", "--worker=all"]
    remote = _remote(command)
    assert subprocess.run([BASH, "-n", "-c", remote]).returncode == 0
    assert remote.startswith('cd "$HOME"/moee_jax && ')
    train = 'env A=1 "$HOME"/moee_venv/bin/moee train --config configs/{}.py:tiny --run_dir gs://bucket/run --config.train.batch_size=256 || exit $?'
    assert remote.index(train.format("vae")) < remote.index(train.format("stage1"))


def test_tpu_pod_installs_a_tarball_of_this_checkout():
    out = _run(["launch/tpu_pod.sh"], env={**TPU_ENV, "INSTALL": "tarball", "INSTALL_ONLY": "1"})
    assert out.returncode == 0, out.stderr
    scp, install = _gcloud_commands(out.stdout)
    assert scp[4] == "scp" and scp[6] == "moee-v5p:moee_src.tgz" and "--worker=all" in scp
    remote = _remote(install)
    assert subprocess.run([BASH, "-n", "-c", remote]).returncode == 0
    assert "tar -xzf moee_src.tgz" in remote and """pip install --quiet -e "$HOME"/moee_jax'[tpu]'""" in remote


def test_tpu_pod_installs_from_git_then_detaches():
    env = {**TPU_ENV, "INSTALL": "git", "REPO_URL": "https://example.com/moee_jax.git", "BRANCH": "dev", "DETACH": "1"}
    out = _run(["launch/tpu_pod.sh"], env=env)
    assert out.returncode == 0, out.stderr
    install, train = _gcloud_commands(out.stdout)
    assert "git clone --quiet --depth 1 --branch dev https://example.com/moee_jax.git" in _remote(install)
    assert "setsid nohup bash -c" in _remote(train) and "moee_logs/" in _remote(train)


@pytest.mark.parametrize(
    "change, message",
    [({"ZONE": ""}, "ZONE is not set"), ({"RUN_DIR": "/local/run"}, "must be a gs:// path"),
     ({"STAGE": "stage3"}, "stage 'stage3' is not one of"), ({"INSTALL": "git"}, "INSTALL=git needs REPO_URL")],
)  # fmt: skip
def test_tpu_pod_names_what_is_wrong(change, message):
    out = _run(["launch/tpu_pod.sh"], env={**TPU_ENV, **change})
    assert out.returncode == 2 and message in out.stderr


# --- launch/gpu_slurm.sbatch ---------------------------------------------------------------------


@pytest.fixture
def slurm(tmp_path):
    """Stand-ins for srun (records its arguments and environment, then runs until SIGTERM or
    SRUN_SECONDS) and scontrol (records its arguments); returns (log file, job environment)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "log"
    _fake(bin_dir, "srun", _dedent(f"""
        echo "srun $*" >> {log}
        echo "env XLA_FLAGS=$XLA_FLAGS MEM=$XLA_PYTHON_CLIENT_MEM_FRACTION PORT=$MOEE_COORDINATOR_PORT ADDR=${{MOEE_COORDINATOR_ADDRESS:-unset}}" >> {log}
        sleep "${{SRUN_SECONDS:-0}}" &
        trap 'echo "srun got TERM" >> {log}; kill $!; exit 0' TERM
        wait
    """))  # fmt: skip
    _fake(bin_dir, "scontrol", f'echo "scontrol $*" >> {log}\n')
    moee = _fake(tmp_path, "moee", "exit 0\n")
    env = {"PATH": f"{bin_dir}:{BASE_PATH}", "HOME": str(tmp_path), "SLURM_JOB_ID": "4242", "SLURM_SUBMIT_DIR": str(REPO),
           "RUN_DIR": "/shared/runs/a", "MOEE": str(moee), "MOEE_COORDINATOR_ADDRESS": "stale:1"}  # fmt: skip
    return log, env


def test_slurm_job_runs_moee_train_through_srun(slurm):
    log, env = slurm
    out = _run(
        ["launch/gpu_slurm.sbatch", "--config.train.batch_size=64"],
        env={**env, "STAGE": "stage2", "VARIANT": "tiny", "XLA_FLAGS": "--xla_dump_to=/tmp/x"},
    )
    assert out.returncode == 0, out.stderr
    srun, environment = log.read_text().splitlines()
    moee = env["MOEE"]
    assert (
        srun
        == f"srun --kill-on-bad-exit=1 {moee} train --config configs/stage2.py:tiny --run_dir /shared/runs/a --config.train.batch_size=64"
    )
    assert environment == "env XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true --xla_dump_to=/tmp/x MEM=.95 PORT=12355 ADDR=unset"


def test_slurm_sigterm_is_forwarded_then_the_job_is_requeued(slurm):
    log, env = slurm
    full_env = {"PATH": BASE_PATH, **env, "SRUN_SECONDS": "30"}
    proc = subprocess.Popen(
        [BASH, "launch/gpu_slurm.sbatch"], cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 20
        while not (log.exists() and "env " in log.read_text()):
            assert time.monotonic() < deadline, "srun stand-in did not start"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    lines = log.read_text().splitlines()
    assert lines[-2:] == ["srun got TERM", "scontrol requeue 4242"]
    assert "requeueing job 4242" in out


def test_slurm_job_needs_a_run_dir(slurm):
    _, env = slurm
    out = _run(["launch/gpu_slurm.sbatch"], env={**env, "RUN_DIR": ""})
    assert out.returncode == 2 and "RUN_DIR is not set" in out.stderr
