"""The reference's statistics from a seeded sample of training image x D4 transforms, read one
batch at a time (network statistics and power-spectrum profiles), its few-image variant
(the parent's statistics), and storing it beside the checkpoint."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ...errors import ConfigError, config_error_from_validation
from ...training.progress import Progress
from . import components as comp
from . import reference
from .calibrate import OODFitStopped, _calibrate_in_sample
from .domain import _domain_from_info
from .reference import OODReference, _median_spread
from .verdict import VerdictConfig, frame_components

ProgressCallback = Progress


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
    method: str = reference.DEFAULT_METHOD,
    entropy_weight: float = reference.DEFAULT_ENTROPY_WEIGHT,
    info: dict | None = None,
    columns: np.ndarray | None = None,
    entropy_mode: str = reference.DEFAULT_ENTROPY_MODE,
    *,
    boundary_entropy: np.ndarray | None = None,
    band_width_px: np.ndarray | None = None,
    feature_weight: float = reference.DEFAULT_FEATURE_WEIGHT,
    log_entropy_weight: float = reference.DEFAULT_LOG_ENTROPY_WEIGHT,
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
    log_entropy_weight
        Weight of ``max(z(ln H), -3)`` in the "uncertainty" score (needs ``entropy``;
        without it, or at 0, the term is off).
    """
    if method not in reference.METHODS:
        raise ConfigError(
            f"unknown OOD method {method!r}; choose one of {', '.join(reference.METHODS)}."
        )
    if entropy_mode not in reference.ENTROPY_MODES:
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
        if entropy is not None and log_entropy_weight > 0:
            h = np.maximum(np.asarray(entropy, dtype=np.float64), 1e-12)
            ref.log_entropy_ref, ref.log_entropy_spread = _median_spread(np.log(h))
            ref.log_entropy_weight = float(log_entropy_weight)
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
        stages = reference.DEFAULT_STAGES
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


#: How the power-spectrum profiles of a reference are computed (stored with it).
PS_SETTINGS = {
    "tile_px": comp.PS_TILE_PX,
    "n_bins": comp.PS_BINS,
    "max_tiles": comp.PS_MAX_TILES,
    "bins": "linear in q, 0.03..1 Nyquist",
}


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
    log_entropy_weight: float = reference.DEFAULT_LOG_ENTROPY_WEIGHT,
) -> tuple[OODReference, _Sample]:
    """Fit on a seeded sample of (item, transform) pairs, one batch in memory at a time.

    Returns the reference (network statistics, power-spectrum statistics, imaging domain,
    an in-sample caution level) and what the sample gave (for a later calibration).  With
    fewer than :data:`FEW_IMAGES` distinct training images and a ``parent`` reference
    (fine-tuning on a few annotated frames), the spreads are floored at the parent's (the
    D4 transforms of one frame have almost no spread: every other frame would look far).
    ``log_entropy_weight``: :data:`~.reference.DEFAULT_LOG_ENTROPY_WEIGHT` for a model's own
    training frames, :data:`~.reference.HELD_OUT_LOG_ENTROPY_WEIGHT` for held-out ones.
    """
    from ...training.data import d4
    from .._model import FrameStats

    pairs = sample_transforms(groups, 8 if cfg.augment else 1, cfg.max_samples, cfg.seed)
    if len(pairs) < 2:
        raise ConfigError(
            f"need at least 2 training images for the OOD reference; got {len(pairs)}."
        )
    vcfg = VerdictConfig()
    ps_settings = dict(PS_SETTINGS)
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
        log_entropy_weight=log_entropy_weight,
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
    cat = np.concatenate
    stats = FrameStats(f, cat(ents), None, None, cat(bnds), cat(bands), cat(fracs))
    sample = _Sample(stats, comps)
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
    constants = [k for k in reference.UNCERTAINTY_FIELDS if k != "kind"]
    for k in ("mean", "scale", "distance_ref", *constants):
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
        ref.log_entropy_spread = max(ref.log_entropy_spread, parent.log_entropy_spread)
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


def fit_ood_reference(
    model: Any,
    images,
    *,
    method: str = reference.DEFAULT_METHOD,
    feature_weight: float = reference.DEFAULT_FEATURE_WEIGHT,
    stages: str | tuple[int, ...] = "default",
    save: bool | str | os.PathLike = True,
    info: dict | None = None,
    progress: ProgressCallback | None = None,
    config: OODFitConfig | None = None,
    domain: dict | None = None,
    **overrides: Any,
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
        (:data:`~.reference.DEFAULT_STAGES`).
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
    config
        How the reference is fitted (default: :class:`OODFitConfig`'s defaults).
    **overrides
        Fields of ``config`` to override (``augment``, ``batch_size``, ``max_samples``,
        ``seed``, ...; None keeps the config's value).

    Returns
    -------
    OODReference
        With an in-sample caution level (the sample's false-alarm quantile; fit with
        :func:`fit_ood_after_training` for a held-out calibration).
    """
    from .._model import ScoringModel

    cfg = _config(config, **overrides)
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


def _config(config: OODFitConfig | None, **overrides: Any) -> OODFitConfig:
    """``config`` (default: the defaults) with the fields in ``overrides`` replaced (None:
    kept); a name that is not a field of :class:`OODFitConfig` is a TypeError."""
    cfg = config or OODFitConfig()
    unknown = sorted(set(overrides) - set(OODFitConfig.model_fields))
    if unknown:
        raise TypeError(
            f"unexpected keyword argument(s) {', '.join(unknown)}: not fields of OODFitConfig "
            f"({', '.join(OODFitConfig.model_fields)})"
        )
    over = {k: v for k, v in overrides.items() if v is not None}
    if not over:
        return cfg
    from pydantic import ValidationError

    try:  # validated like the config itself (model_copy would not check the limits)
        return OODFitConfig.model_validate({**cfg.model_dump(), **over})
    except ValidationError as exc:
        raise config_error_from_validation(exc, source="OOD fit options") from None


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
            "files": [reference.OOD_ARRAYS, reference.OOD_JSON],
            "method": ref.method,
            "n_images": ref.n_images,
            "distance_ref": ref.distance_ref,
            "caution_level": ref.caution_level,
            "weights_sha256": ref.weights_sha256,
        },
        which=which,
    )
