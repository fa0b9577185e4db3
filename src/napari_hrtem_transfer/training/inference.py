"""Inference with a loaded checkpoint: standardisation, padding and overlapping tiles."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from ..models.normalization import apply_normalization
from .device import autocast, resolve_precision


def tile_starts(size: int, tile: int, overlap: int, stride: int) -> list[int]:
    """Start offsets of overlapping tiles along one axis of length ``size`` [px].

    Tiles are ``tile`` long, consecutive starts are at most ``tile - overlap`` apart and are
    multiples of ``stride`` (so every tile sees the same down-sampling grid as the whole
    image); the last tile ends at ``size``.  ``size`` and ``tile`` must be multiples of
    ``stride``.
    """
    if size <= tile:
        return [0]
    step = max((tile - overlap) // stride * stride, stride)
    starts = list(range(0, size - tile, step))
    starts.append(size - tile)
    return sorted(set(starts))


def _cuts(starts: list[int], tile: int, size: int) -> list[tuple[int, int]]:
    """Region of the output each tile is responsible for: split overlaps at their middle."""
    bounds = [0]
    for a, b in zip(starts[:-1], starts[1:], strict=True):
        bounds.append((b + min(a + tile, size)) // 2)
    bounds.append(size)
    return list(zip(bounds[:-1], bounds[1:], strict=True))


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

    def _inference_model(self) -> torch.nn.Module:
        """The model with BatchNorm folded into the convolutions.

        Cached, and rebuilt whenever ``self.model`` is replaced or any of its tensors is
        modified in place (tracked by the tensors' version counters).
        """
        key = (
            id(self.model),
            sum(t._version for t in self.model.state_dict(keep_vars=True).values()),
        )
        if getattr(self, "_fast_key", None) != key:
            fast = fold_batchnorm(self.model)
            if self.device.type in ("cpu", "cuda"):
                fast = fast.to(memory_format=torch.channels_last)
            self._fast, self._fast_key = fast, key
        return self._fast

    def _forward(self, x: np.ndarray, precision: str) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(x[:, None])).to(self.device)
        if self.device.type in ("cpu", "cuda"):
            t = t.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), autocast(self.device, precision):
            y = self._inference_model()(t)
        return y.float()[:, 0].cpu().numpy()

    # ------------------------------------------------------------------ API
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
        in overlapping tiles whose overlaps are split at their middle (each output pixel
        comes from the tile in which it lies farthest from the edge).

        Parameters
        ----------
        images
            Raw images (counts or intensities), numpy or dask.
        tile_size
            Largest tile side [px] (rounded down to a multiple of the output stride).
        overlap
            Minimum overlap of neighbouring tiles [px]; output pixels are at least
            ``overlap / 2`` from a tile edge (except at the image border).  None: the model's
            receptive field (rounded up to the stride), which makes tiled and whole-image
            results equal up to floating-point rounding.
        batch_size
            Tiles or images per forward pass.
        precision
            ``"auto"`` (bf16 where native), ``"fp32"``, ``"bf16"``, ``"fp16"`` (CUDA).
        """
        stack = self.standardize(images)
        s = self.output_stride
        tile = max(int(tile_size) // s * s, s)
        if overlap is None:
            overlap = -(-int(self.model.receptive_field) // s) * s
        if overlap < 0 or overlap >= tile:
            raise ConfigError(
                f"overlap must be in [0, {tile}) px for tiles of {tile} px (got {overlap}); "
                "use larger tiles or a smaller overlap.",
                "overlap",
            )
        prec = resolve_precision(precision, self.device)
        n, h, w = stack.shape
        ph, pw = -(-h // s) * s, -(-w // s) * s
        out = np.empty((n, h, w), dtype=np.float32)
        if ph <= tile and pw <= tile:
            for k in range(0, n, batch_size):
                x = stack[k : k + batch_size]
                x = np.pad(
                    x,
                    ((0, 0), (0, ph - h), (0, pw - w)),
                    mode="reflect" if min(h, w) > 1 else "edge",
                )
                out[k : k + batch_size] = self._forward(x, prec)[:, :h, :w]
            return out
        ys, xs = tile_starts(ph, tile, overlap, s), tile_starts(pw, tile, overlap, s)
        ty, tx = min(tile, ph), min(tile, pw)
        cy, cx = _cuts(ys, ty, ph), _cuts(xs, tx, pw)
        for i in range(n):
            padded = (ph, pw) != (h, w)
            img = stack[i]
            if padded:
                img = np.pad(img, ((0, ph - h), (0, pw - w)), mode="reflect")
            full = np.empty((ph, pw), dtype=np.float32) if padded else out[i]
            jobs = [
                (y0, x0, c0, c1)
                for y0, c0 in zip(ys, cy, strict=True)
                for x0, c1 in zip(xs, cx, strict=True)
            ]
            for k in range(0, len(jobs), batch_size):
                chunk = jobs[k : k + batch_size]
                x = np.stack([img[y0 : y0 + ty, x0 : x0 + tx] for y0, x0, _, _ in chunk])
                y = self._forward(x, prec)
                for (y0, x0, (a0, a1), (b0, b1)), yy in zip(chunk, y, strict=True):
                    full[a0:a1, b0:b1] = yy[a0 - y0 : a1 - y0, b0 - x0 : b1 - x0]
            if padded:
                out[i] = full[:h, :w]
        return out

    def predict_proba(self, images: Any, **kwargs: Any) -> np.ndarray:
        """Particle probability (N, H, W) float32 in [0, 1] of raw images (N, H, W) or (H, W).

        Accepts the keyword arguments of :meth:`predict_logits` (``tile_size``, ``overlap``,
        ``batch_size``, ``precision``).
        """
        logits = np.ascontiguousarray(self.predict_logits(images, **kwargs))
        flat = logits.reshape(-1, logits.shape[-1])  # a view: the sigmoid is in place
        step = max(1, (1 << 20) // max(1, flat.shape[-1]))
        for r in range(0, flat.shape[0], step):  # in place, float64 a block at a time
            blk = flat[r : r + step]
            blk[...] = 1.0 / (1.0 + np.exp(-blk.astype(np.float64)))
        return logits

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
