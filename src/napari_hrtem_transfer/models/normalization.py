"""Per-image standardisation: the model's input pipeline (numpy; no torch needed).

Training and inference call the same function with the parameters stored in the checkpoint
(sidecar key ``"normalization"``), so experimental images are treated exactly like the
simulated training images.  Standardisation is applied to the *whole* image before any crop
or tile, so tiled inference sees the same input values as whole-image inference.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: The normalisation record stored in every checkpoint.
NORMALIZATION: dict[str, Any] = {"method": "per_image_standardize", "eps": 1e-6}


#: Pixels per block of the float64 arithmetic in :func:`standardize`.
_BLOCK_PX = 1 << 20


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
    x = np.asarray(images)
    if x.ndim < 2:
        raise np.exceptions.AxisError(f"images must be (..., H, W); got shape {x.shape}")
    flat = x.reshape(-1, *x.shape[-2:])
    out = np.empty(flat.shape, dtype=np.float32)
    rows = max(1, _BLOCK_PX // max(1, flat.shape[-1]))
    for i, img in enumerate(flat):
        # float64 statistics and arithmetic as before, a block of rows at a time: no
        # full-size float64 temporaries (three of them cost 6 float32 frames at 8192^2 px)
        mean = img.mean(dtype=np.float64)
        var = 0.0
        for r in range(0, img.shape[0], rows):
            d = img[r : r + rows].astype(np.float64) - mean
            var += float(np.einsum("ij,ij->", d, d))
        scale = np.sqrt(var / img.size) + eps
        for r in range(0, img.shape[0], rows):
            out[i, r : r + rows] = (img[r : r + rows].astype(np.float64) - mean) / scale
    return out.reshape(x.shape)


def apply_normalization(images: np.ndarray, record: dict[str, Any]) -> np.ndarray:
    """Apply the normalisation described by a checkpoint's ``record``.

    Raises
    ------
    ValueError
        If the method is unknown (a checkpoint written by a newer version).
    """
    method = record.get("method")
    if method != "per_image_standardize":
        raise ValueError(f"unknown input normalisation {method!r}")
    return standardize(images, float(record.get("eps", 1e-6)))
