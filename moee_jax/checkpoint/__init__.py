"""Orbax checkpoint I/O and converters from PyTorch-world weight files."""
