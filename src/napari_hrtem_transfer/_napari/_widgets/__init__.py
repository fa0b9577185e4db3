"""Dock widgets: simulate, train / fine-tune, segment, per-frame OOD, evaluate.

Each dock is a thin form over one core function (through the jobs in :mod:`.._jobs`);
jobs run on a thread and report typed updates that a timer in the GUI thread shows.
Any error becomes a napari notification, never a crash; closing a dock or the viewer stops
its job at the next step.

Defocus sign everywhere: abTEM's, ``defocus = -C10``; positive defocus = underfocus.
"""

from ._base import (
    DockWidget,
    JobDock,
    LivePlot,
    ThemedPlot,
    WrapLabel,
    breakable,
    format_duration,
)
from ._evaluate import EvaluateWidget
from ._ood import OODView
from ._segment import SegmentWidget, features_table, frame_labels
from ._simulate import SimulateWidget
from ._train import LossPlot, TrainWidget

__all__ = [
    "DockWidget",
    "EvaluateWidget",
    "JobDock",
    "LivePlot",
    "LossPlot",
    "OODView",
    "SegmentWidget",
    "SimulateWidget",
    "ThemedPlot",
    "TrainWidget",
    "WrapLabel",
    "breakable",
    "features_table",
    "format_duration",
    "frame_labels",
]
