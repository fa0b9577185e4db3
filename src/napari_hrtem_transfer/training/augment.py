"""Training augmentations: D4 symmetries, pixel-size rescaling, dose and detail.

Pure numpy/scipy (no torch).  Every function is deterministic given its inputs (random ones
take a ``numpy.random.Generator``), so an epoch plan's row always gives the same sample.
"""

from __future__ import annotations

import numpy as np


def d4_transform(x: np.ndarray, k: int) -> np.ndarray:
    """Apply the dihedral (D4) transform ``k`` (0-7) to the last two axes of ``x``.

    ``k % 4`` counter-clockwise quarter turns (``np.rot90``), then a left-right flip of the
    last axis if ``k >= 4``; ``k = 0`` is the identity.  The eight codes are the eight
    symmetries of the square, so a set of images augmented with all eight is closed under
    rotation and reflection.  Leading axes (batch, channel) are carried along unchanged.

    Parameters
    ----------
    x
        Array of at least two dimensions, e.g. (ny, nx) or (n, ny, nx).
    k
        Transform code, 0 <= k < 8.

    Returns
    -------
    np.ndarray
        A view of ``x`` (not a copy); wrap it in ``np.ascontiguousarray`` where a contiguous
        array is needed.  Quarter turns swap the last two sizes.

    Raises
    ------
    ValueError
        If ``k`` is not in 0..7 or ``x`` has fewer than two dimensions.
    """
    k = int(k)
    if not 0 <= k < 8:
        raise ValueError(f"D4 transform code must be in 0..7 (got {k})")
    if np.ndim(x) < 2:
        raise ValueError(f"D4 transforms act on the last two axes; got a {np.ndim(x)}-d array")
    out = np.rot90(x, k % 4, axes=(-2, -1))
    if k >= 4:
        out = out[..., ::-1]
    return out


def d4(image: np.ndarray, code: int) -> np.ndarray:
    """Short name of :func:`d4_transform`."""
    return d4_transform(image, code)


def coarser_detail(image: np.ndarray, factor: float) -> np.ndarray:
    """``image`` with the detail of a frame ``factor`` times coarser, upsampled back to its
    grid as ``segment`` resamples a coarse frame (a Gaussian of 0.4 x ``factor`` px against
    aliasing, linear down-sampling, linear up-sampling to the same shape)."""
    from scipy import ndimage

    from ..io.frames import zoom

    smooth = ndimage.gaussian_filter(np.asarray(image, np.float32), 0.4 * factor, mode="mirror")
    return zoom(zoom(smooth, 1.0 / factor), 1.0, shape=image.shape)


def renoise(
    raw: np.ndarray,
    dose_e_per_A2: float | None,
    target_e_per_A2: float,
    sampling_A: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """The frame ``raw`` as recorded at the lower dose ``target_e_per_A2`` [e/Å²].

    ``dose_e_per_A2`` is the dose ``raw`` itself was recorded at (for a dataset whose images
    each have their own dose, the image's: :meth:`TrainingData.recorded_dose`).  Noise-free
    intensities (``dose_e_per_A2`` None, NaN or infinite; vacuum = 1) are Poisson-sampled with
    ``intensity * target * sampling_A**2`` expected counts per pixel.  Integer counts at dose
    D are binomially thinned with p = target / D, which gives exactly Poisson counts at the
    target dose; non-integer counts are Poisson-sampled with mean ``counts * p`` (slightly more
    noise than thinning).  A target at or above D returns ``raw`` unchanged.
    """
    if dose_e_per_A2 is None or not np.isfinite(float(dose_e_per_A2)):
        lam = np.clip(raw, 0, None).astype(np.float64) * (target_e_per_A2 * sampling_A**2)
        return rng.poisson(lam).astype(np.float32)
    p = float(target_e_per_A2) / float(dose_e_per_A2)
    if p >= 1.0:
        return raw
    if np.issubdtype(raw.dtype, np.integer):
        return rng.binomial(np.clip(raw, 0, None).astype(np.int64), p).astype(np.float32)
    return rng.poisson(np.clip(raw, 0, None).astype(np.float64) * p).astype(np.float32)


def _mirrored(j: np.ndarray, n: int) -> np.ndarray:
    """Indices ``j`` folded into ``0..n-1`` by mirroring at the borders (``d c b a | a b c d``)."""
    j = np.mod(j, 2 * n)
    return np.where(j < n, j, 2 * n - 1 - j)


def resample_weights(n_src: int, n_out: int, factor: float, origin: float) -> np.ndarray:
    """The (n_out, n_src) matrix that resamples a row of ``n_src`` pixels to pixels
    ``1 / factor`` as wide, the first output pixel's left edge at source position ``origin``
    [source px]; outside the row the source is mirrored.

    ``factor >= 1`` (finer pixels): linear interpolation at the output pixel centres
    (``grid_mode``: output pixel ``o`` is centred on ``origin + (o + 0.5) / factor - 0.5``).
    ``factor < 1`` (coarser pixels): each output pixel is the mean of the source area it
    covers (fractional overlaps), as a detector with larger pixels integrates the signal.
    Each row sums to 1.
    """
    f = float(factor)
    o = np.arange(n_out, dtype=np.float64)
    w = np.zeros((n_out, n_src), dtype=np.float64)
    rows = np.arange(n_out)
    if f >= 1.0:
        s = origin + (o + 0.5) / f - 0.5
        j0 = np.floor(s)
        t = s - j0
        for j, wt in ((j0, 1.0 - t), (j0 + 1, t)):
            np.add.at(w, (rows, _mirrored(j.astype(np.int64), n_src)), wt)
        return w
    lo, hi = origin + o / f, origin + (o + 1) / f
    for k in range(int(np.ceil(1.0 / f)) + 1):
        j = np.floor(lo) + k
        overlap = np.clip(np.minimum(hi, j + 1) - np.maximum(lo, j), 0.0, None)
        np.add.at(w, (rows, _mirrored(j.astype(np.int64), n_src)), overlap * f)
    return w


def rescale_frame(
    image: np.ndarray,
    mask: np.ndarray,
    factor: float,
    shape: tuple[int, int],
    origin: tuple[float, float] = (0.0, 0.0),
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``image`` and ``mask`` as recorded with pixels ``factor`` times smaller, on a grid of
    ``shape`` px whose top-left edge is at ``origin`` [source px] (mirrored beyond the frame).

    Features appear ``factor`` times larger.  With ``rng``, ``image`` holds counts per pixel
    with Poisson noise (a simulation at a recorded dose); the result then holds the counts a
    frame at the same dose per area but the new pixel size would hold: ``1 / factor**2``
    times the counts per pixel, and the noise of those counts.  Resampling alone gets the
    noise wrong (linear interpolation between two pixels halves the noise variance, so a
    network trained on it learns smooth noise and fails on real, pixel-white noise); the
    variance the resampling removed, ``mean / factor**2`` minus the propagated variance
    ``(W**2) counts (W**2)^T / factor**4`` (``W`` from :func:`resample_weights`), is added
    back as Gaussian noise.  That is exact for Poisson counts; for counts with correlated
    noise (a detector MTF) or a DQE below 1 it adds somewhat too much.  Without ``rng``
    (noise-free intensities) the image is only resampled.

    Returns
    -------
    image, mask
        float32 ``shape``; the mask resampled with the same weights and thresholded at 0.5
        (values 0/1).
    """
    f = float(factor)
    src = np.asarray(image, np.float64)
    wy = resample_weights(src.shape[0], shape[0], f, origin[0])
    wx = resample_weights(src.shape[1], shape[1], f, origin[1])
    out = wy @ src @ wx.T
    if rng is not None:
        out /= f * f
        propagated = (wy**2) @ np.clip(src, 0.0, None) @ (wx**2).T / f**4
        missing = np.clip(np.clip(out, 0.0, None) - propagated, 0.0, None)
        out += rng.standard_normal(out.shape) * np.sqrt(missing)
    msk = (wy @ np.asarray(mask, np.float64) @ wx.T) >= 0.5
    return out.astype(np.float32), msk.astype(np.float32)
