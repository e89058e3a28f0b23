"""Layers shared by every model: attention, ResNet blocks, norms, embeddings, resampling."""

from moee_jax.nn.attention import IMPLEMENTATIONS, Attention, dot_product_attention, repeat_to_batch
from moee_jax.nn.embeddings import TimestepEmbedding, sinusoidal_positions, timestep_embedding
from moee_jax.nn.layers import conv, dense, partitioned
from moee_jax.nn.norms import group_norm, layer_norm
from moee_jax.nn.resnet import ResnetBlock2D
from moee_jax.nn.sampling import Downsample2D, Upsample2D

__all__ = [
    "IMPLEMENTATIONS",
    "Attention",
    "dot_product_attention",
    "repeat_to_batch",
    "TimestepEmbedding",
    "sinusoidal_positions",
    "timestep_embedding",
    "conv",
    "dense",
    "partitioned",
    "group_norm",
    "layer_norm",
    "ResnetBlock2D",
    "Downsample2D",
    "Upsample2D",
]
