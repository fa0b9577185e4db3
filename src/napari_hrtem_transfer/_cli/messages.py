"""How the command line reports the warnings of the work it calls."""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Iterable, Iterator


def _own(category: type[Warning]) -> bool:
    """A warning category defined by this package (ReaderWarning, SegmentationWarning, ...)."""
    return category.__module__.startswith("napari_hrtem_transfer")


@contextlib.contextmanager
def captured_warnings() -> Iterator[list[warnings.WarningMessage]]:
    """Record the warnings of the block: the package's own categories every time they are
    given (they are printed by :func:`print_warnings`), every other warning as the user's
    filters (``-W``, ``PYTHONWARNINGS``) let it through."""
    from ..io.geometry import ReaderWarning
    from ..segmentation import SegmentationWarning

    with warnings.catch_warnings(record=True) as caught:
        for category in (ReaderWarning, SegmentationWarning):
            warnings.simplefilter("always", category)
        yield caught


def print_warnings(
    caught: Iterable[warnings.WarningMessage], prefix: str, what: str | None = None
) -> list[str]:
    """Print the package's own warnings as ``PREFIX: warning: [WHAT: ]...`` lines on stderr
    and show every other one (a library's deprecation) as Python would have; returns the
    printed messages."""
    printed = []
    for w in caught:
        if _own(w.category):
            about = f"{what}: " if what else ""
            print(f"{prefix}: warning: {about}{w.message}", file=sys.stderr)
            printed.append(str(w.message))
        else:  # it passed the user's filters once already: show it, do not filter again
            warnings.showwarning(w.message, w.category, w.filename, w.lineno, w.file, w.line)
    return printed
