"""How the command line reports the warnings of the work it calls."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterable


def print_warnings(
    caught: Iterable[warnings.WarningMessage], prefix: str, what: str | None = None
) -> list[str]:
    """Print the package's own warnings (categories defined in ``napari_hrtem_transfer``:
    :class:`~napari_hrtem_transfer.io.ReaderWarning`, ``SegmentationWarning``, ...) as
    ``PREFIX: warning: [WHAT: ]...`` lines on stderr, and hand every other warning (a library's
    deprecation, a ResourceWarning) back to Python's warning filters.  Returns the printed
    messages."""
    printed = []
    for w in caught:
        if w.category.__module__.startswith("napari_hrtem_transfer"):
            about = f"{what}: " if what else ""
            print(f"{prefix}: warning: {about}{w.message}", file=sys.stderr)
            printed.append(str(w.message))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    return printed
