"""Spectra of a frame: the periodic component, the tile-averaged periodogram, radial profiles,
and the sharp (lattice) peaks left out of the ring fit.  numpy/scipy only.

Spatial frequency ``q`` [1/Å] (no 2π); spectra are fftshifted and square.
"""

from __future__ import annotations

import numpy as np

#: Periodic: a pixel is a lattice peak when its power exceeds its ring's median this often.
PEAK_RATIO: float = 25.0
#: Periodic: pixels joined to a peak and above this ratio belong to it (its leakage wings).
PEAK_WING_RATIO: float = 4.0


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
