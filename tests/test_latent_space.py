"""Latent spaces: the lossless space-to-depth autoencoder and latent statistics measured from data."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moee_jax.models.build import build_autoencoder
from moee_jax.models.latent_norm import measure_latent_norm
from moee_jax.models.space_to_depth import depth_to_space, space_to_depth
from moee_jax.models.vae import decode_latents, encode_to_latents


def _params(vae, x):
    return nn.unbox(vae.init(jax.random.key(0), x)["params"])


def test_space_to_depth_round_trip_is_exact_and_groups_each_patch_in_one_cell():
    x = jnp.arange(2 * 4 * 6 * 3, dtype=jnp.float32).reshape(2, 4, 6, 3)
    z = space_to_depth(x, 2)
    assert z.shape == (2, 2, 3, 12)
    np.testing.assert_array_equal(z[0, 1, 2].reshape(2, 2, 3), x[0, 2:4, 4:6])  # cell (1, 2) = pixels rows 2-3, cols 4-5
    np.testing.assert_array_equal(depth_to_space(z, 2), x)


def test_space_to_depth_autoencoder_reconstructs_frames_bit_for_bit_through_normalised_latents():
    vae = build_autoencoder({"kind": "space_to_depth", "factor": 2, "latent_channels": 12})
    rng = np.random.default_rng(0)
    frames = jnp.asarray(rng.integers(0, 256, (2, 3, 8, 8, 3)).astype(np.float32) / 127.5 - 1.0)  # (B, F, H, W, 3)
    params = _params(vae, frames[0])
    params["latent_norm"] = {"shift": jnp.full((12,), 0.25), "scale": jnp.full((12,), 3.0)}
    z = encode_to_latents(vae, params, frames)
    assert z.shape == (2, 3, 4, 4, 12)
    np.testing.assert_allclose(decode_latents(vae, params, z), frames, atol=1e-6)


def test_measured_statistics_give_unit_normal_latents_per_channel():
    rng = np.random.default_rng(1)
    raw = rng.normal([0.5, -2.0, 0.0], [0.3, 2.0, 0.01], size=(4000, 3)).astype(np.float32)
    norm = measure_latent_norm(raw)
    z = (raw - norm["shift"]) * norm["scale"]
    np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(z.std(0), 1.0, atol=1e-4)
    single = measure_latent_norm(raw, per_channel=False)
    assert np.unique(single["scale"]).size == 1  # SD's form: one scale for every channel


def test_a_kl_vae_keeps_sd_scaling_until_its_statistics_are_measured():
    vae = build_autoencoder({"block_out_channels": (8, 16), "layers_per_block": 1, "norm_num_groups": 4, "latent_channels": 4,
                             "scaling_factor": 0.18215})  # fmt: skip
    params = _params(vae, jnp.zeros((1, 4, 4, 3)))
    np.testing.assert_array_equal(params["latent_norm"]["scale"], np.full(4, 0.18215, np.float32))
    np.testing.assert_array_equal(params["latent_norm"]["shift"], np.zeros(4, np.float32))


def test_unknown_autoencoder_kind_and_wrong_latent_channels_are_named():
    with pytest.raises(ValueError, match="kind='vqgan'"):
        build_autoencoder({"kind": "vqgan"})
    with pytest.raises(ValueError, match="latent_channels=12"):
        build_autoencoder({"kind": "space_to_depth", "factor": 2, "latent_channels": 4})
