"""Lazy re-exports (PEP 562): a package names where each of its public names lives, and the
home module is imported on the first look-up of one of them, not when the package is.

One helper for every package that keeps its import cheap (``models``, ``training``, ``sweep``,
``hyperspy``, ``config``)::

    __getattr__, __dir__ = lazy_exports(__name__, {"train": ".loop", ...})

Nothing here imports anything of the package, so every layer may use it.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    module: str, homes: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module-level ``__getattr__`` and ``__dir__`` of a package with lazy names.

    Parameters
    ----------
    module
        ``__name__`` of the module that re-exports the names.
    homes
        Public name -> the module it is defined in, relative to the module's package
        (``".loop"``, ``".simulate.config"``).

    ``__getattr__`` imports the home module of a name on its first look-up and stores the
    value in the module's namespace (later look-ups skip ``__getattr__``); any other name is an
    :class:`AttributeError`, as for a plain module.  ``__dir__`` lists the module's public API
    (its ``__all__`` and every lazy name).
    """

    def __getattr__(name: str) -> Any:
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        namespace = vars(sys.modules[module])
        value = getattr(importlib.import_module(home, namespace["__package__"]), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[module]).get("__all__", ()), *homes})

    return __getattr__, __dir__
