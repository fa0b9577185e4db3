"""Fitting and calibrating an OOD reference on held-out series (never trained on).

:func:`fit_ood_after_training` fits on the model's own training images at the dose they were
simulated at.  A model trained with dose (or pixel-size) augmentation saw other inputs: its
reference must be fitted and its caution level calibrated on frames that span the same
inputs, else the level is set at one dose and frames at other doses inside the training range
are flagged (measured in ``docs/independent_check.md``: 62-72 % of the in-range frames of
the wide series flagged with a 400 e/Å² calibration, 7 % with one on 50-1000 e/Å² frames).
:func:`fit_ood_on_held_out` takes such series: fresh simulations with the training settings
and new seeds, spanning the augmentation ranges (``scripts/train_pretrained_model.py``
stage 3, ``benchmarks/bench_ood_verdict.py --refit-shipped``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .calibrate import calibrate_caution_level
from .domain import imaging_domain_for
from .reference import (
    DEFAULT_FEATURE_WEIGHT,
    DEFAULT_METHOD,
    HELD_OUT_LOG_ENTROPY_WEIGHT,
    OOD_JSON,
)
from .sample import OODFitConfig, _fit_stream, _save


def fit_ood_on_held_out(
    model_dir,
    fit_data: Sequence,
    calibration_data: Sequence = (),
    *,
    n_fit_images: int | None = None,
    which: str = "best",
    device: str | None = None,
    config: OODFitConfig | None = None,
    description: str | None = None,
):
    """Fit a model's OOD reference on held-out labelled series and calibrate its level.

    Parameters
    ----------
    model_dir
        Checkpoint folder; the reference is written into it (tied to the weights' sha256).
    fit_data
        Datasets (:class:`~napari_hrtem_transfer.io.HRTEMDataset` or paths), all with the
        model's training defoci [nm], none of their frames trained on.
    calibration_data
        More such datasets; each of their frames (every defocus) is a held-out frame of the
        training domain for the caution level (5 % false alarms, physics flags included).
    n_fit_images
        Images per ``fit_data`` dataset fitted on (the first ones); the rest of each is a
        calibration frame too.  None: all are fitted on (then ``calibration_data`` must not
        be empty).
    which, device
        Checkpoint and torch device.
    config
        :class:`OODFitConfig` (sample size, batch, seed).
    description
        Where the series come from, stored in the reference's ``info["dataset"]``.

    Returns
    -------
    OODFitResult
        With the finite caution level; raises on a failure (nothing is written then).

    Raises
    ------
    ValueError
        No calibration frames, or a dataset without the model's training defoci or masks.
    """
    from ...io.dataset import HRTEMDataset, load_dataset
    from .._model import ScoringModel
    from .fit import OODFitResult

    t0 = time.perf_counter()
    cfg = config or OODFitConfig()

    fits = [d if isinstance(d, HRTEMDataset) else load_dataset(d, lazy=False) for d in fit_data]
    cals = [
        d if isinstance(d, HRTEMDataset) else load_dataset(d, lazy=False) for d in calibration_data
    ]
    if not fits:
        raise ValueError("fit_ood_on_held_out needs at least one fit dataset")
    sm = ScoringModel(model_dir, which=which, device=device)
    doms = [float(d) for d in (sm.info.get("data") or {}).get("train_defocus_nm") or []]
    doms = doms or [float(d) for d in fits[0].defocus_nm]
    _check_series((*fits, *cals), doms)
    fit_rows, cal_sets = _split(fits, cals, doms, n_fit_images)
    rows = np.asarray(fit_rows, dtype=int)
    domain = imaging_domain_for(fits[0], doms, sm)
    ref, _ = _fit_stream(
        sm,
        lambda j: np.asarray(fits[rows[j, 0]].images[rows[j, 1], rows[j, 2]]),
        rows[:, 3],
        cfg,
        method=DEFAULT_METHOD,
        feature_weight=DEFAULT_FEATURE_WEIGHT,
        stages="default",
        info={
            "train_defocus_nm": doms,
            "dataset": description
            or "held-out series: "
            + ", ".join(str(getattr(d, "path", "in memory")) for d in (*fits, *cals)),
            "n_fit_images": n_fit_images,
        },
        progress=None,
        domain=domain,
        log_entropy_weight=HELD_OUT_LOG_ENTROPY_WEIGHT,
    )
    s, phys, losses = _calibration_terms(sm, ref, cal_sets)
    level, rec = calibrate_caution_level(s, losses, np.ones(s.size, bool), 0.95, physics_flag=phys)
    rec.update(frames_per_domain=s.size // len(doms), domains_nm=doms, source="held-out series")
    ref.caution_level, ref.calibration = level, rec
    _save(sm, ref, True)
    secs = time.perf_counter() - t0
    return OODFitResult(
        True,
        f"{model_dir}: OOD reference fitted on {ref.n_images} held-out image-transforms and "
        f"calibrated on {s.size} held-out frames in {secs:.0f} s; caution level {level:.2f}.",
        Path(model_dir) / OOD_JSON,
        ref.n_images,
        secs,
        level,
    )


def _check_series(datasets, doms) -> None:
    """Every held-out series holds the training defoci [nm] and masks, else a ValueError."""
    for ds in datasets:
        missing = [d for d in doms if not np.any(np.isclose(ds.defocus_nm, d, atol=0.05))]
        if missing or ds.masks is None:
            why = f"lacks the training defoci {missing} nm" if missing else "has no masks"
            raise ValueError(
                f"{getattr(ds, 'path', 'a dataset')} {why}: held-out series need every "
                "training defocus and ground-truth masks (simulate them with the training "
                "settings and new seeds)"
            )


def _split(fits, cals, doms, n_fit_images):
    """(dataset, defocus index, image index, domain index) of the frames fitted on, domain
    first (as the training sample's plan: the seeded sample then repeats), and (dataset,
    defocus index, image index) of the held-out calibration frames."""
    fit_rows, cal_rows = [], []
    for dj, d in enumerate(doms):
        for k, ds in enumerate(fits):
            n = ds.n_images if n_fit_images is None else min(int(n_fit_images), ds.n_images)
            di = ds.defocus_index(d)
            fit_rows += [(k, di, i, dj) for i in range(n)]
            cal_rows += [(k, di, i) for i in range(n, ds.n_images)]
    cal_sets = [(fits[k], di, i) for k, di, i in cal_rows]
    for ds in cals:
        cal_sets += [(ds, ds.defocus_index(d), i) for d in doms for i in range(ds.n_images)]
    if not cal_sets:
        raise ValueError(
            "no calibration frames: pass calibration_data or n_fit_images below the fit "
            "series' number of images"
        )
    return fit_rows, cal_sets


def _calibration_terms(sm, ref, cal_sets):
    """Verdict scores, physics flags and losses (BCE against the masks) of the calibration
    frames, one batch per (dataset, defocus)."""
    from ..metrics import binary_cross_entropy
    from .verdict import VerdictConfig, verdict

    vcfg = VerdictConfig(**ref.verdict)
    groups: dict[tuple[int, int], list[int]] = {}
    by_id = {}
    for ds, di, i in cal_sets:
        groups.setdefault((id(ds), di), []).append(i)
        by_id[id(ds)] = ds
    scores, phys, losses = [], [], []
    for (key, di), idx in groups.items():
        ds = by_id[key]
        x = np.asarray(ds.images[di])[idx]
        st = sm.frame_stats(x, want_logits=True, batch_size=8)
        v = verdict(ref, st, x, model_sampling_A=sm.sampling_A, config=vcfg, caution_level=np.inf)
        scores.append(v.score)
        phys.append(v.physics_flag)
        losses.append(binary_cross_entropy(st.logits, np.asarray(ds.masks)[idx]))
    return np.concatenate(scores), np.concatenate(phys), np.concatenate(losses)
