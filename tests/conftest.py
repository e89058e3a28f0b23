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
