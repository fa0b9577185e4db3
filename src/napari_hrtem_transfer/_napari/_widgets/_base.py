"""Shared plumbing of the dock widgets, one import for the docks.

* :mod:`._dock` -- :class:`DockWidget`, the scrolling dock;
* :mod:`._job` -- :class:`JobDock` (Run/Stop, progress, ETA, status) and :func:`prewarm`;
* :mod:`._plots` -- :class:`ThemedPlot` (matplotlib in napari's theme), :class:`LivePlot`;
* :mod:`._text` -- :class:`WrapLabel`, :func:`notify`, :func:`breakable`,
  :func:`format_duration`, :data:`DEFOCUS_TIP`.
"""

from __future__ import annotations

from ._dock import DockWidget
from ._job import POLL_MS, JobDock, prewarm
from ._plots import LivePlot, ThemedPlot, theme_colors
from ._text import (
    DEFOCUS_TIP,
    MAX_STATUS_CHARS,
    WrapLabel,
    breakable,
    format_duration,
    notify,
)

__all__ = [
    "DEFOCUS_TIP",
    "MAX_STATUS_CHARS",
    "POLL_MS",
    "DockWidget",
    "JobDock",
    "LivePlot",
    "ThemedPlot",
    "WrapLabel",
    "breakable",
    "format_duration",
    "notify",
    "prewarm",
    "theme_colors",
]
