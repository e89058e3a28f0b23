"""Models: the VAE, the video U-Net (also ReferenceNet), the face locator."""

from moee_jax.models.unet import UNetConfig, VideoUNet
from moee_jax.models.vae import AutoencoderKL

__all__ = ["AutoencoderKL", "UNetConfig", "VideoUNet"]
