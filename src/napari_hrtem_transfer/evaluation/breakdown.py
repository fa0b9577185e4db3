"""Model-card breakdowns: Dice per defocus, material, dose bin and particle-size bin.

Input is one row per scored frame, from either source:

* :func:`.independent.score_frames` (columns ``defocus_nm``, ``material``,
  ``dose_e_per_A2``, ``diameter_nm``, ``dice``), or
* :func:`.labelled.evaluate_model`'s ``frames`` table, joined with the dataset's
  per-structure metadata by :func:`frame_rows_from_evaluation` (the package's simulated
  files record ``radii_nm`` per structure; the dose is the file's).

:func:`breakdown` returns one row per (model, factor, level) with the mean Dice and its
percentile-bootstrap interval over frames; :func:`breakdown_markdown` renders them for the
model card.  Numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from .metrics import bootstrap_ci

__all__ = [
    "DOSE_BINS_E_PER_A2",
    "FACTORS",
    "SIZE_BINS_NM",
    "breakdown",
    "breakdown_markdown",
    "frame_rows_from_evaluation",
]

#: Edges of the particle-diameter bins [nm] (left-closed).
SIZE_BINS_NM: tuple[float, ...] = (0.0, 3.0, 5.0, 8.0, 12.5)
#: Edges of the dose bins [e/Å²] (left-closed): low (<150), medium, high (>=600).
DOSE_BINS_E_PER_A2: tuple[float, ...] = (0.0, 150.0, 600.0, math.inf)
#: The factors a breakdown can group by.
FACTORS: tuple[str, ...] = ("defocus_nm", "material", "dose", "size")


def _diameter_nm(meta: Mapping[str, Any]) -> float:
    if meta.get("diameter_nm") is not None:
        return float(meta["diameter_nm"])
    radii = meta.get("radii_nm")
    return float(2 * np.mean(radii)) if radii else float("nan")


def frame_rows_from_evaluation(result: Any, dataset: Any = None) -> list[dict]:
    """Frame rows of an :class:`~.labelled.EvaluationResult` in the breakdown's columns.

    ``dataset`` (the evaluated :class:`~..io.dataset.HRTEMDataset`) supplies each
    structure's diameter (``info["structures"][i]``: ``diameter_nm`` or ``radii_nm``) and
    each image's dose: ``info["per_image"]["dose_e_per_A2"][defocus index][i]`` (the
    simulator's per-image conditions) when recorded, else the structure's ``dose_e_per_A2``,
    else the file's.  Without it the diameter is NaN and the dose the file's.
    """
    info = (getattr(dataset, "info", None) or {}) if dataset is not None else {}
    meta = list(info.get("structures") or [])
    per_dose = (info.get("per_image") or {}).get("dose_e_per_A2")
    defoci = np.asarray(getattr(dataset, "defocus_nm", []), float)
    out = []
    for r in result.frames.records():
        i = int(r["image_index"])
        m = meta[i] if 0 <= i < len(meta) and isinstance(meta[i], Mapping) else {}
        dose = m.get("dose_e_per_A2", r.get("dose_e_per_A2"))
        df = float(r["domain_defocus_nm"])
        if per_dose is not None and defoci.size:
            di = int(np.argmin(np.abs(defoci - df)))
            v = per_dose[di][i] if di < len(per_dose) and i < len(per_dose[di]) else None
            dose = dose if v is None else float(v)
        out.append(
            {
                "model_id": r.get("model_id", getattr(result, "model_id", "")),
                "structure_id": r.get("structure_id"),
                "image_index": i,
                "material": r.get("material"),
                "defocus_nm": df,
                "dose_e_per_A2": dose,
                "diameter_nm": _diameter_nm(m),
                "dice": float(r["dice"]),
            }
        )
    return out


def _bin_label(value: float, edges: Sequence[float], unit: str) -> str | None:
    if value is None or not np.isfinite(value):
        return None
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        if lo <= value < hi:
            if math.isinf(hi):
                return f">= {lo:g} {unit}"
            return f"{lo:g}-{hi:g} {unit}"
    return None


def _level(row: Mapping[str, Any], factor: str, size_bins, dose_bins):
    """(sort key, label) of a frame row for a factor, or None when the row lacks it."""
    if factor == "defocus_nm":
        v = row.get("defocus_nm")
        return None if v is None else (float(v), f"{float(v):g} nm")
    if factor == "material":
        v = row.get("material")
        return None if v in (None, "") else (str(v), str(v))
    if factor == "dose":
        v = row.get("dose_e_per_A2")
        v = float("nan") if v is None else float(v)
        lab = _bin_label(v, dose_bins, "e/Å²")
        return None if lab is None else (float(np.searchsorted(dose_bins, v, "right")), lab)
    if factor == "size":
        v = row.get("diameter_nm")
        v = float("nan") if v is None else float(v)
        lab = _bin_label(v, size_bins, "nm")
        return None if lab is None else (float(np.searchsorted(size_bins, v, "right")), lab)
    raise ValueError(f"unknown factor {factor!r}; choose from {', '.join(FACTORS)}")


def breakdown(
    rows: Iterable[Mapping[str, Any]],
    by: Sequence[str] = FACTORS,
    *,
    metric: str = "dice",
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    size_bins_nm: Sequence[float] = SIZE_BINS_NM,
    dose_bins_e_per_A2: Sequence[float] = DOSE_BINS_E_PER_A2,
) -> list[dict]:
    """Mean ``metric`` per (model, factor, level) with a bootstrap interval over frames.

    Parameters
    ----------
    rows
        One mapping per frame with ``metric`` and the factor columns (see module docstring);
        ``model_id`` separates models (default ``""``).
    by
        Factors among :data:`FACTORS`: ``defocus_nm`` (each defocus), ``material``,
        ``dose`` (bins :data:`DOSE_BINS_E_PER_A2` [e/Å²]), ``size`` (mean particle diameter
        bins :data:`SIZE_BINS_NM` [nm]).  A frame without a factor's value is left out of
        that factor.
    n_boot, confidence, seed
        Bootstrap resamples, coverage and seed of the percentile intervals.

    Returns
    -------
    list of dict
        ``model_id``, ``factor``, ``level`` (label), ``n_frames``, ``<metric>``,
        ``<metric>_ci_low``, ``<metric>_ci_high``; ordered by model, factor, level.
    """
    rows = list(rows)
    out: list[dict] = []
    models = list(dict.fromkeys(str(r.get("model_id", "")) for r in rows))
    for mid in models:
        mine = [r for r in rows if str(r.get("model_id", "")) == mid]
        for factor in by:
            groups: dict[tuple, list[float]] = {}
            for r in mine:
                lv = _level(r, factor, size_bins_nm, dose_bins_e_per_A2)
                v = r.get(metric)
                if lv is None or v is None or not np.isfinite(float(v)):
                    continue
                groups.setdefault(lv, []).append(float(v))
            for k, (key, vals) in enumerate(sorted(groups.items())):
                arr = np.asarray(vals)
                lo, hi = bootstrap_ci(arr, n_boot=n_boot, confidence=confidence, seed=seed + k)
                out.append(
                    {
                        "model_id": mid,
                        "factor": factor,
                        "level": key[1],
                        "n_frames": int(arr.size),
                        metric: float(arr.mean()),
                        f"{metric}_ci_low": lo,
                        f"{metric}_ci_high": hi,
                    }
                )
    return out


_TITLES = {
    "defocus_nm": "Defocus (abTEM sign, positive = underfocus)",
    "material": "Material",
    "dose": "Dose",
    "size": "Mean particle diameter",
}


def breakdown_markdown(rows: Sequence[Mapping[str, Any]], metric: str = "dice") -> str:
    """Markdown tables (one per factor; one column per model) of :func:`breakdown` rows.

    Cells read ``0.934 [0.921, 0.945] (n=40)``: mean, bootstrap interval, frames.
    """
    models = list(dict.fromkeys(str(r["model_id"]) for r in rows))
    factors = list(dict.fromkeys(str(r["factor"]) for r in rows))
    parts: list[str] = []
    for f in factors:
        levels = list(dict.fromkeys(str(r["level"]) for r in rows if r["factor"] == f))
        head = [_TITLES.get(f, f)] + [m or "model" for m in models]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for lv in levels:
            cells = [lv]
            for m in models:
                hit = [
                    r
                    for r in rows
                    if r["factor"] == f and str(r["level"]) == lv and str(r["model_id"]) == m
                ]
                if not hit:
                    cells.append("–")
                    continue
                r = hit[0]
                cells.append(
                    f"{r[metric]:.3f} [{r[f'{metric}_ci_low']:.3f}, "
                    f"{r[f'{metric}_ci_high']:.3f}] (n={r['n_frames']})"
                )
            lines.append("| " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"
