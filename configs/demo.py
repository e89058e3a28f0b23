"""The built-in demo (``moee demo``): synthetic data → vae → embedder → stage1 → stage2 → animate → score.

Variants:
  cpu  the README's main job: fits in about 20 minutes on 2 CPU cores (32² frames, tiny model).
  gpu  the same pipeline trained longer at 64² (use on a machine with an accelerator).
Every stage's config is the stage file's (configs/<stage>.py) with the overrides below.
"""

import importlib.util
import pathlib

from ml_collections import ConfigDict

VARIANTS = ("cpu", "gpu")


def _training():
    spec = importlib.util.spec_from_file_location("moee_configs_training", pathlib.Path(__file__).with_name("training.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg: str = "cpu") -> ConfigDict:
    variant = arg or "cpu"
    if variant not in VARIANTS:
        raise ValueError(f"unknown demo variant {variant!r}; choose one of {VARIANTS}")
    gpu = variant == "gpu"
    c = ConfigDict()
    c.variant = variant
    c.seed = 0
    # Synthetic data (moee_jax.data.builders.synthetic_talking_faces.SyntheticConfig fields).
    c.data = ConfigDict(dict(
        name=f"demo_{variant}", size=64, num_frames=50, train_identities=40 if gpu else 16, test_identities=3 if gpu else 2,
        clips_per_emotion=2 if gpu else 1, intensities=(0.6, 1.0), compounds=("happily_surprised", "sadly_fearful",
        "angrily_disgusted", "fearfully_surprised"), seed=0,
    ))  # fmt: skip
    image = 64 if gpu else 32
    steps = {"vae": 3000, "embedder": 1000, "stage1": 20000, "stage2": 6000} if gpu else {
        "vae": 300, "embedder": 100, "stage1": 300, "stage2": 150}  # fmt: skip
    training = _training()
    c.stages = ConfigDict()
    for stage, n in steps.items():
        s = training.training_config(stage, "tiny")
        s.video.image_size = (image, image)
        s.data.name = f"synthetic_talking_faces/demo_{variant}"
        s.data.image_size = image
        s.train.steps = n
        s.train.log_every = max(n // 10, 1)
        s.train.learning_rate = 1e-3 if stage in ("vae", "embedder") else 5e-4
        s.train.warmup_steps = 0 if stage in ("vae", "embedder") else max(n // 20, 1)
        s.checkpoint.every_steps = max(n // 2, 1)
        s.mesh.shape = (-1, 1, 1)
        c.stages[stage] = s
    # Animation and scoring of held-out identities.
    c.animate = ConfigDict(dict(steps=8 if not gpu else 25, sampler="ddim", guidance=dict(reference=1.5, audio=2.0, emotion=3.0),
                                compounds={"happily_surprised": "happy:0.5,surprised:0.5", "sadly_fearful": "sad:0.5,fearful:0.5"},
                                speech_only_emotions=("anger", "sadness")))  # fmt: skip
    c.reader = ConfigDict(dict(steps=1400 if not gpu else 3000))
    # MoEE's ablations (moee_jax.eval.ablation): stage 2 again from the same stage 1, same steps, each
    # variant scored like the full model. On 2 CPU cores they add about 20 minutes (three stage-2
    # runs, four evaluations), so the cpu demo leaves them to `moee ablate outputs/demo/run`.
    c.ablate = ConfigDict(dict(variants=("full", "no_moe", "no_global", "no_masked_noisy") if gpu else ()))
    return c
