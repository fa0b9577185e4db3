"""The sweep results store: one SQLite file, a versioned schema, one writer.

Only the client process of a sweep writes (workers return plain dicts), one transaction per
finished run, so workers never contend for the SQLite lock and a run is either fully recorded
or not at all.  Readers (``compare-reference --db``, the napari explorer,
:meth:`~napari_hrtem_transfer.evaluation.ResultTable.from_sqlite`) read the two views
``domain_records`` and ``frame_records``, whose columns are the tidy-record columns of
:mod:`napari_hrtem_transfer.evaluation.table`.

Schema (version 1; documented in ``docs/sweeps.md``)
---------------------------------------------------
``schema_version(version)``
    One row: the schema version.  A database written by a newer version is refused.
``sweeps(sweep_id, name, config_json, created_at, package_version)``
    One row per distinct sweep config (``sweep_id`` = hash of the config).
``runs(run_key, sweep_id, status, ...)``
    One row per run: ``status`` ``done`` | ``failed``; the run's grid point, its full config
    (``config_json``: both ``TrainConfig`` s and the dataset fingerprints), generalization
    before/after and shift, timings [s], device, package versions, weight hashes, the error of
    a failed run and the number of attempts.
``domain_results(run_key, stage, domain_defocus_nm, material, ...)``
    Per run, stage (``pretrain`` = before transfer, ``transfer`` = after) and domain: loss,
    Dice, IoU (+ 95 % bootstrap intervals), OOD score (median and mean over frames), mean
    predictive entropy, number of frames.
``frame_results(run_key, stage, domain_defocus_nm, image_index, ...)``
    Per frame: structure id, actual defocus, loss, Dice, IoU, OOD score and distance, entropy.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..evaluation.table import SQLITE_SCHEMA_VERSION, SQLITE_VIEWS, read_schema_version

__all__ = ["SCHEMA_VERSION", "ResultStore", "check_database", "read_status"]

#: Version of the schema this code writes (defined once, beside the reader in
#: ``evaluation.table``).  Bump it with every change and add a migration.
SCHEMA_VERSION = SQLITE_SCHEMA_VERSION

_RUN_COLUMNS = {
    "run_key": "TEXT PRIMARY KEY",
    "sweep_id": "TEXT",
    "sweep_name": "TEXT",
    "status": "TEXT NOT NULL CHECK (status IN ('done', 'failed'))",
    "pretrain_key": "TEXT",
    "pretrain_defocus_nm": "REAL",
    "transfer_defocus_nm": "REAL",
    "freeze": "TEXT",
    "n_transfer": "INTEGER",
    "pretrain_lr": "REAL",
    "transfer_lr": "REAL",
    "seed": "INTEGER",
    "architecture": "TEXT",
    "config_json": "TEXT NOT NULL",
    "generalization_before": "REAL",
    "generalization_after": "REAL",
    "shift": "REAL",
    "exclude_nm_json": "TEXT",
    "pretrain_reused": "INTEGER",
    "pretrain_cached": "INTEGER",
    "pretrain_weights_sha256": "TEXT",
    "transfer_weights_sha256": "TEXT",
    "time_pretrain_s": "REAL",
    "time_transfer_s": "REAL",
    "time_ood_s": "REAL",
    "time_evaluate_s": "REAL",
    "time_run_s": "REAL",
    "cpu_pretrain_s": "REAL",
    "cpu_run_s": "REAL",
    "device": "TEXT",
    "precision": "TEXT",
    "worker": "TEXT",
    "versions_json": "TEXT",
    "notes_json": "TEXT",
    "error": "TEXT",
    "attempts": "INTEGER",
    "finished_at": "TEXT",
}

_DOMAIN_VALUES = (
    "n_images",
    "loss",
    "loss_ci_low",
    "loss_ci_high",
    "dice",
    "dice_ci_low",
    "dice_ci_high",
    "iou",
    "iou_ci_low",
    "iou_ci_high",
    "ood_score",
    "ood_score_mean",
    "entropy",
)

_FRAME_VALUES = (
    "structure_id",
    "actual_defocus_nm",
    "loss",
    "dice",
    "iou",
    "ood_score",
    "ood_distance",
    "entropy",
)

#: Columns of the runs table repeated in both views (the tidy provenance columns).
_VIEW_RUN_COLUMNS = (
    "run_key",
    "pretrain_key",
    "pretrain_defocus_nm",
    "transfer_defocus_nm",
    "freeze",
    "n_transfer",
    "pretrain_lr",
    "transfer_lr",
    "seed",
    "architecture",
)


def _results_sql(table: str, key_decl: str, key: str, columns: str) -> str:
    """``CREATE TABLE`` of a per-(run, stage, domain, ``key``) results table."""
    return f"""CREATE TABLE {table} (
  run_key TEXT NOT NULL REFERENCES runs(run_key) ON DELETE CASCADE,
  stage TEXT NOT NULL CHECK (stage IN ('pretrain', 'transfer')),
  domain_defocus_nm REAL NOT NULL,
  {key_decl},
  {columns},
  PRIMARY KEY (run_key, stage, domain_defocus_nm, {key})
)"""


def _view_sql(view: str, table: str, key: str, values: tuple[str, ...]) -> str:
    """``CREATE VIEW`` of the tidy records of a results table (runs that are ``done``)."""
    run_cols = ", ".join(f"r.{c}" for c in _VIEW_RUN_COLUMNS)
    source = "'sweep ' || r.sweep_name || ' run ' || r.run_key"
    return f"""CREATE VIEW {view} AS
SELECT r.run_key || ':' || t.stage AS model_id, t.stage AS stage, {run_cols},
  t.domain_defocus_nm AS domain_defocus_nm, t.{key} AS {key},
  {", ".join(f"t.{c} AS {c}" for c in values)},
  {source} AS source
FROM {table} t JOIN runs r ON r.run_key = t.run_key
WHERE r.status = 'done'
ORDER BY r.run_key, t.stage, t.domain_defocus_nm, t.{key}"""


def _schema_sql() -> list[str]:
    runs = ",\n  ".join(f"{k} {v}" for k, v in _RUN_COLUMNS.items())
    dom = ",\n  ".join(f"{k} {'INTEGER' if k == 'n_images' else 'REAL'}" for k in _DOMAIN_VALUES)
    frm = ",\n  ".join(f"{k} {'TEXT' if k == 'structure_id' else 'REAL'}" for k in _FRAME_VALUES)
    return [
        "CREATE TABLE schema_version (version INTEGER NOT NULL)",
        """CREATE TABLE sweeps (
  sweep_id TEXT PRIMARY KEY,
  name TEXT,
  config_json TEXT NOT NULL,
  created_at TEXT,
  package_version TEXT
)""",
        f"CREATE TABLE runs (\n  {runs}\n)",
        _results_sql("domain_results", "material TEXT NOT NULL", "material", dom),
        _results_sql("frame_results", "image_index INTEGER NOT NULL", "image_index", frm),
        "CREATE INDEX runs_status ON runs(status)",
        _view_sql(SQLITE_VIEWS["domains"], "domain_results", "material", _DOMAIN_VALUES),
        _view_sql(SQLITE_VIEWS["frames"], "frame_results", "image_index", _FRAME_VALUES),
    ]


def _writable(path: Path) -> bool:
    """May this process write ``path`` (a file or folder)?  One place, so that tests can
    emulate an ordinary user's permissions when they run as root."""
    return os.access(path, os.W_OK)


def check_database(path: str | os.PathLike, flag: str = "--db") -> Path:
    """Check that a results database can be written by a sweep, changing nothing.

    Raises
    ------
    ConfigError
        The folder is missing or read-only, the file is read-only, not a SQLite database, a
        sweep database of a newer schema, or locked by another writer.
    """
    p = Path(path).expanduser()
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise ConfigError(f"{flag} {p} is a folder; give a file such as {p / 'results.sqlite'}.")
    if not parent.is_dir():
        raise ConfigError(
            f"{flag} {p}: the folder {parent} does not exist; create it (mkdir -p {parent}) "
            "or choose another path.",
            flag,
        )
    if not _writable(parent):
        raise ConfigError(
            f"{flag} {p}: the folder {parent} is read-only (SQLite writes its journal beside "
            "the database); choose a writable folder.",
            flag,
        )
    if not p.exists():
        return p.resolve()
    if not _writable(p):
        raise ConfigError(
            f"{flag} {p} is read-only; make it writable (chmod u+w {p}) or give another file.",
            flag,
        )
    try:
        conn = sqlite3.connect(f"file:{p.resolve()}?mode=ro", uri=True, timeout=0.5)
    except sqlite3.Error as exc:  # pragma: no cover - mode=ro on an existing file
        raise ConfigError(f"{flag} {p} cannot be opened: {exc}.", flag) from None
    try:
        try:
            version = read_schema_version(conn)
        except sqlite3.DatabaseError as exc:
            if "locked" in str(exc):
                raise _locked(p, flag) from None
            raise ConfigError(
                f"{flag} {p} is not a sweep results database ({exc}); give a new file name.",
                flag,
            ) from None
        if version is not None and version > SCHEMA_VERSION:
            raise ConfigError(
                f"{flag} {p} was written with schema version {version}, newer than this "
                f"napari-hrtem-transfer understands ({SCHEMA_VERSION}); update the package "
                "(pip install -U napari-hrtem-transfer) or use another database file.",
                flag,
            )
    finally:
        conn.close()
    # a writer (another sweep, or any program in a transaction) holds the lock?
    conn = sqlite3.connect(str(p), timeout=0.5, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc) or "busy" in str(exc):
            raise _locked(p, flag) from None
        if "readonly" in str(exc):
            raise ConfigError(
                f"{flag} {p} is read-only ({exc}); give a writable file.", flag
            ) from None
        raise ConfigError(f"{flag} {p} cannot be written: {exc}.", flag) from None
    finally:
        conn.close()
    return p.resolve()


def _locked(p: Path, flag: str) -> ConfigError:
    return ConfigError(
        f"{flag} {p} is locked by another program (another sweep writing to it, or an open "
        "transaction); wait until it finishes or use another database file.",
        flag,
    )


class ResultStore:
    """The writer's connection to a results database.

    Parameters
    ----------
    path
        The SQLite file; created (with the schema) if missing.

    Notes
    -----
    Open it in the one process that writes (the sweep's client).  Every ``record_*`` call is
    one transaction.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path).expanduser().resolve()
        self.conn = sqlite3.connect(str(self.path), timeout=30.0, isolation_level=None)
        self.conn.execute("PRAGMA foreign_keys = ON")
        self._init_schema()

    # ------------------------------------------------------------------ lifecycle
    def _init_schema(self) -> None:
        with self.transaction() as c:
            version = read_schema_version(c)
            if version is None:
                for stmt in _schema_sql():
                    c.execute(stmt)
                c.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            elif version > SCHEMA_VERSION:
                raise ConfigError(
                    f"{self.path} has schema version {version}, newer than {SCHEMA_VERSION}; "
                    "update napari-hrtem-transfer."
                )

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on any exception)."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    # ------------------------------------------------------------------ writing
    def record_sweep(self, sweep_id: str, name: str, config_json: str, version: str) -> None:
        """Remember a sweep config (once per distinct config)."""
        with self.transaction() as c:
            c.execute(
                "INSERT OR IGNORE INTO sweeps VALUES (?, ?, ?, ?, ?)",
                (sweep_id, name, config_json, _now(), version),
            )

    def record_run(self, result: dict[str, Any]) -> None:
        """Write one finished run (``status`` done) in one transaction, replacing a failed one."""
        run = dict(result["run"])
        run["status"] = "done"
        with self.transaction() as c:
            self._replace_run(c, run)
            key = run["run_key"]
            marks = ", ".join("?" * (4 + len(_DOMAIN_VALUES)))
            c.executemany(
                f"INSERT INTO domain_results (run_key, stage, domain_defocus_nm, material, "
                f"{', '.join(_DOMAIN_VALUES)}) VALUES ({marks})",
                [
                    (key, r["stage"], r["domain_defocus_nm"], r.get("material") or "all")
                    + tuple(_num(r.get(k)) for k in _DOMAIN_VALUES)
                    for r in result["domains"]
                ],
            )
            marks = ", ".join("?" * (4 + len(_FRAME_VALUES)))
            c.executemany(
                f"INSERT INTO frame_results (run_key, stage, domain_defocus_nm, image_index, "
                f"{', '.join(_FRAME_VALUES)}) VALUES ({marks})",
                [
                    (key, r["stage"], r["domain_defocus_nm"], int(r["image_index"]))
                    + tuple(
                        r.get(k) if k == "structure_id" else _num(r.get(k)) for k in _FRAME_VALUES
                    )
                    for r in result["frames"]
                ],
            )

    def record_failure(self, run: dict[str, Any], error: str, attempts: int) -> None:
        """Record a run that failed after its retries (no per-domain rows)."""
        row = dict(run, status="failed", error=error, attempts=attempts)
        with self.transaction() as c:
            self._replace_run(c, row)

    def _replace_run(self, c: sqlite3.Connection, run: dict[str, Any]) -> None:
        c.execute("DELETE FROM runs WHERE run_key = ?", (run["run_key"],))
        run.setdefault("finished_at", _now())
        cols = [k for k in _RUN_COLUMNS if k in run]
        vals = [json.dumps(run[k]) if isinstance(run[k], dict | list) else run[k] for k in cols]
        c.execute(
            f"INSERT INTO runs ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})", vals
        )

    # ------------------------------------------------------------------ reading
    def status(self) -> dict[str, str]:
        """``{run_key: status}`` of every recorded run."""
        return dict(self.conn.execute("SELECT run_key, status FROM runs").fetchall())

    def counts(self) -> dict[str, int]:
        """Rows per table (runs by status, domain and frame results)."""
        out = dict(self.conn.execute("SELECT status, COUNT(*) FROM runs GROUP BY status"))
        for t in ("domain_results", "frame_results"):
            out[t] = self.conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
        return out


def _num(v: Any) -> Any:
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if f != f else f


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def read_status(db: str | os.PathLike) -> dict[str, str]:
    """``{run_key: status}`` of a results database (read-only; empty for a new file)."""
    path = Path(db)
    if not path.exists():
        return {}
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10.0)
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        if "runs" not in tables:
            return {}
        return dict(conn.execute("SELECT run_key, status FROM runs").fetchall())
    finally:
        conn.close()
