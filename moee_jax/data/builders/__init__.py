"""TFDS builders writing the common clip records (:mod:`moee_jax.data.schema`) as ArrayRecord.

``SyntheticTalkingFaces`` (``synthetic_talking_faces``): generated faces with exact ground truth.
``TalkingFaceClips`` (``talking_face_clips``): real videos prepared by ``moee prepare``.

The builders subclass ``tfds.core.GeneratorBasedBuilder``, so importing one imports
``tensorflow_datasets``; they are loaded on first access so that ``import moee_jax.data.builders``
stays cheap.
"""

from __future__ import annotations

import importlib

_BUILDERS = {
    "SyntheticTalkingFaces": "moee_jax.data.builders.synthetic_talking_faces",
    "TalkingFaceClips": "moee_jax.data.builders.talking_face_clips",
}

__all__ = list(_BUILDERS)


def __getattr__(name: str):
    if name in _BUILDERS:
        return getattr(importlib.import_module(_BUILDERS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
