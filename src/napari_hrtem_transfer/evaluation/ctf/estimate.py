"""The per-frame defocus estimate from the Thon rings of the amorphous support.

Method and thresholds: ``docs/ctf.md``.  numpy only (scipy through :mod:`.spectrum`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace

import numpy as np

from .spectrum import _peaks, power_spectrum, radial_profile
from .theory import DEFAULT_CS_MM, DEFAULT_ENERGY_EV, DEFAULT_FOCAL_SPREAD_A, chi_rad, wavelength_A


@dataclass(frozen=True)
class CTFEstimate:
    """Result of :func:`estimate_ctf` for one frame.

    Attributes
    ----------
    defocus_nm
        Best estimate [nm], abTEM sign (positive = underfocus); None if no rings were found.
        When ``sign_determined`` is False the sign is that of the better-fitting branch and
        must be reported as ``±defocus_abs_nm``.
    defocus_abs_nm
        ``|defocus|`` [nm]; None if no rings were found.
    sign_determined
        True when the two signs fit clearly differently and Cs is large enough that the q⁴
        term changes the ring pattern within the information limit.
    fit_quality
        0..1: Pearson correlation between the measured background-subtracted ring profile
        and the fitted model over the fitted band (clipped at 0).
    amorphous
        Thon rings of an amorphous support were found.
    periodic
        Sharp lattice peaks dominate the spectrum (crystal everywhere).
    blank
        No signal above shot noise (blank detector, vacuum, pure noise).
    reason
        Short human reason when ``amorphous`` is False, else None.
    energy_eV, Cs_mm, sampling_A
        Imaging conditions used [eV], [mm], [Å/px].
    defocus_other_sign_nm
        Best defocus [nm] of the other sign branch (None if no rings).
    fit_quality_other_sign
        Fit quality of that branch (0..1).
    q_band_per_A
        (q_min, q_max) [1/Å] of the fitted band.
    n_tiles
        Number of periodogram tiles averaged.
    peak_power_fraction
        Fraction of the spectral power above the ring background held by sharp peaks (0..1).
    ring_contrast
        Amplitude of the fitted ring modulation relative to the background (dimensionless).
    ring_F
        F statistic of the ring term over the smooth background (rings when above
        :data:`RING_F_THRESHOLD`).
    sign_lr
        Likelihood ratio 2 ln(L_best/L_other) of the two sign branches (sign determined when
        above :data:`SIGN_LR_THRESHOLD` and ``cs_phase_rad`` is large enough).
    blank_F
        F statistic of the smooth spectrum over a constant (blank when below
        :data:`BLANK_F_THRESHOLD`).
    cs_phase_rad
        Phase [rad] the Cs term adds at the information limit (the fitted band's end or
        where the focal-spread envelope falls to e⁻²); the sign needs at least
        :data:`SIGN_MIN_CS_PHASE_RAD`.
    conditions_source
        Where ``energy_eV`` and ``Cs_mm`` came from (``"given"``, or what
        :func:`estimate_ctf_with_metadata` found).
    """

    defocus_nm: float | None
    defocus_abs_nm: float | None
    sign_determined: bool
    fit_quality: float
    amorphous: bool
    periodic: bool
    blank: bool
    reason: str | None
    energy_eV: float
    Cs_mm: float
    sampling_A: float
    defocus_other_sign_nm: float | None = None
    fit_quality_other_sign: float = 0.0
    q_band_per_A: tuple[float, float] = (0.0, 0.0)
    n_tiles: int = 0
    peak_power_fraction: float = 0.0
    ring_contrast: float = 0.0
    ring_F: float = 0.0
    sign_lr: float = 0.0
    blank_F: float = 0.0
    cs_phase_rad: float = 0.0
    conditions_source: str = "given"

    def label(self) -> str:
        """Human-readable defocus, e.g. ``"+23.4 nm"``, ``"±23.4 nm"`` or the reason."""
        if not self.amorphous or self.defocus_abs_nm is None:
            return self.reason or "no amorphous signal"
        if self.sign_determined and self.defocus_nm is not None:
            return f"{self.defocus_nm:+.1f} nm"
        return f"±{self.defocus_abs_nm:.1f} nm"

    def to_dict(self) -> dict:
        """JSON-able dictionary of every field (floats, bools, strings, None)."""
        d = asdict(self)
        d["q_band_per_A"] = [float(x) for x in self.q_band_per_A]
        for k, v in list(d.items()):
            if isinstance(v, (np.floating, np.integer)):
                d[k] = v.item()
            elif isinstance(v, np.bool_):
                d[k] = bool(v)
        return d


#: Thresholds of the decisions (calibrated in ``benchmarks/bench_ctf.py``; see docs/ctf.md).
#: Ring detection: F statistic of the ring term over the smooth background.
RING_F_THRESHOLD: float = 10.0
#: Sign: likelihood ratio 2 ln(L_best / L_other) of the two sign branches.
SIGN_LR_THRESHOLD: float = 15.0
#: Sign: the Cs term must add at least this phase [rad] at the information limit (8π: four
#: more ring zeros on one side of focus than on the other).  At Cs 5 µm (4π at 300 kV,
#: 10 Å focal spread, 0.2 Å/px) the better branch had the wrong sign in 8 of 48 abTEM frames.
SIGN_MIN_CS_PHASE_RAD: float = 8 * math.pi
#: Blank: F statistic of the smooth background over a constant (a white spectrum is ~1).
BLANK_F_THRESHOLD: float = 8.0
#: Periodic frames need this many times RING_F_THRESHOLD for rings.
PERIODIC_F_FACTOR: float = 3.0
#: Periodic: fraction of the above-background power in peaks above which the frame is periodic.
PERIODIC_POWER_FRACTION: float = 0.75

#: Most periodogram tiles averaged per estimate, evenly spread over the frame (bounds the
#: cost of large frames: a 4096 px frame has 225 half-overlapping 512 px tiles).
MAX_TILES: int = 32
#: A candidate defocus must put at least this many Thon-ring zeros into the fitted band.
MIN_ZEROS: int = 2
#: The fitted band ends where the radial spectrum falls below its 95th percentile / this.
DYNAMIC_RANGE: float = 1e4

_N_BG = 6  # Legendre terms of the smooth background of the log spectrum
_N_AMP = 3  # Legendre terms of the ring amplitude
_N_SUB = 8  # sub-samples per frequency pixel when averaging cos 2chi
_FIT_BATCH = 128  # candidates fitted at once (bounds the batch's memory)
_CORR = 2.0  # rings per degree of freedom (adjacent rings correlate; thresholds are empirical)


@dataclass
class _Fit:
    defocus_nm: float
    F: float  # F statistic of the ring term
    rss: float  # weighted residual sum of squares (log spectrum)
    corr: float  # correlation of ring model and background-free data, 0..1
    contrast: float  # ring amplitude / background, dimensionless


class _Profile:
    """Log radial profile in the fitted band with its smooth-background projector."""

    def __init__(self, q: np.ndarray, y: np.ndarray, wts: np.ndarray, dq: float):
        self.q, self.y, self.dq = q, y, dq
        u = 2 * (q - q[0]) / max(q[-1] - q[0], 1e-12) - 1
        self.sw = np.sqrt(wts / wts.mean())
        self.P = np.polynomial.legendre.legvander(u, _N_AMP - 1)
        Bw = np.polynomial.legendre.legvander(u, _N_BG - 1) * self.sw[:, None]
        self.Q, _ = np.linalg.qr(Bw)
        yw = y * self.sw
        self.ry = yw - self.Q @ (self.Q.T @ yw)
        self.rss0 = float(self.ry @ self.ry)  # background-only fit
        c = yw - self.sw * (float(yw @ self.sw) / float(self.sw @ self.sw))
        self.rss_const = float(c @ c)  # constant-only fit
        self.n = len(q)
        sub = (np.arange(_N_SUB) + 0.5) / _N_SUB - 0.5
        self.qs = q[:, None] + sub[None, :] * dq

    def blank_F(self) -> float:
        """F statistic of the smooth background over a constant (flat = white spectrum)."""
        dof = max(self.n / _CORR - _N_BG, 1.0)
        return ((self.rss_const - self.rss0) / (_N_BG - 1)) / max(self.rss0 / dof, 1e-300)

    def fit(self, defoci_nm, *, energy_eV: float, Cs_mm: float) -> list[_Fit]:
        """Fit ``log S(q) = B(q) + A(q) cos 2chi(q)`` for every candidate defocus [nm].

        ``B`` (smooth background, Legendre) and ``A`` (ring amplitude, Legendre) are linear;
        ``sin² chi = (1 - cos 2chi)/2``, so a physical fit has ``A < 0``: candidates with a
        positive mean ``A`` get F = 0.  ``cos 2chi`` is averaged over each frequency pixel so
        that rings finer than a pixel do not alias.  Candidates are fitted in batches (one
        pseudo-inverse per candidate, vectorised).
        """
        dfs = np.atleast_1d(np.asarray(defoci_nm, dtype=np.float64))
        out: list[_Fit] = []
        for k in range(0, dfs.size, _FIT_BATCH):
            out += self._fit_batch(dfs[k : k + _FIT_BATCH], energy_eV=energy_eV, Cs_mm=Cs_mm)
        return out

    def _fit_batch(self, dfs: np.ndarray, *, energy_eV: float, Cs_mm: float) -> list[_Fit]:
        dof = max(self.n / _CORR - _N_BG - _N_AMP, 1.0)
        lam = wavelength_A(energy_eV)
        q2 = self.qs * self.qs  # (n, sub)
        cs_term = 0.5 * math.pi * float(Cs_mm) * 1e7 * lam**3 * q2 * q2
        chi = (-math.pi * lam * 10.0) * dfs[:, None, None] * q2[None] + cs_term[None]
        span = chi.max(axis=(1, 2)) - chi.min(axis=(1, 2))
        c2 = np.cos(2 * chi).mean(axis=2)  # (m, n)
        X = self.P[None] * (c2 * self.sw)[:, :, None]  # (m, n, N_AMP)
        Xr = X - np.einsum("nk,mkj->mnj", self.Q, np.einsum("nk,mnj->mkj", self.Q, X))
        rcond = np.finfo(np.float64).eps * max(self.n, _N_AMP)
        coef = np.einsum("mjn,n->mj", np.linalg.pinv(Xr, rcond=rcond), self.ry)
        fit = np.einsum("mnj,mj->mn", Xr, coef)
        rss = ((self.ry[None] - fit) ** 2).sum(axis=1)
        amp = (coef @ self.P.T).mean(axis=1)
        nf = (fit * fit).sum(axis=1)
        ok = (span >= MIN_ZEROS * math.pi) & (amp < 0) & (nf > 0) & (self.rss0 > 0)
        out = []
        for i, df in enumerate(dfs):
            if not ok[i]:
                # fewer than MIN_ZEROS ring zeros in the band, or an unphysical sign of A
                out.append(_Fit(float(df), 0.0, self.rss0, 0.0, 0.0))
                continue
            F = ((self.rss0 - rss[i]) / _N_AMP) / max(rss[i] / dof, 1e-300)
            corr = float(fit[i] @ self.ry) / math.sqrt(nf[i] * self.rss0)
            # ring modulation of the spectrum: S = e^B (1 + A cos 2chi) to first order
            out.append(_Fit(float(df), float(F), float(rss[i]), max(corr, 0.0), -2.0 * amp[i]))
        return out


def _best(prof: _Profile, grid: np.ndarray, fits: list[_Fit], sel, **kw) -> _Fit | None:
    idx = np.flatnonzero(sel)
    if idx.size == 0:
        return None
    j = idx[int(np.argmax([fits[i].F for i in idx]))]
    step = float(grid[1] - grid[0]) if len(grid) > 1 else 0.5
    fine = np.linspace(grid[j] - step, grid[j] + step, 41)
    fine = fine[(fine >= grid[idx].min()) & (fine <= grid[idx].max())]
    cand = prof.fit(fine, **kw) + [fits[j]]
    return max(cand, key=lambda f: f.F)


def estimate_ctf(
    image,
    sampling_A: float,
    *,
    energy_eV: float = DEFAULT_ENERGY_EV,
    Cs_mm: float = DEFAULT_CS_MM,
    defocus_range_nm: tuple[float, float] = (-150.0, 150.0),
    tile_px: int = 512,
    q_min_per_A: float | None = None,
    q_max_per_A: float | None = None,
    focal_spread_A: float = DEFAULT_FOCAL_SPREAD_A,
    max_tiles: int = MAX_TILES,
) -> CTFEstimate:
    """Estimate the defocus of one HRTEM frame from the Thon rings of its amorphous support.

    Method (``docs/ctf.md``): tile-averaged periodogram; sharp lattice peaks masked; radial
    mean; its logarithm fitted, for every candidate defocus on a 0.5 nm grid (refined to
    0.05 nm), by a smooth background plus a ring term ``A(q) cos 2chi(q)`` (linear least
    squares); the candidate with the largest F statistic of the ring term wins, separately
    for each sign; rings are reported when F exceeds :data:`RING_F_THRESHOLD` (times
    :data:`PERIODIC_F_FACTOR` when lattice peaks dominate), the sign when
    the two branches differ by more than :data:`SIGN_LR_THRESHOLD` in likelihood and the Cs
    term adds at least :data:`SIGN_MIN_CS_PHASE_RAD` at the information limit (so never at
    Cs 5 µm, 300 kV, 10 Å focal spread: 4π there).

    Parameters
    ----------
    image
        One frame (ny, nx), raw counts or intensities.
    sampling_A
        Pixel size [Å/px].
    energy_eV
        Beam energy [eV] (from the file's metadata, else the model's training value).
    Cs_mm
        Spherical aberration C30 [mm] (metadata, else the training value, 5 µm = 0.005 mm).
    defocus_range_nm
        Searched defocus interval [nm], abTEM sign.
    tile_px
        Periodogram tile side [px] (frames larger than this are tile-averaged).
    max_tiles
        Most periodogram tiles averaged, evenly spread over the frame (bounds the cost of
        large frames: :data:`MAX_TILES` by default).
    q_min_per_A, q_max_per_A
        Fitted frequency band [1/Å]; default from 1/(25 Å) (or a tenth of the Nyquist
        frequency, if lower) to 0.9 Nyquist.
    focal_spread_A
        Focal spread [Å] assumed for the information limit of the sign decision (the
        training value when unknown).

    Returns
    -------
    CTFEstimate
        The defocus is that of the amorphous film (its mid-plane).
    """
    lo, hi = _check_arguments(sampling_A, energy_eV, Cs_mm, defocus_range_nm)
    img = image if isinstance(image, np.ndarray) else np.asarray(image)
    if img.ndim == 2 and not _all_finite(img):
        raise ValueError("the frame holds NaN or infinite pixels; replace them before the estimate")
    spec, n_tiles = power_spectrum(img, tile_px, max_tiles=max_tiles)
    t = spec.shape[0]
    dq = 1.0 / (t * sampling_A)
    nyq = 0.5 / sampling_A
    common = dict(energy_eV=float(energy_eV), Cs_mm=float(Cs_mm), sampling_A=float(sampling_A))
    qa = float(q_min_per_A) if q_min_per_A is not None else max(min(1.0 / 25.0, 0.1 * nyq), 4 * dq)
    qb = float(q_max_per_A) if q_max_per_A is not None else 0.9 * nyq
    band_q = (qa, qb)
    if not float(spec.max()) > 0:  # constant frame
        return CTFEstimate(
            None, None, False, 0.0, False, False, True,
            "no amorphous signal: blank frame (constant image)",
            **common, q_band_per_A=band_q, n_tiles=n_tiles,
        )  # fmt: skip
    peak_mask, peak_frac = _peaks(spec, sampling_A)
    periodic = peak_frac > PERIODIC_POWER_FRACTION
    pr = _band_profile(spec, sampling_A, peak_mask, qa, qb)
    if pr is None:
        return CTFEstimate(
            None, None, False, 0.0, False, periodic, False,
            "no amorphous signal: no Thon rings found (spectrum cut off at low frequency)",
            **common, q_band_per_A=band_q, n_tiles=n_tiles, peak_power_fraction=peak_frac,
        )  # fmt: skip
    band_q = (qa, float(pr.q[-1]))
    kw = dict(energy_eV=float(energy_eV), Cs_mm=float(Cs_mm))
    best, other = _fit_branches(pr, lo, hi, **kw)
    blank_F = pr.blank_F()
    extra = dict(q_band_per_A=band_q, n_tiles=n_tiles, peak_power_fraction=peak_frac)
    # lattice peaks leave leakage behind even when masked: a periodic frame needs more
    if best.F < RING_F_THRESHOLD * (PERIODIC_F_FACTOR if periodic else 1.0):
        blank = (not periodic) and blank_F < BLANK_F_THRESHOLD
        reason = _no_ring_reason(pr, periodic, blank, lo, hi, **kw)
        return CTFEstimate(
            None, None, False, best.corr, False, periodic, blank, reason, **common,
            ring_F=best.F, blank_F=blank_F, **extra,
        )  # fmt: skip
    lr, cs_phase, sign_det = _sign_decision(pr, best, other, focal_spread_A, **kw)
    return _rings_estimate(best, other, lr, cs_phase, sign_det, blank_F, periodic, common, extra)


def _rings_estimate(best, other, lr, cs_phase, sign_det, blank_F, periodic, common, extra):
    """The estimate of a frame with Thon rings."""
    return CTFEstimate(
        defocus_nm=best.defocus_nm,
        defocus_abs_nm=abs(best.defocus_nm),
        sign_determined=bool(sign_det),
        fit_quality=float(min(best.corr, 1.0)),
        amorphous=True,
        periodic=periodic,
        blank=False,
        reason=None,
        **common,
        defocus_other_sign_nm=None if other is None else other.defocus_nm,
        fit_quality_other_sign=0.0 if other is None else float(min(other.corr, 1.0)),
        ring_contrast=best.contrast,
        ring_F=best.F,
        sign_lr=lr,
        blank_F=blank_F,
        cs_phase_rad=cs_phase,
        **extra,
    )


def _fit_branches(pr: _Profile, lo: float, hi: float, **kw) -> tuple[_Fit, _Fit | None]:
    """The best fit of each sign branch on a 0.5 nm grid over ``lo..hi`` [nm] (refined):
    (the better branch, the other or None)."""
    grid = np.arange(lo, hi + 0.25, 0.5)
    grid = grid[grid <= hi]
    fits = pr.fit(grid, **kw)
    pos = _best(pr, grid, fits, grid >= 0, **kw)
    neg = _best(pr, grid, fits, grid < 0, **kw)
    branches = [f for f in (pos, neg) if f is not None]
    best = max(branches, key=lambda f: f.F)
    other = min(branches, key=lambda f: f.F) if len(branches) == 2 else None
    return best, other


def _check_arguments(sampling_A, energy_eV, Cs_mm, defocus_range_nm) -> tuple[float, float]:
    """Refuse bad imaging conditions by name; the searched defocus interval [nm]."""
    if not (isinstance(sampling_A, (int, float)) and math.isfinite(sampling_A) and sampling_A > 0):
        raise ValueError(f"sampling_A must be a positive pixel size in Å/px (got {sampling_A})")
    if not (math.isfinite(energy_eV) and energy_eV > 0):
        raise ValueError(f"energy_eV must be a positive beam energy in eV (got {energy_eV})")
    if not math.isfinite(Cs_mm):
        raise ValueError(f"Cs_mm must be a finite spherical aberration in mm (got {Cs_mm})")
    lo, hi = (float(defocus_range_nm[0]), float(defocus_range_nm[1]))
    if not lo < hi:
        raise ValueError(f"defocus_range_nm must be (low, high) with low < high (got {lo}, {hi})")
    return lo, hi


def _all_finite(img: np.ndarray, rows: int = 512) -> bool:
    """No NaN or infinite pixel (integers: always), checked a block of rows at a time."""
    if not np.issubdtype(img.dtype, np.floating):
        return True
    return all(bool(np.isfinite(img[r : r + rows]).all()) for r in range(0, img.shape[0], rows))


def _band_profile(spec, sampling_A: float, peak_mask, qa: float, qb: float) -> _Profile | None:
    """The log radial profile (peaks masked) in the band ``qa..qb`` [1/Å]; None when the
    spectrum is cut off below 16 rings."""
    t = spec.shape[0]
    dq = 1.0 / (t * sampling_A)
    q, prof, counts = radial_profile(spec, sampling_A, mask=~peak_mask)
    band = (q >= qa) & (q <= qb) & (counts > 0) & np.isfinite(prof)
    if band.sum() < 16:
        raise ValueError(
            f"the frequency band {qa:.3f}..{qb:.3f} 1/Å holds only {int(band.sum())} rings "
            f"of the {t}x{t} spectrum (need 16); widen q_min_per_A/q_max_per_A or use a "
            "larger frame"
        )
    # drop the high-frequency end where the spectrum has fallen by more than DYNAMIC_RANGE
    # (a detector or filter that kills high frequencies leaves only window leakage there)
    idx = np.flatnonzero(band)
    top = float(np.percentile(prof[idx], 95))
    low = np.flatnonzero(prof[idx] < top / DYNAMIC_RANGE)
    if low.size:
        band[idx[low[0]] :] = False
    if band.sum() < 16:
        return None
    yb = prof[band]
    floor = max(float(np.median(yb)), 1e-300) * 1e-6
    return _Profile(q[band], np.log(np.maximum(yb, floor)), counts[band].astype(np.float64), dq)


def _no_ring_reason(pr: _Profile, periodic: bool, blank: bool, lo, hi, **kw) -> str:
    """Why a frame has no Thon rings, in words."""
    qs = np.linspace(pr.q[0], pr.q[-1], 512)
    span = max(float(np.ptp(chi_rad(qs, d, **kw))) for d in (lo, 0.0, hi))
    if periodic:
        return "no amorphous support: lattice fringes everywhere"
    if span < MIN_ZEROS * math.pi:
        return (
            "no amorphous signal: no Thon rings can appear at this pixel size within the "
            "searched defocus range"
        )
    if blank:
        return "no amorphous signal: blank frame (flat spectrum, shot noise only)"
    return "no amorphous signal: no Thon rings found"


def _sign_decision(pr: _Profile, best, other, focal_spread_A: float, *, energy_eV, Cs_mm):
    """(likelihood ratio of the sign branches, Cs phase at the information limit [rad],
    whether the sign is determined)."""
    lr = 0.0
    if other is not None:
        lr = (pr.n / _CORR) * math.log(max(other.rss, 1e-300) / max(best.rss, 1e-300))
    # the sign lives in the Cs term: how much phase it adds up to the information limit
    # (the fitted band's end, or where the focal-spread envelope falls to e^-2)
    lam = wavelength_A(energy_eV)
    q_lim = float(pr.q[-1])
    if focal_spread_A > 0:
        q_lim = min(q_lim, math.sqrt(2.0 * math.sqrt(2.0) / (math.pi * lam * focal_spread_A)))
    cs_phase = 0.5 * math.pi * abs(Cs_mm) * 1e7 * lam**3 * q_lim**4
    sign_det = other is not None and lr > SIGN_LR_THRESHOLD and cs_phase >= SIGN_MIN_CS_PHASE_RAD
    return lr, cs_phase, sign_det


def estimate_ctf_with_metadata(
    image, sampling_A: float, metadata: Mapping | None = None, **kwargs
) -> CTFEstimate:
    """:func:`estimate_ctf` with the voltage and Cs from a frame's metadata when recorded.

    ``metadata`` is the dictionary of :func:`napari_hrtem_transfer.io.read_images` (keys
    ``energy_eV`` [eV] and ``Cs_A`` [Å]); missing or non-positive values fall back to the
    model's training values (:data:`DEFAULT_ENERGY_EV`, :data:`DEFAULT_CS_MM`) unless
    ``energy_eV`` / ``Cs_mm`` are passed explicitly.  The result's ``conditions_source``
    says which was used.
    """
    md = dict(metadata or {})
    parts = []
    if "energy_eV" in kwargs:
        parts.append("energy given")
    else:
        e = md.get("energy_eV")
        if isinstance(e, (int, float)) and math.isfinite(e) and e > 0:
            kwargs["energy_eV"] = float(e)
            parts.append("energy from metadata")
        else:
            kwargs["energy_eV"] = DEFAULT_ENERGY_EV
            parts.append("energy not recorded: training value")
    if "Cs_mm" in kwargs:
        parts.append("Cs given")
    else:
        c = md.get("Cs_A")
        if isinstance(c, (int, float)) and math.isfinite(c) and c > 0:
            kwargs["Cs_mm"] = float(c) / 1e7
            parts.append("Cs from metadata")
        else:
            kwargs["Cs_mm"] = DEFAULT_CS_MM
            parts.append("Cs not recorded: training value")
    est = estimate_ctf(image, sampling_A, **kwargs)
    return replace(est, conditions_source="; ".join(parts))
