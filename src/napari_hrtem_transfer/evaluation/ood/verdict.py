"""One OOD verdict per frame: a score, a calibrated caution flag, and the reasons.

score = network + ps_weight * max(ps_distance - 1, 0) + physics_weight * n_physics
        + defocus_weight * defocus_excess / defocus_scale

* ``network``: the format-3 score (boundary entropy, band width, feature distance;
  :meth:`~.reference.OODReference.network_terms`);
* ``ps_distance``: the power-spectrum distance to the training images in units of their
  median (:mod:`.components`);
* ``n_physics``: the number of physics reasons other than the defocus (blank, lattice
  everywhere, a pixel size outside the model's domain or implausible, confident particles
  without support);
* the defocus excess over the training range plus margin [nm] (weight 0 by default: see
  :class:`VerdictConfig`).

``caution`` is ``score > caution_level`` **or** any physics reason: a frame whose estimated
defocus lies outside the training range, that has no signal above shot noise, that shows
lattice fringes everywhere and no amorphous support, or whose spectrum says its pixel size is
wrong, is flagged whatever the network thinks of it (a network that is sure and wrong cannot
lower the verdict).  The caution level is calibrated so that ``false_alarm_rate`` (5 %) of
held-out frames of the training domain are flagged, physics reasons included
(:func:`~.fit.calibrate_caution_level`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ...errors import CheckpointError
from . import components as comp
from .reference import LEGACY_CAUTION_LEVEL, OODReference

#: With the segmentation's probabilities, the encoder features of a frame are pooled over at
#: most this many of its tiles, evenly spread (large frames: bounds the OOD pass's cost; frames
#: up to this many tiles -- every training and calibration frame -- are pooled whole).
ENCODER_MAX_TILES = 3


class VerdictConfig(BaseModel):
    """The verdict's settings (defaults live here, once; stored with the calibration)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    ps_weight: float = Field(1.0, ge=0)
    """Weight of ``max(ps_distance - 1, 0)`` in the score.  1 by measurement
    (``benchmarks/bench_ood_entropy.py``, wide series, level recalibrated each time): weight
    0 ranks the domains by loss a little better (Spearman 0.81 against 0.74), but its level
    falls so far that 40 % of the in-range frames are flagged, against 2 % at weight 1
    (docs/ood_score.md, "A candidate measured and not adopted")."""
    physics_weight: float = Field(5.0, ge=0)
    """Score added per physics reason other than the defocus (blank, lattice, pixel size,
    confident particles without support)."""
    defocus_weight: float = Field(0.0, ge=0)
    """Score added per ``defocus_scale_nm`` of defocus excess.  0 by measurement: the sign is
    rarely determined (Cs = 5 µm), and on the wide series the loss is asymmetric (overfocus
    -40..-60 nm hurts, underfocus +40..+60 nm hardly), so any ``|defocus|`` term lowers the
    ranking (Spearman per domain 0.76 -> 0.65 at 0.5 per 10 nm, docs/ood_score.md);
    out-of-range frames are flagged by their reason instead."""
    lattice_peak_fraction: float = Field(0.95, ge=0, le=1)
    """A frame without Thon rings is "lattice everywhere" when the CTF estimator finds it
    periodic in each quarter of the crop, or when this fraction of its spectrum's excess power
    lies in sharp peaks (training-like Au frames near focus: up to 0.90)."""
    defocus_margin_nm: float = Field(10.0, ge=0)
    """Estimated defoci within this margin of the training range are in domain [nm]
    (estimate error ~1-3 nm, per-image jitter, zero-focus calibration offset)."""
    defocus_scale_nm: float = Field(10.0, gt=0)
    """Unit of the defocus excess in the physics term [nm]."""
    blank_contrast: float = Field(0.15, ge=0)
    """Spectral contrast [nats] below which a frame has no signal above shot noise
    (training-like frames: 0.28-1.9, shot noise alone: 0 +- 0.05)."""
    blank_cv: float = Field(1e-3, ge=0)
    """Relative intensity spread (std / mean) below which a frame has no contrast."""
    hf_deficit_z: float = Field(4.0, ge=0)
    """High-frequency deficit (training spreads) above which the frame has too little detail
    for the model's pixel size (coarser than its domain, or an implausible pixel size)
    (training-like and wide-series frames: at most 1.2; a frame at 2x or 3x its true pixel
    size: 7.3 / 6.7)."""
    confident_fraction: float = Field(0.01, ge=0, le=1)
    """Predicted particle fraction above which a segmentation of a frame without support
    (blank, lattice only) is itself a reason."""
    min_ctf_overlap: float = Field(0.0, ge=0, le=1)
    """CTF overlap with the training defoci below which the frame is flagged (0 = off)."""
    ctf_crop_px: int = Field(1024, ge=64)
    """Side of the central crop the CTF is estimated on [px] (bounds the cost)."""
    min_frame_px: int = Field(32, ge=1)
    """Frames with a side under this at the model's pixel size [px] are flagged: too small for
    the spectrum and Thon-ring checks, and the network sees little context (the segmentation
    reflect-pads them to ``SegmentConfig.min_frame_px``)."""
    false_alarm_rate: float = Field(0.05, gt=0, lt=1)
    """Fraction of held-out training-domain frames the caution level lets through flagged."""


@dataclass
class OODScores:
    """The verdict on frames (N,) (also for format 2/3 references: no power-spectrum term).

    Attributes
    ----------
    score
        The verdict score (N,): ~0 training-like, growing with distance.
    distance
        Raw feature distance (N,).
    entropy
        Mean predictive entropy per frame [nats] (N,).
    proba
        Foreground probabilities (N, H, W) float32, or None when they were passed in.
    caution_level
        The reference's calibrated "treat with caution" level.
    boundary_entropy, band_width_px
        Mean entropy on the predicted particle boundary [nats] and the width of the
        uncertain band around it [px] per frame (N,); NaN without a predicted boundary.
    reasons
        Per frame, short strings naming each cause and its value (empty when in domain).
    components
        Per frame, the components' values (dict of floats, bools or None).
    estimated_defocus_nm
        Per frame, the CTF estimate [nm] (signed when the sign is determined, else the
        magnitude; None without Thon rings).
    defocus_sign_determined
        Per frame, whether the estimate's sign is known.
    physics_flag
        Per frame, whether a physics reason applies (flagged regardless of the score).
    """

    score: np.ndarray
    distance: np.ndarray
    entropy: np.ndarray
    proba: np.ndarray | None
    caution_level: float = LEGACY_CAUTION_LEVEL
    boundary_entropy: np.ndarray | None = None
    band_width_px: np.ndarray | None = None
    reasons: list[list[str]] = field(default_factory=list)
    components: list[dict[str, Any]] = field(default_factory=list)
    estimated_defocus_nm: list[float | None] = field(default_factory=list)
    defocus_sign_determined: list[bool] = field(default_factory=list)
    physics_flag: np.ndarray | None = None

    @property
    def caution(self) -> np.ndarray:
        """Per frame: score above the caution level, or a physics reason (N,) bool."""
        over = np.asarray(self.score) > self.caution_level
        if self.physics_flag is not None:
            over = over | np.asarray(self.physics_flag, bool)
        return over


def _input_checks(frame: np.ndarray, cfg: VerdictConfig) -> tuple[dict[str, Any], list[str]]:
    """Signal above shot noise, on a frame at its own pixel size."""
    x = np.asarray(frame)
    mean, sd = comp.mean_std(x)
    out: dict[str, Any] = {"intensity_mean": mean, "intensity_cv": None, "spectral_contrast": None}
    reasons: list[str] = []
    if mean <= 0 and sd > 0:
        reasons.append(f"blank frame: mean intensity {mean:.3g} <= 0 (no beam)")
    elif mean > 0:
        cv = sd / mean
        out["intensity_cv"] = cv
        if cv < cfg.blank_cv:
            reasons.append(f"blank frame: no signal above shot noise (std / mean {cv:.1e})")
    if sd == 0:
        reasons.append("blank frame: constant intensity")
        return out, reasons
    if min(x.shape) >= 32:
        sc = float(comp.spectral_contrast(comp.power_spectrum_profiles(x))[0])
        out["spectral_contrast"] = sc
        if sc < cfg.blank_contrast and not reasons:
            reasons.append(
                f"blank frame: no signal above shot noise (flat spectrum, contrast {sc:.2f})"
            )
    return out, reasons


def _small_frame_reason(native_hw: tuple[int, int], work_hw: tuple[int, int],
                        model_sampling_A: float, min_px: int) -> str | None:
    """The reason for a frame too small to judge: ``work_hw`` [px], its size at the model's
    pixel size before any padding, under ``min_px`` (None when it is large enough)."""
    if min(work_hw) >= min_px:
        return None
    (ny, nx), (wy, wx) = native_hw, work_hw
    at = "" if (ny, nx) == (wy, wx) else f" ({wy}x{wx} px at the model's {model_sampling_A:g} Å/px)"
    return (f"frame too small to judge: {ny}x{nx} px{at}, under {min_px} px: "
            "no power spectrum or Thon rings to check, and the model sees little context")


def frame_components(
    work_frames: np.ndarray,
    *,
    native_frames: np.ndarray | None = None,
    native_sampling_A: float | None = None,
    model_sampling_A: float | None = None,
    domain: dict | None = None,
    config: VerdictConfig | None = None,
    ps_settings: dict | None = None,
    conditions: dict | None = None,
    work_size_px: tuple[int, int] | None = None,
) -> list[dict[str, Any]]:
    """The network-free components of frames (one dict per frame): input checks on the
    native frames, the CTF physics against ``domain`` (rings fitted with the beam energy and
    Cs recorded with the frames, ``conditions``, where known), and the power-spectrum profile
    of the work frames (``_profile``, at the model's pixel size).  No reference needed (the
    fit computes them for its sample before the reference exists).  ``work_size_px``: the
    work frames' size before padding (default: their shape); frames under
    ``config.min_frame_px`` there get the reason "frame too small to judge" and no spectrum
    profile (it would be the padding's)."""
    cfg = config or VerdictConfig()
    x = np.asarray(work_frames)
    x = x[None] if x.ndim == 2 else x
    nat = x if native_frames is None else np.asarray(native_frames)
    nat = nat[None] if nat.ndim == 2 else nat
    if len(nat) != len(x):
        raise CheckpointError(f"{len(nat)} native frames for {len(x)} work frames")
    s_model = model_sampling_A or (domain or {}).get("sampling_A") or 0.2
    s_nat = native_sampling_A or s_model
    st = ps_settings or {}
    work_hw = tuple(int(n) for n in (work_size_px or x.shape[1:]))
    prof = None
    if min(x.shape[1:]) >= 32:
        prof = comp.power_spectrum_profiles(
            x,
            tile_px=int(st.get("tile_px", comp.PS_TILE_PX)),
            n_bins=int(st.get("n_bins", comp.PS_BINS)),
            max_tiles=int(st.get("max_tiles", comp.PS_MAX_TILES)),
        )
    out = []
    for i in range(len(x)):
        c, blank_reasons = _input_checks(nat[i], cfg)
        pc = comp.physics_components(
            nat[i],
            float(s_nat),
            domain,
            crop_px=cfg.ctf_crop_px,
            defocus_margin_nm=cfg.defocus_margin_nm,
            min_overlap=cfg.min_ctf_overlap,
            lattice_peak_fraction=cfg.lattice_peak_fraction,
            conditions=conditions,
        )
        c["_physics_reasons"] = list(pc.pop("physics_reasons"))
        small = _small_frame_reason(nat[i].shape[-2:], work_hw, float(s_model), cfg.min_frame_px)
        if small:
            c["_physics_reasons"].insert(0, small)
        c["_blank_reasons"] = blank_reasons
        c["_profile"] = None if prof is None or small else prof[i]
        c.update(pc)
        out.append(c)
    return out


def combine(
    ref: OODReference,
    stats,
    comps: list[dict[str, Any]],
    *,
    config: VerdictConfig | None = None,
    caution_level: float | None = None,
    zoom: float | None = None,
    model_sampling_A: float | None = None,
) -> OODScores:
    """The verdict from the network's statistics and the frames' components."""
    cfg = config or VerdictConfig(**(ref.verdict or {}))
    terms = ref.network_terms(
        stats.features, stats.entropy, stats.boundary_entropy, stats.band_width_px
    )
    net = np.asarray(terms["network"], dtype=np.float64)
    n = net.size
    if len(comps) != n:
        raise CheckpointError(f"{n} network scores for {len(comps)} frames")
    s_model = model_sampling_A or (ref.domain or {}).get("sampling_A") or 0.2
    frac = getattr(stats, "particle_fraction", None)
    level = float(ref.caution if caution_level is None else caution_level)
    scores = np.empty(n)
    reasons_all: list[list[str]] = []
    comps_all: list[dict[str, Any]] = []
    phys_flag = np.zeros(n, bool)
    defoci: list[float | None] = []
    signs: list[bool] = []
    ent = None if stats.entropy is None else np.asarray(stats.entropy, float).reshape(-1)
    for i in range(n):
        src = comps[i]
        c: dict[str, Any] = {k: float(v[i]) for k, v in terms.items()}
        # the network's own estimate of its per-pixel loss (scored through
        # ``mean_entropy_z`` where the reference has a log_entropy_weight)
        c["mean_entropy_nats"] = None if ent is None else float(ent[i])
        c.update({k: v for k, v in src.items() if not k.startswith("_")})
        prof = src.get("_profile")
        ps_d = hf = None
        if prof is not None and ref.ps_mean is not None:
            ps_d = float(ref.ps_distance(prof)[0])
            hf = float(comp.high_frequency_deficit(prof, ref.ps_mean, ref.ps_scale)[0])
            c["power_spectrum_distance"] = ps_d
            c["high_frequency_deficit_z"] = hf
        blank_reasons = list(src.get("_blank_reasons") or [])
        pr = list(src.get("_physics_reasons") or [])
        phys: list[str] = []
        blank = bool(blank_reasons) or bool(src.get("blank"))
        if blank:
            phys.extend(blank_reasons or [r for r in pr if r.startswith("blank")])
            # a blank frame's "rings" are noise: no defocus reason from them
            if blank_reasons:
                c["estimated_defocus_nm"] = None
                c["ctf_overlap"] = None
            c["defocus_excess_nm"] = 0.0
        else:
            phys.extend(pr)
        if hf is not None and hf > cfg.hf_deficit_z and not blank:
            phys.append(pixel_size_reason(hf, zoom, float(s_model)))
        fr = None if frac is None else float(frac[i])
        c["particle_fraction"] = fr
        no_support = bool(src.get("periodic")) and not bool(src.get("amorphous"))
        if fr is not None and fr > cfg.confident_fraction and (blank or no_support):
            what = "a blank frame" if blank else "a frame without amorphous support"
            phys.append(f"confident particles ({100 * fr:.0f} % of the frame) in {what}")
        excess = float(c.get("defocus_excess_nm") or 0.0)
        n_cat = sum(1 for r in phys if not r.startswith("estimated defocus"))
        physics = cfg.physics_weight * n_cat + cfg.defocus_weight * excess / cfg.defocus_scale_nm
        ps_term = 0.0 if ps_d is None else cfg.ps_weight * max(ps_d - 1.0, 0.0)
        s = float(net[i]) + ps_term + physics
        c["physics"] = physics
        scores[i] = s
        reasons = list(phys)
        if s > level and not phys:
            reasons.extend(_score_reasons(c, s, level))
        reasons_all.append(reasons)
        comps_all.append(
            {
                k: v if isinstance(v, bool | str) or v is None else comp.finite_or_none(v)
                for k, v in c.items()
            }
        )
        phys_flag[i] = bool(phys)
        defoci.append(comp.finite_or_none(c.get("estimated_defocus_nm")))
        signs.append(bool(c.get("defocus_sign_determined")))
    return OODScores(
        score=scores,
        distance=ref.distance(stats.features),
        entropy=np.asarray(stats.entropy),
        proba=getattr(stats, "proba", None),
        caution_level=level,
        boundary_entropy=stats.boundary_entropy,
        band_width_px=stats.band_width_px,
        reasons=reasons_all,
        components=comps_all,
        estimated_defocus_nm=defoci,
        defocus_sign_determined=signs,
        physics_flag=phys_flag,
    )


#: Zoom (frame px / model px) above which missing high frequencies are explained by the
#: upsampling of a coarser frame (no detail beyond its own Nyquist), not a wrong pixel size.
COARSE_ZOOM = 1.25


def pixel_size_reason(hf_deficit_z: float, zoom: float | None, model_sampling_A: float) -> str:
    """The reason for a frame with too little power above 0.6 Nyquist, saying what was
    measured and what the model expects.

    A frame upsampled from a coarser pixel size (``zoom`` > :data:`COARSE_ZOOM`) has no
    detail finer than its own Nyquist period (2 x its pixel size): it is out of the model's
    pixel-size domain whether or not the pixel size is right.  Without that upsampling the
    frame itself looks upsampled or blurred, so its stated pixel size is in doubt.
    """
    measured = (
        f"power above 0.6 Nyquist {hf_deficit_z:.0f} training spreads below the training images"
    )
    if zoom is not None and zoom > COARSE_ZOOM:
        native = zoom * model_sampling_A
        return (
            f"coarser pixels than the model's domain: {native:.3g} Å/px, upsampled x{zoom:.2f} "
            f"to the model's {model_sampling_A:g} Å/px, holds no detail finer than "
            f"{2 * native:.2g} Å (the model was trained on detail to {2 * model_sampling_A:.2g} "
            f"Å; measured: {measured})"
        )
    return (
        f"implausible pixel size: {measured} at the model's {model_sampling_A:g} Å/px: the "
        "frame looks upsampled or blurred; check its pixel size"
    )


def verdict(
    ref: OODReference,
    stats,
    work_frames: np.ndarray,
    *,
    native_frames: np.ndarray | None = None,
    native_sampling_A: float | None = None,
    model_sampling_A: float | None = None,
    zoom: float | None = None,
    config: VerdictConfig | None = None,
    caution_level: float | None = None,
    conditions: dict | None = None,
    work_size_px: tuple[int, int] | None = None,
) -> OODScores:
    """The verdict on frames from one pass of the network (:class:`~.._model.FrameStats`).

    Parameters
    ----------
    ref
        The model's reference.
    stats
        The network's statistics of ``work_frames`` (features, boundary statistics,
        ``particle_fraction``).
    work_frames
        The frames as the network saw them (N, H, W), at the model's pixel size.
    native_frames, native_sampling_A
        The frames at their own pixel size (before resampling) and that pixel size [Å/px]:
        the blank and CTF checks use them (default: the work frames at the model's).
    model_sampling_A
        The model's pixel size [Å/px] (default: the imaging domain's, else 0.2).
    zoom
        The resampling factor applied (image px / model px), for the reasons' text.
    config
        :class:`VerdictConfig` (default: the one the reference was calibrated with).
    caution_level
        Override the reference's level.
    conditions
        What was recorded with the frames (the reader's metadata): ``energy_eV`` [eV] and
        ``Cs_A`` [Å] fit the Thon rings where given, else the model's training values.
    work_size_px
        The work frames' size before they were padded for the network [px] (default: their
        shape): smaller than ``VerdictConfig.min_frame_px``, a frame is too small to judge.
    """
    cfg = config or VerdictConfig(**(ref.verdict or {}))
    comps = frame_components(
        work_frames,
        native_frames=native_frames,
        native_sampling_A=native_sampling_A,
        model_sampling_A=model_sampling_A,
        domain=ref.domain,
        config=cfg,
        ps_settings=ref.ps_settings,
        conditions=conditions,
        work_size_px=work_size_px,
    )
    return combine(
        ref,
        stats,
        comps,
        config=cfg,
        caution_level=caution_level,
        zoom=zoom,
        model_sampling_A=model_sampling_A,
    )


#: The network's z terms that name a reason above 2 training spreads, with their words.
_Z_REASONS = (
    (
        "boundary_entropy_z",
        "the network is unsure of the particle edges (boundary entropy +{z:.1f} training "
        "spreads)",
    ),
    ("band_width_z", "wide uncertain band around the predicted edges (+{z:.1f} training spreads)"),
    (
        "mean_entropy_z",
        "the network is unsure of the whole frame (mean predictive entropy +{z:.1f} training "
        "spreads)",
    ),
)


def _score_reasons(c: dict[str, Any], score: float, level: float) -> list[str]:
    """The largest contributions of a frame flagged by its score alone, in words."""
    parts = []
    for key, text in _Z_REASONS:
        z = c.get(key)
        if z is not None and z > 2:
            parts.append((z, text.format(z=z)))
    fd = c.get("feature_distance")
    if fd is not None and fd > 0.5:
        parts.append(
            (
                2 * fd,
                f"encoder features unlike the training images (distance "
                f"x{fd + 1:.1f} the training median)",
            )
        )
    ps = c.get("power_spectrum_distance")
    if ps is not None and ps > 1.5:
        parts.append(
            (
                2 * (ps - 1),
                f"power spectrum unlike the training images (distance "
                f"x{ps:.1f} the training median)",
            )
        )
    parts.sort(key=lambda p: -p[0])
    head = f"OOD score {score:.1f} above the caution level {level:.1f}"
    if not parts:
        return [head]
    return [f"{head}: {parts[0][1]}", *[p[1] for p in parts[1:]]]


def ood_scores(
    model: Any,
    frames,
    reference: OODReference | None = None,
    batch_size: int = 4,
    *,
    proba=None,
    tile_px: int | None = None,
    native_frames=None,
    native_sampling_A: float | None = None,
    zoom: float | None = None,
    precision: str = "fp32",
    conditions: dict | None = None,
) -> OODScores:
    """The verdict on frames (N, H, W) (raw counts) against the model's training domain.

    Frames of any size are scored: reflect-padded to the model's stride, pooled over the
    unpadded frame only, and processed in tiles (memory bounded by the tile; tiled and
    whole-frame scores agree to rounding).

    Parameters
    ----------
    model
        Model folder, loaded checkpoint, :class:`~.._model.ScoringModel` or torch module.
    frames
        Frames (N, H, W) or one frame (H, W), at the model's pixel size.
    reference
        The reference; by default the one stored in the model folder.
    batch_size
        Tiles per forward pass.
    proba
        The segmentation's particle probability of the same frames, same shape: its
        entropy is used and only the encoder is run (no second prediction).
    tile_px
        Largest tile side [px] (default :attr:`~.fit.OODFitConfig.tile_px`).
    native_frames, native_sampling_A, zoom
        The frames before resampling to the model's pixel size, their pixel size [Å/px] and
        the zoom applied (see :func:`verdict`); default: ``frames`` themselves.
    precision
        Precision of the encoder pass (``segment`` passes its own: bf16 where the hardware
        has it; the scores then differ from fp32 by rounding only).
    conditions
        Beam energy ``energy_eV`` [eV] and ``Cs_A`` [Å] recorded with the frames, for the
        Thon-ring fit (default: the model's training values).

    Raises
    ------
    CheckpointError
        If no reference is given and the model folder has none.
    """
    from .._model import DEFAULT_TILE_PX, ScoringModel

    sm = model if isinstance(model, ScoringModel) else ScoringModel(model)
    sm.precision = precision
    if reference is None:
        if sm.model_dir is None:
            raise CheckpointError("pass the OOD reference for a model that is not a folder.")
        reference = OODReference.load(sm.model_dir)
    x = np.asarray(frames.compute() if hasattr(frames, "compute") else frames)
    st = sm.frame_stats(
        x,
        proba=proba,
        want_proba=proba is None,
        batch_size=batch_size,
        tile_px=tile_px or DEFAULT_TILE_PX,
        max_tiles=ENCODER_MAX_TILES,
    )
    return verdict(
        reference,
        st,
        x,
        native_frames=native_frames,
        native_sampling_A=native_sampling_A,
        model_sampling_A=sm.sampling_A,
        zoom=zoom,
        conditions=conditions,
    )
