"""Reading and writing files: simulated datasets and experimental images.

Nothing here imports HyperSpy at module import time; it is imported inside the functions.
"""

from .dataset import HRTEMDataset, load_dataset, save_dataset
from .frames import Frames
from .hyperspy_integration import from_signal, to_signal
from .readers import SUPPORTED_EXTENSIONS, ExperimentalImage, ReaderWarning, read_images
from .sessions import load_session, read_session

__all__ = [
    "SUPPORTED_EXTENSIONS",
    "ExperimentalImage",
    "Frames",
    "HRTEMDataset",
    "ReaderWarning",
    "from_signal",
    "load_dataset",
    "load_session",
    "read_session",
    "read_images",
    "save_dataset",
    "to_signal",
]
