"""Build a model from its validated config (one branch per architecture)."""

from __future__ import annotations

from typing import Any

from .config import CompactUNetConfig, ResNet18UNetConfig, parse_model_config
from .unet import SegmentationModel, compact_unet, resnet18_unet


def build_model(
    config: CompactUNetConfig | ResNet18UNetConfig | dict[str, Any] | str,
) -> SegmentationModel:
    """Create a randomly initialised model from ``config``.

    Parameters
    ----------
    config
        A model config, a dict with an ``architecture`` key, or an architecture name
        (``"compact"``, ``"resnet18"``).

    Returns
    -------
    SegmentationModel
        In training mode, on the CPU, float32.

    Raises
    ------
    ConfigError
        If the architecture is unknown (the message lists the valid names).
    """
    cfg = parse_model_config(config)
    if isinstance(cfg, CompactUNetConfig):
        return compact_unet(cfg.channels, cfg.bottleneck_dilations)
    if isinstance(cfg, ResNet18UNetConfig):
        return resnet18_unet(cfg.decoder_channels)
    raise AssertionError(f"unhandled config {cfg!r}")  # pragma: no cover
