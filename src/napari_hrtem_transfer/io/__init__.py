"""Reading and writing files: simulated datasets and experimental images.

Nothing here imports HyperSpy at module import time; it is imported inside the functions.
"""

from .dataset import HRTEMDataset, load_dataset, save_dataset

__all__ = ["HRTEMDataset", "load_dataset", "save_dataset"]
