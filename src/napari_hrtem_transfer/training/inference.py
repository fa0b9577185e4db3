"""A loaded checkpoint: standardisation, then the one tiled pass of :mod:`..inference`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from ..models.normalization import apply_normalization
from .device import autocast, resolve_precision


def fold_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` (eval mode) with every Conv2d -> BatchNorm2d pair folded into one conv.

    Halves the memory traffic of inference; outputs equal the original up to float rounding.
    """
    import copy

    from torch import nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    fused = copy.deepcopy(model).eval()

    def walk(module: nn.Module) -> None:
        names = list(module._modules)
        for a, b in zip(names[:-1], names[1:], strict=False):
            ca, cb = module._modules[a], module._modules[b]
            if isinstance(ca, nn.Conv2d) and isinstance(cb, nn.BatchNorm2d):
                module._modules[a] = fuse_conv_bn_eval(ca, cb)
                module._modules[b] = nn.Identity()
        for child in module.children():
            walk(child)

    walk(fused)
    return fused


@dataclass
class LoadedModel:
    """A trained model ready for inference (returned by ``load_checkpoint``).

    Attributes
    ----------
    model
        The :class:`~napari_hrtem_transfer.models.SegmentationModel` in eval mode; it expects
        *standardised* input (N, 1, H, W) (see :meth:`standardize`) and returns logits.
    info
        The checkpoint's sidecar (architecture, normalisation, data, history, ``extra``).
    path
        The checkpoint folder.
    which
        ``"best"`` or ``"last"``.
    device
        Where the model lives.
    """

    model: Any
    info: dict[str, Any]
    path: Path
    which: str
    device: torch.device

    @property
    def sampling_A(self) -> float | None:
        """Pixel size of the training images [Å/px] (None if unknown)."""
        v = self.info.get("sampling_A")
        return None if v is None else float(v)

    @property
    def normalization(self) -> dict[str, Any]:
        """The input normalisation record of the checkpoint."""
        return dict(self.info["normalization"])

    @property
    def output_stride(self) -> int:
        """Input sizes are padded to multiples of this [px]."""
        return int(self.model.output_stride)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _as_stack(images: Any) -> np.ndarray:
        arr = np.asarray(images.compute() if hasattr(images, "compute") else images)
        if arr.ndim == 2:
            arr = arr[None]
        if arr.dtype.names is not None or (
            arr.ndim == 3 and arr.shape[-1] in (3, 4) and min(arr.shape[:2]) > 4
        ):
            raise ConfigError(
                f"images of shape {arr.shape} look like RGB(A) colour images; convert them to "
                "grey (H, W) or (N, H, W) first",
                "images",
            )
        if arr.ndim != 3:
            raise ConfigError(
                f"images must be a grey image (H, W) or a stack (N, H, W); got shape {arr.shape}",
                "images",
            )
        if arr.dtype.kind not in "uif":
            raise ConfigError(f"images must be real numbers; got dtype {arr.dtype}", "images")
        if min(arr.shape[1:]) < 8:
            raise ConfigError(f"images of {arr.shape[1]}x{arr.shape[2]} px are too small", "images")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            bad = np.flatnonzero(~np.isfinite(arr.reshape(len(arr), -1)).all(axis=1))
            raise ConfigError(
                f"image(s) {bad[:10].tolist()} contain NaN or infinite values; "
                "fill or crop them first",
                "images",
            )
        return arr

    def standardize(self, images: Any) -> np.ndarray:
        """Apply the checkpoint's input normalisation to raw images (N, H, W) or (H, W)."""
        return apply_normalization(self._as_stack(images), self.info["normalization"])

    def inference_model(self, precision: str = "fp32") -> torch.nn.Module:
        """The model with BatchNorm folded into the convolutions, channels_last.

        With ``precision="bf16"`` on a CPU, a copy with bf16 weights (no autocast: its
        casts cost more than the convolutions on small maps).  Cached, and rebuilt whenever
        ``self.model`` is replaced or any of its tensors is modified in place (tracked by
        the tensors' version counters).
        """
        key = (
            id(self.model),
            sum(t._version for t in self.model.state_dict(keep_vars=True).values()),
        )
        if getattr(self, "_fast_key", None) != key:
            fast = fold_batchnorm(self.model)
            if self.device.type in ("cpu", "cuda"):
                fast = fast.to(memory_format=torch.channels_last)
            self._fast, self._fast_key, self._fast_bf16 = fast, key, None
        if precision == "bf16" and self.device.type == "cpu":
            if self._fast_bf16 is None:
                import copy

                self._fast_bf16 = copy.deepcopy(self._fast).to(torch.bfloat16)
            return self._fast_bf16
        return self._fast

    def forward_fn(self, precision: str = "auto"):
        """``forward(tiles, decode)`` for :func:`..inference.run_pass` at ``precision``."""
        from ..inference import make_forward

        prec = resolve_precision(precision, self.device)
        net = self.inference_model(prec)
        bf16_weights = prec == "bf16" and self.device.type == "cpu"
        return make_forward(
            net, self.device, prec, weights_dtype=torch.bfloat16 if bf16_weights else None
        )

    def tile_plan(self, h: int, w: int, tile_size: int, overlap: int | None = None):
        """The tiles of an ``h`` x ``w`` frame (:func:`..inference.plan_tiles`).

        ``overlap`` None: the least that makes tiled and whole-image output equal
        (:func:`..inference.overlap_for` of the receptive field).
        """
        from ..inference import overlap_for, plan_tiles

        s = self.output_stride
        tile = max(int(tile_size) // s * s, s)
        if overlap is None:
            overlap = overlap_for(int(getattr(self.model, "receptive_field", 0)), s)
            tile = max(tile, 2 * overlap + s)
        if overlap < 0 or overlap >= tile:
            raise ConfigError(
                f"overlap must be in [0, {tile}) px for tiles of {tile} px (got {overlap}); "
                "use larger tiles or a smaller overlap.",
                "overlap",
            )
        return plan_tiles(h, w, stride=s, max_tile=tile, overlap=overlap)

    # ------------------------------------------------------------------ API
    def run(
        self,
        images: Any,
        *,
        tile_size: int = 2048,
        overlap: int | None = None,
        precision: str = "auto",
        **options: Any,
    ):
        """The one tiled pass (:func:`..inference.run_pass`) over raw images (N, H, W).

        Each image is standardised as a whole by the checkpoint's record
        (:func:`~..models.normalization.apply_normalization`, exactly as in training).
        ``tile_size``, ``overlap`` and ``precision`` as in :meth:`predict_logits`;
        ``options`` are the keywords of :func:`..inference.run_pass` (``batch_size``: tiles
        per forward pass, ``want_proba``, ``want_logits``, ``want_features``,
        ``want_uncertainty``, ``max_tiles``).
        """
        from ..inference import run_pass

        stack = self._as_stack(images)
        n, h, w = stack.shape
        plan = self.tile_plan(h, w, tile_size, overlap)
        record = self.info["normalization"]
        return run_pass(
            self.forward_fn(precision),
            lambda i: apply_normalization(stack[i], record),
            n,
            (h, w),
            plan,
            **options,
        )

    def predict_logits(
        self,
        images: Any,
        tile_size: int = 2048,
        overlap: int | None = None,
        batch_size: int = 4,
        precision: str = "auto",
    ) -> np.ndarray:
        """Logits (N, H, W) float32 of raw images (N, H, W) or (H, W).

        Each image is standardised as a whole, reflect-padded to a multiple of the output
        stride, and processed in one piece if it fits in ``tile_size`` x ``tile_size``, else
        in overlapping tiles whose overlaps are split near their middle (each output pixel
        comes from the tile in which it lies farthest from the edge).

        Parameters
        ----------
        images
            Raw images (counts or intensities), numpy or dask.
        tile_size
            Largest tile side [px] (rounded down to a multiple of the output stride).
        overlap
            Minimum overlap of neighbouring tiles [px].  None: the model's receptive field
            rounded up to the stride plus one stride, which makes tiled and whole-image
            results equal up to floating-point rounding.
        batch_size
            Tiles per forward pass.
        precision
            ``"auto"`` (bf16 where native), ``"fp32"``, ``"bf16"``, ``"fp16"`` (CUDA).
        """
        return self.run(
            images,
            tile_size=tile_size,
            overlap=overlap,
            batch_size=batch_size,
            precision=precision,
            want_logits=True,
        ).logits

    def predict_proba(self, images: Any, **kwargs: Any) -> np.ndarray:
        """Particle probability (N, H, W) float32 in [0, 1] of raw images (N, H, W) or (H, W).

        Accepts the keyword arguments of :meth:`predict_logits` (``tile_size``, ``overlap``,
        ``batch_size``, ``precision``); the sigmoid is taken in float32 on each tile.
        """
        return self.run(images, want_proba=True, **kwargs).proba

    def encoder_features(
        self, images: Any, batch_size: int = 4, precision: str = "fp32"
    ) -> np.ndarray:
        """Deepest encoder features (N, C, h, w) float32 of raw images (whole, padded)."""
        stack = self.standardize(images)
        s = self.output_stride
        n, h, w = stack.shape
        ph, pw = -(-h // s) * s, -(-w // s) * s
        prec = resolve_precision(precision, self.device)
        outs = []
        for k in range(0, n, batch_size):
            x = np.pad(
                stack[k : k + batch_size], ((0, 0), (0, ph - h), (0, pw - w)), mode="reflect"
            )
            t = torch.from_numpy(np.ascontiguousarray(x[:, None])).to(self.device)
            with torch.inference_mode(), autocast(self.device, prec):
                outs.append(self.model.encoder_features(t).float().cpu().numpy())
        return np.concatenate(outs)
