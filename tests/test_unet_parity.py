"""Our U-Net equals diffusers' (fp32, CPU), through safetensors on disk and our converter."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from moee_jax.checkpoint.convert.unet import animatediff_key, convert_unet
from moee_jax.models.init import init_unet_params
from moee_jax.models.unet import VideoUNet
from tests.reference_models import TINY_MOTION, TINY_UNET, ours_unet_config, randomize, rel_err

B, F, H, W = 2, 3, 8, 16  # non-square latents


@pytest.fixture(scope="module")
def torch_models(torch, tmp_path_factory):
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

    root = tmp_path_factory.mktemp("diffusers")
    unet2d = randomize(torch, UNet2DConditionModel(**TINY_UNET), seed=1)
    unet2d.save_pretrained(root / "unet", safe_serialization=True)
    adapter = randomize(torch, MotionAdapter(**TINY_MOTION), seed=2)
    adapter.save_pretrained(root / "motion_adapter", safe_serialization=True)
    motion = UNetMotionModel.from_unet2d(unet2d, adapter).eval()
    return {"root": root, "unet2d": unet2d, "motion": motion}


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    return {
        "sample": rng.standard_normal((B, F, H, W, 4)).astype(np.float32),
        "timesteps": np.array([17, 803], np.int32),
        "context": rng.standard_normal((B, 5, TINY_UNET["cross_attention_dim"])).astype(np.float32),
    }


def _torch_frames(torch, x):
    """(B, F, H, W, C) → (B·F, C, H, W)."""
    return torch.from_numpy(x.reshape((-1,) + x.shape[2:]).transpose(0, 3, 1, 2).copy())


def test_spatial_unet_matches_diffusers_unet2d_frame_by_frame(torch, torch_models, inputs):
    unet = VideoUNet(ours_unet_config())
    params = convert_unet(torch_models["root"] / "unet", unet).params
    ours = jax.jit(lambda p, x, t, c: unet.apply({"params": p}, x, t, c))(
        params, inputs["sample"], inputs["timesteps"], inputs["context"]
    )
    with torch.no_grad():
        ref = torch_models["unet2d"](
            _torch_frames(torch, inputs["sample"]),
            torch.from_numpy(np.repeat(inputs["timesteps"], F)),
            torch.from_numpy(np.repeat(inputs["context"], F, axis=0)),
        ).sample
    ref = ref.numpy().transpose(0, 2, 3, 1).reshape(B, F, H, W, 4)
    assert rel_err(ours, ref) < 1e-4


def test_video_unet_matches_diffusers_unet_motion_model(torch, torch_models, inputs):
    unet = VideoUNet(ours_unet_config(motion_modules=True))
    params = convert_unet(
        torch_models["root"] / "unet", unet, motion_adapter=torch_models["root"] / "motion_adapter"
    ).params
    ours = jax.jit(lambda p, x, t, c: unet.apply({"params": p}, x, t, c))(
        params, inputs["sample"], inputs["timesteps"], inputs["context"]
    )
    with torch.no_grad():
        ref = torch_models["motion"](
            torch.from_numpy(inputs["sample"].transpose(0, 4, 1, 2, 3).copy()),
            torch.from_numpy(inputs["timesteps"]),
            torch.from_numpy(np.repeat(inputs["context"], F, axis=0)),  # diffusers takes per-frame context
        ).sample
    assert rel_err(ours, ref.numpy().transpose(0, 2, 3, 4, 1)) < 1e-4


@pytest.mark.slow  # a second full U-Net compile (~1 CPU minute); the motion modules' parity with diffusers stays in the default suite
def test_temporal_layers_change_the_output(torch_models, inputs):
    """The motion weights are live: dropping them (fresh zero-init modules) changes the result."""
    unet = VideoUNet(ours_unet_config(motion_modules=True))
    with_motion = convert_unet(
        torch_models["root"] / "unet", unet, motion_adapter=torch_models["root"] / "motion_adapter"
    ).params
    fresh = init_unet_params(unet, jax.random.key(0))
    without = convert_unet(torch_models["root"] / "unet", unet, init_params=fresh)
    assert any(m.endswith("motion_modules_0") for m in without.initialised)
    run = jax.jit(lambda p: unet.apply({"params": p}, inputs["sample"], inputs["timesteps"], inputs["context"]))
    assert rel_err(run(with_motion), run(without.params)) > 1e-2


def test_original_animatediff_keys_map_to_diffusers_names():
    key = "down_blocks.0.motion_modules.1.temporal_transformer.transformer_blocks.0.attention_blocks.1.to_q.weight"
    assert animatediff_key(key) == "down_blocks.0.motion_modules.1.transformer_blocks.0.attn2.to_q.weight"
    assert animatediff_key("mid_block.motion_modules.0.temporal_transformer.transformer_blocks.0.ff_norm.bias") == (
        "mid_block.motion_modules.0.transformer_blocks.0.norm3.bias"
    )
    assert animatediff_key(animatediff_key(key)) == animatediff_key(key)


@pytest.mark.slow  # a second full U-Net compile (~1 CPU minute); the motion modules' parity with diffusers stays in the default suite
def test_new_modules_are_reported_as_initialised(torch_models):
    unet = VideoUNet(ours_unet_config(audio_dim=8))
    fresh = init_unet_params(unet, jax.random.key(0))
    result = convert_unet(torch_models["root"] / "unet", unet, init_params=fresh)
    assert result.initialised
    assert all("audio_attn" in m or "norm_audio" in m for m in result.initialised)
    audio_out = result.params["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["audio_attn"]["to_out_0"]
    np.testing.assert_array_equal(audio_out["kernel"], 0.0)  # zero-initialised: the U-Net is unchanged
