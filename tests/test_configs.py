"""Config variants build, and ``sd15`` has exactly the parameters of real SD1.5 / AnimateDiff / SD-VAE
checkpoints (diffusers models built on torch's ``meta`` device: shapes only, no memory)."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import traverse_util

from moee_jax.checkpoint.convert.state_dict import torch_key_to_path
from moee_jax.checkpoint.convert.vae import abstract_params as abstract_vae_params
from moee_jax.models.build import build_backbone
from moee_jax.models.init import abstract_unet_variables

SD15_UNET = dict(
    sample_size=64,
    cross_attention_dim=768,
    attention_head_dim=8,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    layers_per_block=2,
)
SD_VAE = dict(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    latent_channels=4,
    sample_size=512,
)


def get_config(variant):
    from moee_jax.configs import backbone

    return backbone.get_config(variant)


def _torch_shapes(state_dict, skip=lambda k: False) -> dict:
    """diffusers keys/shapes → our paths/shapes by the converter's rule (weights transposed)."""
    out = {}
    for key, t in state_dict.items():
        if skip(key):
            continue
        shape = tuple(t.shape)
        path = torch_key_to_path(key)
        if path[-1] == "weight":
            leaf = "kernel" if len(shape) in (2, 4) else "scale"
            shape = (shape[2], shape[3], shape[1], shape[0]) if len(shape) == 4 else shape[::-1]
            path = path[:-1] + (leaf,)
        out[path] = shape
    return out


def _our_shapes(tree) -> dict:
    return {p: tuple(v.shape) for p, v in traverse_util.flatten_dict(tree).items()}


@pytest.mark.parametrize("variant", ["tiny", "mid", "sd15"])
def test_every_variant_builds_abstractly(variant):
    backbone = build_backbone(get_config(variant))
    params = nn.unbox(abstract_unet_variables(backbone.unet))["params"]
    assert sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(params)) > 0


def test_unknown_variant_is_named():
    with pytest.raises(ValueError, match="sd21"):
        get_config("sd21")


def test_sd15_unet_matches_stable_diffusion_1_5(torch):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        reference = UNet2DConditionModel(**SD15_UNET)
    cfg = get_config("sd15")
    cfg.model.unet.motion_modules = False
    cfg.model.unet.audio_dim = None
    ours = _our_shapes(nn.unbox(abstract_unet_variables(build_backbone(cfg).unet))["params"])
    assert ours == _torch_shapes(reference.state_dict())
    assert sum(int(np.prod(s)) for s in ours.values()) == 859_520_964  # SD1.5's U-Net


def test_sd15_motion_modules_match_animatediff_motion_adapter(torch):
    from diffusers import MotionAdapter

    with torch.device("meta"):
        reference = MotionAdapter()  # the v1.5-2 layout: 2 motion layers per block, mid block, 32 positions
    cfg = get_config("sd15")
    cfg.model.unet.audio_dim = None
    ours = _our_shapes(nn.unbox(abstract_unet_variables(build_backbone(cfg).unet))["params"])
    motion = {p: s for p, s in ours.items() if any(c.startswith("motion_modules") for c in p)}
    assert motion == _torch_shapes(reference.state_dict(), skip=lambda k: k.endswith("pos_embed.pe"))


def test_sd15_vae_matches_the_sd_vae(torch):
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        reference = AutoencoderKL(**SD_VAE)
    ours = _our_shapes(abstract_vae_params(build_backbone(get_config("sd15")).vae))
    # Our latent statistics (shift, scale per channel) are the one part diffusers keeps in its config.
    assert {p: s for p, s in ours.items() if p[0] == "latent_norm"} == {("latent_norm", "shift"): (4,), ("latent_norm", "scale"): (4,)}
    assert {p: s for p, s in ours.items() if p[0] != "latent_norm"} == _torch_shapes(reference.state_dict())


@pytest.mark.parametrize(
    "overrides, parts",
    [
        ({}, {"latents"}),
        ({"sources": ("label",)}, {"latents"}),
        ({"sources": ("embedder",), "bank": True, "discriminator": True}, {"embedder", "bank"}),
        ({"sources": ("embedder",)}, {"embedder", "embedder_tokens"}),
    ],
)
def test_config_chooses_the_emotion_conditioning(overrides, parts):
    from moee_jax.configs import stage2
    from moee_jax.models.system import MoEESystem
    from tests.train_helpers import fake_batch

    cfg = stage2.get_config("tiny")
    cfg.model.emotion.update(overrides)
    system = MoEESystem(cfg)
    assert (system.discriminator is not None) == bool(overrides.get("discriminator"))
    params = jax.eval_shape(system.init, jax.random.key(0), fake_batch(cfg, batch=1))
    assert parts <= set(params["conditioning"])
    assert "emotion" in params["unet"]["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]


def test_every_stage_block_holds_only_its_own_training_fields():
    from moee_jax.configs import training

    fields = {stage: set(training.training_config(stage, "tiny").train) for stage in ("vae", "embedder", "stage1", "stage2")}
    common = set(training.common(True))
    assert fields["vae"] - common == {"vae_frames", "kl_weight", "perceptual", "finalize_batches"}
    assert fields["embedder"] - common == {"info_nce_temperature"}
    assert "info_nce_temperature" not in fields["vae"] | fields["stage1"] | fields["stage2"]
    assert {"joint_emotion"} <= fields["stage1"] and not {"cls_weight", "vq_weight"} & fields["stage1"]
    assert {"cls_weight", "vq_weight"} <= fields["stage2"] and "joint_emotion" not in fields["stage2"]


def test_sharding_rules_live_in_the_config_and_default_to_the_table():
    from moee_jax.parallel.rules import DEFAULT_RULES, rules_from_config

    cfg = get_config("tiny")
    assert cfg.sharding_rules is None and rules_from_config(cfg) == DEFAULT_RULES
    cfg.sharding_rules = (("embed", None), ("batch", ("data", "fsdp")))
    assert rules_from_config(cfg) == (("embed", None), ("batch", ("data", "fsdp")))
    cfg.sharding_rules = (("embed",),)
    with pytest.raises(ValueError, match=r"sharding_rules\[0\]"):
        rules_from_config(cfg)


def test_emotion_config_errors_are_named():
    from moee_jax.models.conditioning import EmotionConfig

    with pytest.raises(ValueError, match="sources"):
        EmotionConfig(sources=("smell",))
    with pytest.raises(ValueError, match="stands alone"):
        EmotionConfig(sources=("embedder", "label"))
    with pytest.raises(ValueError, match="text_dim"):
        EmotionConfig(sources=("text",))
    with pytest.raises(ValueError, match="bank"):
        EmotionConfig(sources=("label",), bank=True)


def test_unknown_model_config_fields_are_named():
    from moee_jax.models.conditioning import EmotionConfig
    from moee_jax.models.unet import UNetConfig

    with pytest.raises(ValueError, match="U-Net config.*layers_per_blok"):
        UNetConfig.from_dict({"layers_per_blok": 2})
    with pytest.raises(ValueError, match="emotion config.*moe_variantt"):
        EmotionConfig.from_dict({"moe_variantt": "moe"})
    assert UNetConfig.from_dict({"block_out_channels": [32, 64]}).block_out_channels == (32, 64)
