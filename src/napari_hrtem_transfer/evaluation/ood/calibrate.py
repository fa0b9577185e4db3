"""The caution level: calibrated on held-out frames of the training domain, or, with too few of
them (fine-tuning on a few annotated frames), derived from the fit's own sample and the parent
model's calibration.  Every level this module sets is finite."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from ...errors import ConfigError
from .domain import _has_domain
from .reference import (
    OODReference,
)
from .verdict import VerdictConfig, combine, verdict

if TYPE_CHECKING:
    from .sample import OODFitConfig, _Sample


class OODFitStopped(Exception):
    """The fit was stopped by the caller (internal: :func:`fit_ood_after_training` reports it)."""


def _calibrate_in_sample(
    ref: OODReference,
    sample: _Sample,
    vcfg: VerdictConfig,
    parent_level: float | None = None,
    parent_calibration: dict | None = None,
) -> None:
    """A caution level from the fit's own sample (a lower bound; replaced by a held-out
    calibration when there is one): the false-alarm quantile of the sample's verdict
    scores.  With a parent: ``max(parent level, in-sample median + the parent's level minus
    its in-domain median)`` -- the parent's calibration says how far above a typical
    in-domain score its level lies; a few frames cannot say it themselves."""
    v = combine(ref, sample.stats, sample.comps, config=vcfg, caution_level=np.inf)
    level, rec = calibrate_caution_level(
        v.score,
        None,
        np.ones(v.score.size, bool),
        1.0 - vcfg.false_alarm_rate,
        physics_flag=v.physics_flag,
    )
    rec["method"] = (
        f"{1 - vcfg.false_alarm_rate:g} quantile of the verdict scores of the fit's own sample "
        "(training image-transforms; in-sample, so a lower bound)"
    )
    if parent_level is not None and np.isfinite(parent_level):
        pc = parent_calibration or {}
        margin = float(parent_level) - float(pc.get("median_in_domain_score") or 0.0)
        derived = float(rec["median_in_domain_score"]) + max(margin, 0.0)
        rec["in_sample_level"] = level
        rec["parent_margin"] = margin
        level = max(float(parent_level), derived)
        rec["method"] = (
            f"max(parent level {parent_level:.3g}, in-sample median "
            f"{rec['median_in_domain_score']:.3g} + the parent's level-minus-median "
            f"{margin:.3g}) (few training frames: derived from the parent's calibration)"
        )
    rec["parent_level"] = parent_level
    ref.caution_level = float(level)
    ref.calibration = rec


# ---------------------------------------------------------------------- calibration
def calibrate_caution_level(
    score: np.ndarray,
    loss: np.ndarray | None,
    in_domain: np.ndarray,
    quantile: float = 0.95,
    *,
    physics_flag: np.ndarray | None = None,
) -> tuple[float, dict]:
    """The "treat with caution" level from held-out frames.

    A frame is flagged when its score exceeds the level or a physics reason applies.  The
    level is set so that a fraction ``1 - quantile`` (5 %) of the training domain's held-out
    frames is flagged, physics flags included: with a fraction ``r`` of them physics-flagged,
    the level is the ``1 - (1 - quantile - r) / (1 - r)`` quantile of the other frames'
    scores (``r >= 1 - quantile``: their largest score; the record says the false-alarm rate
    is then ``r``).  Without physics flags this is the ``quantile`` of the scores.  With
    losses, the record says how well the flag separates bad frames (loss above the training
    domain's ``quantile``) on these frames (recall: bad frames flagged; precision: flagged
    frames bad).

    Parameters
    ----------
    score
        Verdict score of held-out frames (N,), from all domains of a dataset.
    loss
        Their loss (N,), or None (unlabelled).
    in_domain
        Which of them belong to the training domain(s) (N,) bool.
    quantile
        One minus the false-alarm rate.
    physics_flag
        Which frames have a physics reason (N,) bool (flagged whatever the level).

    Returns
    -------
    (level, record)
    """
    score = np.asarray(score, float)
    in_domain = np.asarray(in_domain, bool)
    phys = np.zeros(score.shape, bool) if physics_flag is None else np.asarray(physics_flag, bool)
    ok = np.isfinite(score)
    if not (ok & in_domain).any():
        raise ConfigError("calibration needs held-out frames of the training domain.")
    ind = ok & in_domain
    r = float(phys[ind].mean())
    rest = score[ind & ~phys]
    fa = 1.0 - quantile
    if rest.size == 0:
        level = float(np.max(score[ind]))
    elif r >= fa:
        level = float(np.max(rest))
    else:
        level = float(np.quantile(rest, 1.0 - (fa - r) / (1.0 - r)))
    flag_all = ok & ((score > level) | phys)
    rec: dict[str, Any] = {
        "method": f"{quantile:g} quantile of the training domain's held-out verdicts "
        "(physics flags included)",
        "quantile": quantile,
        "n_frames": int(ok.sum()),
        "n_in_domain": int(ind.sum()),
        "physics_flag_rate_in_domain": r,
        "median_in_domain_score": float(np.median(score[ind])),
        "false_alarm_rate": float(flag_all[ind].mean()),
    }
    if loss is not None:
        loss = np.asarray(loss, float)
        ok &= np.isfinite(loss)
        thr = float(np.quantile(loss[ok & in_domain], quantile))
        bad = ok & (loss > thr)
        flag = ok & flag_all
        rec.update(
            loss_threshold=thr,
            n_bad=int(bad.sum()),
            n_flagged=int(flag.sum()),
            recall=float(np.mean(flag[bad])) if bad.any() else None,
            precision=float(np.mean(bad[flag])) if flag.any() else None,
        )
    return level, rec


#: Fewest held-out frames of the training domain(s) a calibration needs.
MIN_CALIBRATION_FRAMES = 5


def _calibration_plan(sm, dataset, cfg: OODFitConfig, doms) -> tuple[np.ndarray, set] | None:
    """Held-out images (indices) and training-domain indices for the calibration, or None."""
    data = sm.info.get("data") or {}
    sids = np.asarray(dataset.structure_ids).astype(str)
    val = np.flatnonzero(np.isin(sids, [str(s) for s in data.get("val_structures") or []]))
    train_dom = {dataset.defocus_index(d) for d in doms if _has_domain(dataset, d)}
    n_cal = cfg.calibration_frames_per_domain
    if not train_dom or n_cal < 1:
        return None
    rng = np.random.default_rng(cfg.seed)
    sel = np.sort(rng.permutation(val)[:n_cal])
    if sel.size * len(train_dom) < MIN_CALIBRATION_FRAMES:
        return None
    return sel, train_dom


def _calibrate_for_checkpoint(
    sm,
    ref: OODReference,
    dataset,
    cfg: OODFitConfig,
    plan,
    progress=None,
    done: int = 0,
    stop: Callable[[], bool] | None = None,
    sample: _Sample | None = None,
    parent_level: float | None = None,
    parent_calibration: dict | None = None,
) -> None:
    """Set ``ref.caution_level`` from held-out frames of every domain of ``dataset``; with
    too few of them, from the fit's sample and the parent's level (see the module)."""
    from ..metrics import binary_cross_entropy

    vcfg = VerdictConfig(**(ref.verdict or {}))
    if plan is None:
        if sample is None:
            raise ConfigError("no held-out frames and no sample to calibrate the caution level")
        _calibrate_in_sample(ref, sample, vcfg, parent_level, parent_calibration)
        ref.calibration["why"] = (
            f"fewer than {MIN_CALIBRATION_FRAMES} held-out frames of the training domain"
        )
        return
    sel, train_dom = plan
    masks = None if dataset.masks is None else np.asarray(dataset.masks[sel])
    scores, losses, ind, phys = [], [], [], []
    total = done + sel.size * dataset.n_defocus
    for di in range(dataset.n_defocus):
        if stop is not None and stop():
            raise OODFitStopped("stopped while calibrating the caution level")
        x = np.asarray(dataset.images[di][sel])
        st = sm.frame_stats(x, want_logits=True, batch_size=cfg.batch_size, tile_px=cfg.tile_px)
        v = verdict(ref, st, x, model_sampling_A=sm.sampling_A, config=vcfg, caution_level=np.inf)
        scores.append(v.score)
        phys.append(v.physics_flag)
        if masks is not None:
            losses.append(binary_cross_entropy(st.logits, masks))
        ind.append(np.full(sel.size, di in train_dom))
        done += sel.size
        if progress is not None:
            progress(done, total, "calibrating the caution level on held-out frames")
    level, rec = calibrate_caution_level(
        np.concatenate(scores),
        np.concatenate(losses) if masks is not None else None,
        np.concatenate(ind),
        1.0 - vcfg.false_alarm_rate,
        physics_flag=np.concatenate(phys),
    )
    rec["frames_per_domain"] = int(sel.size)
    rec["domains_nm"] = [float(v) for v in dataset.defocus_nm]
    if parent_level is not None and np.isfinite(parent_level):
        rec["parent_level"] = float(parent_level)
    ref.caution_level = level
    ref.calibration = rec
