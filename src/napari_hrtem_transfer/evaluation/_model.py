"""One interface over the things a user may hand to the evaluation (torch imported lazily).

* a model folder (loaded with ``napari_hrtem_transfer.training.load_checkpoint``),
* a loaded checkpoint (an object with ``.model``, ``.info``, ``.sampling_A``),
* a bare torch module with ``encoder_features`` (tests, notebooks).

:class:`ScoringModel` runs the network once per batch and returns both the logits and the
pooled encoder features (mean and std over the deepest feature map), so the labelled metrics
and the label-free OOD score come from the same forward pass.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError, ConfigError


def _normalize(images: np.ndarray, record: dict | None) -> np.ndarray:
    from ..models.normalization import NORMALIZATION, apply_normalization

    try:
        return apply_normalization(images, record or NORMALIZATION)
    except ValueError as exc:
        raise CheckpointError(f"cannot prepare images for this model: {exc}") from exc


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
            try:
                from ..training import load_checkpoint
            except ImportError as exc:  # pragma: no cover - training core missing
                raise CheckpointError(
                    f"cannot load {model}: the training core is not available ({exc})."
                ) from exc
            model = load_checkpoint(self.model_dir, which=which)
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
        if device is not None:
            dev = torch.device(device)
            self.net.to(dev)
        self.device = dev
        self.normalization = self.info.get("normalization")
        #: Which encoder stages are pooled into the OOD features: "all" or "deepest".
        self.feature_stages = "all"
        #: Length of each pooled stage's block in the feature vector (set by :meth:`run`).
        self.stage_sizes: list[int] = []

    @property
    def output_stride(self) -> int:
        """Image sides must be multiples of this [px]."""
        return int(getattr(self.net, "output_stride", 1))

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

    def run(self, images, batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
        """Logits (N, H, W) and pooled encoder features of raw images (N, H, W).

        The features are the mean and std over space of every encoder stage's feature map,
        concatenated from the first stage to the deepest: (N, 2 * sum(C_stage)).
        """
        import torch

        images = np.asarray(images)
        logits, feats = [], []
        captured: list = []
        hook = None
        enc = getattr(self.net, "encoder", None)
        if isinstance(enc, torch.nn.Module):

            def _grab(_m, _inp, out):
                captured.append(list(out) if isinstance(out, list | tuple) else [out])

            hook = enc.register_forward_hook(_grab)
        try:
            with torch.inference_mode():
                for i in range(0, len(images), batch_size):
                    x = _normalize(images[i : i + batch_size], self.normalization)
                    xt = torch.from_numpy(np.ascontiguousarray(x))[:, None].to(self.device)
                    captured.clear()
                    z = self.net(xt)
                    maps = captured[-1] if captured else [self.net.encoder_features(xt)]
                    if self.feature_stages == "deepest":
                        maps = maps[-1:]
                    logits.append(z[:, 0].float().cpu().numpy())
                    pooled = [pool_features(f) for f in maps]
                    self.stage_sizes = [int(p.shape[1]) for p in pooled]
                    feats.append(torch.cat(pooled, 1).cpu().numpy())
        finally:
            if hook is not None:
                hook.remove()
        return np.concatenate(logits), np.concatenate(feats).astype(np.float64)


def pool_features(f):
    """Mean and standard deviation over space of a feature map (N, C, h, w) -> (N, 2C)."""
    import torch

    f = f.float()
    mean = f.mean(dim=(2, 3))
    std = f.std(dim=(2, 3), unbiased=False)
    return torch.cat([mean, std], dim=1)
