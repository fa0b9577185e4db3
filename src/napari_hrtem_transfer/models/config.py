"""Validated architecture configurations (pydantic only; importing this module needs no torch).

A model is described by one of the configs below; :func:`napari_hrtem_transfer.models.build_model`
turns it into a torch module.  The ``architecture`` field is the discriminator, so a plain dict
such as ``{"architecture": "resnet18"}`` validates into the right class with
:func:`parse_model_config`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, ValidationInfo

from ..errors import ConfigError

#: Names accepted by :func:`parse_model_config` and the ``--arch`` CLI flag.
ARCHITECTURES = ("compact", "resnet18")


def _each_between(lo: int, hi: int) -> AfterValidator:
    """Validator of a tuple field (channel counts, dilations): every element in [lo, hi]."""

    def check(v: tuple[int, ...], info: ValidationInfo) -> tuple[int, ...]:
        if any(x < lo or x > hi for x in v):
            raise ValueError(f"{info.field_name} must be between {lo} and {hi} (got {v})")
        return v

    return AfterValidator(check)


#: Output channels of ResNet18UNetConfig's five decoder blocks (1 to 2048 each).
_DecoderChannels = Annotated[tuple[int, int, int, int, int], _each_between(1, 2048)]


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

    channels: Annotated[tuple[int, int, int, int], _each_between(4, 1024)] = (32, 64, 128, 192)
    """Feature channels of the four encoder stages (1/2, 1/4, 1/8, 1/16 resolution)."""

    bottleneck_dilations: Annotated[tuple[int, ...], _each_between(1, 16)] = (2, 4)
    """Dilation of each extra 3x3 convolution in the deepest stage."""


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

    decoder_channels: _DecoderChannels = (256, 128, 64, 32, 16)
    """Output channels of the five decoder blocks, deepest first."""


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
