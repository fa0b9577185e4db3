"""Fine-tune on a few frames a user annotated (napari Labels layer, a label file, a signal).

The study's point, and this tool's: pretrain on simulation, then fine-tune on a handful of
experimental frames.  :func:`dataset_from_annotations` turns frames + labels into an
:class:`~napari_hrtem_transfer.io.HRTEMDataset` (one domain, one "structure" per frame, so
the validation split is by frame), resampled to the model's pixel size with the same policy as
segmentation; :func:`finetune_on_annotations` fine-tunes a model on it with the usual training
loop (same augmentation, checkpoints, stop/resume) and fits the label-free OOD reference: the
fine-tuning stage of :func:`~napari_hrtem_transfer.evaluation.workflows.run_transfer`.
The CLI (``finetune --images --labels``), the napari Train widget and ``HRTEM.finetune`` call
these two functions.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError

__all__ = [
    "AnnotationFinetuneResult",
    "dataset_from_annotations",
    "finetune_on_annotations",
]

#: Fine-tuning defaults for annotated frames (the study fine-tunes with a lower rate).
DEFAULT_SAMPLES_PER_EPOCH = 64
MAX_PATCH_PX = 256


def _array(x: Any, what: str) -> tuple[np.ndarray, tuple[int, ...], float | None]:
    """(frames (n, ny, nx), navigation shape, sampling_A) of an array/ExperimentalImage/signal."""
    from .io.readers import ExperimentalImage

    sampling = None
    if hasattr(x, "axes_manager") and hasattr(x, "data"):
        from .io.readers import images_from_signals

        x = images_from_signals(x)[0]
    if isinstance(x, ExperimentalImage):
        return x.data, x.nav_shape, x.sampling_A
    arr = np.asarray(x.compute() if hasattr(x, "compute") else x)
    if arr.ndim < 2:
        raise ConfigError(
            f"{what} must be an image or a stack (..., ny, nx); got shape {arr.shape}.", what
        )
    return arr.reshape(-1, *arr.shape[-2:]), tuple(arr.shape[:-2]), sampling


def _resample_factor(sampling: float | None, target: float | None, notes: list[str]) -> Any:
    """The zoom from the frames' pixel size to the model's (None: no resampling)."""
    from .segmentation import SegmentConfig

    policy = SegmentConfig()
    if sampling is None:
        notes.append("the frames have no pixel size; the model's was assumed")
        return None
    if target is None:
        return None
    ratio = sampling / target
    if abs(ratio - 1.0) <= policy.resample_tolerance:
        return None
    if ratio > policy.max_zoom or ratio < 1.0 / policy.max_zoom:
        raise ConfigError(
            f"the frames' pixel size {sampling:.4g} Å is {ratio:.3g} times the model's "
            f"{target:.4g} Å; fine-tuning across more than x{policy.max_zoom:g} is "
            "refused. Start from a model trained near this pixel size.",
            "sampling_A",
        )
    notes.append(f"frames resampled from {sampling:.4g} to {target:.4g} Å/px")
    return ratio


def _quarters(f: np.ndarray, m: np.ndarray, name: str) -> tuple[list, list, list]:
    """One annotated frame cut into 2 x 2 quarters (frames, masks, ids)."""
    hy, hx = f.shape[0] // 2, f.shape[1] // 2
    if min(hy, hx) < 32:
        raise ConfigError(
            f"one annotated frame of {f.shape[0]}x{f.shape[1]} px is too small to split "
            "for validation; annotate at least two frames.",
            "labels",
        )
    cuts = [
        (slice(0, hy), slice(0, hx)),
        (slice(0, hy), slice(hx, 2 * hx)),
        (slice(hy, 2 * hy), slice(0, hx)),
        (slice(hy, 2 * hy), slice(hx, 2 * hx)),
    ]
    return [f[c] for c in cuts], [m[c] for c in cuts], [f"{name}q{k}" for k in range(4)]


def _chosen(lab: np.ndarray, annotated: Sequence[int] | None) -> list[int]:
    """The frames to train on: those marked as annotated, or those with a painted pixel."""
    n = lab.shape[0]
    painted = [i for i in range(n) if np.any(lab[i] != 0)]
    if annotated is None:
        chosen = painted
    else:
        chosen = sorted({int(i) for i in annotated})
        bad = [i for i in chosen if not 0 <= i < n]
        if bad:
            raise ConfigError(
                f"annotated frames {bad} are outside the stack of {n} frame(s) (0..{n - 1}).",
                "annotated",
            )
    if not chosen:
        raise ConfigError(
            "no frame has a painted pixel: paint the particles (any non-zero label) on at "
            "least one frame, or mark which frames are annotated.",
            "labels",
        )
    return chosen


def _start_model(model: Any) -> Path:
    """The checkpoint folder to start from: the shipped model, a folder or a package."""
    from .bioimageio import import_bioimageio, is_bioimageio_package
    from .segmentation import PRETRAINED, pretrained_model_dir

    if str(model) == PRETRAINED:
        init = pretrained_model_dir()
    elif is_bioimageio_package(model):
        init = import_bioimageio(model)
    else:
        init = Path(model).expanduser()
    if not (init / "best.json").is_file():
        raise ConfigError(
            f"{init} is not a checkpoint folder (no best.json); pass a model trained with "
            "pretrain/finetune, or 'pretrained'.",
            "model",
        )
    return init


def dataset_from_annotations(
    images: Any,
    labels: Any,
    *,
    sampling_A: float | None = None,
    model_sampling_A: float | None = None,
    annotated: Sequence[int] | None = None,
    defocus_nm: float | None = None,
) -> Any:
    """Build a one-domain training set from annotated frames.

    Parameters
    ----------
    images
        Raw frames: (ny, nx) or (..., ny, nx) array, ExperimentalImage or HyperSpy signal.
    labels
        Same shape as ``images``; any non-zero value is particle.
    sampling_A
        Pixel size of the frames [Å/px] (default: from ``images``; unknown -> the model's).
    model_sampling_A
        Pixel size the model works at [Å/px]; frames are resampled to it (labels with
        nearest-neighbour) when they differ by more than the segmentation tolerance.
    annotated
        Flat indices of the frames to train on (frames you marked as annotated, even if they
        hold no particle); default: every frame with at least one labelled pixel.
    defocus_nm
        The domain's defocus [nm] (a label in histories only); default 0.

    Returns
    -------
    HRTEMDataset
        ``images`` (1, n, ny, nx), ``masks`` (n, ny, nx), ``structure_ids`` = ``frame<i>``
        (a single annotated frame is cut into 2 x 2 quarters so a validation split exists).

    Raises
    ------
    ConfigError
        Shapes differ, no frame is annotated, frames too small, indices outside the stack.
    """
    from .io.dataset import HRTEMDataset
    from .io.frames import zoom as _zoom

    frames, nav, s_img = _array(images, "images")
    lab, lab_nav, _ = _array(labels, "labels")
    if frames.shape != lab.shape or nav != lab_nav:
        raise ConfigError(
            f"the labels have shape {(*lab_nav, *lab.shape[-2:])} but the images "
            f"{(*nav, *frames.shape[-2:])}; paint the labels on a layer of the image's shape "
            "(napari: Layers > New Labels layer with the image selected).",
            "labels",
        )
    chosen = _chosen(lab, annotated)
    sampling = sampling_A if sampling_A is not None else s_img
    target = model_sampling_A if model_sampling_A is not None else sampling
    notes: list[str] = []
    factor = _resample_factor(sampling, target, notes)
    imgs, masks, ids = [], [], []
    for i in chosen:
        f = frames[i].astype(np.float32)
        m = lab[i] != 0
        if factor is not None:
            f = _zoom(f, factor)
            m = _zoom(m.astype(np.float32), 0.0, f.shape) >= 0.5
        imgs.append(f)
        masks.append(m)
        ids.append(f"frame{i}")
    if len(imgs) == 1:  # one frame: quarters, so that a validation split by region exists
        imgs, masks, ids = _quarters(imgs[0], masks[0], ids[0])
        notes.append("a single annotated frame was cut into 4 quarters (3 train, 1 validation)")
    shape = imgs[0].shape
    if min(shape) < 32:
        raise ConfigError(
            f"annotated frames of {shape[0]}x{shape[1]} px (at the model's pixel size) are too "
            "small to train on; they need at least 32 px per side.",
            "images",
        )
    return HRTEMDataset(
        images=np.stack(imgs)[None],
        defocus_nm=[0.0 if defocus_nm is None else float(defocus_nm)],
        sampling_A=float(target) if target is not None else 1.0,
        masks=np.stack(masks),
        structure_ids=ids,
        materials=["experimental"] * len(imgs),
        dose_e_per_A2=None,
        info={
            "source": "annotated frames",
            "frames": [int(i) for i in chosen],
            "pixel_size_known": sampling is not None,
            "notes": notes,
        },
    )


@dataclass
class AnnotationFinetuneResult:
    """What :func:`finetune_on_annotations` returns: the training and the OOD fit."""

    train: Any
    ood: Any
    n_frames: int
    notes: list[str]

    @property
    def out_dir(self) -> Path:
        """The new checkpoint folder."""
        return Path(self.train.out_dir)


def finetune_on_annotations(
    images: Any,
    labels: Any,
    *,
    out_dir: str | os.PathLike,
    model: Any = "pretrained",
    sampling_A: float | None = None,
    annotated: Sequence[int] | None = None,
    freeze: str = "none",
    epochs: int = 20,
    lr: float | None = None,
    samples_per_epoch: int = DEFAULT_SAMPLES_PER_EPOCH,
    seed: int = 0,
    device: str = "auto",
    callbacks: Iterable[Any] | None = None,
    stop: Any = None,
    ood_progress: Any = None,
    resume: bool = False,
    fit_ood: bool = True,
    on_dataset: Callable[[Any], None] | None = None,
    **train_options: Any,
) -> AnnotationFinetuneResult:
    """Fine-tune ``model`` on annotated frames and fit its OOD reference.

    Parameters
    ----------
    images, labels, sampling_A, annotated
        See :func:`dataset_from_annotations`.
    out_dir
        New checkpoint folder (must not exist or be empty, unless ``resume``).
    model
        ``"pretrained"`` (shipped), a checkpoint folder or a bioimage.io package to start
        from.
    freeze
        ``none``, ``encoder``, ``decoder`` or ``gradual`` (see ``TrainConfig.freeze``).
    epochs, lr, samples_per_epoch, seed, device
        Training settings; ``lr`` None uses the fine-tuning default of ``TrainConfig``.
    callbacks, stop
        As for :func:`~napari_hrtem_transfer.training.train`.
    ood_progress
        ``progress(done, total, message)`` of the OOD-reference fit.
    resume
        Continue a stopped run in ``out_dir`` from its ``last`` checkpoint (the same frames
        and labels: the run's data fingerprint is checked).
    fit_ood
        Fit the OOD reference after a complete training (``ood`` is None otherwise).
    on_dataset
        Called with the training set once it is built, before training (e.g. to show its
        ``info["notes"]``).
    **train_options
        Other :class:`~napari_hrtem_transfer.training.TrainConfig` fields (``init_which``:
        the checkpoint of ``model`` to start from).

    Returns
    -------
    AnnotationFinetuneResult
        ``train`` stopped: a resumable ``last`` checkpoint, no OOD fit. The OOD fit never
        raises: ``ood.ok`` False says what failed and how to retry.
    """
    from .evaluation.workflows import run_transfer
    from .training.checkpoint import read_sidecar
    from .training.config import TrainConfig

    init = _start_model(model)
    side = read_sidecar(init, train_options.get("init_which", "best"))
    model_s = side.get("sampling_A")
    ds = dataset_from_annotations(
        images, labels, sampling_A=sampling_A, model_sampling_A=model_s, annotated=annotated
    )
    if on_dataset is not None:
        on_dataset(ds)
    ny, nx = ds.images.shape[-2:]
    patch = min(MAX_PATCH_PX, (min(ny, nx) // 32) * 32)
    kwargs: dict[str, Any] = dict(train_defocus_nm="all", freeze=freeze, epochs=epochs)
    kwargs.update(patch_size=patch, samples_per_epoch=samples_per_epoch, seed=seed)
    kwargs.update(device=device, val_fraction=0.25, **({} if lr is None else {"lr": lr}))
    kwargs.update(train_options)
    config = TrainConfig.finetune(init, **kwargs)
    tr = run_transfer(
        config,
        ds,
        out_dir,
        callbacks=callbacks,
        stop=stop,
        resume=resume,
        fit_ood=fit_ood,
        ood_progress=ood_progress,
    )
    return AnnotationFinetuneResult(
        train=tr.finetune.train,
        ood=tr.finetune.ood,
        n_frames=len(ds.info["frames"]),
        notes=list(ds.info["notes"]),
    )
