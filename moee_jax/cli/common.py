"""What every ``moee`` subcommand shares: the shipped configs and the ``--config`` flag, the log file."""

from __future__ import annotations

import contextlib
import pathlib

from ml_collections import config_flags

# The configs shipped with the package (the repository's configs/): `--config stage1.py:tiny`,
# `--config configs/stage1.py:tiny` and a path of one's own all work from any folder.
CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
DEFAULT_CONFIG = "backbone.py:tiny"


def resolve_config(spec: str) -> str:
    """``FILE[:variant]`` with ``FILE`` as given when it exists, else the shipped config of that name."""
    path, sep, variant = spec.partition(":")
    if pathlib.Path(path).exists() or not path.endswith(".py"):
        return spec
    shipped = CONFIGS / pathlib.Path(path).name
    return f"{shipped}{sep}{variant}" if shipped.exists() else spec


def config_flag(default: str = DEFAULT_CONFIG):
    return config_flags.DEFINE_config_file(
        "config", resolve_config(default), "Config file and variant, e.g. stage1.py:tiny or configs/backbone.py:sd15."
    )


def log_file(path) -> contextlib.AbstractContextManager:
    """The command's full log in ``path`` (:func:`moee_jax.console.log_to`); none for a gs:// run."""
    from moee_jax import console

    return contextlib.nullcontext() if str(path).startswith("gs://") else console.log_to(path)
