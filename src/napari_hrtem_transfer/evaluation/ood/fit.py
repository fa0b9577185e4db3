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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ...errors import CheckpointError, ConfigError
from . import components as comp
from .reference import (
    DEFAULT_ENTROPY_MODE,
    DEFAULT_ENTROPY_WEIGHT,
    DEFAULT_FEATURE_WEIGHT,
    DEFAULT_METHOD,
    DEFAULT_STAGES,
    ENTROPY_MODES,
    METHODS,
    OOD_ARRAYS,
    OOD_JSON,
    ImagingDomain,
    OODReference,
    _median_spread,
    load_ood_reference,
)
from .verdict import VerdictConfig, combine, frame_components, verdict

ProgressCallback = Callable[[int, int, str], None]


class OODFitConfig(BaseModel):
    """How the OOD reference is fitted (the defaults live here, once).

    Attributes
    ----------
    max_samples
        Most image-transforms (training image x dihedral transform) the reference is fitted
        on: a seeded sample spread over the training domains and structures.  The fit costs
        one forward pass per ``batch_size`` of them, whatever the size of the dataset.
    batch_size
        Images per forward pass (memory: one batch of feature maps).
    augment
        Sample the 8 dihedral (D4) transforms of the images, as in training.
    seed
        Seed of the sample.
    calibration_frames_per_domain
        Held-out frames per domain scored to calibrate the "treat with caution" level.
    tile_px
        Largest tile side of the OOD pass [px].
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_samples: int = Field(192, ge=2)
    batch_size: int = Field(8, ge=1)
    augment: bool = True
    seed: int = 0
    calibration_frames_per_domain: int = Field(8, ge=0)
    tile_px: int = Field(1024, ge=16)


def fit_reference_from_features(
    features: np.ndarray,
    entropy: np.ndarray | None = None,
    method: str = DEFAULT_METHOD,
    entropy_weight: float = DEFAULT_ENTROPY_WEIGHT,
    info: dict | None = None,
    columns: np.ndarray | None = None,
    entropy_mode: str = DEFAULT_ENTROPY_MODE,
    *,
    boundary_entropy: np.ndarray | None = None,
    band_width_px: np.ndarray | None = None,
    feature_weight: float = DEFAULT_FEATURE_WEIGHT,
) -> OODReference:
    """Fit an :class:`OODReference` to pooled training features (N, D) (pure numpy).

    With ``boundary_entropy`` and ``band_width_px`` of the training images the reference
    scores the uncertainty on the predicted boundary (kind ``"uncertainty"``, the default
    of the fits from images); without them, features and entropy (``"features+entropy"``).

    Parameters
    ----------
    features
        Pooled encoder features of the training images, (N, D), N >= 2.
    entropy
        Mean predictive entropy of each training image [nats], (N,).
    method
        ``"diag"``.
    entropy_weight
        Weight of the entropy in the score, in [0, 10].
    info
        Provenance stored with the reference.
    columns
        Indices of the columns of ``features`` to use (None: all).
    entropy_mode
        ``"excess"``: ``score = feature_score + w * max(entropy_score, 0)`` (uncertainty can
        raise the score but a confidently wrong model cannot hide a feature shift);
        ``"signed"``: ``feature_score + w * entropy_score``.
    boundary_entropy, band_width_px
        Boundary statistics of the training images, (N,) [nats], [px].
    feature_weight
        Weight of the feature distance in the "uncertainty" score.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown OOD method {method!r}; choose one of {', '.join(METHODS)}.")
    if entropy_mode not in ENTROPY_MODES:
        raise ConfigError(f"entropy_mode must be 'excess' or 'signed'; got {entropy_mode!r}.")
    if not 0 <= entropy_weight <= 10:
        raise ConfigError(
            f"entropy_weight out of range for mode {entropy_mode!r}: {entropy_weight}."
        )
    uncertainty = boundary_entropy is not None and band_width_px is not None
    if entropy_weight > 0 and entropy is None and not uncertainty:
        raise ConfigError("entropy_weight > 0 needs the training images' predictive entropy.")
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ConfigError(f"need pooled features of at least 2 images; got shape {f.shape}.")
    if columns is not None:
        columns = np.asarray(columns, dtype=np.int64)
        f = f[:, columns]
    mean = f.mean(axis=0)
    sd = f.std(axis=0)
    # features that are (almost) constant on the training data would make any deviation
    # infinitely far; floor their scale at a small fraction of the typical feature scale
    floor = max(1e-3 * float(np.median(sd[sd > 0])) if np.any(sd > 0) else 1e-6, 1e-8)
    scale = np.maximum(sd, floor)
    ref = OODReference(
        method=method,
        mean=mean,
        scale=scale,
        n_images=int(f.shape[0]),
        entropy_weight=float(entropy_weight),
        info=dict(info or {}),
        columns=columns,
        entropy_mode=entropy_mode,
    )
    d = ref.distance(f)
    ref.distance_ref = float(np.median(d)) if np.median(d) > 0 else 1.0
    if entropy is not None:
        e = float(np.median(np.asarray(entropy, float)))
        ref.entropy_ref = e if e > 0 else 1.0
    if uncertainty:
        ref.kind = "uncertainty"
        ref.feature_weight = float(feature_weight)
        ref.boundary_ref, ref.boundary_spread = _median_spread(boundary_entropy)
        w = np.asarray(band_width_px, dtype=np.float64)
        ref.log_band_ref, ref.log_band_spread = _median_spread(np.log(np.maximum(w, 1e-12)))
    return ref


# ------------------------------------------------------------------------------ fitting
def sample_transforms(
    groups: np.ndarray, n_codes: int, max_samples: int, seed: int = 0
) -> list[tuple[int, int]]:
    """A seeded sample of at most ``max_samples`` (item, D4 code) pairs.

    Spread evenly over the groups (training domains): the domains take turns, and within a
    domain every item (structure) is taken once, in random order and with a random
    transform, before any item is taken a second time (with another transform).

    Parameters
    ----------
    groups
        Group (domain) label of each item, (n_items,).
    n_codes
        Transforms per item (8 = all dihedral transforms, 1 = identity only).
    max_samples
        Cap on the number of pairs.
    seed
        Seed of the sample.
    """
    rng = np.random.default_rng(seed)
    groups = np.asarray(groups)
    lists = []
    for g in np.unique(groups):
        items = rng.permutation(np.flatnonzero(groups == g))
        codes = np.stack([rng.permutation(n_codes) for _ in items]) if items.size else None
        lists.append(
            [(int(i), int(codes[k, r])) for r in range(n_codes) for k, i in enumerate(items)]
        )
    out: list[tuple[int, int]] = []
    pos = [0] * len(lists)
    while len(out) < max_samples and any(p < len(li) for p, li in zip(pos, lists, strict=True)):
        for k, li in enumerate(lists):
            if pos[k] < len(li) and len(out) < max_samples:
                out.append(li[pos[k]])
                pos[k] += 1
    return out


def _resolve_columns(sizes: list[int], stages) -> tuple[tuple[int, ...], np.ndarray]:
    if stages == "default":
        stages = DEFAULT_STAGES
    if stages == "all":
        stages = tuple(range(len(sizes)))
    elif stages == "all-but-deepest":
        stages = tuple(range(max(1, len(sizes) - 1)))
    stages = tuple(int(k) for k in stages if int(k) < len(sizes)) or tuple(range(len(sizes)))
    starts = np.cumsum([0, *sizes])
    columns = np.concatenate([np.arange(starts[k], starts[k + 1]) for k in stages])
    return stages, columns


@dataclass
class _Sample:
    """What the fit keeps of its sample (no images): network statistics and components."""

    stats: Any
    comps: list[dict[str, Any]]


def _fit_stream(
    sm,
    read: Callable[[int], np.ndarray],
    groups: np.ndarray,
    cfg: OODFitConfig,
    *,
    method: str,
    feature_weight: float,
    stages,
    info: dict,
    progress: ProgressCallback | None,
    stop: Callable[[], bool] | None = None,
    domain: dict | None = None,
    parent: OODReference | None = None,
) -> tuple[OODReference, _Sample]:
    """Fit on a seeded sample of (item, transform) pairs, one batch in memory at a time.

    Returns the reference (network statistics, power-spectrum statistics, imaging domain,
    an in-sample caution level) and what the sample gave (for a later calibration).  With
    fewer than :data:`FEW_IMAGES` distinct training images and a ``parent`` reference
    (fine-tuning on a few annotated frames), the spreads are floored at the parent's (the
    D4 transforms of one frame have almost no spread: every other frame would look far).
    """
    from ...training.data import d4
    from .._model import FrameStats

    pairs = sample_transforms(groups, 8 if cfg.augment else 1, cfg.max_samples, cfg.seed)
    if len(pairs) < 2:
        raise ConfigError(
            f"need at least 2 training images for the OOD reference; got {len(pairs)}."
        )
    vcfg = VerdictConfig()
    ps_settings = {
        "tile_px": comp.PS_TILE_PX,
        "n_bins": comp.PS_BINS,
        "max_tiles": comp.PS_MAX_TILES,
        "bins": "linear in q, 0.03..1 Nyquist",
    }
    # read in item order within a batch (neighbouring chunks); the sample order is random
    feats, ents, bnds, bands, fracs = [], [], [], [], []
    comps: list[dict[str, Any]] = []
    total = len(pairs)
    for k in range(0, total, cfg.batch_size):
        if stop is not None and stop():
            raise OODFitStopped(f"stopped after {k} of {total} image-transforms")
        chunk = pairs[k : k + cfg.batch_size]
        x = np.stack([d4(np.asarray(read(i), dtype=np.float32), c) for i, c in chunk])
        st = sm.frame_stats(x, batch_size=cfg.batch_size, tile_px=cfg.tile_px)
        feats.append(st.features)
        ents.append(st.entropy)
        bnds.append(st.boundary_entropy)
        bands.append(st.band_width_px)
        fracs.append(st.particle_fraction)
        comps.extend(
            frame_components(
                x,
                model_sampling_A=sm.sampling_A,
                domain=domain,
                config=vcfg,
                ps_settings=ps_settings,
            )
        )
        if progress is not None:
            progress(min(k + cfg.batch_size, total), total, "fitting the OOD reference")
    f = np.concatenate(feats)
    stages, columns = _resolve_columns(sm.stage_sizes or [f.shape[1]], stages)
    info = {**info, "stages": list(stages), "n_samples": total, "max_samples": cfg.max_samples}
    ref = fit_reference_from_features(
        f,
        np.concatenate(ents),
        method,
        0.0,
        info=info,
        columns=columns,
        boundary_entropy=np.concatenate(bnds),
        band_width_px=np.concatenate(bands),
        feature_weight=feature_weight,
    )
    ref.weights_sha256 = sm.info.get("weights_sha256")
    ref.imaging_domain = domain
    ref.verdict = vcfg.model_dump()
    profiles = [c["_profile"] for c in comps if c.get("_profile") is not None]
    if len(profiles) >= 2:
        _fit_power_spectrum(ref, np.stack(profiles), ps_settings)
    n_distinct = len({i for i, _ in pairs})
    if parent is not None and n_distinct < FEW_IMAGES:
        ref.info["few_images"] = _adopt_parent(ref, parent, f, profiles, n_distinct)
    sample = _Sample(
        FrameStats(
            f,
            np.concatenate(ents),
            None,
            None,
            np.concatenate(bnds),
            np.concatenate(bands),
            np.concatenate(fracs),
        ),
        comps,
    )
    _calibrate_in_sample(
        ref,
        sample,
        vcfg,
        None if parent is None else parent.caution,
        None if parent is None else parent.calibration,
    )
    return ref, sample


#: Fewer distinct training images than this: spreads are floored at the parent's.
FEW_IMAGES = 16


def _adopt_parent(ref: OODReference, parent: OODReference, features, profiles, n: int) -> str:
    """Few training images: the parent reference's statistics (network and spectrum), or at
    least its spreads when the architectures differ; returns what was done, in words."""
    same = (
        parent.kind == "uncertainty"
        and parent.mean.shape == ref.mean.shape
        and (parent.columns is None) == (ref.columns is None)
        and (parent.columns is None or np.array_equal(parent.columns, ref.columns))
    )
    if not same:
        _floor_spreads(ref, parent, features, profiles)
        return (
            f"{n} distinct training image(s) < {FEW_IMAGES}: spreads floored at the parent "
            "reference's (other architecture)"
        )
    for k in (
        "mean",
        "scale",
        "distance_ref",
        "boundary_ref",
        "boundary_spread",
        "log_band_ref",
        "log_band_spread",
        "feature_weight",
    ):
        setattr(ref, k, getattr(parent, k))
    if parent.ps_mean is not None:
        ref.ps_mean, ref.ps_scale = parent.ps_mean, parent.ps_scale
        ref.ps_distance_ref, ref.ps_settings = parent.ps_distance_ref, dict(parent.ps_settings)
    return (
        f"{n} distinct training image(s) < {FEW_IMAGES}: the parent reference's statistics; "
        "the fine-tuned network's drift enters through the level (in-sample median + the "
        "parent's level-minus-median)"
    )


def _floor_spreads(
    ref: OODReference, parent: OODReference, features: np.ndarray, profiles=None
) -> None:
    """Spreads (and the distances' units) at least the parent reference's."""
    if parent.kind == "uncertainty":
        ref.boundary_spread = max(ref.boundary_spread, parent.boundary_spread)
        ref.log_band_spread = max(ref.log_band_spread, parent.log_band_spread)
    if parent.scale.shape == ref.scale.shape:
        ref.scale = np.maximum(ref.scale, parent.scale)
        d = ref.distance(features)
        med = float(np.median(d))
        ref.distance_ref = max(med if med > 0 else 1.0, parent.distance_ref)
    if (
        ref.ps_mean is not None
        and parent.ps_scale is not None
        and parent.ps_scale.shape == ref.ps_scale.shape
    ):
        ref.ps_scale = np.maximum(ref.ps_scale, parent.ps_scale)
        own = 0.0
        if profiles is not None and len(profiles):
            ref.ps_distance_ref = 1.0
            own = float(np.median(ref.ps_distance(np.stack(profiles))))
        ref.ps_distance_ref = max(own, parent.ps_distance_ref)


def _fit_power_spectrum(ref: OODReference, profiles: np.ndarray, settings: dict) -> None:
    """Mean and scale of the training images' power-spectrum profiles, and the median
    distance (the unit of the distance)."""
    ref.ps_mean = profiles.mean(axis=0)
    sd = profiles.std(axis=0)
    # a spread of ~0 in a ring would make any deviation infinite: floor at 0.05 nats
    ref.ps_scale = np.maximum(sd, 0.05)
    ref.ps_settings = dict(settings)
    ref.ps_distance_ref = 1.0
    d = ref.ps_distance(profiles)
    med = float(np.median(d))
    ref.ps_distance_ref = med if med > 0 else 1.0


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


def fit_ood_reference(
    model: Any,
    images,
    *,
    method: str = DEFAULT_METHOD,
    feature_weight: float = DEFAULT_FEATURE_WEIGHT,
    stages: str | tuple[int, ...] = "default",
    augment: bool | None = None,
    save: bool | str | os.PathLike = True,
    batch_size: int | None = None,
    info: dict | None = None,
    max_samples: int | None = None,
    seed: int | None = None,
    progress: ProgressCallback | None = None,
    config: OODFitConfig | None = None,
    domain: dict | None = None,
) -> OODReference:
    """Fit the training-domain distribution of a model and store it with the model.

    Streams: the images are read one batch at a time (``images[i]``, so a dask or HDF5
    array is never loaded whole), and at most ``max_samples`` image-transforms are used.

    Parameters
    ----------
    model
        Model folder, loaded checkpoint or torch module with ``encoder_features``.
    images
        Raw training images (N, H, W) (electron counts, as the model receives them).
    method, feature_weight
        See :func:`fit_reference_from_features` (the fit from images always gives the
        default "uncertainty" score).
    stages
        Encoder stages whose pooled features enter the distance, 0 = first (highest
        resolution): a tuple of indices, ``"all"``, ``"all-but-deepest"`` or ``"default"``
        (:data:`DEFAULT_STAGES`).
    augment, batch_size, max_samples, seed
        Override the fields of ``config`` (:class:`OODFitConfig`).
    save
        True: write into the model folder (when the model came from one); a path: write there;
        False: do not write.
    info
        Provenance to store (training defocus [nm], dataset, ...).
    progress
        Called as ``progress(done, total, message)`` after each batch.
    domain
        The model's :class:`~.reference.ImagingDomain` as a dict (default: from
        ``info["train_defocus_nm"]`` and the simulator's defaults, or None).

    Returns
    -------
    OODReference
        With an in-sample caution level (the sample's false-alarm quantile; fit with
        :func:`fit_ood_after_training` for a held-out calibration).
    """
    from .._model import ScoringModel

    cfg = _config(
        config, augment=augment, batch_size=batch_size, max_samples=max_samples, seed=seed
    )
    sm = model if isinstance(model, ScoringModel) else ScoringModel(model)
    x = images
    if np.ndim(x) == 2:
        x = np.asarray(x)[None]
    ref, _ = _fit_stream(
        sm,
        lambda i: x[i],
        np.zeros(len(x), int),
        cfg,
        method=method,
        feature_weight=feature_weight,
        stages=stages,
        info=dict(info or {}),
        progress=progress,
        domain=domain if domain is not None else _domain_from_info(info, sm),
    )
    _save(sm, ref, save)
    return ref


def _config(config: OODFitConfig | None, **overrides) -> OODFitConfig:
    cfg = config or OODFitConfig()
    over = {k: v for k, v in overrides.items() if v is not None}
    return cfg.model_copy(update=over) if over else cfg


def _save(sm, ref: OODReference, save) -> Path | None:
    target = None
    if save is True:
        target = sm.model_dir
    elif save:
        target = Path(save)
    if target is not None:
        ref.save(target)
        if sm.loaded is not None and target == sm.model_dir:
            _register_in_sidecar(sm, ref)
    return target


def _register_in_sidecar(sm, ref: OODReference) -> None:
    """Note the reference in the checkpoint sidecar's ``extra`` (summary, not the arrays)."""
    try:
        from ...training import update_checkpoint_extra
    except ImportError:  # pragma: no cover - training core missing
        return
    which = getattr(sm.loaded, "which", "best")
    update_checkpoint_extra(
        sm.model_dir,
        "ood_reference",
        {
            "files": [OOD_ARRAYS, OOD_JSON],
            "method": ref.method,
            "n_images": ref.n_images,
            "distance_ref": ref.distance_ref,
            "caution_level": ref.caution_level,
            "weights_sha256": ref.weights_sha256,
        },
        which=which,
    )


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


def _simulation_configs(info: dict) -> list[dict]:
    """The simulation configs in a dataset's info (merged datasets hold several)."""
    out = []
    if isinstance(info.get("config"), dict):
        out.append(info["config"])
    for sub in info.get("merged_from") or []:
        if isinstance(sub, dict):
            out.extend(_simulation_configs(sub))
    return out


def _domain_from_info(info: dict | None, sm) -> dict | None:
    """An imaging domain from ``info["train_defocus_nm"]`` and the simulator's defaults."""
    doms = [float(d) for d in (info or {}).get("train_defocus_nm") or []]
    if not doms:
        return None
    return ImagingDomain(
        defocus_nm_range=(min(doms), max(doms)),
        defocus_nm=doms,
        sampling_A=getattr(sm, "sampling_A", None),
        source="training defoci given to the fit; other values: the simulator's defaults",
    ).model_dump()


def _parent_reference(sm) -> OODReference | None:
    """The OOD reference of the model this one was fine-tuned from, if readable."""
    parent = (sm.info or {}).get("parent") or {}
    path = parent.get("path") if isinstance(parent, dict) else None
    if not path:
        return None
    try:
        return load_ood_reference(path, parent.get("weights_sha256"))
    except CheckpointError:
        return None


#: Most training frames whose defocus is estimated for a domain without metadata.
MAX_DOMAIN_ESTIMATES = 16


def imaging_domain_for(dataset, doms, sm, parent_ref=None, items=None) -> dict | None:
    """The imaging domain of a model trained on ``dataset`` at defoci ``doms`` [nm].

    Simulated datasets: their metadata (beam energy, Cs, focal spread, dose, pixel size)
    and the training defoci.  Annotated frames (``info["source"] == "annotated frames"``,
    :func:`~napari_hrtem_transfer.annotations.dataset_from_annotations`): the parent model's domain
    (or the simulator's defaults) widened to the training frames' estimated defoci
    (:func:`~napari_hrtem_transfer.evaluation.ctf.estimate_ctf`; magnitude when the sign is
    not determined, both signs then).
    """
    info = dict(getattr(dataset, "info", {}) or {})
    cfgs = _simulation_configs(info)
    sampling = float(dataset.sampling_A)
    annotated = info.get("source") == "annotated frames"
    if doms and (cfgs or not annotated):
        c0 = cfgs[0] if cfgs else {}
        fs = [float(c.get("focal_spread_A", 10.0)) for c in cfgs]
        return ImagingDomain(
            defocus_nm_range=(min(doms), max(doms)),
            defocus_nm=[float(d) for d in doms],
            energy_eV=float(getattr(dataset, "energy_eV", c0.get("energy_eV", 300e3))),
            Cs_mm=float(c0.get("Cs_A", 5e4)) * 1e-7,
            focal_spread_A=max(fs) if fs else 10.0,
            dose_e_per_A2=getattr(dataset, "dose_e_per_A2", None),
            sampling_A=sampling,
            source="the training dataset's simulation metadata"
            if cfgs
            else "the training dataset's defoci, energy and dose; Cs and focal spread: the "
            "simulator's defaults",
        ).model_dump()
    from ..ctf import estimate_ctf

    base = None if parent_ref is None else parent_ref.domain
    base = dict(base or {})
    energy = float(base.get("energy_eV") or getattr(dataset, "energy_eV", 300e3))
    cs = float(base.get("Cs_mm") if base.get("Cs_mm") is not None else 0.005)
    est: list[float] = []
    pairs = [] if items is None else [tuple(int(v) for v in p) for p in np.asarray(items)]
    for di, ii in sorted(set(pairs))[:MAX_DOMAIN_ESTIMATES]:
        frame = np.asarray(dataset.images[di, ii], dtype=np.float32)
        try:
            e = estimate_ctf(
                frame,
                sampling,
                energy_eV=energy,
                Cs_mm=cs,
                tile_px=max(32, min(512, min(frame.shape)) // 2 * 2),
            )
        except ValueError:
            continue
        if e.defocus_nm is None:
            continue
        est.extend(
            [float(e.defocus_nm)]
            if e.sign_determined
            else [float(e.defocus_abs_nm), -float(e.defocus_abs_nm)]
        )
    lo_hi = list(base.get("defocus_nm_range") or []) + est
    if not lo_hi:
        lo_hi = [float(d) for d in doms] if doms else []
    if not lo_hi:
        return None
    return ImagingDomain(
        defocus_nm_range=(min(lo_hi), max(lo_hi)),
        defocus_nm=sorted(set([float(d) for d in base.get("defocus_nm") or []] + est)),
        energy_eV=energy,
        Cs_mm=cs,
        focal_spread_A=float(base.get("focal_spread_A") or 10.0),
        dose_e_per_A2=base.get("dose_e_per_A2"),
        sampling_A=sampling,
        source=(
            ("the parent model's domain" if base else "the simulator's defaults")
            + f" and {len(est)} estimated defoci of the training frames"
        ),
    ).model_dump()


def _has_domain(dataset, d) -> bool:
    try:
        dataset.defocus_index(d)
    except Exception:  # noqa: BLE001 - not in this dataset
        return False
    return True


# --------------------------------------------------------------- after training
class OODFitStopped(Exception):
    """The fit was stopped by the caller (internal: :func:`fit_ood_after_training` reports it)."""


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
    max_samples: int | None = None,
    batch_size: int | None = None,
    progress: ProgressCallback | None = None,
    seed: int | None = None,
    config: OODFitConfig | None = None,
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
    max_samples, batch_size, seed
        Override the fields of ``config`` (:class:`OODFitConfig`).
    progress
        Called as ``progress(done, total, message)`` after each batch.

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
    cfg = _config(config, max_samples=max_samples, batch_size=batch_size, seed=seed)
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
    from ...training.loop import _stop_fn  # the one stop convention (Event or callable)

    should_stop = None if stop is None else _stop_fn(stop)
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
