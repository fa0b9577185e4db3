"""U-Net segmentation models (torch).

``build_model(config)`` creates a :class:`SegmentationModel` from a validated config.  Every
model maps standardised images (N, 1, H, W) to logits (N, 1, H, W), exposes
``encoder_features(x)`` (the deepest encoder stage, for OOD scores) and supports part-wise
freezing (``freeze("none" | "encoder" | "decoder" | "gradual")``).

The configs (:mod:`.config`) and :func:`standardize` need no torch; the model classes are
imported on first use, so ``from napari_hrtem_transfer.models import ModelConfig`` stays cheap.
"""

from __future__ import annotations

from ..lazy import lazy_exports
from .config import (
    ARCHITECTURES,
    CompactUNetConfig,
    ModelConfig,
    ResNet18UNetConfig,
    parse_model_config,
)
from .normalization import NORMALIZATION, standardize

__all__ = [
    "ARCHITECTURES",
    "FREEZE_MODES",
    "NORMALIZATION",
    "CompactUNetConfig",
    "ModelConfig",
    "ResNet18UNetConfig",
    "SegmentationModel",
    "build_model",
    "compact_unet",
    "parse_model_config",
    "resnet18_unet",
    "standardize",
]

_LAZY = {
    "build_model": ".factory",
    "SegmentationModel": ".unet",
    "FREEZE_MODES": ".unet",
    "compact_unet": ".unet",
    "resnet18_unet": ".unet",
}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
