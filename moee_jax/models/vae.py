"""The KL-regularised image autoencoder of latent diffusion (diffusers ``AutoencoderKL``, SD config).

A convolutional encoder maps an image to the mean and log-variance of a diagonal Gaussian posterior
``q(z|x) = N(μ, diag(exp(logvar)))`` (Kingma & Welling 2014, the VAE); the decoder maps a latent back
to pixels. Rombach et al. 2022 (LDM, §3.1 "Perceptual Image Compression") train it with a small KL
weight so the latent space is nearly deterministic, and diffusion runs on ``z · scaling_factor``.

Layout is channels-last: images ``(B, H, W, in_channels)`` in [-1, 1]; latents
``(B, H / 2^(n-1), W / 2^(n-1), latent_channels)`` for ``n = len(block_out_channels)``. Module names
mirror diffusers' so its checkpoints convert key by key (see :mod:`moee_jax.checkpoint.convert.vae`).
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from moee_jax.models.latent_norm import LatentNorm
from moee_jax.nn.attention import dot_product_attention
from moee_jax.nn.layers import conv, dense
from moee_jax.nn.norms import group_norm
from moee_jax.nn.resnet import ResnetBlock2D
from moee_jax.nn.sampling import Downsample2D, Upsample2D

# diffusers builds every norm of the VAE (resnets, mid-block attention, conv_norm_out) with this eps.
_EPS = 1e-6
# diffusers' DiagonalGaussianDistribution clamps the log-variance to this range.
_LOGVAR_RANGE = (-30.0, 20.0)
_SPATIAL = ("batch", "height", "width", "act_embed")


class VAEAttentionBlock(nn.Module):
    """Single-head spatial self-attention with a residual: ``x + W_o·softmax(q kᵀ/√C) v``, q, k, v from ``GN(x)``.

    diffusers' VAE mid-block ``Attention`` (one head of width ``C``, biased projections, group norm
    on the input). ``x`` (B, H, W, C) → (B, H, W, C).
    """

    groups: int
    implementation: str = "xla"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        tokens = group_norm(self.groups, _EPS, name="group_norm", dtype=self.dtype)(x).reshape(b, h * w, c)

        def project(name: str) -> jax.Array:
            y = dense(c, ("embed", "heads"), name=name, dtype=self.dtype)(tokens)
            return nn.with_logical_constraint(y.reshape(b, h * w, 1, c), ("batch", "length", "act_heads", None))

        q, k, v = project("to_q"), project("to_k"), project("to_v")
        out = dot_product_attention(q, k, v, implementation=self.implementation)
        out = dense(c, ("heads", "embed"), name="to_out_0", dtype=self.dtype)(out.reshape(b, h * w, c))
        # Row-parallel output replicated over 'tensor' (see moee_jax.parallel.rules).
        out = nn.with_logical_constraint(out, ("batch", "length", "act_embed"))
        return x + out.reshape(b, h, w, c)


class MidBlock(nn.Module):
    """ResNet → (attention) → ResNet at the lowest resolution; (B, h, w, C) → (B, h, w, C)."""

    channels: int
    groups: int
    add_attention: bool = True
    implementation: str = "xla"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = ResnetBlock2D(self.channels, self.groups, _EPS, dtype=self.dtype, name="resnets_0")(x)
        if self.add_attention:
            x = VAEAttentionBlock(self.groups, self.implementation, self.dtype, name="attentions_0")(x)
        return ResnetBlock2D(self.channels, self.groups, _EPS, dtype=self.dtype, name="resnets_1")(x)


class DownEncoderBlock(nn.Module):
    """``num_layers`` ResNets, then optionally a stride-2 conv.

    (B, H, W, C_in) → (B, H/2, W/2, channels), or (B, H, W, channels) without the downsampler.
    """

    channels: int
    num_layers: int
    groups: int
    add_downsample: bool
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.channels, self.groups, _EPS, dtype=self.dtype, name=f"resnets_{j}")(x)
        if self.add_downsample:
            # diffusers pads (0, 1) bottom/right, not symmetrically, before the stride-2 conv.
            x = Downsample2D(self.channels, asymmetric_pad=True, dtype=self.dtype, name="downsamplers_0")(x)
        return nn.with_logical_constraint(x, _SPATIAL)


class UpDecoderBlock(nn.Module):
    """``num_layers`` ResNets, then optionally 2× nearest upsampling + conv.

    (B, H, W, C_in) → (B, 2H, 2W, channels), or (B, H, W, channels) without the upsampler.
    """

    channels: int
    num_layers: int
    groups: int
    add_upsample: bool
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.channels, self.groups, _EPS, dtype=self.dtype, name=f"resnets_{j}")(x)
        if self.add_upsample:
            x = Upsample2D(self.channels, dtype=self.dtype, name="upsamplers_0")(x)
        return nn.with_logical_constraint(x, _SPATIAL)


class Encoder(nn.Module):
    """Image (B, H, W, in) → Gaussian moments (B, H/2^(n-1), W/2^(n-1), 2·latent) before ``quant_conv``."""

    latent_channels: int
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    groups: int
    mid_block_add_attention: bool = True
    implementation: str = "xla"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = conv(self.block_out_channels[0], 3, name="conv_in", dtype=self.dtype)(x)
        last = len(self.block_out_channels) - 1
        for i, ch in enumerate(self.block_out_channels):
            x = DownEncoderBlock(ch, self.layers_per_block, self.groups, i < last, self.dtype, name=f"down_blocks_{i}")(x)
        x = MidBlock(
            self.block_out_channels[-1],
            self.groups,
            self.mid_block_add_attention,
            self.implementation,
            self.dtype,
            name="mid_block",
        )(x)
        x = nn.silu(group_norm(self.groups, _EPS, name="conv_norm_out", dtype=self.dtype)(x))
        return conv(2 * self.latent_channels, 3, name="conv_out", dtype=self.dtype)(x)


class Decoder(nn.Module):
    """Latent (B, h, w, latent) after ``post_quant_conv`` → image (B, h·2^(n-1), w·2^(n-1), out)."""

    out_channels: int
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    groups: int
    mid_block_add_attention: bool = True
    implementation: str = "xla"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        x = conv(self.block_out_channels[-1], 3, name="conv_in", dtype=self.dtype)(z)
        x = MidBlock(
            self.block_out_channels[-1],
            self.groups,
            self.mid_block_add_attention,
            self.implementation,
            self.dtype,
            name="mid_block",
        )(x)
        last = len(self.block_out_channels) - 1
        for i, ch in enumerate(reversed(self.block_out_channels)):
            # The decoder's up blocks hold one resnet more than the encoder's down blocks.
            x = UpDecoderBlock(ch, self.layers_per_block + 1, self.groups, i < last, self.dtype, name=f"up_blocks_{i}")(x)
        x = nn.silu(group_norm(self.groups, _EPS, name="conv_norm_out", dtype=self.dtype)(x))
        return conv(self.out_channels, 3, name="conv_out", dtype=self.dtype)(x)


class AutoencoderKL(nn.Module):
    """KL autoencoder of LDM (Rombach et al. 2022) with the VAE posterior of Kingma & Welling 2014.

    ``encode``: image (B, H, W, in_channels) in [-1, 1] → ``(mean, logvar)``, each
    (B, H/2^(n-1), W/2^(n-1), latent_channels), unscaled. ``decode``: unscaled latent → image.
    ``__call__`` is the whole round trip ``decode(denormalise(normalise(encode(x).mean)))``, used to
    initialise every parameter.

    ``latent_norm`` (:class:`~moee_jax.models.latent_norm.LatentNorm`) holds the diffusion-latent
    statistics: SD's ``scaling_factor`` for converted SD weights, the measured ``1/std`` (and mean)
    for a VAE trained here (:func:`~moee_jax.models.latent_norm.measure_latent_norm`).
    """

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    dtype: jnp.dtype = jnp.float32
    attention_implementation: str = "xla"

    def setup(self):
        self.encoder = Encoder(
            self.latent_channels,
            tuple(self.block_out_channels),
            self.layers_per_block,
            self.norm_num_groups,
            self.mid_block_add_attention,
            self.attention_implementation,
            self.dtype,
        )
        self.decoder = Decoder(
            self.out_channels,
            tuple(self.block_out_channels),
            self.layers_per_block,
            self.norm_num_groups,
            self.mid_block_add_attention,
            self.attention_implementation,
            self.dtype,
        )
        if self.use_quant_conv:
            self.quant_conv = conv(2 * self.latent_channels, 1, name="quant_conv", dtype=self.dtype)
        if self.use_post_quant_conv:
            self.post_quant_conv = conv(self.latent_channels, 1, name="post_quant_conv", dtype=self.dtype)
        self.latent_norm = LatentNorm(self.latent_channels, self.scaling_factor)

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent cell along each side: ``2^(n-1)``."""
        return 2 ** (len(self.block_out_channels) - 1)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(B, H, W, in_channels) → ``mean, logvar`` (B, h, w, latent_channels), logvar clipped to [-30, 20]."""
        moments = self.encoder(x)
        if self.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, *_LOGVAR_RANGE)

    def decode(self, z: jax.Array) -> jax.Array:
        """Unscaled latent (B, h, w, latent_channels) → image (B, H, W, out_channels)."""
        if self.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x: jax.Array) -> jax.Array:
        mean, _ = self.encode(x)
        return self.decode(self.latent_norm.denormalise(self.latent_norm.normalise(mean)))


def sample_latent(rng: jax.Array, mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """A reparameterised draw ``z = μ + exp(logvar / 2)·ε``, ``ε ~ N(0, I)`` (Kingma & Welling 2014, §2.4)."""
    eps = jax.random.normal(rng, mean.shape, mean.dtype)
    return mean + jnp.exp(0.5 * logvar) * eps


def _per_frame(fn: Callable[[jax.Array], jax.Array], x: jax.Array) -> jax.Array:
    """Apply an image function to ``(B, H, W, C)`` or, frames folded into batch, to ``(B, F, H, W, C)``."""
    if x.ndim == 4:
        return fn(x)
    if x.ndim != 5:
        raise ValueError(f"expected images (B, H, W, C) or videos (B, F, H, W, C); got shape {x.shape}")
    b, f = x.shape[:2]
    y = fn(x.reshape(b * f, *x.shape[2:]))
    return y.reshape(b, f, *y.shape[1:])


def encode_to_latents(vae, params, images: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """Images or videos in [-1, 1], ``(B, [F,] H, W, C)`` → diffusion latents ``(B, [F,] h, w, C_lat)``.

    The posterior mean when ``rng`` is None, else a sample from it, normalised by the autoencoder's
    ``latent_norm`` (``(z − shift) · scale``). ``vae`` is any autoencoder of
    :func:`moee_jax.models.build.build_autoencoder` (KL or space-to-depth).
    """

    def encode(x: jax.Array) -> jax.Array:
        mean, logvar = vae.apply({"params": params}, x, method=type(vae).encode)
        z = mean if rng is None else sample_latent(rng, mean, logvar)
        return vae.apply({"params": params}, z, method=lambda m, z: m.latent_norm.normalise(z))

    return _per_frame(encode, images)


def decode_latents(vae, params, latents: jax.Array) -> jax.Array:
    """Diffusion latents ``(B, [F,] h, w, C_lat)`` → images ``(B, [F,] H, W, C)``, undoing ``latent_norm``."""

    def decode(z: jax.Array) -> jax.Array:
        return vae.apply({"params": params}, z, method=lambda m, z: m.decode(m.latent_norm.denormalise(z)))

    return _per_frame(decode, latents)
