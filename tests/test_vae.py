"""AutoencoderKL: parity with diffusers on a tiny random VAE, the latent scaling, and the converter's errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from moee_jax.checkpoint.convert.state_dict import ConversionError
from moee_jax.checkpoint.convert.vae import convert_vae
from moee_jax.models.vae import AutoencoderKL, decode_latents, encode_to_latents

BLOCKS = (8, 16)
GROUPS = 4
LATENT = 4
H, W = 16, 24  # non-square on purpose
WEIGHTS = "diffusion_pytorch_model.safetensors"


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def torch_vae(torch):
    from diffusers import AutoencoderKL as TorchAutoencoderKL

    torch.manual_seed(0)
    model = TorchAutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(BLOCKS),
        up_block_types=("UpDecoderBlock2D",) * len(BLOCKS),
        block_out_channels=BLOCKS,
        layers_per_block=1,
        norm_num_groups=GROUPS,
        latent_channels=LATENT,
        sample_size=H,
    ).eval()
    # Every parameter perturbed, norms and biases included: default zero biases / unit scales would
    # let a transposed or misplaced affine parameter pass unnoticed.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def vae_dir(torch_vae, tmp_path_factory):
    path = tmp_path_factory.mktemp("vae") / "vae"
    torch_vae.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def vae() -> AutoencoderKL:
    return AutoencoderKL(block_out_channels=BLOCKS, layers_per_block=1, norm_num_groups=GROUPS, latent_channels=LATENT)


@pytest.fixture(scope="module")
def params(vae, vae_dir):
    return convert_vae(vae_dir, vae)


@pytest.fixture(scope="module")
def encode(vae):
    return jax.jit(lambda p, x: vae.apply({"params": p}, x, method=AutoencoderKL.encode))


@pytest.fixture(scope="module")
def decode(vae):
    return jax.jit(lambda p, z: vae.apply({"params": p}, z, method=AutoencoderKL.decode))


@pytest.fixture(scope="module")
def images():
    """(2, H, W, 3) in [-1, 1], channels-last."""
    return np.random.default_rng(0).uniform(-1.0, 1.0, (2, H, W, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def latents():
    """(2, H/2, W/2, 4) unscaled latents, channels-last."""
    return np.random.default_rng(1).standard_normal((2, H // 2, W // 2, LATENT)).astype(np.float32)


@pytest.fixture(scope="module")
def torch_posterior(torch, torch_vae, images):
    with torch.no_grad():
        dist = torch_vae.encode(torch.from_numpy(images).permute(0, 3, 1, 2)).latent_dist
    return dist.mean.permute(0, 2, 3, 1).numpy(), dist.logvar.permute(0, 2, 3, 1).numpy()


def _saved_state(vae_dir) -> dict[str, np.ndarray]:
    return dict(load_file(str(vae_dir / WEIGHTS)))


def test_encode_mean_matches_diffusers(encode, params, images, torch_posterior):
    mean, _ = encode(params, images)
    assert mean.shape == (2, H // 2, W // 2, LATENT)
    assert rel_err(mean, torch_posterior[0]) < 1e-4


def test_encode_logvar_matches_diffusers(encode, params, images, torch_posterior):
    _, logvar = encode(params, images)
    assert rel_err(logvar, torch_posterior[1]) < 1e-4


def test_decode_matches_diffusers(torch, torch_vae, decode, params, latents):
    with torch.no_grad():
        want = torch_vae.decode(torch.from_numpy(latents).permute(0, 3, 1, 2)).sample.permute(0, 2, 3, 1).numpy()
    got = decode(params, latents)
    assert got.shape == (2, H, W, 3)
    assert rel_err(got, want) < 1e-4


def test_encode_to_latents_is_scaled_posterior_mean(vae, encode, params, images):
    mean, _ = encode(params, images)
    np.testing.assert_allclose(encode_to_latents(vae, params, images), mean * vae.scaling_factor, rtol=1e-5, atol=1e-6)


def test_encode_to_latents_with_rng_samples_around_the_scaled_mean(vae, encode, params, images):
    mean, logvar = encode(params, images)
    z = encode_to_latents(vae, params, images, rng=jax.random.key(0))
    eps = (z / vae.scaling_factor - mean) / jnp.exp(0.5 * logvar)
    assert not np.allclose(z, mean * vae.scaling_factor)
    assert abs(float(eps.mean())) < 0.2 and abs(float(eps.std()) - 1.0) < 0.2


def test_decode_latents_divides_by_scaling_factor(vae, decode, params, latents):
    got = decode_latents(vae, params, latents * vae.scaling_factor)
    np.testing.assert_allclose(got, decode(params, latents), rtol=1e-4, atol=1e-5)


def test_video_frames_are_encoded_independently(vae, params, images):
    video = np.stack([images, images[::-1]], axis=1)  # (B=2, F=2, H, W, 3)
    got = encode_to_latents(vae, params, video)
    assert got.shape == (2, 2, H // 2, W // 2, LATENT)
    np.testing.assert_allclose(got[:, 1], encode_to_latents(vae, params, images[::-1]), rtol=1e-5, atol=1e-6)


def test_legacy_attention_names_and_conv_shaped_projections_convert(vae, vae_dir, params, tmp_path):
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for key, value in _saved_state(vae_dir).items():
        for new, old in legacy.items():
            if f".attentions.0.{new}." in key:
                key = key.replace(f".{new}.", f".{old}.")
                if value.ndim == 2:
                    value = value[:, :, None, None]
        state[key] = value
    assert any(".query.weight" in k for k in state)
    save_file(state, str(tmp_path / WEIGHTS))
    jax.tree.map(np.testing.assert_array_equal, convert_vae(tmp_path / WEIGHTS, vae), params)


def test_renamed_key_is_reported(vae, vae_dir, tmp_path):
    state = _saved_state(vae_dir)
    state["decoder.conv_inn.weight"] = state.pop("decoder.conv_in.weight")
    save_file(state, str(tmp_path / WEIGHTS))
    with pytest.raises(ConversionError, match=r"decoder\.conv_inn\.weight"):
        convert_vae(tmp_path, vae)


def test_wrong_shape_is_reported(vae, vae_dir, tmp_path):
    state = _saved_state(vae_dir)
    state["encoder.conv_out.bias"] = np.zeros(3, np.float32)
    save_file(state, str(tmp_path / WEIGHTS))
    with pytest.raises(ConversionError, match=r"encoder\.conv_out\.bias: file has shape \(3,\)"):
        convert_vae(tmp_path, vae)


def test_pickle_file_is_refused(torch, torch_vae, vae, tmp_path):
    path = tmp_path / "diffusion_pytorch_model.bin"
    torch.save(torch_vae.state_dict(), path)
    with pytest.raises(ConversionError, match="pickle.*--allow_pickle"):
        convert_vae(tmp_path, vae)
