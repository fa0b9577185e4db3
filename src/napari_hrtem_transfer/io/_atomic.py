"""Deprecated: use :mod:`napari_hrtem_transfer.io.atomic` (the same functions, public name)."""

from __future__ import annotations

import warnings
from typing import Any

from . import atomic as _public

__all__: list[str] = []


def __getattr__(name: str) -> Any:
    value = getattr(_public, name)  # AttributeError for names the public module lacks
    warnings.warn(
        f"napari_hrtem_transfer.io._atomic.{name} is deprecated; import it from "
        "napari_hrtem_transfer.io.atomic",
        DeprecationWarning,
        stacklevel=2,
    )
    return value
