"""`moee convert`: diffusers / AnimateDiff safetensors → Orbax checkpoint, with actionable errors."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from moee_jax.checkpoint.convert.state_dict import ConversionError
from moee_jax.checkpoint.convert.unet import convert_unet
from moee_jax.checkpoint.orbax import load_metadata, restore_params
from moee_jax.models.unet import VideoUNet
from tests.reference_models import TINY_UNET, ours_unet_config, randomize

REPO = pathlib.Path(__file__).resolve().parent.parent

# diffusers models matching configs/backbone.py:tiny
TINY_CFG_UNET = dict(TINY_UNET, layers_per_block=1, cross_attention_dim=32)
TINY_CFG_VAE = dict(
    block_out_channels=(8, 16),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    norm_num_groups=4,
    latent_channels=4,
)
TINY_CFG_MOTION = dict(
    block_out_channels=(32, 64), motion_layers_per_block=1, motion_num_attention_heads=4, motion_norm_num_groups=8
)


@pytest.fixture(scope="module")
def sources(torch, tmp_path_factory):
    from diffusers import AutoencoderKL, MotionAdapter, UNet2DConditionModel

    root = tmp_path_factory.mktemp("sd")
    randomize(torch, UNet2DConditionModel(**TINY_CFG_UNET), seed=3).save_pretrained(root / "unet")
    randomize(torch, AutoencoderKL(**TINY_CFG_VAE), seed=4).save_pretrained(root / "vae")
    randomize(torch, MotionAdapter(**TINY_CFG_MOTION), seed=5).save_pretrained(root / "motion")
    return root


def _moee(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", "moee_jax.cli", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow  # converts and restores a whole checkpoint in a subprocess (~2 CPU minutes); the converters' parity tests stay
def test_moee_convert_writes_a_restorable_checkpoint_listing_new_modules(sources, tmp_path):
    out = tmp_path / "ckpt"
    proc = _moee(
        "convert", "--config", "configs/backbone.py:tiny", "--unet", str(sources / "unet"), "--vae",
        str(sources / "vae"), "--motion_adapter", str(sources / "motion"), "--out", str(out),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = load_metadata(out)
    assert meta["initialised"]["vae"] == []
    assert meta["initialised"]["face_locator"] and meta["initialised"]["reference_net"] == []
    assert meta["initialised"]["unet"] and all("audio" in m for m in meta["initialised"]["unet"])
    params = restore_params(out)
    state = load_file(str(sources / "unet" / "diffusion_pytorch_model.safetensors"))
    np.testing.assert_array_equal(
        params["unet"]["conv_in"]["kernel"], state["conv_in.weight"].transpose(2, 3, 1, 0)
    )
    # ReferenceNet starts from the same SD U-Net weights.
    np.testing.assert_array_equal(params["reference_net"]["conv_in"]["kernel"], params["unet"]["conv_in"]["kernel"])
    motion = load_file(str(sources / "motion" / "diffusion_pytorch_model.safetensors"))
    np.testing.assert_array_equal(
        params["unet"]["down_blocks_0"]["motion_modules_0"]["proj_out"]["kernel"],
        motion["down_blocks.0.motion_modules.0.proj_out.weight"].T,
    )


def test_moee_convert_refuses_pickle_without_flag(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"not really a pickle")
    proc = _moee("convert", "--config", "configs/backbone.py:tiny", "--unet", str(tmp_path / "unet"), "--out", str(tmp_path / "o"))
    assert proc.returncode != 0
    assert "pickle" in proc.stderr and "--allow_pickle" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def unet():
    return VideoUNet(ours_unet_config(layers_per_block=1, cross_attention_dim=32))


def _edited_copy(src: pathlib.Path, dst: pathlib.Path, edit) -> pathlib.Path:
    state = dict(load_file(str(src / "diffusion_pytorch_model.safetensors")))
    edit(state)
    dst.mkdir()
    save_file(state, str(dst / "diffusion_pytorch_model.safetensors"))
    return dst


def test_renamed_key_is_named_in_the_error(sources, tmp_path, unet):
    def rename(state):
        state["down_blocks.0.resnets.0.conv_one.weight"] = state.pop("down_blocks.0.resnets.0.conv1.weight")

    path = _edited_copy(sources / "unet", tmp_path / "renamed", rename)
    with pytest.raises(ConversionError) as err:
        convert_unet(path, unet)
    assert "down_blocks.0.resnets.0.conv_one.weight" in str(err.value)
    assert "down_blocks_0/resnets_0/conv1/kernel" in str(err.value)


def test_wrong_shape_is_named_in_the_error(sources, tmp_path, unet):
    def reshape(state):
        state["mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"] = np.zeros((64, 7), np.float32)

    path = _edited_copy(sources / "unet", tmp_path / "reshaped", reshape)
    with pytest.raises(ConversionError, match=r"mid_block\.attentions\.0\.transformer_blocks\.0\.attn2\.to_k\.weight"):
        convert_unet(path, unet)


def test_converted_tree_matches_the_model_tree(sources, unet):
    import flax.linen as nn

    from moee_jax.models.init import abstract_unet_variables

    params = convert_unet(sources / "unet", unet).params
    target = nn.unbox(abstract_unet_variables(unet))["params"]
    got = {k: v.shape for k, v in traverse_util.flatten_dict(params).items()}
    want = {k: v.shape for k, v in traverse_util.flatten_dict(target).items()}
    assert got == want
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda v: v.dtype == np.float32, params))


def test_bfloat16_safetensors_are_read_as_float32(torch, tmp_path):
    from safetensors.torch import save_file as save_torch

    from moee_jax.checkpoint.convert.state_dict import load_state_dict

    weights = {"w": torch.randn(3, 2).to(torch.bfloat16), "h": torch.randn(2).to(torch.float16)}
    save_torch(weights, str(tmp_path / "m.safetensors"))
    state = load_state_dict(tmp_path / "m.safetensors")
    assert state["w"].dtype == np.float32
    np.testing.assert_array_equal(state["w"], weights["w"].float().numpy())
    np.testing.assert_array_equal(state["h"], weights["h"].numpy())


def test_truncated_safetensors_file_is_named(tmp_path):
    from moee_jax.checkpoint.convert.state_dict import load_state_dict

    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ConversionError, match="bad.safetensors"):
        load_state_dict(tmp_path / "bad.safetensors")
