"""Tidy result records: one row per model x domain, stored column-wise (numpy only).

Every evaluation (``evaluate_model``), the published table (``load_reference_table``) and the
demo produce the same columns, so the aggregation in :mod:`.aggregate` treats a user's own
sweep and the study's side by side.  Columns (units in the name):

======================  ============================================================
``model_id``            unique name of the model (checkpoint path or table row)
``stage``               ``"pretrain"`` (before fine-tuning) or ``"transfer"`` (after)
``pretrain_defocus_nm`` defocus of the pretraining domain [nm]
``transfer_defocus_nm`` defocus of the fine-tuning (target) domain [nm]; NaN if none
``domain_defocus_nm``   defocus of the evaluated domain [nm]
``loss``                mean validation loss on that domain (binary cross-entropy [nats]
                        for our models; the study's loss minus 0.3133 for the paper)
``source``              provenance: who produced the number (paper citation, checkpoint)
======================  ============================================================

Optional columns: ``freeze``, ``n_transfer``, ``pretrain_lr``, ``transfer_lr``, ``seed``,
``dose_e_per_A2``, ``material``, ``n_images``, ``dice``, ``iou``, ``loss_ci_low``,
``loss_ci_high``, ``dice_ci_low``, ``dice_ci_high``, ``iou_ci_low``, ``iou_ci_high``,
``ood_score``, ``ood_score_median``, ``structures``.

A sweep's SQLite store (``hrtem-transfer sweep``) is read with :meth:`ResultTable.from_sqlite`:
its views ``domain_records`` and ``frame_records`` have these column names.
Defocus sign: abTEM's (``defocus = -C10``, positive = underfocus).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DatasetError

__all__ = ["REQUIRED_COLUMNS", "SQLITE_VIEWS", "ResultTable", "read_schema_version"]

#: Views of a sweep database (``napari_hrtem_transfer.sweep.store``) holding tidy records:
#: ``"domains"`` one row per run x stage x domain (x material), ``"frames"`` one per frame.
SQLITE_VIEWS = {"domains": "domain_records", "frames": "frame_records"}

#: Highest version of the sweep database schema this module reads.
SQLITE_SCHEMA_VERSION = 1


def read_schema_version(conn: Any) -> int | None:
    """The schema version of an open sweep database; None for an empty database.

    The one reader of the ``schema_version`` table (the writer is
    ``napari_hrtem_transfer.sweep.store``).

    Raises
    ------
    sqlite3.DatabaseError
        The file is not a sweep results database (no ``schema_version`` table).
    """
    import sqlite3

    tables = {
        r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'view')")
    }
    if not tables:
        return None
    if "schema_version" not in tables:
        raise sqlite3.DatabaseError("not a sweep results database (no schema_version table)")
    row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
    return int(row[0]) if row and row[0] is not None else None


#: Columns every result table needs for the study's views.
REQUIRED_COLUMNS = (
    "model_id",
    "stage",
    "pretrain_defocus_nm",
    "transfer_defocus_nm",
    "domain_defocus_nm",
    "loss",
)

#: Columns holding text; every other column is read back from CSV as float.
TEXT_COLUMNS = frozenset(
    {
        "model_id",
        "stage",
        "source",
        "freeze",
        "material",
        "structures",
        "checkpoint",
        "split",
        "run_key",
        "pretrain_key",
        "architecture",
        "structure_id",
    }
)


def _column(values: Sequence[Any], name: str) -> np.ndarray:
    if name in TEXT_COLUMNS:
        return np.array(["" if v is None else str(v) for v in values], dtype=object)
    out = np.empty(len(values), dtype=float)
    for i, v in enumerate(values):
        if v is None or v == "":
            out[i] = np.nan
        else:
            try:
                out[i] = float(v)
            except (TypeError, ValueError):
                return np.array(["" if x is None else str(x) for x in values], dtype=object)
    return out


class ResultTable:
    """A small column store of tidy records (no pandas needed).

    Parameters
    ----------
    columns
        Mapping of column name to a sequence; all of equal length.  Text columns become
        object arrays, the others float arrays (missing = NaN).
    """

    def __init__(self, columns: Mapping[str, Sequence[Any] | np.ndarray] | None = None) -> None:
        self._cols: dict[str, np.ndarray] = {}
        n = None
        for k, v in (columns or {}).items():
            arr = v if isinstance(v, np.ndarray) and v.ndim == 1 else _column(list(v), k)
            if arr.dtype.kind not in "fO":
                arr = _column(list(arr), k)
            if n is not None and len(arr) != n:
                raise DatasetError(f"column {k!r} has {len(arr)} values, others have {n}.")
            n = len(arr)
            self._cols[k] = arr
        self._n = n or 0

    # construction ------------------------------------------------------------------------
    @classmethod
    def from_records(cls, records: Iterable[Mapping[str, Any]]) -> ResultTable:
        """Build a table from dicts (missing keys become NaN / empty text)."""
        records = list(records)
        names: list[str] = []
        for r in records:
            for k in r:
                if k not in names:
                    names.append(k)
        return cls({k: _column([r.get(k) for r in records], k) for k in names})

    @classmethod
    def concat(cls, tables: Iterable[ResultTable]) -> ResultTable:
        """Stack tables row-wise; columns missing from one table are filled with NaN / ''."""
        tables = [t for t in tables if len(t)]
        if not tables:
            return cls()
        names: list[str] = []
        for t in tables:
            names += [c for c in t.columns if c not in names]
        cols = {}
        for c in names:
            parts = []
            for t in tables:
                if c in t._cols:
                    parts.append(t._cols[c])
                elif c in TEXT_COLUMNS or any(
                    c in u._cols and u._cols[c].dtype == object for u in tables
                ):
                    parts.append(np.array([""] * len(t), dtype=object))
                else:
                    parts.append(np.full(len(t), np.nan))
            if any(p.dtype == object for p in parts):
                parts = [p.astype(object) for p in parts]
            cols[c] = np.concatenate(parts)
        return cls(cols)

    @classmethod
    def from_csv(cls, path: str | os.PathLike) -> ResultTable:
        """Read a table written by :meth:`to_csv` (or any CSV with the tidy columns)."""
        path = Path(path)
        if not path.exists():
            raise DatasetError(f"results table {path} does not exist.")
        header, rows = _read_csv(path, f"results table {path}")
        cols = {
            h: _column([r[i] if i < len(r) else "" for r in rows], h) for i, h in enumerate(header)
        }
        return cls(cols)

    @classmethod
    def from_sqlite(
        cls,
        path: str | os.PathLike,
        level: str = "domains",
        where: str | None = None,
        params: Sequence[Any] = (),
    ) -> ResultTable:
        """Read the tidy records of a sweep's SQLite store (opened read-only).

        Parameters
        ----------
        path
            The database written by ``hrtem-transfer sweep`` / ``run_sweep``.
        level
            ``"domains"`` (one row per run, stage and domain) or ``"frames"`` (one per frame).
        where
            Optional SQL condition on the view's columns, e.g. ``"freeze = ?"``.
        params
            Parameters of ``where``.

        Only runs recorded as ``done`` are included (failed runs have no records).

        Raises
        ------
        DatasetError
            The file is missing, not a sweep database, or of a newer schema.
        """
        import sqlite3

        if level not in SQLITE_VIEWS:
            raise DatasetError(f"level must be one of {', '.join(SQLITE_VIEWS)}; got {level!r}.")
        p = Path(path).expanduser()
        if not p.is_file():
            raise DatasetError(f"results database {p} does not exist.")
        try:
            conn = sqlite3.connect(f"file:{p.resolve()}?mode=ro", uri=True, timeout=10.0)
        except sqlite3.Error as exc:  # pragma: no cover
            raise DatasetError(f"cannot open {p}: {exc}.") from None
        try:
            try:
                version = read_schema_version(conn)
            except sqlite3.DatabaseError as exc:
                raise DatasetError(
                    f"{p} is not a sweep results database ({exc}); write one with "
                    "'hrtem-transfer sweep'."
                ) from None
            if version is None or int(version) > SQLITE_SCHEMA_VERSION:
                raise DatasetError(
                    f"{p} has schema version {version}; this version of napari-hrtem-transfer "
                    f"reads version {SQLITE_SCHEMA_VERSION}. Update the package."
                )
            sql = f"SELECT * FROM {SQLITE_VIEWS[level]}"
            if where:
                sql += f" WHERE {where}"
            cur = conn.execute(sql, tuple(params))
            names = [d[0] for d in cur.description]
            rows = cur.fetchall()
        finally:
            conn.close()
        return cls({n: _column([r[i] for r in rows], n) for i, n in enumerate(names)})

    # access ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._n

    def __contains__(self, name: str) -> bool:
        return name in self._cols

    def __getitem__(self, name: str) -> np.ndarray:
        try:
            return self._cols[name]
        except KeyError:
            raise DatasetError(
                f"the results table has no column {name!r}; it has {', '.join(self._cols)}."
            ) from None

    @property
    def columns(self) -> list[str]:
        """Column names, in order."""
        return list(self._cols)

    def require(self, columns: Iterable[str], what: str = "this view") -> None:
        """Raise a :class:`DatasetError` naming every missing column."""
        missing = [c for c in columns if c not in self._cols]
        if missing:
            raise DatasetError(
                f"{what} needs the column(s) {', '.join(missing)}, missing from the results "
                f"table (it has: {', '.join(self._cols) or 'no columns'})."
            )

    def take(self, idx) -> ResultTable:
        """Rows at the integer indices or boolean mask ``idx``."""
        return ResultTable({k: v[idx] for k, v in self._cols.items()})

    def where(self, **conditions: Any) -> ResultTable:
        """Rows matching every condition.

        A condition is a value (floats compared with a 1e-6 tolerance), a list/tuple/set of
        allowed values, or a callable returning a boolean array.  ``None`` means no condition.
        """
        mask = np.ones(self._n, bool)
        for name, cond in conditions.items():
            if cond is None:
                continue
            col = self[name]
            if callable(cond):
                mask &= np.asarray(cond(col), bool)
            elif isinstance(cond, list | tuple | set | frozenset | np.ndarray):
                m = np.zeros(self._n, bool)
                for c in cond:
                    m |= _equal(col, c)
                mask &= m
            else:
                mask &= _equal(col, cond)
        return self.take(mask)

    def unique(self, name: str) -> list:
        """Sorted distinct values of a column (NaN and '' left out)."""
        col = self[name]
        if col.dtype == object:
            return sorted({v for v in col if v != ""})
        vals = col[np.isfinite(col)]
        return sorted(set(np.round(vals, 6).tolist()))

    def with_column(self, name: str, values) -> ResultTable:
        """A copy with one column added or replaced (a scalar is broadcast)."""
        cols = dict(self._cols)
        if np.ndim(values) == 0:
            values = [values] * self._n
        cols[name] = _column(list(values), name)
        return ResultTable(cols)

    def records(self) -> list[dict[str, Any]]:
        """Rows as dicts of plain Python values (NaN becomes None)."""
        out = []
        names = self.columns
        for i in range(self._n):
            out.append({k: _plain(self._cols[k][i]) for k in names})
        return out

    def groups(self, keys: Sequence[str]) -> dict[tuple, np.ndarray]:
        """Row indices of each distinct combination of ``keys`` (floats rounded to 1e-6)."""
        cols = []
        for k in keys:
            c = self[k]
            cols.append(np.round(c, 6) if c.dtype != object else c)
        out: dict[tuple, list[int]] = {}
        for i, key in enumerate(zip(*cols, strict=True)):
            out.setdefault(tuple(_plain(x) for x in key), []).append(i)
        return {k: np.asarray(v) for k, v in out.items()}

    # output ------------------------------------------------------------------------------
    def to_csv_text(self) -> str:
        """The table as CSV text (NaN written as an empty field)."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(self.columns)
        for r in self.records():
            w.writerow(
                ["" if v is None else (repr(v) if isinstance(v, float) else v) for v in r.values()]
            )
        return buf.getvalue()

    def to_csv(self, path: str | os.PathLike) -> Path:
        """Write the table as CSV, atomically."""
        from ..io.atomic import write_text_atomic

        return write_text_atomic(path, self.to_csv_text())

    def to_json(self, path: str | os.PathLike) -> Path:
        """Write the table as a JSON list of records, atomically."""
        from ..io.atomic import write_text_atomic

        return write_text_atomic(path, json.dumps(self.records(), indent=1))

    def __repr__(self) -> str:
        return f"ResultTable({self._n} rows; columns: {', '.join(self.columns)})"


def _read_csv(path: Path, what: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows (blank lines as empty rows) of an existing CSV file.

    Raises :class:`~napari_hrtem_transfer.errors.DatasetError` ``"{what} is empty."`` for a
    file without a header line.
    """
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader)
        except StopIteration:
            raise DatasetError(f"{what} is empty.") from None
        return header, list(reader)


def _equal(col: np.ndarray, value: Any) -> np.ndarray:
    if col.dtype == object:
        return col == str(value)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return np.isnan(col)
    try:
        v = float(value)
    except (TypeError, ValueError):
        return np.zeros(col.shape, bool)
    return np.abs(col - v) <= 1e-6


def _plain(x: Any) -> Any:
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and math.isnan(x):
        return None
    return x


#: Reductions over models allowed in aggregations.
REDUCTIONS: dict[str, Callable[..., Any]] = {
    "median": np.median,
    "mean": np.mean,
    "min": np.min,
    "max": np.max,
}
