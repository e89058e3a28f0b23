"""``python -m moee_jax.cli``: the ``moee`` command."""

from moee_jax.cli import run

run()
