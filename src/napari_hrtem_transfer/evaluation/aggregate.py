"""The study's views of many models: aggregation of tidy records with a reduction.

All functions take a :class:`~.table.ResultTable` (from ``evaluate_model``, the demo, a user's
CSV or :func:`~.reference.load_reference_table`) and a ``reduction`` over the models of a cell:
``"median"`` (default, as in the study), ``"mean"``, ``"min"`` or ``"max"``.

Order of operations for the generalization of a group of models
---------------------------------------------------------------
The loss on each domain is first reduced over the models of the group (median by default),
then the population std (ddof=0) of these per-domain values over the non-zero defoci is
taken.  This is the order that reproduces the published numbers: on the study's table,
pretraining in focus gives 0.0028 and at +10 nm 0.0580 (the per-model std followed by the
median gives 0.0030 and 0.0576).  ``order="model-first"`` gives the other order.

Defocus in [nm], abTEM sign (positive = underfocus).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import ConfigError
from .metrics import generalization as _generalization
from .table import REDUCTIONS, ResultTable

__all__ = [
    "Matrix",
    "domain_losses",
    "domain_profile",
    "generalization_by",
    "generalization_matrix",
    "ood_domain_ranking",
    "ood_rank_correlation",
    "reduce",
    "shift_matrix",
    "target_matrix",
]


def reduce(values, reduction: str = "median") -> float:
    """Reduce values over models with ``"median"`` | ``"mean"`` | ``"min"`` | ``"max"``.

    NaN propagates (a missing loss never silently disappears from a cell).
    """
    try:
        fn = REDUCTIONS[reduction]
    except KeyError:
        raise ConfigError(
            f"unknown reduction {reduction!r}; choose one of {', '.join(REDUCTIONS)}.",
            "reduction",
        ) from None
    v = np.asarray(values, dtype=float)
    return float(fn(v)) if v.size else float("nan")


@dataclass
class Matrix:
    """A pretrain-domain x target-domain matrix (the study's heatmap layout).

    Attributes
    ----------
    values
        Array (n_rows, n_cols); NaN where no model exists.
    rows_nm, cols_nm
        Defocus of each row (pretraining domain) and column [nm].
    row_label, col_label, value_label
        Axis and colour-bar labels.
    title
        What the matrix shows.
    counts
        Number of models reduced into each cell.
    """

    values: np.ndarray
    rows_nm: np.ndarray
    cols_nm: np.ndarray
    row_label: str = "pretraining defocus [nm]"
    col_label: str = "target defocus [nm]"
    value_label: str = "loss"
    title: str = ""
    counts: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    def at(self, row_nm: float, col_nm: float) -> float:
        """Value at a (row, column) defocus pair [nm]."""
        i = int(np.argmin(np.abs(self.rows_nm - row_nm)))
        j = int(np.argmin(np.abs(self.cols_nm - col_nm)))
        if abs(self.rows_nm[i] - row_nm) > 1e-6 or abs(self.cols_nm[j] - col_nm) > 1e-6:
            raise ConfigError(f"({row_nm:g}, {col_nm:g}) nm is not a cell of this matrix.")
        return float(self.values[i, j])

    def to_records(self) -> list[dict]:
        """One dict per cell (for JSON/CSV)."""
        out = []
        for i, r in enumerate(self.rows_nm):
            for j, c in enumerate(self.cols_nm):
                v = self.values[i, j]
                out.append(
                    {
                        "row_defocus_nm": float(r),
                        "col_defocus_nm": float(c),
                        "value": None if not np.isfinite(v) else float(v),
                        "n_models": None if self.counts is None else int(self.counts[i, j]),
                    }
                )
        return out


def domain_losses(
    table: ResultTable,
    keys: Sequence[str] = ("pretrain_defocus_nm",),
    stage: str | None = "pretrain",
    reduction: str = "median",
    value: str = "loss",
) -> dict[tuple, dict[float, float]]:
    """Per-domain ``value`` reduced over the models of each group.

    Returns
    -------
    dict
        ``{group key tuple: {domain defocus [nm]: reduced value}}``.
    """
    table.require([*keys, "domain_defocus_nm", value, *(["stage"] if stage else [])])
    t = table.where(stage=stage) if stage else table
    out: dict[tuple, dict[float, float]] = {}
    for key, idx in sorted(t.groups([*keys, "domain_defocus_nm"]).items(), key=_sort_key):
        out.setdefault(key[:-1], {})[float(key[-1])] = reduce(t[value][idx], reduction)
    return out


def _sort_key(item):
    return tuple((0, x, "") if isinstance(x, float | int) else (1, 0.0, str(x)) for x in item[0])


def generalization_by(
    table: ResultTable,
    keys: Sequence[str] = ("pretrain_defocus_nm",),
    stage: str | None = "pretrain",
    reduction: str = "median",
    exclude_nm: Sequence[float] = (0.0,),
    order: str = "domain-first",
) -> dict[tuple, float]:
    """Generalization (population std of per-domain losses, non-zero defoci) per group.

    Parameters
    ----------
    table
        Tidy records.
    keys
        Columns defining a group of models (a cell of the study's views).
    stage
        ``"pretrain"`` (after pretraining), ``"transfer"`` (after fine-tuning) or None (all).
    reduction
        Reduction over the models of a group.
    exclude_nm
        Domains left out of the std [nm]; 0 nm by default, as in the study.
    order
        ``"domain-first"`` (reduce each domain's loss over models, then std; reproduces the
        published values) or ``"model-first"`` (std per model, then reduce).

    Returns
    -------
    dict
        ``{group key tuple: generalization}``.
    """
    if order == "domain-first":
        per = domain_losses(table, keys, stage, reduction)
        return {k: _generalization(v, exclude_nm=exclude_nm) for k, v in per.items()}
    if order != "model-first":
        raise ConfigError(f"order must be 'domain-first' or 'model-first'; got {order!r}.")
    per_model = domain_losses(table, [*keys, "model_id"], stage, "median")
    grouped: dict[tuple, list[float]] = {}
    for k, v in per_model.items():
        grouped.setdefault(k[:-1], []).append(_generalization(v, exclude_nm=exclude_nm))
    return {k: reduce(v, reduction) for k, v in grouped.items()}


def _matrix_from(cells: dict[tuple, float], counts: dict[tuple, int], **kw) -> Matrix:
    rows = sorted({k[0] for k in cells})
    cols = sorted({k[1] for k in cells})
    vals = np.full((len(rows), len(cols)), np.nan)
    cnt = np.zeros((len(rows), len(cols)), int)
    for (r, c), v in cells.items():
        vals[rows.index(r), cols.index(c)] = v
        cnt[rows.index(r), cols.index(c)] = counts.get((r, c), 0)
    return Matrix(vals, np.asarray(rows, float), np.asarray(cols, float), counts=cnt, **kw)


def target_matrix(
    table: ResultTable,
    stage: str = "transfer",
    reduction: str = "median",
    value: str = "loss",
) -> Matrix:
    """Loss on the target domain, pretraining domain x target (fine-tuning) domain.

    ``stage="pretrain"`` gives the matrix before transfer (the pretrained model read on the
    target domain), ``stage="transfer"`` after.  Only records whose evaluated domain is the
    target domain (``domain_defocus_nm == transfer_defocus_nm``) enter.
    """
    table.require(
        ["stage", "pretrain_defocus_nm", "transfer_defocus_nm", "domain_defocus_nm", value],
        "the pretrain x target matrix",
    )
    t = table.where(stage=stage)
    t = t.take(np.abs(t["domain_defocus_nm"] - t["transfer_defocus_nm"]) <= 1e-6)
    cells, counts = {}, {}
    for key, idx in t.groups(["pretrain_defocus_nm", "transfer_defocus_nm"]).items():
        cells[key] = reduce(t[value][idx], reduction)
        counts[key] = len(set(t["model_id"][idx])) if "model_id" in t else len(idx)
    when = "before transfer (after pretraining)" if stage == "pretrain" else "after transfer"
    return _matrix_from(
        cells,
        counts,
        value_label=f"{reduction} {value} on target domain",
        title=f"Target-domain {value} {when}",
        meta={"stage": stage, "reduction": reduction},
    )


def generalization_matrix(
    table: ResultTable,
    stage: str = "transfer",
    reduction: str = "median",
    exclude_nm: Sequence[float] = (0.0,),
) -> Matrix:
    """Generalization per (pretraining, target) cell, before (``stage="pretrain"``) or after.

    Each cell uses the models of that (pretrain, transfer) pair only, so before and after
    compare the same pretrained models with their fine-tuned versions.
    """
    keys = ("pretrain_defocus_nm", "transfer_defocus_nm")
    g = generalization_by(table, keys, stage, reduction, exclude_nm)
    t = table.where(stage=stage)
    counts = {
        k: len(set(t["model_id"][idx])) if "model_id" in t else len(idx)
        for k, idx in t.groups(list(keys)).items()
    }
    when = "after pretraining" if stage == "pretrain" else "after transfer"
    excl = ", ".join(f"{e:g}" for e in exclude_nm)
    return _matrix_from(
        g,
        counts,
        value_label=f"generalization (std of {reduction} losses, excl. {excl} nm)",
        title=f"Generalization {when}",
        meta={"stage": stage, "reduction": reduction, "exclude_nm": list(exclude_nm)},
    )


def shift_matrix(
    table: ResultTable, reduction: str = "median", exclude_nm: Sequence[float] = (0.0,)
) -> Matrix:
    """Shift of generalization, after transfer minus after pretraining; positive = worse."""
    after = generalization_matrix(table, "transfer", reduction, exclude_nm)
    before = generalization_matrix(table, "pretrain", reduction, exclude_nm)
    vals = np.full(after.values.shape, np.nan)
    for i, r in enumerate(after.rows_nm):
        for j, c in enumerate(after.cols_nm):
            try:
                vals[i, j] = after.values[i, j] - before.at(r, c)
            except ConfigError:
                pass
    return Matrix(
        vals,
        after.rows_nm,
        after.cols_nm,
        value_label="shift of generalization (after − before; > 0 = worse)",
        title="Shift of generalization by fine-tuning",
        counts=after.counts,
        meta={"reduction": reduction, "exclude_nm": list(exclude_nm)},
    )


@dataclass
class DomainProfile:
    """Per-domain losses before and after transfer for one (pretrain, target) pair [nm]."""

    domains_nm: np.ndarray
    before: np.ndarray
    after: np.ndarray
    pretrain_defocus_nm: float
    transfer_defocus_nm: float
    reduction: str = "median"
    n_models: int = 0


def domain_profile(
    table: ResultTable,
    pretrain_defocus_nm: float,
    transfer_defocus_nm: float,
    reduction: str = "median",
    value: str = "loss",
) -> DomainProfile:
    """Per-domain ``value`` before and after transfer for one pair (the study's bar charts)."""
    sel = table.where(
        pretrain_defocus_nm=pretrain_defocus_nm, transfer_defocus_nm=transfer_defocus_nm
    )
    if not len(sel):
        raise ConfigError(
            f"no models pretrained at {pretrain_defocus_nm:g} nm and fine-tuned at "
            f"{transfer_defocus_nm:g} nm in the results table."
        )
    keys = ("pretrain_defocus_nm",)
    b = domain_losses(sel, keys, "pretrain", reduction, value)
    a = domain_losses(sel, keys, "transfer", reduction, value)
    b = next(iter(b.values()), {})
    a = next(iter(a.values()), {})
    doms = sorted(set(b) | set(a))
    return DomainProfile(
        np.asarray(doms, float),
        np.array([b.get(d, np.nan) for d in doms]),
        np.array([a.get(d, np.nan) for d in doms]),
        float(pretrain_defocus_nm),
        float(transfer_defocus_nm),
        reduction,
        len(set(sel["model_id"])) if "model_id" in sel else 0,
    )


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); NaN for < 3 pairs or no spread."""
    from scipy.stats import rankdata

    if x.size < 3:
        return float("nan")
    rx, ry = rankdata(x), rankdata(y)
    if np.std(rx) == 0 or np.std(ry) == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def ood_rank_correlation(
    table: ResultTable,
    by: Sequence[str] = (),
    score: str = "ood_score",
    value: str = "loss",
) -> dict[tuple, dict[str, float]]:
    """Spearman rank correlation of the label-free OOD score with the true loss.

    Over every row of ``table`` (e.g. all models x domains of a sweep, or all frames with
    ``ResultTable.from_sqlite(db, "frames")``), optionally within groups.

    Parameters
    ----------
    table
        Tidy records with ``score`` and ``value`` columns; rows where either is NaN are left
        out (models without an OOD reference, unlabelled data).
    by
        Columns defining groups (e.g. ``("stage",)`` or ``("domain_defocus_nm",)``); ``()``
        gives one group ``()`` with every row.
    score, value
        The label-free score and the loss it should rank.

    Returns
    -------
    dict
        ``{group key tuple: {"spearman": rho, "n": number of pairs}}``; rho is NaN with fewer
        than 3 pairs or without spread.  A high positive rho means the score ranks frames or
        domains the way their (unknown at use time) loss would.
    """
    table.require([*by, score, value], "the OOD rank correlation")
    groups = table.groups(list(by)) if by else {(): np.arange(len(table))}
    out: dict[tuple, dict[str, float]] = {}
    for key, idx in sorted(groups.items(), key=_sort_key):
        x = np.asarray(table[score][idx], float)
        y = np.asarray(table[value][idx], float)
        ok = np.isfinite(x) & np.isfinite(y)
        out[key] = {"spearman": _spearman(x[ok], y[ok]), "n": int(ok.sum())}
    return out


def ood_domain_ranking(
    table: ResultTable,
    stage: str | None = None,
    reduction: str = "median",
    score: str = "ood_score",
    value: str = "loss",
) -> list[dict[str, float]]:
    """How the OOD score ranks the domains, beside how their loss ranks them.

    The score and the loss of each domain are reduced over all models (rows) of ``table``
    (one ``stage`` or all), then ranked (1 = highest = most out of distribution / worst).

    Returns
    -------
    list of dict
        One per domain, sorted by defocus: ``domain_defocus_nm``, ``ood_score``, ``loss``,
        ``ood_rank``, ``loss_rank``, ``n_rows``.
    """
    from scipy.stats import rankdata

    table.require(["domain_defocus_nm", score, value], "the OOD domain ranking")
    t = table.where(stage=stage) if stage else table
    if "material" in t:
        t = t.where(material=lambda c: (c == "all") | (c == ""))
    rows = []
    for key, idx in sorted(t.groups(["domain_defocus_nm"]).items(), key=_sort_key):
        s = np.asarray(t[score][idx], float)
        v = np.asarray(t[value][idx], float)
        rows.append(
            {
                "domain_defocus_nm": float(key[0]),
                "ood_score": reduce(s[np.isfinite(s)], reduction),
                "loss": reduce(v[np.isfinite(v)], reduction),
                "n_rows": int(idx.size),
            }
        )
    if rows:
        for name in ("ood_score", "loss"):
            vals = np.array([r[name] for r in rows], float)
            ranks = rankdata(-np.nan_to_num(vals, nan=-np.inf), method="min")
            for r, k in zip(rows, ranks, strict=True):
                r[f"{name.split('_')[0]}_rank"] = int(k)
    return rows
