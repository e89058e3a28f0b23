"""Shared test set-up: fp32 CPU JAX with a persistent compilation cache, and session fixtures."""

from __future__ import annotations

import os
import pathlib

# Must be set before jax initialises its backends.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Eight fake CPU devices for the sharding tests. The tiny test models run in milliseconds but take
# seconds to compile, so XLA's backend optimisations are turned down: the suite's compile time on 2
# cores halves and the numbers are the same fp32 arithmetic.
_FLAGS = ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", "")] + [f for f in _FLAGS if f.split("=")[0] not in os.environ.get("XLA_FLAGS", "")]).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import pytest  # noqa: E402

_CACHE = pathlib.Path(os.environ.get("MOEE_JAX_TEST_CACHE", pathlib.Path(__file__).resolve().parent.parent / ".cache" / "jax"))
_CACHE.mkdir(parents=True, exist_ok=True)
jax.config.update("jax_compilation_cache_dir", str(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
# CLI subprocesses started by tests inherit the same cache (and the XLA flags above).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def torch():
    """PyTorch for parity references (test-only dependency), single-threaded and deterministic."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    return torch


@pytest.fixture(scope="session")
def load_benchmark():
    """``load_benchmark("unet_step")``: a script of ``benchmarks/`` imported as a module (the folder
    is not a package)."""
    import importlib.util

    folder = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


def _once_per_run(tmp_path_factory, name: str, make):
    """``make(folder)`` once per test run, shared by every xdist worker (they have one base temp
    folder): the first worker to get the lock builds ``folder``, the others reuse it."""
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the run's folder, above the per-worker ones
    folder = shared / name
    with FileLock(str(folder) + ".lock"):
        if not (folder / ".done").exists():
            folder.mkdir(parents=True, exist_ok=True)
            make(folder)
            (folder / ".done").touch()
    return folder


@pytest.fixture(scope="session")
def synthetic_tfds(tmp_path_factory):
    """The ``tiny`` synthetic_talking_faces dataset built once per test run: ``(data_dir, name)``."""
    pytest.importorskip("tensorflow", reason="building TFDS datasets needs tensorflow-cpu (the test extra)")
    from moee_jax.data.builders.synthetic_talking_faces import build

    data_dir = _once_per_run(tmp_path_factory, "tfds", lambda folder: build("tiny", str(folder)))
    return str(data_dir), "synthetic_talking_faces/tiny"


@pytest.fixture(scope="session")
def tiny_run(synthetic_tfds, tmp_path_factory):
    """A run with the tiny ``embedder`` and ``stage2`` stages exported with initialised (woken)
    parameters, as `moee train` leaves finished stages; built once per test run. Read-only: a test
    that adds stages copies it first."""
    from tests.train_helpers import export_initialised_stage, stage_config

    def make(folder):
        for stage in ("embedder", "stage2"):
            export_initialised_stage(stage_config(stage, synthetic_tfds[0]), folder)

    return _once_per_run(tmp_path_factory, "tiny_run", make)


# Modules that take minutes on 2 CPU cores (cold compilation cache), longest first. Collecting them
# first lets ``pytest -n 2 --dist loadfile`` start them early instead of leaving one worker with a
# long tail. test_animate builds the shared ``tiny_run``; the other modules that read it come last,
# so that their worker does not wait for it.
_HEAVY_FIRST = ("test_animate.py", "test_moee_model.py", "test_unet_features.py", "test_sharding.py", "test_train_runtime.py",
                "test_train_stages.py", "test_configs.py", "test_pipeline.py", "test_attention.py")  # fmt: skip
_LAST = ("test_evaluate.py", "test_analysis.py")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = item.path.name
        if name in _HEAVY_FIRST:
            return _HEAVY_FIRST.index(name)
        return len(_HEAVY_FIRST) + 1 + _LAST.index(name) if name in _LAST else len(_HEAVY_FIRST)

    items.sort(key=rank)  # stable: the order inside each module is kept
