"""Building the models' frozen config dataclasses from ``ml_collections`` sections."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


def dataclass_from_dict(cls: type[T], d: Mapping[str, Any], what: str) -> T:
    """``cls(**d)`` with lists turned into tuples (frozen, hashable); unknown keys are an error
    naming ``what`` (e.g. "U-Net config") and the known fields."""
    d = dict(d)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown {what} field(s) {unknown}; known fields: {sorted(names)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
