"""Validated architecture configurations (pydantic only; importing this module needs no torch).

A model is described by one of the configs below; :func:`napari_hrtem_transfer.models.build_model`
turns it into a torch module.  The ``architecture`` field is the discriminator, so a plain dict
such as ``{"architecture": "resnet18"}`` validates into the right class with
:func:`parse_model_config`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator

from ..errors import ConfigError

#: Names accepted by :func:`parse_model_config` and the ``--arch`` CLI flag.
ARCHITECTURES = ("compact", "resnet18")


class CompactUNetConfig(BaseModel):
    """The CPU-sized default: a 4-level U-Net with a large receptive field (< 2 M parameters).

    The input is folded into 4 channels at half resolution (pixel unshuffle) and the logits are
    unfolded back to full resolution (pixel shuffle), so no convolution runs at full
    resolution.  The deepest stage (1/16 resolution) uses dilated convolutions; the receptive
    field is about 330 px.
    """

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, frozen=True, use_attribute_docstrings=True
    )

    architecture: Literal["compact"] = "compact"
    """Architecture name (discriminator)."""

    channels: tuple[int, int, int, int] = (32, 64, 128, 192)
    """Feature channels of the four encoder stages (1/2, 1/4, 1/8, 1/16 resolution)."""

    bottleneck_dilations: tuple[int, ...] = (2, 4)
    """Dilation of each extra 3x3 convolution in the deepest stage."""

    @field_validator("channels")
    @classmethod
    def _positive_channels(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(c < 4 or c > 1024 for c in v):
            raise ValueError(f"channels must be between 4 and 1024 (got {v})")
        return v

    @field_validator("bottleneck_dilations")
    @classmethod
    def _positive_dilations(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(d < 1 or d > 16 for d in v):
            raise ValueError(f"bottleneck_dilations must be between 1 and 16 (got {v})")
        return v


class ResNet18UNetConfig(BaseModel):
    """The study's U-Net with a ResNet-18 encoder (~14.3 M parameters).

    Encoder: ResNet-18 (64/128/256/512 channels, BatchNorm + ReLU) with a 1-channel stem;
    decoder: five up-sampling blocks with skip concatenation; head: 3x3 convolution to one
    logit channel.  Weights are initialised randomly (no ImageNet weights are downloaded).
    """

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, frozen=True, use_attribute_docstrings=True
    )

    architecture: Literal["resnet18"] = "resnet18"
    """Architecture name (discriminator)."""

    decoder_channels: tuple[int, int, int, int, int] = (256, 128, 64, 32, 16)
    """Output channels of the five decoder blocks, deepest first."""

    @field_validator("decoder_channels")
    @classmethod
    def _positive_channels(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(c < 1 or c > 2048 for c in v):
            raise ValueError(f"decoder_channels must be between 1 and 2048 (got {v})")
        return v


ModelConfig = Annotated[CompactUNetConfig | ResNet18UNetConfig, Field(discriminator="architecture")]
"""Any architecture config; ``architecture`` selects the class."""

_ADAPTER: TypeAdapter = TypeAdapter(ModelConfig)


def parse_model_config(value: Any) -> CompactUNetConfig | ResNet18UNetConfig:
    """Validate ``value`` (a config, a dict or an architecture name) into a model config.

    Parameters
    ----------
    value
        A config instance, a dict with an ``architecture`` key, or just the name
        (``"compact"`` or ``"resnet18"``).

    Returns
    -------
    CompactUNetConfig or ResNet18UNetConfig

    Raises
    ------
    ConfigError
        If the architecture name is unknown; the message lists the valid names.
    """
    if isinstance(value, (CompactUNetConfig, ResNet18UNetConfig)):
        return value
    if isinstance(value, str):
        value = {"architecture": value}
    if isinstance(value, dict) and value.get("architecture") not in ARCHITECTURES:
        raise ConfigError(
            f"unknown architecture {value.get('architecture')!r}; choose one of "
            f"{', '.join(ARCHITECTURES)}.",
            "architecture",
        )
    return _ADAPTER.validate_python(value)
