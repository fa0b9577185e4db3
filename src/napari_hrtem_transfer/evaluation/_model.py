"""One interface over the things a user may hand to the evaluation (torch imported lazily).

* a model folder (loaded with ``napari_hrtem_transfer.training.load_checkpoint``),
* a loaded checkpoint (an object with ``.model``, ``.info``, ``.sampling_A``),
* a bare torch module with ``encoder_features`` (tests, notebooks).

:class:`ScoringModel` runs the network and returns, per frame, the logits (or the particle
probability) and the pooled encoder features (mean and standard deviation over space of
every encoder stage's feature map), so the labelled metrics and the label-free OOD score
come from the same forward pass.

Frames of any size are accepted: each frame is standardised as a whole, reflect-padded to
a multiple of the model's output stride, and processed in overlapping tiles when it is
larger than the tile.  The pooled statistics are accumulated tile by tile (Chan's parallel
update of count, mean and sum of squared deviations) over the part of the frame each tile
is responsible for, clipped to the unpadded frame, so memory is bounded by a tile and the
result equals the whole-frame result up to floating-point rounding.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError, ConfigError
from ..inference import boundary_mask

__all__ = ["DEFAULT_TILE_PX", "FrameStats", "ScoringModel", "boundary_mask", "boundary_statistics"]

#: Largest tile side [px] of the OOD pass (rounded down to the output stride).  A 1024 px
#: tile of the compact U-Net needs a few hundred MB; frames up to this size are one tile.
DEFAULT_TILE_PX = 1024


def _normalize(images: np.ndarray, record: dict | None) -> np.ndarray:
    from ..models.normalization import NORMALIZATION, apply_normalization

    try:
        return apply_normalization(images, record or NORMALIZATION)
    except ValueError as exc:
        raise CheckpointError(f"cannot prepare images for this model: {exc}") from exc


@dataclass
class FrameStats:
    """What one pass over frames (N, H, W) gives.

    Attributes
    ----------
    features
        Pooled encoder features (N, D): per stage, the spatial mean of each channel, then
        its standard deviation, stages from shallow to deep (valid, unpadded region only).
    entropy
        Mean binary predictive entropy per frame [nats] (N,).
    boundary_entropy
        Mean predictive entropy on the predicted particle boundary per frame [nats] (N,)
        (pixels whose 4-neighbourhood holds both classes at the 0.5 threshold); NaN for a
        frame with no predicted boundary (no particle, or all particle).
    band_width_px
        Width of the uncertain band around the predicted particle edges [px] (N,): the
        frame's summed predictive entropy [nats] / (boundary pixels + 1).  A frame without
        a predicted boundary (a model that finds nothing) gets all its entropy: the "+ 1"
        makes the value grow continuously as the predicted particles shrink to nothing.
    proba
        Particle probability (N, H, W) float32, when asked for and computed here.
    logits
        Logits (N, H, W) float32, when asked for.
    particle_fraction
        Fraction of each frame's pixels predicted particle (``p > 0.5``) (N,): the OOD
        verdict's "confident particles in a frame without support" check.
    """

    features: np.ndarray
    entropy: np.ndarray
    proba: np.ndarray | None = None
    logits: np.ndarray | None = None
    boundary_entropy: np.ndarray | None = None
    band_width_px: np.ndarray | None = None
    particle_fraction: np.ndarray | None = None


def _entropy_sum(p: np.ndarray) -> float:
    """Sum of the binary entropy [nats] of probabilities ``p`` (any shape), float64."""
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    return float(-(p * np.log(p) + (1 - p) * np.log1p(-p)).sum())


def _entropy_mean_chunked(p: np.ndarray, rows: int = 512) -> float:
    """Mean binary entropy of a probability map (H, W), a block of rows at a time."""
    total = 0.0
    for r in range(0, p.shape[0], rows):
        total += _entropy_sum(p[r : r + rows])
    return total / p.size


def _entropy_map(p: np.ndarray) -> np.ndarray:
    """Binary entropy [nats] of probabilities ``p`` (any shape), float64."""
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    return -(p * np.log(p) + (1 - p) * np.log1p(-p))


def _boundary_sums(p: np.ndarray, rows: int = 512) -> tuple[float, int]:
    """Sum of the entropy [nats] on the predicted boundary of a probability map (H, W) and
    the number of boundary pixels, a block of rows (plus a one-row halo) at a time."""
    total, count = 0.0, 0
    h = p.shape[0]
    for r0 in range(0, h, rows):
        r1 = min(r0 + rows, h)
        a, b = max(r0 - 1, 0), min(r1 + 1, h)
        block = np.asarray(p[a:b])
        edge = boundary_mask(block > 0.5)[r0 - a : r0 - a + (r1 - r0)]
        if edge.any():
            total += float(_entropy_map(block[r0 - a : r0 - a + (r1 - r0)][edge]).sum())
            count += int(edge.sum())
    return total, count


def boundary_statistics(proba: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per frame: the mean predictive entropy [nats] on the predicted particle boundary and
    the width of the uncertain band around it [px] (summed entropy per boundary pixel).

    Parameters
    ----------
    proba
        Particle probability (N, H, W) or (H, W).

    Returns
    -------
    (boundary_entropy, band_width_px)
        Two (N,) float64 arrays (see :class:`FrameStats`); the boundary entropy is NaN for
        a frame without a predicted boundary.
    """
    p = np.asarray(proba)
    p = p[None] if p.ndim == 2 else p
    return _boundary_from_maps(p, [_entropy_mean_chunked(p[i]) for i in range(len(p))])


def _boundary_from_maps(p: np.ndarray, mean_entropy) -> tuple[np.ndarray, np.ndarray]:
    """Boundary statistics of probability maps (N, H, W) whose mean entropies are known."""
    bnd = np.full(len(p), np.nan)
    band = np.empty(len(p))
    for i in range(len(p)):
        total, count = _boundary_sums(p[i])
        if count:
            bnd[i] = total / count
        band[i] = float(mean_entropy[i]) * p[i].size / (count + 1)
    return bnd, band


class ScoringModel:
    """A segmentation network ready for evaluation.

    Parameters
    ----------
    model
        Model folder, loaded checkpoint or torch module (see module docstring).
    which
        Checkpoint to load from a folder (``"best"`` or ``"last"``).
    device
        Torch device; by default the one the model is on (CUDA when a folder is loaded
        and a GPU is present).
    """

    def __init__(self, model: Any, which: str = "best", device: str | None = None) -> None:
        import torch

        self.model_dir: Path | None = None
        self.loaded = None
        if isinstance(model, str | os.PathLike):
            self.model_dir = Path(model)
            from ..inference import load_model

            model = load_model(self.model_dir, which=which, device=device or "auto")
        if hasattr(model, "model") and hasattr(model, "info"):
            self.loaded = model
            self.net = model.model
            self.info: dict = dict(getattr(model, "info", {}) or {})
            self.sampling_A: float | None = getattr(model, "sampling_A", None)
            md = getattr(model, "model_dir", None) or getattr(model, "path", None)
            if self.model_dir is None and md is not None:
                p = Path(md)
                self.model_dir = p if p.is_dir() else p.parent
        elif isinstance(model, torch.nn.Module):
            self.net = model
            self.info = {}
            self.sampling_A = None
        else:
            raise ConfigError(
                "expected a model folder, a loaded checkpoint or a torch module; "
                f"got {type(model).__name__}."
            )
        if not hasattr(self.net, "encoder_features"):
            raise CheckpointError("the model has no encoder_features(x); it cannot be scored OOD.")
        self.net.eval()
        try:
            dev = next(self.net.parameters()).device
        except StopIteration:  # pragma: no cover
            dev = torch.device("cpu")
        if device is not None and device != "auto":
            dev = torch.device(device)
            self.net.to(dev)
        self.device = dev
        self.normalization = self.info.get("normalization")
        #: Length of each pooled stage's block in the feature vector (set by a pass).
        self.stage_sizes: list[int] = []
        #: Number of network forward passes made (tiles or batches); for tests and benchmarks.
        self.n_forward = 0
        #: Inference precision of the passes (``fp32``, ``bf16``, ``fp16``, ``auto``: as
        #: ``segment``'s); references are fitted at fp32.
        self.precision = "fp32"

    @property
    def output_stride(self) -> int:
        """Padded image sides are multiples of this [px]."""
        return int(getattr(self.net, "output_stride", 1))

    @property
    def receptive_field(self) -> int:
        """Receptive field of an output pixel [px] (0 if the model does not say)."""
        return int(getattr(self.net, "receptive_field", 0) or 0)

    @property
    def name(self) -> str:
        """A readable identifier (model folder, or the class name)."""
        if self.model_dir is not None:
            return str(self.model_dir)
        return self.info.get("name") or type(self.net).__name__

    def check_images(self, shape: tuple[int, int], sampling_A: float | None, what: str) -> None:
        """Raise a clear error if images of ``shape`` [px] and ``sampling_A`` [Å/px] don't fit."""
        if sampling_A is not None and self.sampling_A is not None:
            if abs(float(sampling_A) - float(self.sampling_A)) > 1e-3 * float(self.sampling_A):
                raise ConfigError(
                    f"{what} has a pixel size of {float(sampling_A):g} Å/px but the model "
                    f"{self.name} was trained at {float(self.sampling_A):g} Å/px. Resample the "
                    "images to the model's pixel size (or train a model at this sampling); "
                    "scores at a different magnification would be meaningless."
                )
        data = self.info.get("data") or {}
        train_px = data.get("image_shape") or self.info.get("image_shape")
        if train_px is not None:
            t = tuple(int(x) for x in (train_px if np.ndim(train_px) else (train_px, train_px)))
            if t != tuple(int(x) for x in shape):
                raise ConfigError(
                    f"{what} has images of {shape[0]}x{shape[1]} px but the model {self.name} "
                    f"was trained on {t[0]}x{t[1]} px images. Evaluate on images of the "
                    "training size (simulate them with the same --size), so that losses are "
                    "comparable with the training domain's."
                )

    # ------------------------------------------------------------------ forward
    def _forward_fn(self):
        """``forward(tiles, decode)`` of the one engine (BatchNorm folded when the checkpoint
        offers it, bf16 weights on a CPU at bf16)."""
        from ..inference import make_forward
        from ..training.device import resolve_precision

        prec = (
            resolve_precision(self.precision, self.device) if self.precision != "fp32" else "fp32"
        )
        lm = self.loaded
        if lm is not None and hasattr(lm, "forward_fn") and lm.device == self.device:
            self._engine_forward = lm.forward_fn(prec)
        else:
            self._engine_forward = make_forward(self.net, self.device, prec)
        return self._forward

    def _forward(self, x: np.ndarray, decode: bool):
        """Run one batch (B, h, w) of standardised tiles through the engine's forward:
        logits (B, h, w) (a float32 tensor) or None, and the encoder stage maps."""
        return self._engine_forward(x, decode)

    def _plan(self, h: int, w: int, tile_px: int, overlap_px: int | None):
        from ..inference import overlap_for, plan_tiles

        s = self.output_stride
        if overlap_px is None:
            overlap_px = overlap_for(self.receptive_field, s)
        return plan_tiles(h, w, stride=s, max_tile=tile_px, overlap=overlap_px)

    def frame_stats(
        self,
        frames,
        *,
        proba=None,
        want_proba: bool = False,
        want_logits: bool = False,
        tile_px: int = DEFAULT_TILE_PX,
        batch_size: int = 4,
        overlap_px: int | None = None,
        max_tiles: int | None = None,
    ) -> FrameStats:
        """Pooled encoder features, mean predictive entropy and boundary statistics of raw
        frames (N, H, W) (see :class:`FrameStats`).

        Parameters
        ----------
        frames
            Raw frames (N, H, W) or (H, W) of any size >= 2 px (numpy or dask).
        proba
            The particle probability of the same frames on the same grid (e.g. from the
            segmentation); when given, its entropy is used and only the encoder is run.
        want_proba, want_logits
            Also return the probability / logit maps (N, H, W) (needs the decoder).
        tile_px
            Largest tile side [px] (rounded down to the output stride); bounds the memory.
        batch_size
            Tiles per forward pass.
        overlap_px
            Overlap of neighbouring tiles [px]; default: the receptive field plus two strides,
            which makes tiled and whole-frame results equal up to rounding.
        max_tiles
            Pool the features over at most this many tiles per frame, evenly spread over
            the frame (an unbiased estimate of the pooled statistics that bounds the cost on
            large frames; the entropy and boundary statistics still use every pixel).  With
            ``proba`` given (encoder only) only those tiles are run.  None: every tile.
        """
        x = np.asarray(frames.compute() if hasattr(frames, "compute") else frames)
        if x.ndim == 2:
            x = x[None]
        if x.ndim != 3 or min(x.shape[1:]) < 2:
            raise ConfigError(f"frames must be (N, H, W) or (H, W); got shape {x.shape}.")
        n, h, w = x.shape
        if proba is not None:
            pr = np.asarray(proba)
            pr = pr[None] if pr.ndim == 2 else pr
            if pr.shape != x.shape:
                raise ConfigError(
                    f"proba of shape {pr.shape} does not match the frames' shape {x.shape}."
                )
        else:
            pr = None
        from ..inference import run_pass

        res = run_pass(
            self._forward_fn(),
            lambda i: _normalize(x[i][None], self.normalization)[0],
            n,
            (h, w),
            self._plan(h, w, tile_px, overlap_px),
            batch_size=batch_size,
            want_proba=want_proba,
            want_logits=want_logits,
            want_features=True,
            want_uncertainty=pr is None,
            max_tiles=max_tiles,
        )
        self.n_forward += res.n_forward
        self.stage_sizes = res.stage_sizes
        feats = res.features()
        feats = np.zeros((n, 0)) if feats is None else feats
        out_p, out_z = res.proba, res.logits
        if pr is not None:
            ent = np.array([_entropy_mean_chunked(pr[i]) for i in range(n)])
            bnd, band = _boundary_from_maps(pr, ent)
            frac = np.array([float(np.count_nonzero(pr[i] > 0.5)) for i in range(n)]) / (h * w)
        else:
            ent = res.entropy_sum / (h * w)
            b_cnt = res.boundary_count
            bnd = np.where(b_cnt > 0, res.boundary_sum / np.maximum(b_cnt, 1), np.nan)
            band = res.entropy_sum / (b_cnt + 1)
            frac = res.foreground / float(h * w)
        return FrameStats(feats.astype(np.float64), ent, out_p, out_z, bnd, band, frac)

