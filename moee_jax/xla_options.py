"""XLA compiler options the project's compiled functions use, per backend.

On the CPU backend, XLA hands dots *and* convolutions to YNNPACK ("YNN fusions"). At this
project's shapes YNNPACK's convolutions, and most of all their kernel gradients (31–42 GFLOP/s
against 70–155 for the forward convolution of the same layer), are slower than XLA's own
convolutions. Keeping YNNPACK for dots alone (``xla_cpu_experimental_ynn_fusion_type =
LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT``) measured, compiled both ways in one process and timed in
alternation (``benchmarks/RESULTS.md``, "YNNPACK for dots only"):

- the demo's stage-1 training step: 0.81–0.83× the time (two paired runs; in a before/after run of
  ``benchmarks/train_step.py``, 1,425 → 1,097 ms and MFU 16.7 → 21.6 %);
- the ``mid`` U-Net's forward + backward (B=2, 32²): 0.93×;
- the ``mid-video`` U-Net's (8 frames, 32²): 0.94× (forward alone 0.80×).

Results agree to float rounding (the demo step's loss to 1e-7 relative).

:func:`compiler_options` gives the options for ``jax.jit(..., compiler_options=...)`` or
``Lowered.compile(compiler_options=...)``: empty on other backends, on a jaxlib that does not
know the option (it is checked once by compiling a trivial function), and when ``XLA_FLAGS``
already sets it (the user's choice wins).
"""

from __future__ import annotations

import functools
import logging
import os

import jax
import jax.numpy as jnp

_log = logging.getLogger("moee_jax")

CPU_OPTIONS: dict[str, str] = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


@functools.cache
def _supported(options: tuple[tuple[str, str], ...]) -> bool:
    try:
        jax.jit(lambda x: x + 1).lower(jnp.zeros((), jnp.float32)).compile(compiler_options=dict(options))
    except Exception as e:  # an XLA build without the option: compile as XLA defaults
        _log.info("XLA does not take the compiler options %s (%s); compiling with its defaults", dict(options), e)
        return False
    return True


def compiler_options(backend: str | None = None) -> dict[str, str]:
    """The compiler options for functions compiled on ``backend`` (default: JAX's default backend)."""
    if (backend or jax.default_backend()) != "cpu":
        return {}
    flags = os.environ.get("XLA_FLAGS", "")
    options = {k: v for k, v in CPU_OPTIONS.items() if k not in flags}
    if not options or not _supported(tuple(sorted(options.items()))):
        return {}
    return options
