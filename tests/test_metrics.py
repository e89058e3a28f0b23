"""Training metrics: event files read back, the progress line, peak FLOP/s, MFU and FLOP counts."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moee_jax.train import metrics as M

# --- event files ---------------------------------------------------------------------------------


def test_scalars_are_read_back_with_their_steps(tmp_path):
    with M.MetricsWriter(tmp_path / "tb") as writer:
        writer.scalars(0, {"loss": 0.5, "lr": 1e-4})
        writer.scalars(10, {"loss": np.float32(0.25), "lr": jnp.asarray(2e-4)})
        writer.scalars(20, {"loss/latent": 0.125})
    got = M.read_scalars(tmp_path / "tb")
    assert got.keys() == {"loss", "lr", "loss/latent"}
    assert [s for s, _ in got["loss"]] == [0, 10] and [s for s, _ in got["lr"]] == [0, 10]
    np.testing.assert_allclose([v for _, v in got["loss"]], [0.5, 0.25], rtol=1e-7)
    np.testing.assert_allclose([v for _, v in got["lr"]], [1e-4, 2e-4], rtol=1e-6)  # float32 on disk
    assert got["loss/latent"] == [(20, 0.125)]


def test_event_file_is_a_tensorboard_event_file_without_tensorflow(tmp_path):
    script = (
        "import sys\n"
        "from moee_jax.train.metrics import MetricsWriter, read_scalars\n"
        f"w = MetricsWriter({str(tmp_path)!r}); w.scalars(3, {{'loss': 1.5}}); w.close()\n"
        f"assert read_scalars({str(tmp_path)!r}) == {{'loss': [(3, 1.5)]}}\n"
        "print('tensorflow' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"
    (path,) = tmp_path.iterdir()
    assert path.name.startswith("events.out.tfevents.")


@pytest.mark.slow  # imports TensorFlow (~0.5 CPU minute); the event file's format is checked without it
def test_tensorflow_reads_the_event_file(tmp_path):
    """An independent reader: TensorFlow's own record and event parser (in a child process, so
    this one stays free of TensorFlow)."""
    pytest.importorskip("tensorflow", reason="the independent reader is TensorFlow's (test extra)")
    with M.MetricsWriter(tmp_path) as writer:
        writer.scalars(7, {"loss": 0.75, "grad_norm": 3.5})
    (path,) = tmp_path.iterdir()
    script = (
        "import json, sys, tensorflow as tf\n"
        "events = tf.compat.v1.train.summary_iterator(sys.argv[1])\n"
        "print(json.dumps([[e.step, v.tag, v.simple_value] for e in events for v in e.summary.value]))\n"
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [[7, "loss", 0.75], [7, "grad_norm", 3.5]]


def test_text_is_read_back(tmp_path):
    with M.MetricsWriter(tmp_path) as writer:
        writer.text(0, "config", "stage: stage1\nbatch_size: 8")
    assert M.read_texts(tmp_path) == {"config": [(0, "stage: stage1\nbatch_size: 8")]}


def test_disabled_writer_writes_nothing(tmp_path):
    logdir = tmp_path / "tb"
    with M.MetricsWriter(logdir, enabled=False) as writer:
        writer.scalars(1, {"loss": 1.0})
        writer.text(1, "config", "x")
        writer.flush()
    assert not logdir.exists()


def test_flush_makes_points_readable_before_close(tmp_path):
    writer = M.MetricsWriter(tmp_path, flush_secs=3600)
    writer.scalars(5, {"loss": 2.0})
    writer.flush()
    assert M.read_scalars(tmp_path) == {"loss": [(5, 2.0)]}
    writer.close()


def test_resumed_run_purges_the_steps_logged_after_its_checkpoint(tmp_path):
    with M.MetricsWriter(tmp_path) as first:
        for step in (10, 20, 30, 40):
            first.scalars(step, {"loss": step / 100})
    with M.MetricsWriter(tmp_path, purge_step=20) as resumed:  # restored the step-20 checkpoint
        resumed.scalars(30, {"loss": 0.9})
    assert M.read_scalars(tmp_path) == {"loss": [(10, pytest.approx(0.1)), (30, pytest.approx(0.9))]}


def test_writing_after_close_is_an_error(tmp_path):
    writer = M.MetricsWriter(tmp_path)
    writer.close()
    with pytest.raises(RuntimeError, match="closed"):
        writer.scalars(1, {"loss": 1.0})


@pytest.mark.parametrize(
    "value, error, message", [(np.ones(3), ValueError, r"'x' has shape \(3,\)"), ("abc", TypeError, "'x'='abc' is not a number")]
)
def test_non_scalar_values_are_named(tmp_path, value, error, message):
    with M.MetricsWriter(tmp_path) as writer, pytest.raises(error, match=message):
        writer.scalars(1, {"x": value})


def test_truncated_last_record_is_ignored(tmp_path):
    with M.MetricsWriter(tmp_path) as writer:
        writer.scalars(1, {"loss": 1.0})
        writer.scalars(2, {"loss": 2.0})
    (path,) = tmp_path.iterdir()
    path.write_bytes(path.read_bytes()[:-5])
    assert M.read_scalars(tmp_path) == {"loss": [(1, 1.0)]}


# --- progress line -------------------------------------------------------------------------------


def test_progress_line_format():
    line = M.format_progress(
        120, 1000, {"lr": 1e-4, "latent": 0.1, "loss": 0.123449, "spatial": 12345.678},
        steps_per_second=3.2149, examples_per_second=12.84, mfu=0.1234, eta_seconds=273.4,
    )  # fmt: skip
    assert (
        line
        == "step  120/1000 | loss 0.1234 | latent 0.1 | spatial 1.235e+04 | lr 1.0e-04 | 3.21 steps/s | 12.8 ex/s | MFU 12.3% | eta 4m33s"
    )


def test_progress_line_leaves_out_unknown_timing():
    assert M.format_progress(7, 10, {"loss": 2.0}) == "step  7/10 | loss 2"


@pytest.mark.parametrize(
    "seconds, text",
    [(0, "0s"), (59.4, "59s"), (60, "1m00s"), (273, "4m33s"), (3600, "1h00m"), (7500, "2h05m"), (2 * 86400 + 3 * 3600, "2d03h")],
)
def test_durations(seconds, text):
    assert M.format_duration(seconds) == text


def test_progress_line_measures_rates_between_calls():
    now = [100.0]
    progress = M.ProgressLine(1000, examples_per_step=4, flops_per_step=2e12, num_devices=2, peak_flops=1e13, clock=lambda: now[0])
    assert progress(100, {"loss": 1.0}) == "step  100/1000 | loss 1"  # starts the clock
    now[0] += 50.0
    line = progress(200, {"loss": 0.5})
    # 100 steps in 50 s = 2 steps/s, 8 ex/s; MFU = 2e12 * 2 / (2 * 1e13) = 20 %; 800 steps left = 400 s
    assert line == "step  200/1000 | loss 0.5 | 2.00 steps/s | 8.0 ex/s | MFU 20.0% | eta 6m40s"


def test_progress_line_from_timing_measured_by_the_caller():
    progress = M.ProgressLine(1000)
    values = {"loss": 0.1234, "latent": 0.1, "lr": 1e-4, "steps_per_s": 3.2149, "examples_per_s": 12.84, "mfu": 0.1234}
    line = progress.format(120, values)
    # 880 steps left at 3.2149 steps/s = 273.7 s
    assert line == "step  120/1000 | loss 0.1234 | latent 0.1 | lr 1.0e-04 | 3.21 steps/s | 12.8 ex/s | MFU 12.3% | eta 4m34s"
    assert progress.format(5, {"loss": 1.0}) == "step    5/1000 | loss 1"


def test_progress_line_mark_restarts_the_clock():
    now = [0.0]
    progress = M.ProgressLine(10, clock=lambda: now[0])
    progress(1, {})
    now[0] = 100.0  # e.g. a checkpoint save
    progress.mark(1)
    now[0] = 101.0
    assert progress(3, {}) == "step  3/10 | 2.00 steps/s | eta 4s"  # 7 steps at 2/s


# --- peak FLOP/s and MFU -------------------------------------------------------------------------


def _device(kind: str, platform: str = "gpu"):
    return types.SimpleNamespace(device_kind=kind, platform=platform)


@pytest.mark.parametrize(
    "kind, dtype, peak",
    [
        ("NVIDIA H100 80GB HBM3", "bfloat16", 989.4e12),
        ("NVIDIA H100 80GB HBM3", "float32", 66.9e12),
        ("NVIDIA H100 PCIe", "bfloat16", 756.5e12),
        ("NVIDIA H100 NVL", "bfloat16", 835.5e12),
        ("NVIDIA H200", "bfloat16", 989.4e12),
        ("NVIDIA H200", jnp.bfloat16, 989.4e12),
        ("NVIDIA H200 NVL", "bf16", 835.5e12),
        ("NVIDIA A100-SXM4-80GB", "bfloat16", 312e12),
        ("NVIDIA A100 80GB PCIe", "tf32", 156e12),
        ("NVIDIA A100-SXM4-40GB", np.float32, 19.5e12),
        ("NVIDIA L4", "bfloat16", 121e12),
        ("NVIDIA L40S", "bfloat16", None),
        ("TPU v4", "bfloat16", 275e12),
        ("TPU v4 lite", "bfloat16", None),
        ("TPU v5 lite", "bfloat16", 197e12),
        ("TPU v5e", "bfloat16", 197e12),
        ("TPU v5", "bfloat16", 459e12),
        ("TPU v5p", "bfloat16", 459e12),
        ("TPU v6 lite", "bfloat16", 918e12),
        ("TPU v6e", "bfloat16", 918e12),
        ("TPU v5p", "float32", None),
    ],
)
def test_peak_flops_table(kind, dtype, peak):
    assert M.peak_flops_per_device(_device(kind), dtype) == peak


def test_cpu_has_no_peak():
    assert M.peak_flops_per_device(jax.devices("cpu")[0]) is None


def test_unknown_dtype_is_named():
    with pytest.raises(ValueError, match="'int8' is not one of"):
        M.peak_flops_per_device(_device("NVIDIA H200"), "int8")


def test_mfu_arithmetic():
    # 8 H100s at 989.4 TFLOP/s each; 2 steps/s of 1.5e15 FLOPs = 3e15 FLOP/s of 7.9152e15 possible.
    assert M.mfu(1.5e15, 2.0, 8, 989.4e12) == pytest.approx(3e15 / (8 * 989.4e12))
    assert M.mfu(1.5e15, 2.0, 8, 989.4e12) == pytest.approx(0.37902, rel=1e-4)
    assert M.mfu(None, 2.0, 8, 1e12) is None
    assert M.mfu(1e12, 2.0, 8, None) is None
    assert M.mfu(1e12, 0.0, 8, 1e12) is None
    with pytest.raises(ValueError, match="num_devices=0"):
        M.mfu(1e12, 1.0, 0, 1e12)


# --- FLOP counts ---------------------------------------------------------------------------------

MATMUL_FLOPS = 2 * 256**3


def _matmul_compiled(spec_a=None, spec_b=None):
    a = jnp.ones((256, 256), jnp.float32)
    b = jnp.ones((256, 256), jnp.float32)
    if spec_a is not None:
        mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
        a = jax.device_put(a, NamedSharding(mesh, spec_a))
        b = jax.device_put(b, NamedSharding(mesh, spec_b))
    lowered = jax.jit(jnp.matmul).lower(a, b)
    return lowered, lowered.compile()


needs_8_devices = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs 8 (fake) devices: XLA_FLAGS=--xla_force_host_platform_device_count=8"
)


def test_unsharded_matmul_flops():
    lowered, compiled = _matmul_compiled()
    assert M.compiled_flops(compiled) == MATMUL_FLOPS
    assert M.compiled_flops(lowered) == MATMUL_FLOPS


@needs_8_devices
def test_row_sharded_matmul_counts_all_devices():
    lowered, compiled = _matmul_compiled(P("x", None), P(None, None))
    assert M.compiled_flops(compiled) == MATMUL_FLOPS
    assert M.compiled_flops(lowered) == MATMUL_FLOPS


@needs_8_devices
def test_contraction_sharded_matmul_adds_only_its_all_reduce():
    lowered, compiled = _matmul_compiled(P(None, "x"), P("x", None))
    assert MATMUL_FLOPS <= M.compiled_flops(compiled) <= 1.02 * MATMUL_FLOPS
    assert M.compiled_flops(lowered) == MATMUL_FLOPS


@needs_8_devices
def test_replicated_matmul_counts_every_devices_copy_unless_lowered():
    lowered, compiled = _matmul_compiled(P(None, None), P(None, None))
    assert M.compiled_flops(compiled) == 8 * MATMUL_FLOPS  # executed: the whole matmul on each device
    assert M.compiled_flops(lowered) == MATMUL_FLOPS  # the program's FLOPs


@pytest.mark.parametrize(
    "analysis, flops",
    [({"flops": 10.0}, 10.0), ([{"flops": 10.0}], 10.0), ([{"flops": 4.0}, {"flops": 6.0}], 10.0),
     (None, None), ({}, None), ({"flops": -1.0}, None), ({"flops": math.nan}, None), ([], None)],
)  # fmt: skip
def test_cost_analysis_shapes_across_jax_versions(analysis, flops):
    lowered = types.SimpleNamespace(cost_analysis=lambda: analysis)
    assert M.compiled_flops(lowered) == flops


def test_cost_analysis_failure_is_none():
    def fail():
        raise NotImplementedError("cost analysis")

    assert M.compiled_flops(types.SimpleNamespace(cost_analysis=fail)) is None
