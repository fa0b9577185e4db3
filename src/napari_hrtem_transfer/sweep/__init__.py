"""Sweeps of many transfer experiments on dask.distributed, with a SQLite results store.

Public API (dask.distributed and torch are imported when a sweep runs, not on import)::

    SweepConfig, load_sweep_config          the grid (pydantic, from TOML)
    run_sweep(config, db, client=None, workers=None, progress=True, *, scheduler=None,
              stop=None, retry_failed=True) -> SweepResult
    plan_sweep(config, db) -> SweepPlan      validate against the data and list the runs
    ResultStore, SCHEMA_VERSION              the versioned SQLite store (one writer)

Read a database with ``napari_hrtem_transfer.evaluation.ResultTable.from_sqlite(db)``.
"""

from __future__ import annotations

from ..lazy import lazy_exports
from .config import RunPoint, SweepConfig, load_sweep_config

__all__ = [
    "SCHEMA_VERSION",
    "ResultStore",
    "RunPoint",
    "SweepConfig",
    "SweepInterrupted",
    "SweepPlan",
    "SweepResult",
    "check_database",
    "load_sweep_config",
    "plan_sweep",
    "run_sweep",
]

_LAZY = {
    "run_sweep": ".runner",
    "plan_sweep": ".plan",
    "SweepPlan": ".plan",
    "SweepResult": ".runner",
    "SweepInterrupted": ".runner",
    "ResultStore": ".store",
    "SCHEMA_VERSION": ".store",
    "check_database": ".store",
}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
