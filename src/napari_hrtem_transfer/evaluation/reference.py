"""Importer of the study's published result table (``paper_defocus_sweep.csv``).

The table (Rangel DaCosta, Oill, Scott, "Strategies for effective transfer learning for HRTEM
analysis with neural networks", Elemental Microscopy EM000010, 2025; CC-BY-4.0) has one row
per trained model pair (7,200 rows) with the columns

* ``pretrain_lr``, ``transfer_lr``, ``N_tl_training_points``, ``freeze_option``
* ``pretrain_defocus``, ``transfer_defocus`` — defocus in [Å] (abTEM sign)
* ``best_pretrain_val_<D>`` — validation loss on domain D [Å] after pretraining (best epoch)
* ``best_transfer_performance_<D>`` — validation loss on domain D after transfer learning

Losses already have the study's constant 0.3133 subtracted.  :func:`load_reference_table`
turns each row into two models (``stage="pretrain"`` and ``stage="transfer"``) and one tidy
record per evaluated domain, with defocus converted to [nm], so the result aggregates exactly
like a user's own evaluations.
"""

from __future__ import annotations

import os
import re
from importlib.resources import as_file, files
from importlib.resources.abc import Traversable
from pathlib import Path

import numpy as np

from ..errors import DatasetError
from .table import ResultTable, _read_csv

__all__ = [
    "REFERENCE_CITATION",
    "REFERENCE_ENV",
    "REFERENCE_FILENAME",
    "find_reference_csv",
    "load_reference_table",
    "packaged_reference_csv",
]

REFERENCE_FILENAME = "paper_defocus_sweep.csv"
REFERENCE_CITATION = (
    "L. Rangel DaCosta, H. Oill, M. Scott, 'Strategies for effective transfer learning for "
    "HRTEM analysis with neural networks', Elemental Microscopy EM000010 (2025); result "
    "table CC-BY-4.0"
)

#: Columns the importer needs besides the per-domain loss columns.
REFERENCE_META_COLUMNS = (
    "pretrain_defocus",
    "transfer_defocus",
    "freeze_option",
    "N_tl_training_points",
    "pretrain_lr",
    "transfer_lr",
)
_PRE = re.compile(r"^best_pretrain_val_(-?\d+(?:\.\d+)?)$")
_POST = re.compile(r"^best_transfer_performance_(-?\d+(?:\.\d+)?)$")

#: Environment variable that points at another copy of the published table.
REFERENCE_ENV = "HRTEM_TRANSFER_REFERENCE_CSV"

#: Where the table ships inside the package (with its CITATION.md and licence notice).
REFERENCE_PACKAGE_DIR = "data"


def packaged_reference_csv() -> Traversable:
    """The copy of the published table that ships with the package (CC-BY-4.0).

    A :class:`importlib.resources.abc.Traversable`; read it with ``open()`` or through
    :func:`importlib.resources.as_file`.  ``data/CITATION.md`` and
    ``data/LICENSE_paper_defocus_sweep.txt`` beside it name the authors and the licence.
    """
    return files("napari_hrtem_transfer") / REFERENCE_PACKAGE_DIR / REFERENCE_FILENAME


def find_reference_csv() -> Path | None:
    """The published table as a file path: ``$HRTEM_TRANSFER_REFERENCE_CSV`` or the packaged copy.

    Returns None only if neither exists (a broken installation, or a zipped package, where
    :func:`load_reference_table` still reads the packaged copy through importlib.resources).
    """
    env = os.environ.get(REFERENCE_ENV)
    if env:
        return Path(env)
    packaged = packaged_reference_csv()
    if isinstance(packaged, Path) and packaged.is_file():
        return packaged
    return None


def load_reference_table(path: str | os.PathLike | None = None) -> ResultTable:
    """Read the published table into tidy records (one row per model x domain).

    Parameters
    ----------
    path
        The CSV.  By default ``$HRTEM_TRANSFER_REFERENCE_CSV`` if set, else the copy that ships
        with the package (:func:`packaged_reference_csv`).

    Returns
    -------
    ResultTable
        Columns ``model_id`` (``paper-row<i>/pretrain`` or ``/transfer``), ``stage``,
        ``pretrain_defocus_nm``, ``transfer_defocus_nm``, ``domain_defocus_nm`` [nm],
        ``loss``, ``freeze``, ``n_transfer``, ``pretrain_lr``, ``transfer_lr``, ``source``.

    Raises
    ------
    DatasetError
        If the file is missing or lacks columns (the message names them).
    """
    if path is None:
        env = os.environ.get(REFERENCE_ENV)
        if env:
            return _read_reference_csv(Path(env), f"${REFERENCE_ENV}")
        packaged = packaged_reference_csv()
        if not packaged.is_file():
            raise DatasetError(
                f"the packaged copy of {REFERENCE_FILENAME} is missing from this installation; "
                f"reinstall napari-hrtem-transfer, or pass the table's path (--csv PATH or "
                f"${REFERENCE_ENV})."
            )
        with as_file(packaged) as p:
            return _read_reference_csv(p)
    return _read_reference_csv(Path(path))


def _read_reference_csv(path: Path, origin: str = "") -> ResultTable:
    """Parse one copy of the published table (see :func:`load_reference_table`)."""
    if not path.is_file():
        via = f" (from {origin})" if origin else ""
        raise DatasetError(
            f"published table {path}{via} does not exist; pass an existing file, or leave it "
            f"out to use the copy that ships with the package."
        )
    header, rows = _read_csv(path, str(path))
    rows = [r for r in rows if r]
    pre = {float(m.group(1)): i for i, h in enumerate(header) if (m := _PRE.match(h))}
    post = {float(m.group(1)): i for i, h in enumerate(header) if (m := _POST.match(h))}
    missing = [c for c in REFERENCE_META_COLUMNS if c not in header]
    if not pre:
        missing.append("best_pretrain_val_<defocus Å>")
    if not post:
        missing.append("best_transfer_performance_<defocus Å>")
    if missing:
        raise DatasetError(
            f"{path} is not the study's result table: missing column(s) {', '.join(missing)}."
        )
    col = {h: i for i, h in enumerate(header)}
    try:
        arr = np.array(rows, dtype=object)
        if arr.ndim != 2 or arr.shape[1] != len(header):
            raise ValueError("rows of unequal length")

        def num(name_or_idx):
            j = col[name_or_idx] if isinstance(name_or_idx, str) else name_or_idx
            return np.array([float(x) if x != "" else np.nan for x in arr[:, j]])

        pre_def_nm = num("pretrain_defocus") / 10.0
        tr_def_nm = num("transfer_defocus") / 10.0
        n_tl = num("N_tl_training_points")
        lr_p, lr_t = num("pretrain_lr"), num("transfer_lr")
        freeze = arr[:, col["freeze_option"]].astype(str)
        n = len(rows)
        parts = []
        for stage, doms in (("pretrain", pre), ("transfer", post)):
            for d_A, j in sorted(doms.items()):
                parts.append(
                    {
                        "model_id": np.array(
                            [f"paper-row{i}/{stage}" for i in range(n)], dtype=object
                        ),
                        "stage": np.array([stage] * n, dtype=object),
                        "pretrain_defocus_nm": pre_def_nm,
                        "transfer_defocus_nm": tr_def_nm,
                        "domain_defocus_nm": np.full(n, d_A / 10.0),
                        "loss": num(j),
                        "freeze": freeze.astype(object),
                        "n_transfer": n_tl,
                        "pretrain_lr": lr_p,
                        "transfer_lr": lr_t,
                    }
                )
    except (ValueError, IndexError) as exc:
        raise DatasetError(f"cannot parse {path}: {exc}") from exc
    cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    cols["source"] = np.array([REFERENCE_CITATION] * len(cols["loss"]), dtype=object)
    return ResultTable(cols)
