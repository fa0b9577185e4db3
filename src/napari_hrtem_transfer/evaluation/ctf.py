"""Per-frame CTF (defocus) estimation from Thon rings, and a CTF information-transfer overlap.

Everything here is numpy/scipy; no torch, abTEM or hyperspy is imported.

Conventions and units
---------------------
* Defocus follows abTEM: ``defocus = -C10``; positive defocus is underfocus.  Public
  arguments are in [nm] (``*_nm``), internal lengths in [Å].
* Spatial frequency ``q`` in [1/Å] (no 2π): the Nyquist frequency of a pixel size
  ``sampling_A`` is ``1 / (2 sampling_A)``.
* Aberration phase (abTEM) ``chi(q) = 2π/λ (C10 λ² q²/2 + C30 λ⁴ q⁴/4)``
  ``= -π λ Δf q² + (π/2) Cs λ³ q⁴`` [rad] with ``Δf`` the defocus and ``Cs = C30``.
* Phase-contrast transfer ``T(q) = -E_t(q) [sin chi(q) + ... ]``; see :func:`ctf_curve`.

See ``docs/ctf.md`` for the method, the formulas and the measured accuracy.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np

__all__ = [
    "DEFAULT_CS_MM",
    "DEFAULT_ENERGY_EV",
    "DEFAULT_FOCAL_SPREAD_A",
    "RING_F_THRESHOLD",
    "SIGN_LR_THRESHOLD",
    "CTFEstimate",
    "chi_rad",
    "ctf_curve",
    "ctf_overlap",
    "ctf_overlap_for_estimate",
    "estimate_ctf",
    "estimate_ctf_with_metadata",
    "periodic_component",
    "power_spectrum",
    "power_transfer",
    "radial_profile",
    "wavelength_A",
]

#: Training values of the shipped model (``simulate.config`` laptop/study presets): 300 kV,
#: Cs 5 µm, focal spread 10 Å.  Used when a frame's metadata has no voltage or Cs.
DEFAULT_ENERGY_EV: float = 300e3
DEFAULT_CS_MM: float = 5e-3
DEFAULT_FOCAL_SPREAD_A: float = 10.0
#: Per-image defocus jitter of the training sets [nm] (``SimulationConfig.defocus_jitter_nm``).
DEFAULT_TRAINING_JITTER_NM: float = 1.5


@functools.lru_cache(maxsize=64)
def _wavelength_A(energy_eV: float) -> float:
    from ..simulate.config import wavelength_A as _wl

    return float(_wl(energy_eV))


def wavelength_A(energy_eV: float) -> float:
    """Relativistic electron wavelength [Å] at kinetic energy ``energy_eV`` [eV]."""
    return _wavelength_A(float(energy_eV))


def chi_rad(q_per_A, defocus_nm: float, *, energy_eV: float, Cs_mm: float) -> np.ndarray:
    """abTEM aberration phase ``chi(q)`` [rad] at spatial frequencies ``q_per_A`` [1/Å].

    ``chi = -π λ Δf q² + (π/2) Cs λ³ q⁴`` with ``Δf = defocus_nm`` (abTEM sign, positive =
    underfocus) in Å and ``Cs = Cs_mm`` in Å.
    """
    q = np.asarray(q_per_A, dtype=np.float64)
    lam = wavelength_A(energy_eV)
    df_A = float(defocus_nm) * 10.0
    cs_A = float(Cs_mm) * 1e7
    q2 = q * q
    return -math.pi * lam * df_A * q2 + 0.5 * math.pi * cs_A * lam**3 * q2 * q2


def ctf_curve(
    q_per_A,
    defocus_nm: float,
    *,
    energy_eV: float = DEFAULT_ENERGY_EV,
    Cs_mm: float = DEFAULT_CS_MM,
    focal_spread_A: float = 0.0,
    amplitude_contrast: float = 0.0,
) -> np.ndarray:
    """Phase-contrast transfer function ``T(q)`` (dimensionless) of a weak object.

    ``T(q) = E_t(q) · [sqrt(1 - A²) sin chi(q) + A cos chi(q)]`` with the abTEM phase
    :func:`chi_rad`, amplitude contrast fraction ``A = amplitude_contrast`` (0..1) and the
    temporal-coherence envelope ``E_t(q) = exp(-(π λ Δ q²)² / 4)`` of the focal spread
    ``Δ = focal_spread_A`` [Å] (abTEM's definition).  ``q_per_A`` in [1/Å].  The power
    spectrum of an amorphous film is ∝ ``T(q)²`` times the specimen's (smooth) spectrum.
    """
    if not 0.0 <= amplitude_contrast <= 1.0:
        raise ValueError(
            f"amplitude_contrast must lie in [0, 1] (got {amplitude_contrast}); "
            "typical values are 0 (pure phase) to 0.1"
        )
    q = np.asarray(q_per_A, dtype=np.float64)
    chi = chi_rad(q, defocus_nm, energy_eV=energy_eV, Cs_mm=Cs_mm)
    a = float(amplitude_contrast)
    t = math.sqrt(1.0 - a * a) * np.sin(chi) + a * np.cos(chi)
    if focal_spread_A > 0:
        lam = wavelength_A(energy_eV)
        t = t * np.exp(-0.25 * (math.pi * lam * float(focal_spread_A) * q * q) ** 2)
    return t


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


# --------------------------------------------------------------------------------------------
# spectra


def _window(n: int) -> np.ndarray:
    w = np.hanning(n + 2)[1:-1]  # strictly positive Hann window
    return np.outer(w, w)


def periodic_component(tile: np.ndarray) -> np.ndarray:
    """Periodic part of an image (Moisan's periodic + smooth decomposition).

    The smooth part ``s`` solves ``Δs = Δ_boundary u`` (the jumps between opposite edges);
    ``u - s`` has no edge discontinuity, so its periodogram has no cross of edge artefacts
    and needs no window: every pixel counts with full frequency resolution.
    L. Moisan, J. Math. Imaging Vis. 39, 161 (2011).
    """
    u = np.asarray(tile, dtype=np.float64)
    ny, nx = u.shape
    v = np.zeros_like(u)
    d = u[-1, :] - u[0, :]
    v[0, :] += d
    v[-1, :] -= d
    d = u[:, -1] - u[:, 0]
    v[:, 0] += d
    v[:, -1] -= d
    cy = np.cos(2 * np.pi * np.arange(ny) / ny)[:, None]
    cx = np.cos(2 * np.pi * np.arange(nx) / nx)[None, :]
    den = 2 * cy + 2 * cx - 4
    den[0, 0] = 1.0
    sf = np.fft.fft2(v) / den
    sf[0, 0] = 0.0
    return u - np.real(np.fft.ifft2(sf))


def power_spectrum(
    image, tile_px: int = 512, max_tiles: int = 256, window: str = "periodic"
) -> tuple[np.ndarray, int]:
    """Tile-averaged periodogram (Welch) of an image; memory bounded by one tile.

    Square tiles of ``min(tile_px, ny, nx)`` px (50 % overlap, mean removed per tile) are
    Fourier transformed one at a time and their ``|F|²`` averaged; at most ``max_tiles``
    tiles (evenly spread) are used.  ``window="periodic"`` (default) transforms each tile's
    periodic component (:func:`periodic_component`, no taper, full resolution);
    ``window="hann"`` tapers each tile with a Hann window instead (less leakage from strong
    off-grid peaks, twice as wide a frequency resolution, edge pixels down-weighted).

    Returns
    -------
    (numpy.ndarray, int)
        fftshifted float64 spectrum (t, t) normalised by the window energy (white noise of
        variance v gives v), and the number of tiles averaged.
    """
    if window not in ("periodic", "hann"):
        raise ValueError(f"window must be 'periodic' or 'hann' (got {window!r})")
    img = np.asarray(image)
    if img.ndim != 2:
        raise ValueError(
            f"expected one 2-D frame (ny, nx), got an array of shape {img.shape}; "
            "pass one frame of a stack at a time"
        )
    ny, nx = img.shape
    t = int(min(tile_px, ny, nx))
    if t < 32:
        raise ValueError(
            f"the frame {ny}x{nx} px is too small for a CTF estimate; give at least 32x32 px"
        )
    t -= t % 2
    step = max(t // 2, 1)
    ys = list(range(0, ny - t + 1, step))
    xs = list(range(0, nx - t + 1, step))
    corners = [(y, x) for y in ys for x in xs]
    if len(corners) > max_tiles:
        idx = np.linspace(0, len(corners) - 1, max_tiles).round().astype(int)
        corners = [corners[i] for i in idx]
    w = _window(t) if window == "hann" else None
    norm = float((w * w).sum()) if w is not None else float(t * t)
    acc = np.zeros((t, t), dtype=np.float64)
    for y, x in corners:
        tile = np.asarray(img[y : y + t, x : x + t], dtype=np.float64)
        if w is None:
            tile = periodic_component(tile)
        tile = tile - tile.mean()
        f = np.fft.fft2(tile * w if w is not None else tile)
        acc += f.real**2 + f.imag**2
    acc /= norm * len(corners)
    return np.fft.fftshift(acc), len(corners)


def _q_grid(t: int, sampling_A: float) -> np.ndarray:
    f = np.fft.fftshift(np.fft.fftfreq(t, d=sampling_A))
    return np.hypot(f[:, None], f[None, :])


def radial_profile(
    spectrum: np.ndarray, sampling_A: float, mask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Azimuthal mean of an fftshifted square spectrum in rings one frequency pixel wide.

    Returns ``(q_per_A, profile, n_pixels)``, rings up to the Nyquist frequency; pixels where
    ``mask`` is False are left out.
    """
    t = spectrum.shape[0]
    q = _q_grid(t, sampling_A)
    dq = 1.0 / (t * sampling_A)
    r = np.floor(q / dq + 0.5).astype(np.int64)
    nbin = t // 2
    keep = r < nbin
    if mask is not None:
        keep &= mask
    sums = np.bincount(r[keep], weights=spectrum[keep], minlength=nbin)[:nbin]
    counts = np.bincount(r[keep], minlength=nbin)[:nbin].astype(np.float64)
    prof = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return np.arange(nbin) * dq, prof, counts


def _ring_median_ratio(spectrum: np.ndarray, sampling_A: float) -> np.ndarray:
    """Each pixel's power over the median of its ring (1 px wide)."""
    t = spectrum.shape[0]
    q = _q_grid(t, sampling_A)
    dq = 1.0 / (t * sampling_A)
    r = np.minimum(np.floor(q / dq + 0.5).astype(np.int64), t)
    order = np.argsort(r, axis=None, kind="stable")
    rs = r.ravel()[order]
    vals = spectrum.ravel()[order]
    bounds = np.flatnonzero(np.diff(rs)) + 1
    med = np.empty(rs.max() + 1)
    for seg_r, seg in zip(rs[np.r_[0, bounds]], np.split(vals, bounds), strict=True):
        med[seg_r] = np.median(seg)
    return spectrum / np.maximum(med[r], 1e-300)


# --------------------------------------------------------------------------------------------
# fit

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
#: Periodic: a pixel is a lattice peak when its power exceeds its ring's median this often.
PEAK_RATIO: float = 25.0
#: Periodic: pixels joined to a peak and above this ratio belong to it (its leakage wings).
PEAK_WING_RATIO: float = 4.0
#: Periodic frames need this many times RING_F_THRESHOLD for rings.
PERIODIC_F_FACTOR: float = 3.0
#: Periodic: fraction of the above-background power in peaks above which the frame is periodic.
PERIODIC_POWER_FRACTION: float = 0.75

#: A candidate defocus must put at least this many Thon-ring zeros into the fitted band.
MIN_ZEROS: int = 2
#: The fitted band ends where the radial spectrum falls below its 95th percentile / this.
DYNAMIC_RANGE: float = 1e4

_N_BG = 6  # Legendre terms of the smooth background of the log spectrum
_N_AMP = 3  # Legendre terms of the ring amplitude
_N_SUB = 8  # sub-samples per frequency pixel when averaging cos 2chi
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
        that rings finer than a pixel do not alias.
        """
        out = []
        dof = max(self.n / _CORR - _N_BG - _N_AMP, 1.0)
        for df in np.atleast_1d(defoci_nm):
            chi = chi_rad(self.qs, float(df), energy_eV=energy_eV, Cs_mm=Cs_mm)
            if float(chi.max() - chi.min()) < MIN_ZEROS * math.pi:
                # fewer than MIN_ZEROS ring zeros in the band: nothing ring-like to fit
                out.append(_Fit(float(df), 0.0, self.rss0, 0.0, 0.0))
                continue
            c2 = np.cos(2 * chi).mean(axis=1)
            X = self.P * (c2 * self.sw)[:, None]
            Xr = X - self.Q @ (self.Q.T @ X)
            coef, *_ = np.linalg.lstsq(Xr, self.ry, rcond=None)
            fit = Xr @ coef
            rss = float(np.sum((self.ry - fit) ** 2))
            amp = float(np.mean(self.P @ coef))
            nf = float(fit @ fit)
            if amp >= 0 or nf <= 0 or self.rss0 <= 0:
                out.append(_Fit(float(df), 0.0, self.rss0, 0.0, 0.0))
                continue
            F = ((self.rss0 - rss) / _N_AMP) / max(rss / dof, 1e-300)
            corr = float(fit @ self.ry) / math.sqrt(nf * self.rss0)
            # ring modulation of the spectrum: S = e^B (1 + A cos 2chi) to first order
            out.append(_Fit(float(df), float(F), rss, max(corr, 0.0), -2.0 * amp))
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


def _peaks(spec: np.ndarray, sampling_A: float) -> tuple[np.ndarray, float]:
    """Pixels left out of the ring fit, and the fraction of excess power in lattice peaks.

    Left out: the two frequency axes (|qx| or |qy| <= 1 px: detector row/column patterns
    and what is left of the frame edges) and sharp peaks (power > :data:`PEAK_RATIO` times
    their ring's median, dilated by 2 px).  The fraction is the power above the ring
    background held by the peaks over that held by all pixels off the axes.
    """
    from scipy import ndimage

    t = spec.shape[0]
    dq = 1.0 / (t * sampling_A)
    q2d = _q_grid(t, sampling_A)
    k = np.abs(np.arange(t) - t // 2)
    axes = (k[:, None] <= 1) | (k[None, :] <= 1)
    ratio = _ring_median_ratio(spec, sampling_A)
    sel = (q2d > 3 * dq) & ~axes
    core = (ratio > PEAK_RATIO) & sel
    # hysteresis: a peak's leakage wings (pixels above PEAK_WING_RATIO joined to a core
    # pixel) go with it, then 2 px more
    labels, _ = ndimage.label((ratio > PEAK_WING_RATIO) & sel)
    keep = np.unique(labels[core])
    wings = np.isin(labels, keep[keep > 0])
    peaks = ndimage.binary_dilation(core | wings, iterations=2) & sel
    qprof, prof, _ = radial_profile(spec, sampling_A, mask=~(peaks | axes))
    bg = np.interp(q2d, qprof, np.nan_to_num(prof, nan=float(np.nanmedian(prof))))
    excess = np.clip(spec - bg, 0, None)
    total = float(excess[sel].sum())
    frac = float(excess[peaks].sum() / total) if total > 0 else 0.0
    return peaks | axes, frac


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
    if not (isinstance(sampling_A, (int, float)) and math.isfinite(sampling_A) and sampling_A > 0):
        raise ValueError(f"sampling_A must be a positive pixel size in Å/px (got {sampling_A})")
    if not (math.isfinite(energy_eV) and energy_eV > 0):
        raise ValueError(f"energy_eV must be a positive beam energy in eV (got {energy_eV})")
    if not math.isfinite(Cs_mm):
        raise ValueError(f"Cs_mm must be a finite spherical aberration in mm (got {Cs_mm})")
    lo, hi = (float(defocus_range_nm[0]), float(defocus_range_nm[1]))
    if not lo < hi:
        raise ValueError(f"defocus_range_nm must be (low, high) with low < high (got {lo}, {hi})")
    img = np.asarray(image)
    if img.ndim == 2 and not np.all(np.isfinite(img)):
        raise ValueError("the frame holds NaN or infinite pixels; replace them before the estimate")
    spec, n_tiles = power_spectrum(img, tile_px)
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
        return CTFEstimate(
            None, None, False, 0.0, False, periodic, False,
            "no amorphous signal: no Thon rings found (spectrum cut off at low frequency)",
            **common, q_band_per_A=band_q, n_tiles=n_tiles, peak_power_fraction=peak_frac,
        )  # fmt: skip
    band_q = (qa, float(q[band].max()))
    yb = prof[band]
    level = float(np.median(yb))
    floor = max(level, 1e-300) * 1e-6
    pr = _Profile(q[band], np.log(np.maximum(yb, floor)), counts[band].astype(np.float64), dq)
    kw = dict(energy_eV=float(energy_eV), Cs_mm=float(Cs_mm))
    grid = np.arange(lo, hi + 0.25, 0.5)
    grid = grid[grid <= hi]
    fits = pr.fit(grid, **kw)
    pos = _best(pr, grid, fits, grid >= 0, **kw)
    neg = _best(pr, grid, fits, grid < 0, **kw)
    branches = [f for f in (pos, neg) if f is not None]
    best = max(branches, key=lambda f: f.F)
    other = min(branches, key=lambda f: f.F) if len(branches) == 2 else None
    blank_F = pr.blank_F()

    # lattice peaks leave leakage behind even when masked: a periodic frame needs more
    f_needed = RING_F_THRESHOLD * (PERIODIC_F_FACTOR if periodic else 1.0)
    if best.F < f_needed:
        blank = (not periodic) and blank_F < BLANK_F_THRESHOLD
        qs = np.linspace(pr.q[0], pr.q[-1], 512)
        span = max(
            float(np.ptp(chi_rad(qs, d, energy_eV=energy_eV, Cs_mm=Cs_mm))) for d in (lo, 0.0, hi)
        )
        if periodic:
            reason = "no amorphous support: lattice fringes everywhere"
        elif span < MIN_ZEROS * math.pi:
            reason = (
                "no amorphous signal: no Thon rings can appear at this pixel size within the "
                "searched defocus range"
            )
        elif blank:
            reason = "no amorphous signal: blank frame (flat spectrum, shot noise only)"
        else:
            reason = "no amorphous signal: no Thon rings found"
        return CTFEstimate(
            None, None, False, best.corr, False, periodic, blank, reason, **common,
            q_band_per_A=band_q, n_tiles=n_tiles, peak_power_fraction=peak_frac,
            ring_F=best.F, blank_F=blank_F,
        )  # fmt: skip
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
        q_band_per_A=band_q,
        n_tiles=n_tiles,
        peak_power_fraction=peak_frac,
        ring_contrast=best.contrast,
        ring_F=best.F,
        sign_lr=lr,
        blank_F=blank_F,
        cs_phase_rad=cs_phase,
    )


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


# --------------------------------------------------------------------------------------------
# information-transfer overlap


def power_transfer(
    q_per_A,
    defocus_nm: float,
    *,
    energy_eV: float = DEFAULT_ENERGY_EV,
    Cs_mm: float = DEFAULT_CS_MM,
    focal_spread_A: float = DEFAULT_FOCAL_SPREAD_A,
    jitter_nm: float = 0.0,
) -> np.ndarray:
    """Power transfer ``⟨T(q)²⟩`` (dimensionless, 0..1) of a condition at ``q_per_A`` [1/Å].

    ``T`` is :func:`ctf_curve` with the focal-spread envelope; ``⟨·⟩`` averages over a
    Gaussian spread of defocus of standard deviation ``jitter_nm`` [nm] around
    ``defocus_nm`` (a training set's per-image defocus jitter; 0 = one defocus), by 25-point
    quadrature over ±3 standard deviations.
    """
    q = np.asarray(q_per_A, dtype=np.float64)
    kw = dict(energy_eV=energy_eV, Cs_mm=Cs_mm, focal_spread_A=focal_spread_A)
    if jitter_nm <= 0:
        return ctf_curve(q, float(defocus_nm), **kw) ** 2
    x = np.linspace(-3.0, 3.0, 25)
    g = np.exp(-0.5 * x * x)
    g /= g.sum()
    out = np.zeros_like(q)
    for xi, gi in zip(x, g, strict=True):
        out += gi * ctf_curve(q, float(defocus_nm) + float(jitter_nm) * xi, **kw) ** 2
    return out


def ctf_overlap(
    defocus_nm: float,
    training_defocus_nm: Sequence[float],
    *,
    energy_eV: float = DEFAULT_ENERGY_EV,
    Cs_mm: float = DEFAULT_CS_MM,
    sampling_A: float,
    focal_spread_A: float = DEFAULT_FOCAL_SPREAD_A,
    training_jitter_nm: float = DEFAULT_TRAINING_JITTER_NM,
    q_min_per_A: float = 0.02,
    q_max_per_A: float | None = None,
) -> float:
    """Information-transfer overlap [0..1] of a frame's CTF with the model's training CTFs.

    Which spatial frequencies a condition transfers, and how strongly, is its power transfer
    ``P(q) = ⟨T(q)²⟩`` (:func:`power_transfer`; for a training condition averaged over the
    training set's defocus jitter ``training_jitter_nm`` [nm]).  The overlap of the frame
    (defocus ``defocus_nm`` [nm]) with training condition k is the Pearson correlation of
    ``P_frame`` and ``P_k`` over ``q_min_per_A <= q <= q_max_per_A`` [1/Å] (uniform in q;
    default q_max = the Nyquist frequency ``1/(2 sampling_A)``):

        ρ_k = Σ_q p_f p_k / sqrt(Σ_q p_f² · Σ_q p_k²),   p = P - mean_q(P)

    and the result is ``max(0, max_k ρ_k)``: 1 = the frame passes the same bands of
    information as a training condition, 0 = no resemblance (or anti-correlated bands).
    Dimensionless.  ``P`` ignores the sign of T, so ``±defocus`` give nearly the same
    overlap when Cs is small (exactly the same for Cs = 0): the overlap is usable when the
    sign of an estimate is undetermined.  Units: defocus [nm] (abTEM sign), energy [eV],
    Cs [mm], sampling and focal spread [Å].  ``docs/ctf.md`` shows how it ranks the
    study's out-of-distribution losses.
    """
    train = np.atleast_1d(np.asarray(training_defocus_nm, dtype=np.float64))
    if train.size == 0:
        raise ValueError("training_defocus_nm is empty; give the model's training defoci in nm")
    if not np.all(np.isfinite(train)) or not math.isfinite(float(defocus_nm)):
        raise ValueError("defocus values must be finite numbers in nm")
    if not (math.isfinite(sampling_A) and sampling_A > 0):
        raise ValueError(f"sampling_A must be a positive pixel size in Å/px (got {sampling_A})")
    qmax = 0.5 / sampling_A if q_max_per_A is None else float(q_max_per_A)
    if not 0 <= q_min_per_A < qmax:
        raise ValueError(f"need 0 <= q_min_per_A < q_max_per_A [1/Å] (got {q_min_per_A}, {qmax})")
    q = np.linspace(q_min_per_A, qmax, 2048)
    kw = dict(energy_eV=energy_eV, Cs_mm=Cs_mm, focal_spread_A=focal_spread_A)
    pf = power_transfer(q, float(defocus_nm), **kw)
    pf = pf - pf.mean()
    nf = float(pf @ pf)
    best = 0.0
    for d in train:
        pk = power_transfer(q, float(d), jitter_nm=training_jitter_nm, **kw)
        pk = pk - pk.mean()
        nk = float(pk @ pk)
        if nf <= 0 or nk <= 0:
            continue
        best = max(best, float(pf @ pk) / math.sqrt(nf * nk))
    return float(min(max(best, 0.0), 1.0))


def ctf_overlap_for_estimate(
    estimate: CTFEstimate,
    training_defocus_nm: Sequence[float],
    *,
    focal_spread_A: float = DEFAULT_FOCAL_SPREAD_A,
    training_jitter_nm: float = DEFAULT_TRAINING_JITTER_NM,
    q_min_per_A: float = 0.02,
    q_max_per_A: float | None = None,
) -> float | None:
    """:func:`ctf_overlap` [0..1] of an estimate, with its energy, Cs and pixel size.

    None when the frame has no Thon rings (``estimate.amorphous`` False).  When the sign is
    undetermined the lower of the overlaps of ``+|defocus|`` and ``-|defocus|`` is returned
    (the conservative choice for an out-of-distribution verdict).
    """
    if not estimate.amorphous or estimate.defocus_abs_nm is None:
        return None
    kw = dict(
        energy_eV=estimate.energy_eV,
        Cs_mm=estimate.Cs_mm,
        sampling_A=estimate.sampling_A,
        focal_spread_A=focal_spread_A,
        training_jitter_nm=training_jitter_nm,
        q_min_per_A=q_min_per_A,
        q_max_per_A=q_max_per_A,
    )
    if estimate.sign_determined and estimate.defocus_nm is not None:
        return ctf_overlap(estimate.defocus_nm, training_defocus_nm, **kw)
    a = estimate.defocus_abs_nm
    return min(
        ctf_overlap(a, training_defocus_nm, **kw), ctf_overlap(-a, training_defocus_nm, **kw)
    )
