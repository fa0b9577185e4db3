"""Training, checkpoints and inference of the U-Net segmentation models.

Public API (torch is imported on first use of a function, not by importing this package)::

    TrainConfig                      validated pydantic config (no torch needed)
    train(config, data, out_dir, *, callbacks=None, stop=None, resume=False) -> TrainResult
    load_checkpoint(model_dir, which="best", device="auto") -> LoadedModel
    update_checkpoint_extra(model_dir, key, value, which="best")
    read_sidecar(model_dir, which="best") -> dict
    Callback, TrainCallback, TrainStart, StepUpdate, EpochUpdate, TrainResult
"""

from __future__ import annotations

from ..lazy import lazy_exports
from .config import TrainConfig

__all__ = [
    "Callback",
    "EpochUpdate",
    "LoadedModel",
    "Progress",
    "StopRequest",
    "StepUpdate",
    "TrainCallback",
    "TrainConfig",
    "TrainResult",
    "TrainStart",
    "load_checkpoint",
    "read_sidecar",
    "stop_checker",
    "train",
    "update_checkpoint_extra",
]

_LAZY = {
    "train": ".loop",
    "load_checkpoint": ".checkpoint",
    "read_sidecar": ".checkpoint",
    "update_checkpoint_extra": ".checkpoint",
    "LoadedModel": ".inference",
    "Callback": ".callbacks",
    "TrainCallback": ".callbacks",
    "TrainStart": ".callbacks",
    "StepUpdate": ".callbacks",
    "EpochUpdate": ".callbacks",
    "TrainResult": ".callbacks",
    "Progress": ".progress",
    "StopRequest": ".progress",
    "stop_checker": ".progress",
}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
