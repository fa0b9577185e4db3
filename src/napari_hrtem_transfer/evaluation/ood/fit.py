"""Fitting and calibrating the OOD reference (end of training, after fine-tuning, on demand).

* :func:`fit_ood_reference` / :func:`_fit_stream`: a seeded sample of training image x D4
  transforms, read one batch at a time, gives the network statistics (pooled features,
  boundary entropy, band width) and the power-spectrum profile statistics.
* :func:`fit_ood_after_training` (``pretrain``/``finetune``, napari, the sweep, the demo):
  the fit, then the caution level from held-out frames (:func:`calibrate_caution_level`),
  then the model's :class:`~.reference.ImagingDomain` (from the dataset's metadata), stored
  beside the checkpoint.
* **Calibration survives fine-tuning.**  With fewer than :data:`MIN_CALIBRATION_FRAMES`
  held-out frames of the training domain (annotation fine-tuning: a few frames), the level
  is ``max(parent level, the false-alarm quantile of the new model's verdict scores on the
  training frames' D4 transforms)``; without a parent, that quantile alone (in-sample, so
  a lower bound: said in the calibration record).  Every reference this module writes has a
  finite level.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .calibrate import (
    MIN_CALIBRATION_FRAMES,
    OODFitStopped,
    _calibrate_for_checkpoint,
    _calibration_plan,
    calibrate_caution_level,
)
from .domain import (
    _has_domain,
    _parent_reference,
    imaging_domain_for,
)
from .reference import (
    DEFAULT_FEATURE_WEIGHT,
    DEFAULT_METHOD,
    OOD_JSON,
    load_ood_reference,
)
from .sample import (
    OODFitConfig,
    ProgressCallback,
    _config,
    _fit_stream,
    _save,
    fit_ood_reference,
    fit_reference_from_features,
    sample_transforms,
)


# --------------------------------------------------------------- after training
@dataclass
class OODFitResult:
    """What :func:`fit_ood_after_training` did.

    Attributes
    ----------
    ok
        True when the model folder now holds a reference for its weights.
    message
        One line for the user: what was done, or what failed and how to retry.
    reference_path
        The reference's JSON file, when written (or already present).
    n_samples
        Image-transforms the reference was fitted on.
    seconds
        Wall time of the fit [s].
    caution_level
        The calibrated "treat with caution" level (None if not calibrated).
    error
        The failure (exception type and text), None on success.
    """

    ok: bool
    message: str
    reference_path: Path | None = None
    n_samples: int = 0
    seconds: float = 0.0
    caution_level: float | None = None
    error: str | None = None


def _fit_for_checkpoint(
    model_dir, dataset, which, device, refit, cfg: OODFitConfig, progress, stop=None
) -> OODFitResult:
    from ...io.dataset import HRTEMDataset, load_dataset
    from .._model import ScoringModel

    t0 = time.perf_counter()
    ds = dataset if isinstance(dataset, HRTEMDataset) else load_dataset(dataset, lazy=True)
    sm = ScoringModel(model_dir, which=which, device=device)
    sha = sm.info.get("weights_sha256")
    if not refit and load_ood_reference(model_dir, sha) is not None:
        return OODFitResult(
            True, f"{model_dir}: OOD reference already present.", Path(model_dir) / OOD_JSON
        )
    data = sm.info.get("data") or {}
    doms = [float(d) for d in data.get("train_defocus_nm") or []]
    # the exact (defocus index, image index) pairs trained on, else all training structures
    items = np.asarray(data.get("train_items") or [], dtype=int).reshape(-1, 2)
    train_ids = [str(s) for s in data.get("train_structures") or []]
    sids = np.asarray(ds.structure_ids).astype(str)
    same_file = bool(
        items.size
        and items[:, 0].max() < ds.n_defocus
        and items[:, 1].max() < ds.n_images
        and set(sids[items[:, 1]]) <= set(train_ids)
    )
    if not same_file:
        idx = np.flatnonzero(np.isin(sids, train_ids))
        present = [d for d in doms if _has_domain(ds, d)]
        if not idx.size or not present:
            return OODFitResult(
                False,
                f"{model_dir}: no OOD reference and its training images are not in the "
                "dataset; label-free OOD scores are not available for this model. Fit one "
                f"with 'hrtem-transfer evaluate --model {model_dir} --data TRAINING.hspy "
                "--fit-ood' on the dataset it was trained on.",
            )
        items = np.array([(ds.defocus_index(d), i) for d in present for i in idx], dtype=int)
    imgs = ds.images
    parent_ref = _parent_reference(sm)
    parent_level = None if parent_ref is None else parent_ref.caution
    domain = imaging_domain_for(ds, doms, sm, parent_ref, items)
    plan = _calibration_plan(sm, ds, cfg, doms)
    n_cal = 0 if plan is None else plan[0].size * ds.n_defocus
    n_fit = min(cfg.max_samples, len(items) * (8 if cfg.augment else 1))

    def fit_progress(done: int, _total: int, message: str) -> None:
        if progress is not None:
            progress(done, n_fit + n_cal, message)

    ref, sample = _fit_stream(
        sm,
        lambda k: imgs[items[k, 0], items[k, 1]],
        items[:, 0],
        cfg,
        method=DEFAULT_METHOD,
        feature_weight=DEFAULT_FEATURE_WEIGHT,
        stages="default",
        info={"train_defocus_nm": doms, "dataset": str(getattr(ds, "path", None))},
        progress=fit_progress,
        stop=stop,
        domain=domain,
        parent=parent_ref,
    )
    _calibrate_for_checkpoint(
        sm,
        ref,
        ds,
        cfg,
        plan,
        progress,
        ref.n_images,
        stop=stop,
        sample=sample,
        parent_level=parent_level,
        parent_calibration=None if parent_ref is None else parent_ref.calibration,
    )
    _save(sm, ref, True)
    secs = time.perf_counter() - t0
    doms_txt = ", ".join(f"{d:g}" for d in doms)
    caution = "" if ref.caution_level is None else f"; caution level {ref.caution_level:.2f}"
    return OODFitResult(
        True,
        f"{model_dir}: OOD reference fitted on {ref.n_images} training image-transforms "
        f"({doms_txt} nm) in {secs:.0f} s{caution}.",
        Path(model_dir) / OOD_JSON,
        ref.n_images,
        secs,
        ref.caution_level,
    )


def fit_ood_reference_for_checkpoint(
    model_dir,
    dataset,
    which: str = "best",
    device: str | None = None,
    refit: bool = False,
    *,
    progress: ProgressCallback | None = None,
    config: OODFitConfig | None = None,
    **overrides: Any,
) -> str:
    """Fit and store a checkpoint's OOD reference from its own training images.

    The training structures and defocus domains are read from the checkpoint's sidecar, and
    a seeded sample of at most ``max_samples`` of their image-transforms is read lazily from
    ``dataset``, one batch at a time; the "treat with caution" level is calibrated on the
    held-out structures of every domain of ``dataset`` (when labelled).

    Parameters
    ----------
    model_dir
        Checkpoint folder.
    dataset
        :class:`~napari_hrtem_transfer.io.HRTEMDataset` the model was trained on, or its path.
    which
        ``"best"`` or ``"last"``.
    device
        Torch device (``None`` = where the checkpoint loads).
    refit
        Fit again even if a reference for these exact weights exists.
    progress
        Called as ``progress(done, total, message)`` after each batch.
    config
        How the reference is fitted (default: :class:`OODFitConfig`'s defaults).
    **overrides
        Fields of ``config`` to override (``max_samples``, ``batch_size``, ``seed``, ...;
        None keeps the config's value).

    Returns
    -------
    str
        What was done, in words (also when nothing could be done).

    Raises
    ------
    Exception
        Whatever the fit raises (use :func:`fit_ood_after_training` for a call that never
        raises).
    """
    cfg = _config(config, **overrides)
    return _fit_for_checkpoint(model_dir, dataset, which, device, refit, cfg, progress).message


def fit_ood_after_training(
    model_dir,
    data,
    *,
    progress: ProgressCallback | None = None,
    which: str = "best",
    device: str | None = None,
    config: OODFitConfig | None = None,
    stop=None,
) -> OODFitResult:
    """The end-of-training step: fit the model's OOD reference; never raises for a failure.

    Called by ``pretrain``/``finetune`` (command line), the napari Train widget and the demo
    protocol once the checkpoint is written.  Any failure of the fit (out of memory, a
    missing file, ...) is caught: the trained checkpoint is untouched and usable, the result
    says what happened and how to retry
    (``hrtem-transfer evaluate --model MODEL --data DATA --fit-ood``).

    Parameters
    ----------
    model_dir
        The checkpoint folder just written.
    data
        The training dataset (:class:`~napari_hrtem_transfer.io.HRTEMDataset` or a path).
    progress
        Called as ``progress(done, total, message)`` after each batch.
    which, device
        Checkpoint and torch device.
    config
        :class:`OODFitConfig` (default: its defaults).
    stop
        A ``threading.Event`` or a callable returning True to stop; checked between batches.
        A stopped fit writes nothing (an older reference of other weights is never used) and
        says how to fit later.

    Returns
    -------
    OODFitResult
    """
    t0 = time.perf_counter()
    cfg = config or OODFitConfig()
    from ...training.progress import stop_checker

    should_stop = None if stop is None else stop_checker(stop)
    try:
        return _fit_for_checkpoint(model_dir, data, which, device, True, cfg, progress, should_stop)
    except OODFitStopped as exc:
        where = getattr(data, "path", None) or (
            data if isinstance(data, str | os.PathLike) else None
        )
        return OODFitResult(
            False,
            f"The OOD-reference fit was stopped ({exc}); nothing was written. The trained "
            f"checkpoint {model_dir} is complete and usable; only the label-free OOD scores "
            f"are missing. Fit later with: hrtem-transfer evaluate --model {model_dir} "
            f"--data {where or 'TRAINING.hspy'} --fit-ood",
            seconds=time.perf_counter() - t0,
            error="stopped",
        )
    except Exception as exc:  # noqa: BLE001 - any failure must leave the checkpoint usable
        err = f"{type(exc).__name__}: {exc}"
        where = getattr(data, "path", None) or (
            data if isinstance(data, str | os.PathLike) else None
        )
        data_txt = str(where) if where else "TRAINING.hspy"
        hint = (
            " (out of memory: retry with a smaller sample, OODFitConfig(max_samples=...) or "
            "batch_size)"
            if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower()
            else ""
        )
        return OODFitResult(
            False,
            f"The OOD-reference fit failed ({err}){hint}. The trained checkpoint {model_dir} is "
            "complete and usable; only the label-free OOD scores are missing. Retry with: "
            f"hrtem-transfer evaluate --model {model_dir} --data {data_txt} --fit-ood",
            seconds=time.perf_counter() - t0,
            error=err,
        )


__all__ = [
    "MIN_CALIBRATION_FRAMES",
    "OODFitConfig",
    "OODFitResult",
    "OODFitStopped",
    "ProgressCallback",
    "calibrate_caution_level",
    "fit_ood_after_training",
    "fit_ood_reference",
    "fit_ood_reference_for_checkpoint",
    "fit_reference_from_features",
    "imaging_domain_for",
    "sample_transforms",
]
