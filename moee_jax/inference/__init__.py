"""Inference: sampling video latents for one clip with ReferenceNet features and nested CFG."""
