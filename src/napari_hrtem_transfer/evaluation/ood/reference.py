"""The stored OOD reference of a model: its schema (pydantic), the arrays, file I/O.

A reference is two files beside the checkpoint (no pickle):

* ``ood_reference.safetensors``: the arrays (feature mean and scale, the selected feature
  columns, and from format 4 the training images' power-spectrum profile mean and scale);
* ``ood_reference.json``: everything else, validated by :class:`ReferenceFile` on reading:
  the score's constants, the calibrated caution level and how it was found, and (format 4)
  the model's :class:`ImagingDomain`.

Formats 2 (``distance / median - 1 + w * entropy excess``) and 3 (the uncertainty score
without an imaging domain) are read and scored with their own formula; format 3 files get an
imaging domain from their training defoci and the simulator's defaults.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ...errors import CheckpointError, ConfigError

#: File names of the stored reference, in the model folder.
OOD_ARRAYS = "ood_reference.safetensors"
OOD_JSON = "ood_reference.json"
METHODS = ("diag",)
#: How the entropy enters the score: "excess" adds ``w * max(e, 0)``, "signed" adds ``w * e``.
ENTROPY_MODES = ("excess", "signed")
#: Default distance method, chosen by measurement (see the package docstring).
DEFAULT_METHOD = "diag"
#: Encoder stages pooled into the features by default (0 = highest resolution).
DEFAULT_STAGES: str | tuple[int, ...] = "all-but-deepest"
#: Default weight of the predictive entropy in the (format 2) score.
DEFAULT_ENTROPY_WEIGHT = 2.0
#: Default way the entropy enters the score (see :data:`ENTROPY_MODES`).
DEFAULT_ENTROPY_MODE = "excess"
#: What a reference scores: "uncertainty" (format 3 and 4: boundary entropy, band width and
#: the feature distance) or "features+entropy" (format 2 references, still read).
SCORE_KINDS = ("uncertainty", "features+entropy")
#: Weight of the (positive part of the) relative feature distance ``d / d_ref - 1`` in the
#: "uncertainty" score.
DEFAULT_FEATURE_WEIGHT = 2.0
#: Weight of ``max(z(ln H), -3)`` (H: the frame's mean predictive entropy [nats]) in the
#: "uncertainty" score of fits on a model's own training frames: one training spread counts
#: as much as one of the boundary terms.  On frames the model was trained on, ln H is low and
#: narrow (memorised), so held-out frames of the same domain get a large z: with weight 3 the
#: AUC of confidently wrong far frames against held-out training-domain frames fell from 0.95
#: to 0.70 (tiny -10 nm model, tests/evaluation/test_ood.py; docs/ood_score.md).
DEFAULT_LOG_ENTROPY_WEIGHT = 1.0
#: The same weight for fits on held-out frames (:func:`~.held_out.fit_ood_on_held_out`, the
#: shipped model's): there ln H's median and spread are those of new frames.  Measured on five
#: wide series (docs/ood_score.md, "The frame's mean entropy"): weight 1 -> 3 raises the
#: per-domain Spearman with the true loss 0.87 -> 0.98 on the issue's series and on the two
#: simulated after the choice 0.89 -> 0.93 and 0.62 -> 0.69, with no more in-range flags.
HELD_OUT_LOG_ENTROPY_WEIGHT = 3.0
#: Lower clip of the two uncertainty terms of the score (in units of the training spread).
Z_FLOOR = 3.0
#: Floor of the robust spreads of the boundary statistics [nats] and [px].
SPREAD_FLOOR = 1e-4
FORMAT_VERSION = "4"
READABLE_FORMATS = ("2", "3", "4")
#: "Treat with caution" level of scores without a calibrated one: a format 2 reference
#: without a level, and the default of :class:`~.verdict.OODScores` (every reference this
#: version writes has a finite, calibrated level).
LEGACY_CAUTION_LEVEL = 1.0


class ImagingDomain(BaseModel):
    """What a model was trained on, in physical units (stored in the OOD reference).

    Attributes
    ----------
    defocus_nm_range
        Lowest and highest training defocus [nm] (abTEM sign: positive = underfocus).
    defocus_nm
        The training defoci [nm] (domain centres; annotated frames: their estimates).
    energy_eV
        Beam energy [eV].
    Cs_mm
        Spherical aberration [mm].
    focal_spread_A
        Focal spread [Å].
    dose_e_per_A2
        Electron dose [e/Å²] (None: noise-free or unknown).
    sampling_A
        Pixel size of the training images [Å/px].
    source
        Where the values came from (dataset metadata, parent model, estimates).
    """

    model_config = ConfigDict(extra="ignore")

    defocus_nm_range: tuple[float, float]
    defocus_nm: list[float] = Field(default_factory=list)
    energy_eV: float = 300e3
    Cs_mm: float = 0.005
    focal_spread_A: float = 10.0
    dose_e_per_A2: float | None = None
    sampling_A: float | None = None
    source: str = ""


@dataclass(kw_only=True)
class UncertaintyConstants:
    """The constants of the "uncertainty" network term, with their defaults (one home).

    Shared, field for field, by the stored file (:class:`ReferenceFile`: pydantic takes the
    annotated fields of a stdlib dataclass base as its own) and the in-memory
    :class:`OODReference` (keyword-only there).

    Attributes
    ----------
    kind
        What the network term scores (:data:`SCORE_KINDS`).
    boundary_ref, boundary_spread
        Median and robust spread (1.4826 x MAD) of the training images' mean predictive
        entropy on the predicted particle boundary [nats].
    log_band_ref, log_band_spread
        The same for ``ln`` of the width [px] of the uncertain band around the predicted
        edges.
    feature_weight
        Weight of ``max(distance / distance_ref - 1, 0)`` in the network term.
    log_entropy_ref, log_entropy_spread
        Median and robust spread of ``ln`` of the training images' mean predictive entropy
        over the whole frame [ln nats]: the network's own estimate of its per-pixel loss.
    log_entropy_weight
        Weight of ``max(z(ln H), -3)`` in the network term (0 in references written
        before it existed, which then score as they did).
    """

    kind: str = "features+entropy"
    boundary_ref: float = 0.0
    boundary_spread: float = 1.0
    log_band_ref: float = 0.0
    log_band_spread: float = 1.0
    feature_weight: float = DEFAULT_FEATURE_WEIGHT
    log_entropy_ref: float = 0.0
    log_entropy_spread: float = 1.0
    log_entropy_weight: float = 0.0


class ReferenceFile(BaseModel, UncertaintyConstants):
    """Schema of ``ood_reference.json`` (formats 2, 3 and 4).

    Unknown keys are ignored (a newer minor version may add some); wrong types are a
    :class:`~napari_hrtem_transfer.errors.CheckpointError` on reading.
    """

    model_config = ConfigDict(extra="ignore")

    format_version: Literal["2", "3", "4"] = "2"
    method: str
    distance_ref: float
    entropy_ref: float = 1.0
    entropy_weight: float = 0.0
    entropy_mode: str = "excess"
    n_images: int = 0
    n_features: int | None = None
    stages: list[int] | None = None
    weights_sha256: str | None = None
    score: str | None = None
    caution_level: float | None = None
    calibration: dict[str, Any] = Field(default_factory=dict)
    info: dict[str, Any] = Field(default_factory=dict)
    # format 4
    imaging_domain: ImagingDomain | None = None
    power_spectrum: dict[str, Any] | None = None
    verdict: dict[str, Any] = Field(default_factory=dict)


#: The fields of :class:`UncertaintyConstants` ("kind" and the network term's constants).
UNCERTAINTY_FIELDS = tuple(f.name for f in fields(UncertaintyConstants))

#: The fields that :class:`ReferenceFile` and :class:`OODReference` share, read back as
#: they were written (``save`` overrides a few: the format, the JSON-able dictionaries).
_STORED_AS_IS = (
    "format_version",
    "method",
    "distance_ref",
    "entropy_ref",
    "entropy_weight",
    "entropy_mode",
    "n_images",
    "weights_sha256",
    *UNCERTAINTY_FIELDS,
    "caution_level",
    "calibration",
    "info",
    "verdict",
)


@dataclass
class OODReference(UncertaintyConstants):
    """The training-domain distribution of one model's inputs and outputs.

    Attributes
    ----------
    method
        ``"diag"``: per-feature standardisation.
    mean, scale
        Mean and standard deviation of each pooled feature over the training images, (D,).
    distance_ref
        Median feature distance of the training images (the unit of the feature term).
    entropy_ref
        Median mean predictive entropy of the training images [nats].
    entropy_weight
        Weight of the entropy term in the (format 2) score.
    n_images
        Number of training image-transforms the reference was fitted on.
    info
        Provenance: training domain(s) (defocus [nm]), dataset, date, ...
    caution_level
        Verdict score above which a frame is treated with caution, calibrated on held-out
        frames (see :func:`~.fit.calibrate_caution_level`); None only for old files.
    calibration
        How the caution level was found (method, quantile, frames used, false-alarm rate).
    kind, boundary_ref, boundary_spread, log_band_ref, log_band_spread, feature_weight
        The constants of the "uncertainty" network term (:class:`UncertaintyConstants`,
        keyword-only).
    imaging_domain
        The model's :class:`ImagingDomain` (None: unknown, old file without training defoci).
    ps_mean, ps_scale
        Mean and standard deviation of the training images' radially averaged, normalised
        log power spectrum (:func:`~.components.power_spectrum_profiles`), (n_bins,); None
        for references of format 2/3.
    ps_distance_ref
        Median power-spectrum distance of the training images.
    ps_settings
        How the profiles were computed (tile size [px], bins, q range [1/Å]).
    verdict
        The verdict's settings the caution level was calibrated with
        (:class:`~.verdict.VerdictConfig` fields).
    format_version
        The file format this reference was read from (or will be written as).
    """

    method: str
    mean: np.ndarray
    scale: np.ndarray
    distance_ref: float = 1.0
    entropy_ref: float = 1.0
    entropy_weight: float = DEFAULT_ENTROPY_WEIGHT
    n_images: int = 0
    info: dict = field(default_factory=dict)
    weights_sha256: str | None = None
    columns: np.ndarray | None = None
    entropy_mode: str = DEFAULT_ENTROPY_MODE
    caution_level: float | None = None
    calibration: dict = field(default_factory=dict)
    imaging_domain: dict | None = None
    ps_mean: np.ndarray | None = None
    ps_scale: np.ndarray | None = None
    ps_distance_ref: float = 1.0
    ps_settings: dict = field(default_factory=dict)
    verdict: dict = field(default_factory=dict)
    format_version: str = FORMAT_VERSION

    @property
    def caution(self) -> float:
        """The "treat with caution" level: calibrated if available, else 1 (old files only)."""
        c = self.caution_level
        return float(c) if c is not None and np.isfinite(c) else LEGACY_CAUTION_LEVEL

    @property
    def domain(self) -> dict | None:
        """The imaging domain, from the file or (old files) from the training defoci."""
        if self.imaging_domain:
            return dict(self.imaging_domain)
        doms = [float(d) for d in (self.info or {}).get("train_defocus_nm") or []]
        if not doms:
            return None
        return ImagingDomain(
            defocus_nm_range=(min(doms), max(doms)),
            defocus_nm=doms,
            source="training defoci of the reference's info; other values: simulator defaults",
        ).model_dump()

    def _select(self, features: np.ndarray) -> np.ndarray:
        f = np.asarray(features, dtype=np.float64)
        if f.ndim == 1:
            f = f[None]
        if self.columns is not None and f.ndim == 2 and f.shape[1] != self.mean.size:
            if f.shape[1] <= int(np.max(self.columns)):
                raise CheckpointError(
                    f"features of shape {f.shape} do not match the stored OOD reference: was "
                    "the reference fitted on another model?"
                )
            f = f[:, self.columns]
        return f

    def distance(self, features: np.ndarray) -> np.ndarray:
        """Distance (N,) of pooled features from the training distribution.

        ``features`` is either the full pooled vector (``FrameStats.features`` of
        :meth:`~.._model.ScoringModel.frame_stats`)
        (the stored ``columns`` are selected) or already the selected (N, D) columns.
        """
        f = self._select(features)
        if f.ndim != 2 or f.shape[1] != self.mean.size:
            raise CheckpointError(
                f"features of shape {f.shape} do not match the stored OOD reference "
                f"({self.mean.size} features): was the reference fitted on another model?"
            )
        z = (f - self.mean) / self.scale
        return np.sqrt(np.mean(z * z, axis=1))

    def ps_distance(self, profiles: np.ndarray) -> np.ndarray | None:
        """RMS standardised distance (N,) of power-spectrum profiles from the training mean,
        in units of the training images' median distance; None without power-spectrum stats."""
        if self.ps_mean is None or self.ps_scale is None:
            return None
        p = np.atleast_2d(np.asarray(profiles, dtype=np.float64))
        if p.shape[1] != self.ps_mean.size:
            raise CheckpointError(
                f"power-spectrum profiles of {p.shape[1]} bins do not match the reference's "
                f"{self.ps_mean.size}."
            )
        z = (p - self.ps_mean) / self.ps_scale
        return np.sqrt(np.mean(z * z, axis=1)) / max(self.ps_distance_ref, 1e-12)

    def score(self, features: np.ndarray, *args: Any, **kwargs: Any) -> np.ndarray:
        """The network term (N,): ~0 for training-like frames, growing with uncertainty.

        ``max(z(b), -3) + max(z(ln w), -3) + feature_weight * max(d / d_ref - 1, 0)`` for
        "uncertainty" references (format 2: ``d / d_ref - 1 + entropy term``); the verdict
        (:func:`~.verdict.ood_scores`) adds the input and physics terms.  Takes the
        arguments of :meth:`network_terms`.
        """
        return self.network_terms(features, *args, **kwargs)["network"]

    def network_terms(
        self,
        features: np.ndarray,
        entropy: np.ndarray | None = None,
        boundary_entropy: np.ndarray | None = None,
        band_width_px: np.ndarray | None = None,
    ) -> dict[str, np.ndarray]:
        """The network term and its parts (N,) each: ``boundary_entropy_z``,
        ``band_width_z``, ``feature_distance`` (``d / d_ref - 1``) and ``network``.

        Parameters
        ----------
        features
            Pooled encoder features (N, D) (:attr:`~.._model.FrameStats.features`).
        entropy
            Mean predictive entropy per frame [nats] (format 2 references).
        boundary_entropy, band_width_px
            Boundary statistics per frame [nats], [px] ("uncertainty" references); NaN
            (no predicted boundary) adds nothing.
        """
        d = self.distance(features)
        f = d / self.distance_ref - 1.0
        if self.kind == "uncertainty":
            if boundary_entropy is None or band_width_px is None:
                raise ConfigError(
                    "this OOD reference scores the uncertainty on the predicted particle "
                    "boundary; pass boundary_entropy and band_width_px (see FrameStats)."
                )
            zb = _robust_z(boundary_entropy, self.boundary_ref, self.boundary_spread)
            zb = np.maximum(zb, -Z_FLOOR)
            lw = np.log(np.maximum(np.asarray(band_width_px, dtype=np.float64), 1e-12))
            zw = np.maximum(_robust_z(lw, self.log_band_ref, self.log_band_spread), -Z_FLOOR)
            net = zb + zw + self.feature_weight * np.maximum(f, 0.0)
            out = {"boundary_entropy_z": zb, "band_width_z": zw, "feature_distance": f}
            if self.log_entropy_weight > 0:
                if entropy is None:
                    raise ConfigError(
                        "this OOD reference scores the frame's mean predictive entropy; "
                        "pass entropy (see FrameStats)."
                    )
                lh = np.log(np.maximum(np.asarray(entropy, dtype=np.float64), 1e-12))
                zh = _robust_z(lh, self.log_entropy_ref, self.log_entropy_spread)
                zh = np.maximum(zh, -Z_FLOOR)
                net = net + self.log_entropy_weight * zh
                out["mean_entropy_z"] = zh
            return {**out, "network": net}
        w = float(self.entropy_weight)
        net = f
        if w > 0:
            if entropy is None:
                raise ConfigError("this OOD reference mixes in the predictive entropy; pass it.")
            e = np.asarray(entropy, float) / self.entropy_ref - 1.0
            net = f + w * (e if self.entropy_mode == "signed" else np.maximum(e, 0.0))
        return {"feature_distance": f, "network": net}

    def score_stats(self, stats) -> np.ndarray:
        """The network term of a :class:`~.._model.FrameStats` (one pass over frames)."""
        return self.score(
            stats.features, stats.entropy, stats.boundary_entropy, stats.band_width_px
        )

    # storage --------------------------------------------------------------------------
    def save(self, model_dir: str | os.PathLike) -> tuple[Path, Path]:
        """Write ``ood_reference.safetensors`` and ``ood_reference.json`` atomically."""
        from safetensors.numpy import save_file

        from ...io.atomic import atomic_path
        from .._files import write_text_atomic

        if self.caution_level is None or not math.isfinite(float(self.caution_level)):
            raise ConfigError(
                "refusing to write an OOD reference without a finite caution level; "
                "calibrate it first (fit_ood_after_training does)."
            )
        d = Path(model_dir)
        d.mkdir(parents=True, exist_ok=True)
        arrays = {"mean": self.mean.astype(np.float64), "scale": self.scale.astype(np.float64)}
        if self.columns is not None:
            arrays["columns"] = np.asarray(self.columns, dtype=np.int64)
        if self.ps_mean is not None and self.ps_scale is not None:
            arrays["ps_mean"] = np.asarray(self.ps_mean, dtype=np.float64)
            arrays["ps_scale"] = np.asarray(self.ps_scale, dtype=np.float64)
        with atomic_path(d / OOD_ARRAYS) as tmp:
            save_file(arrays, str(tmp))
        meta = ReferenceFile.model_validate(
            {
                **{k: getattr(self, k) for k in _STORED_AS_IS},
                "format_version": FORMAT_VERSION,
                "entropy_weight": self.entropy_weight if self.kind != "uncertainty" else 0.0,
                "n_features": int(self.mean.size),
                "stages": self.info.get("stages"),
                "score": (
                    "verdict score = network + ps_weight * max(ps_distance - 1, 0) + physics; "
                    "network = max(z(b), -3) + max(z(ln w), -3) + feature_weight * "
                    "max(distance / distance_ref - 1, 0) + log_entropy_weight * "
                    "max(z(ln H), -3) (b: mean entropy on the predicted boundary [nats], "
                    "w: uncertain band width [px], H: mean predictive entropy of the frame "
                    "[nats]); physics: see docs/ood_score.md"
                ),
                "calibration": _jsonable(self.calibration),
                "info": _jsonable(self.info),
                "verdict": _jsonable(self.verdict),
                "imaging_domain": self.imaging_domain,
                "power_spectrum": (
                    None
                    if self.ps_mean is None
                    else {
                        **_jsonable(self.ps_settings),
                        "distance_ref": float(self.ps_distance_ref),
                    }
                ),
            }
        )
        text = json.dumps(_jsonable(meta.model_dump(mode="json")), indent=1)
        write_text_atomic(d / OOD_JSON, text)
        return d / OOD_ARRAYS, d / OOD_JSON

    @classmethod
    def load(cls, model_dir: str | os.PathLike) -> OODReference:
        """Read the reference stored in ``model_dir`` (formats 2, 3 and 4).

        Raises
        ------
        CheckpointError
            If the files are missing, unreadable or of an unknown format.
        """
        from safetensors.numpy import load_file

        d = Path(model_dir)
        a, j = d / OOD_ARRAYS, d / OOD_JSON
        if not (a.is_file() and j.is_file()):
            raise CheckpointError(
                f"{d} has no OOD reference ({OOD_ARRAYS} + {OOD_JSON}); fit one with "
                f"'hrtem-transfer evaluate --model {d} --data TRAINING.hspy --fit-ood'."
            )
        try:
            arrays = load_file(str(a))
            raw = json.loads(j.read_text())
        except Exception as exc:  # noqa: BLE001 - corrupted file of any kind
            raise CheckpointError(f"cannot read the OOD reference in {d}: {exc}") from exc
        if isinstance(raw, dict) and str(raw.get("format_version", "2")) not in READABLE_FORMATS:
            raise CheckpointError(
                f"the OOD reference in {d} has format {raw.get('format_version')!r}; this "
                f"version reads {', '.join(READABLE_FORMATS)}. Fit it again with "
                f"'hrtem-transfer evaluate --model {d} --data TRAINING.hspy --fit-ood'."
            )
        try:
            meta = ReferenceFile.model_validate(
                {**raw, "format_version": str(raw.get("format_version", "2"))}
            )
        except (ValidationError, TypeError) as exc:
            raise CheckpointError(f"the OOD reference in {d} is malformed: {exc}") from exc
        if (
            meta.method not in METHODS
            or meta.entropy_mode not in ENTROPY_MODES
            or meta.kind not in SCORE_KINDS
        ):
            raise CheckpointError(
                f"the OOD reference in {d} uses a score this version no longer computes "
                f"({meta.method!r}, {meta.entropy_mode!r}); fit it again with "
                f"'hrtem-transfer evaluate --model {d} --data TRAINING.hspy --fit-ood'."
            )
        ps = dict(meta.power_spectrum or {})
        return cls(
            **meta.model_dump(include=set(_STORED_AS_IS)),
            mean=arrays["mean"],
            scale=arrays["scale"],
            columns=arrays.get("columns"),
            imaging_domain=None
            if meta.imaging_domain is None
            else meta.imaging_domain.model_dump(),
            ps_mean=arrays.get("ps_mean"),
            ps_scale=arrays.get("ps_scale"),
            ps_distance_ref=float(ps.pop("distance_ref", 1.0)),
            ps_settings=ps,
        )


def _robust_z(v, ref: float, spread: float) -> np.ndarray:
    """(v - ref) / spread, NaN (no predicted boundary) -> 0."""
    z = (np.asarray(v, dtype=np.float64) - ref) / max(float(spread), SPREAD_FLOOR)
    return np.where(np.isfinite(z), z, 0.0)


def _median_spread(v: np.ndarray) -> tuple[float, float]:
    """Median and robust spread (1.4826 x median absolute deviation) of the finite values."""
    v = np.asarray(v, dtype=np.float64)
    v = v[np.isfinite(v)]
    if not v.size:
        return 0.0, 1.0
    med = float(np.median(v))
    return med, max(1.4826 * float(np.median(np.abs(v - med))), SPREAD_FLOOR)


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return _jsonable(v.tolist())
    if isinstance(v, np.generic):
        return _jsonable(v.item())
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def load_ood_reference(
    model_dir: str | os.PathLike, weights_sha256: str | None = None
) -> OODReference | None:
    """The stored reference of a model folder, or None if it has none.

    Parameters
    ----------
    model_dir
        The checkpoint folder.
    weights_sha256
        The sha256 of the weights being scored (``weights_sha256`` of the sidecar).  When
        given and the reference was fitted on other weights, None is returned (a reference
        left behind by a replaced checkpoint is never used).
    """
    d = Path(model_dir)
    if not (d / OOD_ARRAYS).is_file():
        return None
    ref = OODReference.load(d)
    if weights_sha256 and ref.weights_sha256 and ref.weights_sha256 != weights_sha256:
        return None
    return ref
