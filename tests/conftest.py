"""Shared test set-up: fp32 CPU JAX with a persistent compilation cache, and session fixtures."""

from __future__ import annotations

import os
import pathlib

# Must be set before jax initialises its backends.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import pytest  # noqa: E402

_CACHE = pathlib.Path(os.environ.get("MOEE_JAX_TEST_CACHE", pathlib.Path(__file__).resolve().parent.parent / ".cache" / "jax"))
_CACHE.mkdir(parents=True, exist_ok=True)
jax.config.update("jax_compilation_cache_dir", str(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def torch():
    """PyTorch for parity references (test-only dependency), single-threaded and deterministic."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    return torch


@pytest.fixture(scope="session")
def synthetic_tfds(tmp_path_factory):
    """The ``tiny`` synthetic_talking_faces dataset built once per session: ``(data_dir, name)``."""
    pytest.importorskip("tensorflow", reason="building TFDS datasets needs tensorflow-cpu (the test extra)")
    from moee_jax.data.builders.synthetic_talking_faces import build

    data_dir = tmp_path_factory.mktemp("tfds")
    build("tiny", str(data_dir))
    return str(data_dir), "synthetic_talking_faces/tiny"


# Modules that take minutes on 2 CPU cores, longest first. Collecting them first lets
# ``pytest -n 2 --dist loadfile`` start them early instead of leaving one worker with a long tail.
_HEAVY_FIRST = ("test_train_stages.py", "test_animate.py", "test_analysis.py", "test_evaluate.py", "test_train_runtime.py", "test_moee_model.py", "test_eval.py")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = item.path.name
        return _HEAVY_FIRST.index(name) if name in _HEAVY_FIRST else len(_HEAVY_FIRST)

    items.sort(key=rank)  # stable: the order inside each module is kept
