"""Training stage ``stage2``: ``moee train --config configs/stage2.py:VARIANT --run_dir RUN`` (tiny | mid | sd15).

See configs/training.py for the shared fields and moee_jax/train/stages.py for what the stage trains.
"""

import importlib.util
import pathlib


def get_config(arg: str = "tiny"):
    spec = importlib.util.spec_from_file_location("moee_configs_training", pathlib.Path(__file__).with_name("training.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.training_config("stage2", arg or "tiny")
