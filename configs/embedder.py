"""Training stage ``embedder``: ``moee train --config configs/embedder.py:VARIANT --run_dir RUN`` (tiny | mid | sd15).

See configs/training.py for the shared fields and moee_jax/train/stages.py for what the stage trains.
"""

from moee_jax.configs import training


def get_config(arg: str = "tiny"):
    return training.training_config("embedder", arg or "tiny")
