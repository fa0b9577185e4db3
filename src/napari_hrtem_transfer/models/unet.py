"""U-Net segmentation models: encoder, decoder and head as named parts, with freezing.

Every model maps a standardised image batch (N, 1, H, W) to logits (N, 1, H, W) (one
"particle" logit per pixel; apply a sigmoid for probabilities).  H and W must be multiples of
:attr:`SegmentationModel.output_stride`; :class:`napari_hrtem_transfer.training.LoadedModel`
pads arbitrary images for you.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

FreezeMode = Literal["none", "encoder", "decoder", "gradual"]
FREEZE_MODES: tuple[str, ...] = ("none", "encoder", "decoder", "gradual")

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def conv_bn_relu(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    """3x3 convolution (no bias) + BatchNorm + ReLU; 'same' padding for stride 1."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class Encoder(nn.Module):
    """A sequence of stages; each stage's output is one feature map (shallow to deep).

    Parameters
    ----------
    stages
        Modules applied in order; the output of stage ``i`` is feature ``i``.
    out_channels
        Channels of each feature.
    """

    def __init__(self, stages: Sequence[nn.Module], out_channels: Sequence[int]) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.out_channels = tuple(int(c) for c in out_channels)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Return the feature of every stage, shallowest first."""
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


class DecoderBlock(nn.Module):
    """Nearest-neighbour 2x up-sampling, skip concatenation, two conv-BN-ReLU.

    Parameters
    ----------
    cin
        Channels coming from the deeper block.
    cskip
        Channels of the skip connection (0 for none).
    cout
        Output channels.
    """

    def __init__(self, cin: int, cskip: int, cout: int) -> None:
        super().__init__()
        self.conv1 = conv_bn_relu(cin + cskip, cout)
        self.conv2 = conv_bn_relu(cout, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        """Up-sample ``x`` 2x, concatenate ``skip`` and convolve."""
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


class Decoder(nn.Module):
    """U-Net decoder: one :class:`DecoderBlock` per level, deepest first.

    Parameters
    ----------
    encoder_channels
        Channels of the encoder features, shallowest first; the deepest is the decoder input.
    decoder_channels
        Output channels of each block, deepest first.
    n_skips
        How many blocks receive a skip (the remaining, shallowest blocks get none).
    """

    def __init__(
        self, encoder_channels: Sequence[int], decoder_channels: Sequence[int], n_skips: int
    ) -> None:
        super().__init__()
        skips = list(encoder_channels[:-1])[::-1][:n_skips]
        skips += [0] * (len(decoder_channels) - len(skips))
        ins = [encoder_channels[-1], *decoder_channels[:-1]]
        self.blocks = nn.ModuleList(
            DecoderBlock(i, s, o) for i, s, o in zip(ins, skips, decoder_channels, strict=True)
        )
        self.out_channels = int(decoder_channels[-1])

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Decode encoder ``features`` (shallowest first) into the last block's output."""
        x = features[-1]
        skips = features[:-1][::-1]
        for i, block in enumerate(self.blocks):
            x = block(x, skips[i] if i < len(skips) else None)
        return x


class SegmentationModel(nn.Module):
    """Encoder -> decoder -> head, with part-wise freezing.

    Freezing a part sets ``requires_grad=False`` on its parameters and keeps its normalisation
    layers in eval mode, also across ``model.train()``, so their running statistics stay
    exactly as loaded.

    Parameters
    ----------
    encoder
        The :class:`Encoder`.
    decoder
        The :class:`Decoder`.
    head
        Maps the decoder output to logits (N, 1, H, W).
    output_stride
        Ratio of input size to the deepest feature size; H and W must be multiples of it.
    """

    def __init__(
        self, encoder: Encoder, decoder: Decoder, head: nn.Module, output_stride: int
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.head = head
        self.output_stride = int(output_stride)
        self._frozen: set[str] = set()
        _init_weights(self)

    # ------------------------------------------------------------------ forward
    def check_input_shape(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``x`` is (N, 1, H, W) with H, W multiples of the stride."""
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"expected input of shape (N, 1, H, W); got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        s = self.output_stride
        if h % s or w % s:
            ph, pw = -(-h // s) * s, -(-w // s) * s
            raise ValueError(
                f"input height and width must be multiples of {s}; got {h}x{w}. "
                f"Pad the input to {ph}x{pw}."
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, 1, H, W) of standardised images ``x`` (N, 1, H, W)."""
        self.check_input_shape(x)
        return self.head(self.decoder(self.encoder(x)))

    def encoder_features(self, x: torch.Tensor) -> torch.Tensor:
        """Deepest encoder feature map (N, C, H/stride, W/stride) of standardised ``x``.

        Used for label-free out-of-distribution scores.
        """
        self.check_input_shape(x)
        return self.encoder(x)[-1]

    # ------------------------------------------------------------------ parts
    def parts(self) -> list[tuple[str, nn.Module]]:
        """Freezable parts from input to output: encoder stages, decoder blocks, head."""
        out: list[tuple[str, nn.Module]] = [
            (f"encoder.stages.{i}", m) for i, m in enumerate(self.encoder.stages)
        ]
        out += [(f"decoder.blocks.{i}", m) for i, m in enumerate(self.decoder.blocks)]
        out.append(("head", self.head))
        return out

    @property
    def frozen_parts(self) -> tuple[str, ...]:
        """Names of the frozen parts, in :meth:`parts` order."""
        return tuple(n for n, _ in self.parts() if n in self._frozen)

    def set_frozen(self, names: Iterable[str]) -> None:
        """Freeze exactly the parts named in ``names`` (see :meth:`parts`); unfreeze the rest.

        Raises
        ------
        KeyError
            If a name is not a part; the message lists the valid names.
        """
        names = set(names)
        valid = [n for n, _ in self.parts()]
        unknown = names - set(valid)
        if unknown:
            raise KeyError(f"unknown parts {sorted(unknown)}; valid parts are {valid}")
        self._frozen = names
        for name, module in self.parts():
            frozen = name in names
            for p in module.parameters():
                p.requires_grad_(not frozen)
            for m in module.modules():
                if isinstance(m, _NORM_TYPES):
                    m.train(self.training and not frozen)

    def freeze(self, mode: FreezeMode, epoch: int = 0, n_epochs: int = 1) -> tuple[str, ...]:
        """Apply a freezing protocol; return the frozen part names.

        Parameters
        ----------
        mode
            ``"none"``: train everything; ``"encoder"``: freeze every encoder stage;
            ``"decoder"``: freeze every decoder block (the head stays trainable);
            ``"gradual"``: unfreeze from the head backwards over the epochs, so that in
            epoch ``epoch`` (0-based) of ``n_epochs`` the last
            ``ceil((epoch + 1) / n_epochs * n_parts)`` parts are trainable and in the last
            epoch everything is.
        epoch
            Current epoch (0-based); used by ``"gradual"`` only.
        n_epochs
            Number of epochs of the stage; used by ``"gradual"`` only.
        """
        names = [n for n, _ in self.parts()]
        if mode == "none":
            frozen: list[str] = []
        elif mode == "encoder":
            frozen = [n for n in names if n.startswith("encoder.")]
        elif mode == "decoder":
            frozen = [n for n in names if n.startswith("decoder.")]
        elif mode == "gradual":
            n_epochs = max(int(n_epochs), 1)
            k = -(-(min(epoch, n_epochs - 1) + 1) * len(names) // n_epochs)
            frozen = names[: len(names) - k]
        else:
            raise KeyError(f"unknown freeze mode {mode!r}; choose one of {FREEZE_MODES}")
        self.set_frozen(frozen)
        return self.frozen_parts

    def train(self, mode: bool = True) -> SegmentationModel:
        """Set train/eval mode, keeping the normalisation layers of frozen parts in eval."""
        super().train(mode)
        for name, module in self.parts():
            if name in self._frozen:
                for m in module.modules():
                    if isinstance(m, _NORM_TYPES):
                        m.train(False)
        return self

    @property
    def receptive_field(self) -> int:
        """Receptive field of an output pixel [px] (an upper bound, computed analytically).

        Tiles whose used pixels lie at least half of this from the tile edge give exactly the
        whole-image result.
        """
        return receptive_field(self)

    def n_parameters(self, trainable_only: bool = False) -> int:
        """Number of parameters (only those with ``requires_grad`` if ``trainable_only``)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


def receptive_field(model: SegmentationModel) -> int:
    """Side of the receptive field [px] of one output pixel of a U-Net ``model``.

    Follows the deepest path (every encoder stage, every decoder block, the head), adding
    ``(k - 1) * dilation * jump`` per convolution or pooling window, where ``jump`` is the
    input-pixel step of the layer's grid (nearest-neighbour up-sampling halves it and adds
    nothing); residual shortcuts are parallel and never larger than their main path.
    """
    rf, jump = 1.0, 1.0

    def walk(module: nn.Module) -> None:
        nonlocal rf, jump
        for name, child in module.named_children():
            if name == "downsample":
                continue
            if isinstance(child, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
                k = (
                    child.kernel_size
                    if isinstance(child.kernel_size, int)
                    else child.kernel_size[0]
                )
                st = child.stride if isinstance(child.stride, int) else child.stride[0]
                dil = getattr(child, "dilation", 1)
                dil = dil if isinstance(dil, int) else dil[0]
                rf += (k - 1) * dil * jump
                jump *= st
            elif isinstance(child, nn.PixelUnshuffle):
                rf += (child.downscale_factor - 1) * jump
                jump *= child.downscale_factor
            elif isinstance(child, nn.PixelShuffle):
                jump /= child.upscale_factor
            else:
                walk(child)

    for stage in model.encoder.stages:
        walk(stage)
    for block in model.decoder.blocks:
        jump /= 2
        walk(block)
    walk(model.head)
    return int(math.ceil(rf))


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------- compact
def compact_unet(
    channels: Sequence[int] = (32, 64, 128, 192), bottleneck_dilations: Sequence[int] = (2, 4)
) -> SegmentationModel:
    """The CPU-sized default U-Net (see :class:`~.config.CompactUNetConfig`)."""
    c = list(channels)
    stages: list[nn.Module] = [
        nn.Sequential(nn.PixelUnshuffle(2), conv_bn_relu(4, c[0]), conv_bn_relu(c[0], c[0]))
    ]
    for i in range(1, len(c) - 1):
        stages.append(
            nn.Sequential(conv_bn_relu(c[i - 1], c[i], stride=2), conv_bn_relu(c[i], c[i]))
        )
    stages.append(
        nn.Sequential(
            conv_bn_relu(c[-2], c[-1], stride=2),
            *[conv_bn_relu(c[-1], c[-1], dilation=d) for d in bottleneck_dilations],
        )
    )
    encoder = Encoder(stages, c)
    decoder = Decoder(c, c[:-1][::-1], n_skips=len(c) - 1)
    head = nn.Sequential(nn.Conv2d(c[0], 4, 3, padding=1), nn.PixelShuffle(2))
    return SegmentationModel(encoder, decoder, head, output_stride=2 ** len(c))


# ---------------------------------------------------------------------- resnet18
class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv-BN with an identity (or 1x1 projection) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual block."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


def resnet18_unet(decoder_channels: Sequence[int] = (256, 128, 64, 32, 16)) -> SegmentationModel:
    """The study's ResNet-18-encoder U-Net (see :class:`~.config.ResNet18UNetConfig`)."""
    stem = nn.Sequential(
        nn.Conv2d(1, 64, 7, stride=2, padding=3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
    )

    def layer(cin: int, cout: int, stride: int) -> nn.Sequential:
        return nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout))

    stages = [
        stem,
        nn.Sequential(nn.MaxPool2d(3, stride=2, padding=1), *layer(64, 64, 1)),
        layer(64, 128, 2),
        layer(128, 256, 2),
        layer(256, 512, 2),
    ]
    encoder = Encoder(stages, (64, 64, 128, 256, 512))
    decoder = Decoder(encoder.out_channels, decoder_channels, n_skips=4)
    head = nn.Conv2d(int(decoder_channels[-1]), 1, 3, padding=1)
    return SegmentationModel(encoder, decoder, head, output_stride=32)
