"""Pure metric kernels (numpy only): overlap scores, losses, bootstrap intervals, and the
study's out-of-distribution (OOD) measures.

Conventions
-----------
* Masks are boolean (or 0/1) arrays; a batch is ``(N, H, W)`` and every score is computed
  per image, so a stack can be annotated frame by frame.
* Losses are the mean binary cross-entropy per pixel [nats], the loss the U-Net is trained
  with (logits in, no double softmax; see SCIENCE.md).
* Defocus follows abTEM: ``defocus = -C10``, positive = underfocus, in [nm].

The study's OOD measures
------------------------
``generalization``
    Population standard deviation (``numpy.std``, ``ddof=0``) of a model's per-domain losses
    over all non-zero defoci.  The in-focus domain (0 nm) is the hardest and an outlier, so
    it is excluded by default; which domains to exclude is a parameter.  Larger is worse.
``shift``
    ``after - before`` (generalization after transfer minus after pretraining).  Positive
    means fine-tuning made the model's OOD behaviour worse.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from ..errors import ConfigError

__all__ = [
    "binary_cross_entropy",
    "bootstrap_ci",
    "dice",
    "generalization",
    "iou",
    "predictive_entropy",
    "shift",
]

#: Probabilities are clipped to [EPS, 1 - EPS] when a loss is computed from probabilities.
EPS = 1e-7


def _as_batch(a, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim == 2:
        a = a[None]
    if a.ndim < 3:
        raise ConfigError(
            f"{name} must be an image (H, W) or a batch (N, H, W); got shape {a.shape}."
        )
    return a.reshape(a.shape[0], -1)


def _check_pair(pred, target) -> tuple[np.ndarray, np.ndarray, bool]:
    single = np.ndim(pred) == 2
    p = _as_batch(pred, "pred").astype(bool)
    t = _as_batch(target, "target").astype(bool)
    if p.shape != t.shape:
        raise ConfigError(
            f"prediction and ground truth differ in shape: {np.shape(pred)} vs {np.shape(target)}."
        )
    return p, t, single


def dice(pred, target, empty: float = 1.0):
    """Dice coefficient ``2|P∩T| / (|P| + |T|)`` of binary masks, per image.

    Parameters
    ----------
    pred, target
        Binary masks, shape (H, W) or (N, H, W).
    empty
        Value returned for an image where both masks are empty (a correct "no particle").

    Returns
    -------
    float or numpy.ndarray
        A float for one image, an array (N,) for a batch.
    """
    return _overlap(pred, target, empty, union=False)


def iou(pred, target, empty: float = 1.0):
    """Intersection over union (Jaccard index) ``|P∩T| / |P∪T|`` of binary masks, per image.

    Parameters
    ----------
    pred, target, empty
        As in :func:`dice`: binary masks (H, W) or (N, H, W), and the value returned for an
        image where both masks are empty.

    Returns
    -------
    float or numpy.ndarray
        As :func:`dice`: a float for one image, an array (N,) for a batch.
    """
    return _overlap(pred, target, empty, union=True)


def _overlap(pred, target, empty: float, union: bool):
    """Dice (``union`` False) or IoU (True) per image; ``empty`` where both masks are empty."""
    p, t, single = _check_pair(pred, target)
    inter = np.logical_and(p, t).sum(axis=1).astype(float)
    if union:
        denom = np.logical_or(p, t).sum(axis=1).astype(float)
    else:
        inter = 2.0 * inter
        denom = p.sum(axis=1).astype(float) + t.sum(axis=1)
    out = np.where(denom > 0, inter / np.maximum(denom, 1), empty)
    return float(out[0]) if single else out


def binary_cross_entropy(pred, target, from_logits: bool = True):
    """Mean binary cross-entropy per pixel [nats], per image.

    Parameters
    ----------
    pred
        Logits (``from_logits=True``, the default) or foreground probabilities, shape (H, W)
        or (N, H, W) (a singleton channel axis (N, 1, H, W) is accepted).
    target
        Binary ground truth of the same shape.
    from_logits
        Whether ``pred`` holds logits.  With logits the loss is computed in the numerically
        stable form ``max(z, 0) - z*y + log(1 + exp(-|z|))``; probabilities are clipped to
        ``[EPS, 1 - EPS]``.

    Returns
    -------
    float or numpy.ndarray
        A float for one image, an array (N,) for a batch.
    """
    pred = np.asarray(pred, dtype=np.float64)
    if pred.ndim == 4 and pred.shape[1] == 1:
        pred = pred[:, 0]
    single = pred.ndim == 2
    z = _as_batch(pred, "pred")
    y = _as_batch(target, "target").astype(np.float64)
    if z.shape != y.shape:
        raise ConfigError(
            f"prediction and ground truth differ in shape: {pred.shape} vs {np.shape(target)}."
        )
    if from_logits:
        per_px = np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))
    else:
        p = np.clip(z, EPS, 1 - EPS)
        per_px = -(y * np.log(p) + (1 - y) * np.log1p(-p))
    out = per_px.mean(axis=1)
    return float(out[0]) if single else out


def predictive_entropy(proba):
    """Mean binary entropy of the predicted probabilities [nats], per image.

    0 for confident predictions, ``log 2 ≈ 0.693`` when every pixel is at 0.5.

    Parameters
    ----------
    proba
        Foreground probabilities, shape (H, W) or (N, H, W).

    Returns
    -------
    float or numpy.ndarray
    """
    proba = np.asarray(proba, dtype=np.float64)
    single = proba.ndim == 2
    p = np.clip(_as_batch(proba, "proba"), EPS, 1 - EPS)
    out = -(p * np.log(p) + (1 - p) * np.log1p(-p)).mean(axis=1)
    return float(out[0]) if single else out


def bootstrap_ci(
    values,
    statistic: Callable[[np.ndarray], float] = np.mean,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int | None = 0,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of a statistic of per-image values.

    Parameters
    ----------
    values
        Per-image values, shape (N,).  NaNs are dropped.
    statistic
        Function of a 1-D array (vectorised over ``axis=-1`` if possible, such as
        ``numpy.mean`` or ``numpy.median``).
    n_boot
        Number of bootstrap resamples.
    confidence
        Coverage of the interval, in (0, 1).
    seed
        Seed of the resampling (the default makes reports reproducible).

    Returns
    -------
    (float, float)
        Lower and upper bounds; ``(nan, nan)`` without values, ``(v, v)`` for a single value.
    """
    if not 0 < confidence < 1:
        raise ConfigError(f"confidence must lie in (0, 1); got {confidence}.")
    if n_boot < 1:
        raise ConfigError(f"n_boot must be at least 1; got {n_boot}.")
    v = np.asarray(values, dtype=float).reshape(-1)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return (float("nan"), float("nan"))
    if v.size == 1:
        return (float(v[0]), float(v[0]))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, v.size, size=(n_boot, v.size))
    samples = v[idx]
    try:
        stats = np.asarray(statistic(samples, axis=-1), dtype=float)
    except TypeError:
        stats = np.array([statistic(s) for s in samples], dtype=float)
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(stats, [alpha, 1 - alpha])
    return (float(lo), float(hi))


def generalization(
    losses: Mapping[float, float] | Sequence[float] | np.ndarray,
    defocus_nm: Sequence[float] | np.ndarray | None = None,
    exclude_nm: Sequence[float] = (0.0,),
    tol_nm: float = 1e-6,
) -> float:
    """The study's generalization measure: population std of per-domain losses.

    Parameters
    ----------
    losses
        Loss of one model (or one reduced cell of models) on each domain: a mapping
        ``{defocus [nm]: loss}`` or a sequence aligned with ``defocus_nm``.
    defocus_nm
        Defocus of each domain [nm]; required when ``losses`` is a sequence.
    exclude_nm
        Domains left out [nm]; the in-focus domain (0 nm) by default, as in the study.
    tol_nm
        Tolerance when matching excluded defoci [nm].

    Returns
    -------
    float
        ``numpy.std(kept_losses, ddof=0)``; NaN if any kept loss is NaN.

    Raises
    ------
    ConfigError
        If fewer than two domains remain after exclusion.
    """
    if isinstance(losses, Mapping):
        d = np.array([float(k) for k in losses], dtype=float)
        v = np.array([float(x) for x in losses.values()], dtype=float)
    else:
        if defocus_nm is None:
            raise ConfigError("give defocus_nm with a sequence of losses (or pass a mapping).")
        v = np.asarray(losses, dtype=float).reshape(-1)
        d = np.asarray(defocus_nm, dtype=float).reshape(-1)
        if d.shape != v.shape:
            raise ConfigError(f"{v.size} losses for {d.size} defocus values.")
    keep = np.ones(d.shape, bool)
    for e in exclude_nm:
        keep &= np.abs(d - float(e)) > tol_nm
    if keep.sum() < 2:
        raise ConfigError(
            f"generalization needs at least two domains after excluding {list(exclude_nm)} nm; "
            f"the domains are {sorted(d.tolist())} nm."
        )
    return float(np.std(v[keep], ddof=0))


def shift(after, before):
    """Shift of a measure between two models, ``after - before``; positive = worse.

    Parameters
    ----------
    after, before
        Generalization (or any loss-like measure, larger = worse) of the fine-tuned model and
        of the model before fine-tuning.  Scalars or arrays.

    Returns
    -------
    float or numpy.ndarray
    """
    out = np.asarray(after, dtype=float) - np.asarray(before, dtype=float)
    return float(out) if out.ndim == 0 else out
