"""moee_jax: MoEE talking-head video diffusion in JAX/Flax.

Subpackages: ``nn`` (layers), ``models`` (VAE, U-Net, ReferenceNet, ...), ``diffusion``
(schedules, samplers, guidance), ``parallel`` (mesh and sharding rules), ``checkpoint``
(Orbax I/O and weight converters), ``cli`` (the ``moee`` command).
"""

__version__ = "0.1.0"
