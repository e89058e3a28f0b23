"""Converters: diffusers / AnimateDiff safetensors → our parameter trees."""

from moee_jax.checkpoint.convert.state_dict import ConversionError, load_state_dict

__all__ = ["ConversionError", "load_state_dict"]
