"""The SQLite store: versioned schema, one transaction per run, clear errors, nothing changed."""

from __future__ import annotations

import json
import os
import sqlite3

import numpy as np
import pytest

from napari_hrtem_transfer.errors import ConfigError, DatasetError
from napari_hrtem_transfer.evaluation import ResultTable
from napari_hrtem_transfer.sweep.store import SCHEMA_VERSION, ResultStore, check_database

from .conftest import file_digest


def _result(key: str, loss0: float = 0.5) -> dict:
    run = {
        "run_key": key,
        "sweep_name": "t",
        "pretrain_key": "p1",
        "pretrain_defocus_nm": -5.0,
        "transfer_defocus_nm": 5.0,
        "freeze": "encoder",
        "n_transfer": 4,
        "pretrain_lr": 1e-3,
        "transfer_lr": 1e-4,
        "seed": 0,
        "architecture": "compact",
        "config_json": "{}",
        "versions_json": {"torch": "x"},
    }
    domains, frames = [], []
    for stage, off in (("pretrain", 0.0), ("transfer", 0.1)):
        for j, d in enumerate((-5.0, 0.0, 5.0)):
            domains.append(
                {
                    "stage": stage,
                    "domain_defocus_nm": d,
                    "material": "all",
                    "loss": loss0 + off + j,
                    "dice": 0.5,
                    "ood_score": float(j),
                    "n_images": 2,
                }
            )
            for i in (7, 9):
                frames.append(
                    {
                        "stage": stage,
                        "domain_defocus_nm": d,
                        "image_index": i,
                        "structure_id": f"s{i}",
                        "loss": loss0 + off + j + i,
                        "ood_score": float(i),
                    }
                )
    return {"run": run, "domains": domains, "frames": frames}


def test_schema_roundtrip_and_views(tmp_path):
    db = tmp_path / "r.sqlite"
    with ResultStore(db) as st:
        st.record_run(_result("a"))
        st.record_failure(_result("b")["run"], "RuntimeError: boom", attempts=3)
        assert st.status() == {"a": "done", "b": "failed"}
        c = st.counts()
        assert c["done"] == 1 and c["failed"] == 1
        assert c["domain_results"] == 6 and c["frame_results"] == 12
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    err, att = conn.execute("SELECT error, attempts FROM runs WHERE run_key='b'").fetchone()
    assert err == "RuntimeError: boom" and att == 3
    assert json.loads(conn.execute("SELECT versions_json FROM runs").fetchone()[0]) == {
        "torch": "x"
    }
    conn.close()
    # readers see only finished runs, with the tidy columns
    t = ResultTable.from_sqlite(db)
    assert len(t) == 6
    assert set(t["model_id"]) == {"a:pretrain", "a:transfer"}
    np.testing.assert_allclose(
        t.where(stage="transfer")["loss"], [0.6, 1.6, 2.6]
    )  # written values come back
    f = ResultTable.from_sqlite(db, "frames")
    assert len(f) == 12 and set(f["structure_id"]) == {"s7", "s9"}
    assert len(ResultTable.from_sqlite(db, where="freeze = ?", params=["none"])) == 0


def test_failed_then_done_replaces_the_row(tmp_path):
    db = tmp_path / "r.sqlite"
    with ResultStore(db) as st:
        st.record_failure(_result("a")["run"], "boom", 2)
        st.record_run(_result("a", loss0=0.25))
        assert st.status() == {"a": "done"}
        assert st.counts()["domain_results"] == 6
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT COUNT(*), MAX(error) FROM runs").fetchone() == (1, None)


def test_a_failing_write_leaves_nothing(tmp_path):
    db = tmp_path / "r.sqlite"
    bad = _result("a")
    bad["frames"][3]["image_index"] = bad["frames"][2]["image_index"]  # duplicate primary key
    with ResultStore(db) as st:
        with pytest.raises(sqlite3.IntegrityError):
            st.record_run(bad)
        assert st.status() == {}
        assert st.counts()["domain_results"] == 0  # the transaction was rolled back


def test_newer_schema_is_refused_and_unchanged(tmp_path):
    db = tmp_path / "r.sqlite"
    ResultStore(db).close()
    conn = sqlite3.connect(db)
    conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    conn.commit()
    conn.close()
    before = file_digest(db)
    with pytest.raises(ConfigError, match="newer"):
        check_database(db)
    with pytest.raises(DatasetError, match="schema version"):
        ResultTable.from_sqlite(db)
    assert file_digest(db) == before


def test_locked_database(tmp_path):
    db = tmp_path / "r.sqlite"
    ResultStore(db).close()
    before = file_digest(db)
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(ConfigError, match="locked"):
            check_database(db)
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert file_digest(db) == before
    check_database(db)  # free again


def test_read_only_database_and_folder(tmp_path, monkeypatch):
    if os.geteuid() == 0:
        # root may write anything (CI runs as root): judge writability from the owner's
        # permission bits, as the kernel does for an ordinary user who owns the file
        import stat

        from napari_hrtem_transfer.sweep import store

        monkeypatch.setattr(
            store, "_writable", lambda p: bool(os.stat(p).st_mode & stat.S_IWUSR)
        )
    db = tmp_path / "r.sqlite"
    ResultStore(db).close()
    before = file_digest(db)
    db.chmod(0o444)
    try:
        with pytest.raises(ConfigError, match="read-only"):
            check_database(db)
    finally:
        db.chmod(0o644)
    assert file_digest(db) == before
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(ConfigError, match="read-only"):
            check_database(ro / "new.sqlite")
    finally:
        ro.chmod(0o755)
    assert not (ro / "new.sqlite").exists()


def test_not_a_sweep_database(tmp_path):
    db = tmp_path / "other.sqlite"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    with pytest.raises(ConfigError, match="not a sweep results database"):
        check_database(db)
    (tmp_path / "junk.sqlite").write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(ConfigError, match="not a sweep results database"):
        check_database(tmp_path / "junk.sqlite")
    with pytest.raises(ConfigError, match="does not exist"):
        check_database(tmp_path / "missing" / "r.sqlite")


def test_read_only_reported_where_permissions_say_so(tmp_path, monkeypatch):
    """The same checks where the tests run as root (which may write anyway): os.access says no."""
    db = tmp_path / "r.sqlite"
    ResultStore(db).close()
    before = file_digest(db)
    real = os.access

    def no_write(path, mode, *a, **k):
        if mode & os.W_OK and os.fspath(path) == os.fspath(db):
            return False
        return real(path, mode, *a, **k)

    monkeypatch.setattr(os, "access", no_write)
    with pytest.raises(ConfigError, match="read-only; make it writable"):
        check_database(db)
    assert file_digest(db) == before
