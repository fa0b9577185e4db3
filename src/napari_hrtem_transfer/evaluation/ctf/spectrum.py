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


def _work_dtype(a: np.ndarray) -> type:
    """float64 for float64 input, else float32 (counts, float32 frames)."""
    return np.float64 if a.dtype == np.float64 else np.float32


def periodic_component(tile: np.ndarray) -> np.ndarray:
    """Periodic part of an image (Moisan's periodic + smooth decomposition).

    The smooth part ``s`` solves ``Δs = Δ_boundary u`` (the jumps between opposite edges);
    ``u - s`` has no edge discontinuity, so its periodogram has no cross of edge artefacts
    and needs no window: every pixel counts with full frequency resolution.
    L. Moisan, J. Math. Imaging Vis. 39, 161 (2011).  Computed with real FFTs, in float32
    unless the tile is float64.
    """
    import scipy.fft as sfft

    u = np.asarray(tile)
    u = u.astype(_work_dtype(u), copy=False)
    ny, nx = u.shape
    v = np.zeros_like(u)
    d = u[-1, :] - u[0, :]
    v[0, :] += d
    v[-1, :] -= d
    d = u[:, -1] - u[:, 0]
    v[:, 0] += d
    v[:, -1] -= d
    cy = np.cos(2 * np.pi * np.arange(ny) / ny)[:, None]
    cx = np.cos(2 * np.pi * np.arange(nx // 2 + 1) / nx)[None, :]
    den = (2 * cy + 2 * cx - 4).astype(u.dtype)
    den[0, 0] = 1.0
    sf = sfft.rfft2(v)
    sf /= den
    sf[0, 0] = 0.0
    return u - sfft.irfft2(sf, s=(ny, nx))


def _corners(ny: int, nx: int, t: int, max_tiles: int) -> list[tuple[int, int]]:
    """Tile corners at 50 % overlap; at most ``max_tiles`` of them, evenly spread."""
    step = max(t // 2, 1)
    corners = [(y, x) for y in range(0, ny - t + 1, step) for x in range(0, nx - t + 1, step)]
    if len(corners) > max_tiles:
        idx = np.linspace(0, len(corners) - 1, max_tiles).round().astype(int)
        corners = [corners[i] for i in idx]
    return corners


def _full_from_half(half: np.ndarray, t: int) -> np.ndarray:
    """The (t, t) power spectrum from its rfft half (t, t//2 + 1): P(-k) = P(k)."""
    full = np.empty((t, t), dtype=half.dtype)
    full[:, : t // 2 + 1] = half
    neg_y = np.r_[0, t - 1 : 0 : -1]
    full[:, t // 2 + 1 :] = half[neg_y][:, t // 2 - 1 : 0 : -1]
    return full


def power_spectrum(
    image, tile_px: int = 512, max_tiles: int = 256, window: str = "periodic"
) -> tuple[np.ndarray, int]:
    """Tile-averaged periodogram (Welch) of an image; memory bounded by one tile.

    Square tiles of ``min(tile_px, ny, nx)`` px (50 % overlap, mean removed per tile) are
    Fourier transformed one at a time (real FFTs, float32 unless the image is float64) and
    their ``|F|²`` averaged; at most ``max_tiles`` tiles (evenly spread) are used.
    ``window="periodic"`` (default) transforms each tile's periodic component
    (:func:`periodic_component`, no taper, full resolution); ``window="hann"`` tapers each
    tile with a Hann window instead (less leakage from strong off-grid peaks, twice as wide a
    frequency resolution, edge pixels down-weighted).

    Returns
    -------
    (numpy.ndarray, int)
        fftshifted float64 spectrum (t, t) normalised by the window energy (white noise of
        variance v gives v), and the number of tiles averaged.
    """
    import scipy.fft as sfft

    if window not in ("periodic", "hann"):
        raise ValueError(f"window must be 'periodic' or 'hann' (got {window!r})")
    img = image if isinstance(image, np.ndarray) else np.asarray(image)
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
    corners = _corners(ny, nx, t, max_tiles)
    dt = _work_dtype(img)
    w = _window(t).astype(dt) if window == "hann" else None
    norm = float((w.astype(np.float64) ** 2).sum()) if w is not None else float(t * t)
    acc = np.zeros((t, t // 2 + 1), dtype=np.float64)
    for y, x in corners:
        tile = np.asarray(img[y : y + t, x : x + t]).astype(dt)
        if w is None:
            tile = periodic_component(tile)
        tile -= tile.mean(dtype=np.float64)
        f = sfft.rfft2(tile * w if w is not None else tile)
        acc += f.real.astype(np.float64) ** 2 + f.imag.astype(np.float64) ** 2
    acc /= norm * len(corners)
    return np.fft.fftshift(_full_from_half(acc, t)), len(corners)


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


def _axis_background(spec: np.ndarray, width: int = 15) -> np.ndarray:
    """On the frequency axes (3 px wide bands), the running median along the axis (window
    ``width`` px); +inf elsewhere.  A detector row/column pattern or edge leakage is smooth
    along the axis; a lattice reflection on it is a sharp peak above this."""
    from scipy import ndimage

    t = spec.shape[0]
    c = t // 2
    bg = np.full(spec.shape, np.inf)
    rows = slice(c - 1, c + 2)
    bg[rows, :] = ndimage.median_filter(spec[rows, :], size=(1, width), mode="nearest")
    along = ndimage.median_filter(spec[:, rows], size=(width, 1), mode="nearest")
    bg[:, rows] = np.minimum(bg[:, rows], along)
    return bg


def _peaks(spec: np.ndarray, sampling_A: float) -> tuple[np.ndarray, float]:
    """Pixels left out of the ring fit, and the fraction of excess power in lattice peaks.

    Left out: the two frequency axes (|qx| or |qy| <= 1 px: detector row/column patterns
    and what is left of the frame edges) and sharp peaks (power > :data:`PEAK_RATIO` times
    their ring's median, dilated by 2 px).  Peaks on the axes (an axis-aligned crystal, e.g.
    a cubic lattice in a zone axis along the frame's edges) are found against the running
    median along the axis (:func:`_axis_background`).  The fraction is the power above the
    background held by the peaks (off and on the axes) over that held by all pixels off the
    axes plus the axis peaks.
    """
    from scipy import ndimage

    t = spec.shape[0]
    dq = 1.0 / (t * sampling_A)
    q2d = _q_grid(t, sampling_A)
    k = np.abs(np.arange(t) - t // 2)
    axes = (k[:, None] <= 1) | (k[None, :] <= 1)
    far = q2d > 3 * dq
    ratio = _ring_median_ratio(spec, sampling_A)
    sel = far & ~axes
    core = (ratio > PEAK_RATIO) & sel
    # hysteresis: a peak's leakage wings (pixels above PEAK_WING_RATIO joined to a core
    # pixel) go with it, then 2 px more
    labels, _ = ndimage.label((ratio > PEAK_WING_RATIO) & sel)
    keep = np.unique(labels[core])
    wings = np.isin(labels, keep[keep > 0])
    peaks = ndimage.binary_dilation(core | wings, iterations=2) & sel
    ax_bg = _axis_background(spec)
    ax_core = axes & far & (spec > PEAK_RATIO * ax_bg)
    ax_peaks = ndimage.binary_dilation(ax_core, iterations=2) & axes & far
    qprof, prof, _ = radial_profile(spec, sampling_A, mask=~(peaks | axes))
    bg = np.interp(q2d, qprof, np.nan_to_num(prof, nan=float(np.nanmedian(prof))))
    excess = np.clip(spec - bg, 0, None)
    ax_excess = float(np.clip(spec[ax_peaks] - ax_bg[ax_peaks], 0, None).sum())
    total = float(excess[sel].sum()) + ax_excess
    frac = float((excess[peaks].sum() + ax_excess) / total) if total > 0 else 0.0
    return peaks | axes, frac
