"""The model's input pipeline: optional flat-field correction, then per-image standardisation.

Numpy and scipy only (no torch).  Training and inference call the same function,
:func:`apply_normalization`, with the record stored in the checkpoint (sidecar key
``"normalization"``), so experimental images are treated exactly like the simulated training
images.  The chain is applied to the *whole* image before any crop or tile, so tiled inference
sees the same input values as whole-image inference.

Records
-------
``{"method": "per_image_standardize", "eps": 1e-6}``
    Standardisation only (every checkpoint written before flat-field correction existed;
    output bit-identical to :func:`standardize`).
``{"method": "flat_field_standardize", "eps": 1e-6, "flat_field_sigma_A": 150.0,
"sampling_A": 0.2}``
    Divide by a Gaussian-blurred copy of the frame (sigma ``flat_field_sigma_A`` [Å]), then
    standardise.  ``sampling_A`` [Å/px] is the pixel size of the images the record expects:
    the model's native pixel size, because inference resamples frames to it before
    normalising.  The blur in pixels is ``flat_field_sigma_A / sampling_A``; a caller holding
    frames at another pixel size passes ``sampling_A=`` to :func:`apply_normalization`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

#: The normalisation record of standardisation only (old checkpoints, default configs).
NORMALIZATION: dict[str, Any] = {"method": "per_image_standardize", "eps": 1e-6}

#: Methods :func:`apply_normalization` understands.
METHODS = ("per_image_standardize", "flat_field_standardize")

#: Pixels per block of the float64 arithmetic in :func:`standardize`.
_BLOCK_PX = 1 << 20

#: The blur runs on a block-mean copy whose pixels are at most sigma / this wide.
_LOWRES_SIGMA_PX = 4.0


class PreprocessConfig(BaseModel):
    """The input preprocessing of a new model (stored in its checkpoint as a record).

    Examples
    --------
    >>> PreprocessConfig().record(0.2)
    {'method': 'per_image_standardize', 'eps': 1e-06}
    >>> PreprocessConfig(flat_field_sigma_A=150.0).record(0.2)["method"]
    'flat_field_standardize'
    """

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, use_attribute_docstrings=True
    )

    flat_field_sigma_A: float | None = Field(default=None, gt=0.0, le=1e5)
    """Flat-field correction: each frame is divided by a copy blurred with a Gaussian of this
    sigma [Å] (it removes session-dependent uneven illumination), then standardised.  Use a
    sigma well above the particle size (e.g. 150 Å for particles up to 12 nm) so particle
    contrast survives.  None: standardisation only."""

    eps: float = Field(default=1e-6, ge=0.0)
    """Added to the standard deviation so that constant images do not divide by zero."""

    def record(self, sampling_A: float | None) -> dict[str, Any]:
        """The checkpoint record for a model whose native pixel size is ``sampling_A`` [Å/px].

        Raises
        ------
        ValueError
            If flat-field correction is on and ``sampling_A`` is unknown.
        """
        if self.flat_field_sigma_A is None:
            return {"method": "per_image_standardize", "eps": float(self.eps)}
        if sampling_A is None or not sampling_A > 0:
            raise ValueError(
                "flat-field correction needs the training images' pixel size (sampling_A [Å])"
            )
        return {
            "method": "flat_field_standardize",
            "eps": float(self.eps),
            "flat_field_sigma_A": float(self.flat_field_sigma_A),
            "sampling_A": float(sampling_A),
        }


def standardize(images: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Standardise each image to mean 0 and variance 1.

    Parameters
    ----------
    images
        Array (..., H, W) of raw values (electron counts or intensities).
    eps
        Added to the standard deviation so that constant images do not divide by zero.

    Returns
    -------
    np.ndarray
        float32 array of the same shape; each (H, W) image has mean 0 and std 1 (std
        computed with ddof=0, in float64).
    """
    return _each_image(images, lambda img, out: _standardize_into(img, out, eps))


def _each_image(images: np.ndarray, into: Callable[[np.ndarray, np.ndarray], None]) -> np.ndarray:
    """Apply ``into(img, out)`` to each (H, W) image of ``images`` (..., H, W); float32 out."""
    x = np.asarray(images)
    if x.ndim < 2:
        raise np.exceptions.AxisError(f"images must be (..., H, W); got shape {x.shape}")
    flat = x.reshape(-1, *x.shape[-2:])
    out = np.empty(flat.shape, dtype=np.float32)
    for i, img in enumerate(flat):
        into(img, out[i])
    return out.reshape(x.shape)


def _standardize_into(img: np.ndarray, out: np.ndarray, eps: float) -> None:
    """Standardise one frame into ``out`` (float32; may be ``img`` itself)."""
    rows = max(1, _BLOCK_PX // max(1, img.shape[-1]))
    # float64 statistics and arithmetic, a block of rows at a time: no full-size float64
    # temporaries (three of them cost 6 float32 frames at 8192^2 px)
    mean = img.mean(dtype=np.float64)
    var = 0.0
    for r in range(0, img.shape[0], rows):
        d = img[r : r + rows].astype(np.float64) - mean
        var += float(np.einsum("ij,ij->", d, d))
    scale = np.sqrt(var / img.size) + eps
    for r in range(0, img.shape[0], rows):
        out[r : r + rows] = (img[r : r + rows].astype(np.float64) - mean) / scale


def _block_means(img: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Means of k x k blocks (the last ones partial) and their centre coordinates [px]."""
    ny, nx = img.shape
    ys, xs = np.arange(0, ny, k), np.arange(0, nx, k)
    low = np.empty((ys.size, xs.size), np.float64)
    for j, y0 in enumerate(ys):
        band = img[y0 : y0 + k].astype(np.float64)
        low[j] = np.add.reduceat(band.sum(axis=0), xs) / (band.shape[0] * np.diff(np.r_[xs, nx]))
    cy = (ys + np.minimum(ys + k, ny) - 1) / 2.0
    cx = (xs + np.minimum(xs + k, nx) - 1) / 2.0
    return low, cy, cx


def _lerp_weights(centres: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices i0, i1 and weight w of linear interpolation from ``centres`` to 0..n-1."""
    pos = np.interp(np.arange(n, dtype=np.float64), centres, np.arange(centres.size))
    i0 = np.floor(pos).astype(np.int64)
    i1 = np.minimum(i0 + 1, centres.size - 1)
    return i0, i1, pos - i0


def background(img: np.ndarray, sigma_px: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The smooth background of one frame, on a coarse grid (see :func:`flat_field`).

    The frame is reduced to means of k x k blocks (k = sigma / 4, so the background, smooth
    on the scale of sigma, is represented with 4 samples per sigma), blurred there with a
    Gaussian (reflecting borders) whose width makes the total blur sigma [px].

    Returns
    -------
    low, cy, cx
        The coarse background and the centre coordinates [px] of its rows and columns.
    """
    from scipy import ndimage

    k = max(1, int(sigma_px / _LOWRES_SIGMA_PX))
    low, cy, cx = _block_means(img, k)
    # a k-px box adds k^2/12 px^2 of variance; the coarse Gaussian makes up the rest
    s_low = math.sqrt(max(sigma_px**2 - k * k / 12.0, 0.0)) / k
    low = ndimage.gaussian_filter(low, s_low, mode="reflect", truncate=4.0)
    return low, cy, cx


def flat_field(img: np.ndarray, sigma_px: float, out: np.ndarray | None = None) -> np.ndarray:
    """Divide one frame (H, W) by its Gaussian-blurred copy (sigma ``sigma_px`` [px]).

    The blurred copy is computed on a block-mean grid and interpolated back bilinearly a block
    of rows at a time, so no full-size float64 temporary is made.  Where the background's
    mean is not positive (offset-subtracted data) the background is subtracted instead;
    backgrounds below 1 % of their mean are clipped there (no division by ~0).

    Returns
    -------
    np.ndarray
        float32 (H, W); ``out`` if given.
    """
    ny, nx = img.shape
    low, cy, cx = background(img, sigma_px)
    yi0, yi1, wy = _lerp_weights(cy, ny)
    xi0, xi1, wx = _lerp_weights(cx, nx)
    # columns first on the coarse rows: (n_low_y, nx), small
    lowx = low[:, xi0] * (1.0 - wx) + low[:, xi1] * wx
    mean_bg = float(low.mean())
    divide = mean_bg > 0
    floor = 0.01 * mean_bg
    if out is None:
        out = np.empty((ny, nx), np.float32)
    rows = max(1, _BLOCK_PX // 4 // max(1, nx))  # ~6 float64 temporaries of a block
    for r in range(0, ny, rows):
        sl = slice(r, min(r + rows, ny))
        w = wy[sl, None]
        bg = lowx[yi0[sl]] * (1.0 - w) + lowx[yi1[sl]] * w
        blk = img[sl].astype(np.float64)
        out[sl] = blk / np.maximum(bg, floor) if divide else blk - bg
    return out


def flat_field_standardize(images: np.ndarray, sigma_px: float, eps: float = 1e-6) -> np.ndarray:
    """Flat-field correct (:func:`flat_field`) and standardise each image (..., H, W).

    Returns
    -------
    np.ndarray
        float32 array of the same shape, each image of mean 0 and std 1.
    """

    def into(img: np.ndarray, out: np.ndarray) -> None:
        flat_field(img, sigma_px, out=out)
        _standardize_into(out, out, eps)

    return _each_image(images, into)


def apply_normalization(
    images: np.ndarray, record: dict[str, Any], sampling_A: float | None = None
) -> np.ndarray:
    """Apply the whole input preprocessing described by a checkpoint's ``record``.

    Parameters
    ----------
    images
        Raw frames (..., H, W), at the model's pixel size.
    record
        The checkpoint's ``"normalization"`` record (see the module docstring).
    sampling_A
        Pixel size of ``images`` [Å/px] when it is not the record's ``sampling_A`` (only the
        flat-field blur depends on it); None: the record's.

    Raises
    ------
    ValueError
        If the method is unknown (a checkpoint written by a newer version) or the record is
        incomplete.
    """
    method = record.get("method")
    eps = float(record.get("eps", 1e-6))
    if method == "per_image_standardize":
        return standardize(images, eps)
    if method == "flat_field_standardize":
        sigma_A = record.get("flat_field_sigma_A")
        s = sampling_A if sampling_A is not None else record.get("sampling_A")
        if not sigma_A or not s:
            raise ValueError(
                "the flat_field_standardize record needs flat_field_sigma_A and sampling_A "
                f"(got {record})"
            )
        return flat_field_standardize(images, float(sigma_A) / float(s), eps)
    raise ValueError(f"unknown input normalisation {method!r}")
