"""Bad input stops a sweep before any run starts, with a clear error and the database unchanged."""

from __future__ import annotations

import sqlite3

import pytest

from napari_hrtem_transfer.cli import main
from napari_hrtem_transfer.errors import ConfigError, DatasetError
from napari_hrtem_transfer.sweep import runner
from napari_hrtem_transfer.sweep.runner import plan_sweep, run_sweep
from napari_hrtem_transfer.sweep.store import SCHEMA_VERSION, ResultStore

from .conftest import file_digest, tiny_config


def _toml(cfg: dict) -> str:
    """A minimal TOML writer for the test configs (tables of scalars and lists)."""

    def val(v):
        if isinstance(v, str):
            return f'"{v}"'
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        return repr(v)

    lines = [f"{k} = {val(v)}" for k, v in cfg.items() if not isinstance(v, dict)]
    for k, v in cfg.items():
        if isinstance(v, dict):
            lines.append(f"[{k}]")
            lines += [f"{kk} = {val(vv)}" for kk, vv in v.items()]
    return "\n".join(lines) + "\n"


def test_plan_lists_runs_and_shares_pretrained_models(data_path, tmp_path):
    plan = plan_sweep(tiny_config(data_path, grid={"seeds": [0, 1]}), tmp_path / "r.sqlite")
    assert len(plan.specs) == 2 * 2 * 2  # targets x freezing x seeds
    assert len(plan.pretrain_keys) == 2  # one pretrained model per seed
    assert len({s["run_key"] for s in plan.specs}) == len(plan.specs)
    assert plan.model_dir == tmp_path / "r_models"
    # the keys do not depend on where the models go, only on what determines a result
    other = plan_sweep(
        tiny_config(data_path, grid={"seeds": [0, 1]}, run={"model_dir": str(tmp_path / "m")}),
        tmp_path / "r.sqlite",
    )
    assert [s["run_key"] for s in other.specs] == [s["run_key"] for s in plan.specs]
    changed = plan_sweep(
        tiny_config(data_path, grid={"seeds": [0, 1]}, transfer={"epochs": 2}),
        tmp_path / "r.sqlite",
    )
    assert not {s["run_key"] for s in changed.specs} & {s["run_key"] for s in plan.specs}
    assert {s["pretrain_key"] for s in changed.specs} == set(plan.pretrain_keys)


@pytest.mark.parametrize(
    ("sections", "error", "words"),
    [
        ({"grid": {"transfer_defocus_nm": [0.0, 7.5]}}, ConfigError, ["7.5 nm not in", "-5, 0, 5"]),
        ({"grid": {"pretrain_defocus_nm": [-10.0]}}, ConfigError, ["-10 nm not in"]),
        ({"grid": {"n_transfer": [4, 9]}}, ConfigError, ["N = 9", "8 training images"]),
        ({"transfer": {"patch_size": 96}}, ConfigError, ["larger than the images"]),
        ({"data": {"transfer": "/nonexistent/x.hspy"}}, DatasetError, ["does not exist"]),
    ],
)
def test_grid_that_does_not_fit_the_data(data_path, tmp_path, sections, error, words):
    db = tmp_path / "r.sqlite"
    ResultStore(db).close()
    before = file_digest(db)
    with pytest.raises(error) as info:
        run_sweep(tiny_config(data_path, **sections), db, progress=False)
    for w in words:
        assert w in str(info.value), (w, str(info.value))
    assert file_digest(db) == before
    assert not (tmp_path / "r_models").exists()


def test_unreachable_scheduler(data_path, tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "SCHEDULER_TIMEOUT", "2s")
    db = tmp_path / "r.sqlite"
    with pytest.raises(ConfigError, match="cannot be reached"):
        run_sweep(tiny_config(data_path), db, scheduler="tcp://127.0.0.1:9", progress=False)
    assert not db.exists()


def test_newer_schema_database_is_left_alone(data_path, tmp_path):
    db = tmp_path / "r.sqlite"
    ResultStore(db).close()
    conn = sqlite3.connect(db)
    conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 5,))
    conn.commit()
    conn.close()
    before = file_digest(db)
    with pytest.raises(ConfigError, match="newer"):
        run_sweep(tiny_config(data_path), db, progress=False)
    assert file_digest(db) == before


def test_locked_database_is_refused(data_path, tmp_path):
    db = tmp_path / "r.sqlite"
    ResultStore(db).close()
    before = file_digest(db)
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(ConfigError, match="locked"):
            run_sweep(tiny_config(data_path), db, progress=False)
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert file_digest(db) == before


def test_another_sweep_holds_the_database(data_path, tmp_path):
    db = tmp_path / "r.sqlite"
    with runner._db_lock(db.resolve()):
        with pytest.raises(ConfigError, match="another sweep is writing"):
            run_sweep(tiny_config(data_path), db, progress=False)
    assert not db.exists()


@pytest.mark.parametrize(
    ("sections", "words"),
    [
        ({"grid": {"freeze": ["none", "encodr"]}}, "grid.freeze[1]"),
        ({"grid": {"transfer_defocus_nm": [0.0, 7.5]}}, "7.5 nm not in"),
        ({"grid": {"n_transfer": [64]}}, "N = 64"),
    ],
)
def test_cli_exit_2_without_traceback(data_path, tmp_path, capsys, sections, words):
    cfg = tmp_path / "sweep.toml"
    cfg.write_text(_toml(tiny_config(data_path, **sections)))
    db = tmp_path / "r.sqlite"
    rc = main(["sweep", "--config", str(cfg), "--db", str(db), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert words in err and "Traceback" not in err
    assert err.startswith("hrtem-transfer sweep: error:")
    assert not db.exists()


def test_cli_dry_run_writes_nothing(data_path, tmp_path, capsys):
    cfg = tmp_path / "sweep.toml"
    cfg.write_text(_toml(tiny_config(data_path)))
    db = tmp_path / "r.sqlite"
    rc = main(["sweep", "--config", str(cfg), "--db", str(db), "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.startswith("4 runs (1 distinct pretrained models, reuse on); 0 done")
    assert out.count(" todo ") == 4
    assert not db.exists()
