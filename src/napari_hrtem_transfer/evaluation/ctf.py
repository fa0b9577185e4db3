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

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

__all__ = [
    "DEFAULT_CS_MM",
    "DEFAULT_ENERGY_EV",
    "DEFAULT_FOCAL_SPREAD_A",
    "CTFEstimate",
    "chi_rad",
    "ctf_curve",
    "ctf_overlap",
    "estimate_ctf",
    "power_spectrum",
    "radial_profile",
    "wavelength_A",
]

#: Training values of the shipped model (``simulate.config`` laptop/study presets): 300 kV,
#: Cs 5 µm, focal spread 10 Å.  Used when a frame's metadata has no voltage or Cs.
DEFAULT_ENERGY_EV: float = 300e3
DEFAULT_CS_MM: float = 5e-3
DEFAULT_FOCAL_SPREAD_A: float = 10.0


def wavelength_A(energy_eV: float) -> float:
    """Relativistic electron wavelength [Å] at kinetic energy ``energy_eV`` [eV]."""
    from ..simulate.config import wavelength_A as _wl

    return float(_wl(float(energy_eV)))


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
    temporal-coherence envelope ``E_t(q) = exp(-(π λ Δ q²)² / 2)`` of the focal spread
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
        t = t * np.exp(-0.5 * (math.pi * lam * float(focal_spread_A) * q * q) ** 2)
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
        True when the two signs fit clearly differently (needs Cs large enough that the q⁴
        term changes the ring pattern within the fitted band).
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


def power_spectrum(image, tile_px: int = 512, max_tiles: int = 256) -> tuple[np.ndarray, int]:
    """Tile-averaged periodogram (Welch) of an image; memory bounded by one tile.

    Square tiles of ``min(tile_px, ny, nx)`` px (50 % overlap, Hann window, mean removed per
    tile) are Fourier transformed one at a time and their ``|F|²`` averaged; at most
    ``max_tiles`` tiles (evenly spread) are used.

    Returns
    -------
    (numpy.ndarray, int)
        fftshifted float64 spectrum (t, t) normalised by the window energy (white noise of
        variance v gives v), and the number of tiles averaged.
    """
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
    w = _window(t)
    norm = float((w * w).sum())
    acc = np.zeros((t, t), dtype=np.float64)
    for y, x in corners:
        tile = np.asarray(img[y : y + t, x : x + t], dtype=np.float64)
        tile = tile - tile.mean()
        f = np.fft.fft2(tile * w)
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


@dataclass
class _Fit:
    defocus_nm: float
    score: float
    contrast: float


def _basis(u: np.ndarray, n: int) -> np.ndarray:
    """Legendre polynomials 0..n-1 of u in [-1, 1] (columns)."""
    return np.polynomial.legendre.legvander(u, n - 1)


def _fit_profile(
    q: np.ndarray,
    y: np.ndarray,
    wts: np.ndarray,
    defoci_nm: np.ndarray,
    *,
    energy_eV: float,
    Cs_mm: float,
    dq: float,
    n_bg: int = 6,
    n_amp: int = 3,
) -> tuple[np.ndarray, np.ndarray]:
    """Score every candidate defocus by a linear fit ``y = B(q) + A(q) cos 2chi(q)``.

    ``B`` (``n_bg`` Legendre terms) is the smooth background, ``A`` (``n_amp`` terms) the
    ring amplitude (sin² chi = (1 - cos 2chi)/2, so a physical fit has A < 0).  The cos 2chi
    column is averaged over each frequency pixel (8 sub-samples) so that rings finer than a
    pixel do not alias.  Returns (score, contrast) per candidate: score = correlation of the
    ring term with the background-free data (0 if A >= 0), contrast = -mean(A)/mean(B).
    """
    u = 2 * (q - q[0]) / max(q[-1] - q[0], 1e-12) - 1
    sw = np.sqrt(wts)
    B = _basis(u, n_bg)
    P = _basis(u, n_amp)
    # background-only fit, projected out of everything
    Bw = B * sw[:, None]
    Q, _ = np.linalg.qr(Bw)
    yw = y * sw
    ry = yw - Q @ (Q.T @ yw)
    ny2 = float(ry @ ry)
    sub = (np.arange(8) + 0.5) / 8 - 0.5
    qs = q[:, None] + sub[None, :] * dq
    scores = np.zeros(len(defoci_nm))
    contrasts = np.zeros(len(defoci_nm))
    bmean = float(np.average(y, weights=wts))
    for i, df in enumerate(defoci_nm):
        c2 = np.cos(2 * chi_rad(qs, df, energy_eV=energy_eV, Cs_mm=Cs_mm)).mean(axis=1)
        X = P * c2[:, None] * sw[:, None]
        Xr = X - Q @ (Q.T @ X)
        coef, *_ = np.linalg.lstsq(Xr, ry, rcond=None)
        fit = Xr @ coef
        amp = P @ coef
        mean_amp = float(np.average(amp, weights=wts))
        if mean_amp >= 0 or ny2 <= 0:
            continue
        nf = float(fit @ fit)
        scores[i] = float(fit @ ry) / math.sqrt(max(nf * ny2, 1e-300))
        contrasts[i] = -mean_amp / max(abs(bmean), 1e-300)
    return scores, contrasts


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
    min_fit_quality: float = 0.5,
) -> CTFEstimate:
    """Estimate the defocus of one HRTEM frame from the Thon rings of its amorphous support.

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
        Fitted frequency band [1/Å]; default from ~1/(25 Å) to 0.9 Nyquist.
    min_fit_quality
        Fit quality (0..1) below which no rings are reported.

    Returns
    -------
    CTFEstimate
    """
    if not (sampling_A > 0 and math.isfinite(sampling_A)):
        raise ValueError(f"sampling_A must be a positive pixel size in Å/px (got {sampling_A})")
    if not energy_eV > 0:
        raise ValueError(f"energy_eV must be positive, in eV (got {energy_eV})")
    lo, hi = (float(defocus_range_nm[0]), float(defocus_range_nm[1]))
    if not lo < hi:
        raise ValueError(f"defocus_range_nm must be (low, high) with low < high (got {lo}, {hi})")
    spec, n_tiles = power_spectrum(image, tile_px)
    t = spec.shape[0]
    dq = 1.0 / (t * sampling_A)
    nyq = 0.5 / sampling_A
    common = dict(energy_eV=float(energy_eV), Cs_mm=float(Cs_mm), sampling_A=float(sampling_A))

    # sharp peaks: pixels far above their ring's median
    ratio = _ring_median_ratio(spec, sampling_A)
    q2d = _q_grid(t, sampling_A)
    peak = (ratio > 30.0) & (q2d > 3 * dq)
    qprof, prof_all, _ = radial_profile(spec, sampling_A)
    bg_all = np.nan_to_num(prof_all)
    excess = np.clip(spec - np.interp(q2d, qprof, bg_all), 0, None)
    total_excess = float(excess[q2d > 3 * dq].sum())
    peak_frac = float(excess[peak].sum() / total_excess) if total_excess > 0 else 0.0

    # radial profile without the peaks
    q, prof, counts = radial_profile(spec, sampling_A, mask=~peak)
    qa = q_min_per_A if q_min_per_A is not None else max(1.0 / 25.0, 4 * dq)
    qb = q_max_per_A if q_max_per_A is not None else 0.9 * nyq
    band = (q >= qa) & (q <= qb) & (counts > 0) & np.isfinite(prof)
    if band.sum() < 16:
        raise ValueError(
            f"the frequency band {qa:.3f}..{qb:.3f} 1/Å holds too few rings of the "
            f"{t}x{t} spectrum; widen q_min_per_A/q_max_per_A or use a larger frame"
        )
    qb_, yb = q[band], prof[band]
    # log-like compression keeps the fit balanced across the falling spectrum
    level = np.median(yb)
    if not level > 0:
        return CTFEstimate(
            None,
            None,
            False,
            0.0,
            False,
            False,
            True,
            "no amorphous signal: blank frame",
            **common,
            n_tiles=n_tiles,
        )
    ylog = np.log(np.maximum(yb, level * 1e-6))
    wts = counts[band].astype(np.float64)

    grid = np.arange(lo, hi + 0.25, 0.5)
    scores, contrasts = _fit_profile(qb_, ylog, wts, grid, energy_eV=energy_eV, Cs_mm=Cs_mm, dq=dq)

    def best_in(sel):
        if not sel.any():
            return None
        idx = np.flatnonzero(sel)
        j = idx[int(np.argmax(scores[idx]))]
        # refine on a fine grid around the best grid point
        fine = np.linspace(grid[j] - 0.5, grid[j] + 0.5, 21)
        s2, c2 = _fit_profile(qb_, ylog, wts, fine, energy_eV=energy_eV, Cs_mm=Cs_mm, dq=dq)
        k = int(np.argmax(s2))
        return _Fit(float(fine[k]), float(max(s2[k], 0.0)), float(c2[k]))

    pos = best_in(grid >= 0)
    neg = best_in(grid < 0)
    fits = [f for f in (pos, neg) if f is not None]
    best = max(fits, key=lambda f: f.score)
    other = min(fits, key=lambda f: f.score) if len(fits) == 2 else None

    # blank: flat spectrum (no structure beyond the statistical noise of the profile)
    n_eff = np.maximum(wts * n_tiles / 4.0, 1.0)
    resid = (yb / level - 1.0) * np.sqrt(n_eff)
    flat = float(np.mean(resid**2)) < 4.0

    periodic = peak_frac > 0.5
    if best.score < min_fit_quality:
        if flat:
            reason = "no amorphous signal: blank frame (flat spectrum, shot noise only)"
        elif periodic:
            reason = "no amorphous support: lattice fringes everywhere"
        else:
            reason = "no amorphous signal: no Thon rings found"
        return CTFEstimate(
            None,
            None,
            False,
            best.score,
            False,
            periodic,
            flat,
            reason,
            **common,
            q_band_per_A=(float(qa), float(qb)),
            n_tiles=n_tiles,
            peak_power_fraction=peak_frac,
        )
    sign_det = other is not None and (best.score - other.score) > 0.15
    return CTFEstimate(
        defocus_nm=best.defocus_nm,
        defocus_abs_nm=abs(best.defocus_nm),
        sign_determined=bool(sign_det),
        fit_quality=float(min(best.score, 1.0)),
        amorphous=True,
        periodic=periodic,
        blank=False,
        reason=None,
        **common,
        defocus_other_sign_nm=None if other is None else other.defocus_nm,
        fit_quality_other_sign=0.0 if other is None else float(other.score),
        q_band_per_A=(float(qa), float(qb)),
        n_tiles=n_tiles,
        peak_power_fraction=peak_frac,
        ring_contrast=best.contrast,
    )


# --------------------------------------------------------------------------------------------
# information-transfer overlap


def ctf_overlap(
    defocus_nm: float,
    training_defocus_nm: Sequence[float],
    *,
    energy_eV: float = DEFAULT_ENERGY_EV,
    Cs_mm: float = DEFAULT_CS_MM,
    sampling_A: float,
    focal_spread_A: float = DEFAULT_FOCAL_SPREAD_A,
    q_min_per_A: float = 0.05,
    q_max_per_A: float | None = None,
) -> float:
    """Information-transfer overlap [0..1] of a frame's CTF with the training CTFs.

    For two conditions a, b with transfer functions ``T_a, T_b`` (:func:`ctf_curve`, with the
    focal-spread envelope) the overlap is the normalised 2-D inner product over the band
    ``q_min_per_A <= |q| <= q_max_per_A`` [1/Å] (default q_max = Nyquist of ``sampling_A``)

        ρ(a, b) = ∫ T_a T_b q dq / sqrt(∫ T_a² q dq · ∫ T_b² q dq)

    (``q dq``: the 2-D frequency plane), clipped at 0 (contrast-inverted transfer counts as no
    overlap), and the result is the maximum of ρ over the training defoci: 1 = the frame's
    CTF transfers information exactly like one training condition.  Dimensionless.
    """
    train = np.atleast_1d(np.asarray(training_defocus_nm, dtype=np.float64))
    if train.size == 0:
        raise ValueError("training_defocus_nm is empty; give the model's training defoci in nm")
    qmax = 0.5 / sampling_A if q_max_per_A is None else float(q_max_per_A)
    if not 0 <= q_min_per_A < qmax:
        raise ValueError(f"need 0 <= q_min_per_A < q_max_per_A (got {q_min_per_A}, {qmax}) [1/Å]")
    q = np.linspace(q_min_per_A, qmax, 4096)
    kw = dict(energy_eV=energy_eV, Cs_mm=Cs_mm, focal_spread_A=focal_spread_A)
    ta = ctf_curve(q, float(defocus_nm), **kw)
    na = float(np.sum(ta * ta * q))
    best = 0.0
    for d in train:
        tb = ctf_curve(q, float(d), **kw)
        nb = float(np.sum(tb * tb * q))
        if na <= 0 or nb <= 0:
            continue
        best = max(best, float(np.sum(ta * tb * q)) / math.sqrt(na * nb))
    return float(min(max(best, 0.0), 1.0))
