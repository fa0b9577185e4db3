"""Sweeps on a LocalCluster of processes: one row set per run, reruns, reuse, worker death.

Each run trains a 4/8/8/8-channel U-Net for one epoch on 64x64 discs; a sweep of four runs takes
a few seconds once the worker processes are up.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import threading
from pathlib import Path

import numpy as np
import pytest

from napari_hrtem_transfer.evaluation import ResultTable
from napari_hrtem_transfer.sweep import SweepConfig, run_sweep
from napari_hrtem_transfer.sweep.runner import plan_sweep

from .conftest import DEFOCI, file_digest, tiny_config

pytestmark = pytest.mark.slow

N_VAL = 2  # held-out structures of the tiny dataset (val_fraction 0.2 of 10)


def _counts(db) -> dict:
    conn = sqlite3.connect(db)
    try:
        out = dict(conn.execute("SELECT status, COUNT(*) FROM runs GROUP BY status"))
        for t in ("domain_results", "frame_results"):
            out[t] = conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
        # how many row sets each run has (must be exactly one)
        out["per_run"] = sorted(
            {
                n
                for (n,) in conn.execute(
                    "SELECT COUNT(*) FROM domain_results GROUP BY run_key, stage"
                )
            }
        )
        return out
    finally:
        conn.close()


def _expect(n_runs: int) -> dict:
    n_dom = len(DEFOCI)
    return {
        "done": n_runs,
        "domain_results": n_runs * 2 * n_dom,
        "frame_results": n_runs * 2 * n_dom * N_VAL,
        "per_run": [n_dom],
    }


@pytest.fixture(scope="module")
def done_sweep(data_path, process_client, tmp_path_factory):
    """A finished 4-run sweep (one shared pretrained model), fine-tuned models kept."""
    tmp = tmp_path_factory.mktemp("sweep")
    cfg = SweepConfig.model_validate(tiny_config(data_path, run={"keep_models": True}))
    db = tmp / "results.sqlite"
    res = run_sweep(cfg, db, client=process_client, progress=False)
    return cfg, db, res


def test_sweep_fills_one_row_set_per_run(done_sweep):
    cfg, db, res = done_sweep
    assert (res.n_runs, res.n_done, res.n_failed, res.n_skipped) == (4, 4, 0, 0)
    assert res.n_pretrained == 1 and not res.interrupted
    assert _counts(db) == _expect(4)
    conn = sqlite3.connect(db)
    rows = conn.execute(
        "SELECT run_key, pretrain_weights_sha256, generalization_before, generalization_after, "
        "shift, device, versions_json, config_json, time_transfer_s FROM runs"
    ).fetchall()
    # one pretrained model shared by all runs
    assert len({r[1] for r in rows}) == 1
    t = ResultTable.from_sqlite(db)
    for key, _sha, g_before, g_after, shift, device, versions, config, t_tr in rows:
        assert device == "cpu" and "torch" in json.loads(versions) and t_tr > 0
        assert json.loads(config)["pretrain"]["deterministic"] is True
        # generalization = population std of the per-domain losses without 0 nm
        for stage, g in (("pretrain", g_before), ("transfer", g_after)):
            sel = t.where(model_id=f"{key}:{stage}")
            losses = {d: v for d, v in zip(sel["domain_defocus_nm"], sel["loss"], strict=True)}
            assert g == pytest.approx(np.std([losses[-5.0], losses[5.0]]), rel=1e-12)
        assert shift == pytest.approx(g_after - g_before)
    # the same pretrained model read on the same held-out frames gives the same numbers
    before = t.where(stage="pretrain")
    for d in DEFOCI:
        assert len(set(before.where(domain_defocus_nm=d)["loss"].tolist())) == 1


def test_rerun_adds_nothing(done_sweep, process_client):
    cfg, db, _ = done_sweep
    digest = file_digest(db)
    res = run_sweep(cfg, db, client=process_client, progress=False)
    assert (res.n_skipped, res.n_done, res.n_failed) == (4, 0, 0)
    assert file_digest(db) == digest


def test_compare_reference_db_equals_direct_computation(done_sweep, data_path, tmp_path):
    """`compare-reference --db` == the views computed from the runs' own evaluation records."""
    from scipy.stats import spearmanr

    from napari_hrtem_transfer.cli import main
    from napari_hrtem_transfer.evaluation import evaluate_model
    from napari_hrtem_transfer.evaluation.aggregate import (
        generalization_matrix,
        shift_matrix,
        target_matrix,
    )
    from napari_hrtem_transfer.io import load_dataset
    from napari_hrtem_transfer.training import read_sidecar

    cfg, db, _ = done_sweep
    plan = plan_sweep(cfg, db)
    ds = load_dataset(data_path, lazy=False)
    doms, frames = [], []
    for spec in plan.specs:
        key, pt = spec["run_key"], spec["point"]
        ft = plan.model_dir / "runs" / key / "finetuned"
        pre = plan.model_dir / "pretrained" / spec["pretrain_key"]
        val = read_sidecar(ft)["data"]["val_structures"]
        prov = {k: pt[k] for k in ("pretrain_defocus_nm", "transfer_defocus_nm", "freeze")}
        for stage, model in (("pretrain", pre), ("transfer", ft)):
            ev = evaluate_model(
                model,
                ds,
                structures=val,
                n_boot=cfg.run.n_boot,
                model_id=f"{key}:{stage}",
                provenance={**prov, "stage": stage},
            )
            doms += ev.domains.records()
            frames += ev.frames.records()
    direct = ResultTable.from_records(doms)
    out = tmp_path / "rep"
    rc = main(["compare-reference", "--db", str(db), "--no-reference", "--out", str(out)])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    for name, mat in (
        ("target_before", target_matrix(direct, "pretrain")),
        ("target_after", target_matrix(direct, "transfer")),
        ("generalization_after", generalization_matrix(direct, "transfer")),
        ("shift", shift_matrix(direct)),
    ):
        got = summary[f"reference_{name}"]
        want = mat.to_records()
        assert [(g["row_defocus_nm"], g["col_defocus_nm"]) for g in got] == [
            (w["row_defocus_nm"], w["col_defocus_nm"]) for w in want
        ]
        np.testing.assert_allclose(
            [np.nan if g["value"] is None else g["value"] for g in got],
            [np.nan if w["value"] is None else w["value"] for w in want],
            rtol=1e-9,
            err_msg=name,
        )
    sweep = json.loads((out / "sweep_summary.json").read_text())
    rho_dom = spearmanr(direct["ood_score"], direct["loss"]).statistic
    ft = ResultTable.from_records(frames)
    rho_frm = spearmanr(ft["ood_score"], ft["loss"]).statistic
    assert sweep["ood_spearman_domains"]["all"]["spearman"] == pytest.approx(rho_dom, abs=1e-9)
    assert sweep["ood_spearman_frames"]["all"]["spearman"] == pytest.approx(rho_frm, abs=1e-9)
    assert sweep["ood_spearman_frames"]["all"]["n"] == len(ft) == 4 * 2 * len(DEFOCI) * N_VAL


def test_compare_reference_labels_whose_numbers_are_whose(done_sweep, tmp_path, capsys):
    """Issue 18: `compare-reference --db` printed the published table's values under an
    unlabelled heading and not the user's own; report.md headed both sections "The study's
    views" and named one run key as the source of the whole sweep."""
    from napari_hrtem_transfer.cli import main
    from napari_hrtem_transfer.evaluation.aggregate import generalization_by

    cfg, db, _ = done_sweep
    out = tmp_path / "rep"
    capsys.readouterr()
    assert main(["compare-reference", "--db", str(db), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "the published table (" in text
    assert f"your results (--db {db}: 4 runs of sweep {cfg.name})" in text
    own = ResultTable.from_sqlite(db)
    mine = text.split("your results", 1)[1].split("your sweep", 1)[0]
    g = generalization_by(own, ("pretrain_defocus_nm",), "pretrain", "median", (0.0,))
    assert g
    for k, v in g.items():
        assert f"pretrained at {k[0]:+g} nm: {v:.4f}" in mine
    assert "your sweep (--db): 4 runs" in text
    md = (out / "report.md").read_text()
    assert "## The study's views: the published table" in md
    assert "## The study's views: your results" in md
    assert f"Source: 4 runs of sweep {cfg.name}." in md
    assert " run " not in md.split("## The study's views: your results", 1)[1].split("\n")[2]


def test_reused_pretrained_model_is_bitwise_a_single_runs(
    done_sweep, data_path, process_client, tmp_path
):
    from napari_hrtem_transfer.training import read_sidecar, train

    cfg, db, _ = done_sweep
    raw = tiny_config(data_path, grid={"transfer_defocus_nm": [5.0]})
    raw["run"]["reuse_pretrained"] = False
    db2 = tmp_path / "noreuse.sqlite"
    res = run_sweep(raw, db2, client=process_client, progress=False)
    assert res.n_done == 2 and res.n_pretrained == 0
    q = (
        "SELECT run_key, pretrain_weights_sha256, transfer_weights_sha256, pretrain_reused "
        "FROM runs ORDER BY run_key"
    )
    own = sqlite3.connect(db2).execute(q).fetchall()
    shared = {r[0]: r for r in sqlite3.connect(db).execute(q).fetchall()}
    for key, pre_sha, ft_sha, reused in own:
        assert reused == 0 and shared[key][3] == 1
        assert pre_sha == shared[key][1]  # the cached model is the one a run trains itself
        assert ft_sha == shared[key][2]  # ... so the fine-tuned weights are identical too

    def by_row(t):
        return {
            (m, d): (loss, ood)
            for m, d, loss, ood in zip(
                t["model_id"], t["domain_defocus_nm"], t["loss"], t["ood_score"], strict=True
            )
        }

    a = by_row(ResultTable.from_sqlite(db2))
    b = by_row(ResultTable.from_sqlite(db, where="transfer_defocus_nm = 5"))
    assert len(a) == 2 * 2 * len(DEFOCI)
    assert a == b  # every loss and OOD score, bit for bit
    # and the model one plain training with the same settings writes, in this process
    pt = cfg.points()[0]
    out = train(cfg.pretrain_config(pt), data_path, tmp_path / "single")
    assert read_sidecar(out.out_dir)["weights_sha256"] == own[0][1]


def test_stop_then_rerun_continues(data_path, process_client, tmp_path):
    raw = tiny_config(data_path, grid={"seeds": [3]})
    db = tmp_path / "r.sqlite"
    stop = threading.Event()
    seen = []

    def progress(done, total, message):
        seen.append((done, total, message))
        stop.set()

    res = run_sweep(raw, db, client=process_client, progress=progress, stop=stop)
    assert res.interrupted and 1 <= res.n_done < 4
    assert seen[0][:2] == (1, 4) and seen[0][2].startswith("done ")
    assert _counts(db)["done"] == res.n_done
    res2 = run_sweep(raw, db, client=process_client, progress=False)
    assert res2.n_skipped == res.n_done and res2.n_done == 4 - res.n_done
    assert _counts(db) == _expect(4)


def test_failed_run_recorded_with_its_error_then_retried(data_path, tmp_path, monkeypatch):
    """A run that raises is retried `retries` times, then recorded as failed with the error."""
    from distributed import Client, LocalCluster

    from napari_hrtem_transfer.evaluation.ood import fit as ood_fit

    calls = []
    real = ood_fit._fit_for_checkpoint

    def flaky(model_dir, *args, **kwargs):
        # the fit itself raises; the workflow's OOD stage turns it into a failed result
        if Path(model_dir).name == "finetuned":
            calls.append(model_dir)
            raise RuntimeError("boom in the OOD fit")
        return real(model_dir, *args, **kwargs)

    raw = tiny_config(data_path, grid={"transfer_defocus_nm": [5.0], "freeze": ["none"]})
    db = tmp_path / "r.sqlite"
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0"
        ) as cluster,
        Client(cluster, set_as_default=False) as client,
    ):
        monkeypatch.setattr(ood_fit, "_fit_for_checkpoint", flaky)
        res = run_sweep(raw, db, client=client, progress=False)
        assert res.n_failed == 1 and len(calls) == 1 + raw["run"]["retries"]
        err, attempts, status = (
            sqlite3.connect(db).execute("SELECT error, attempts, status FROM runs").fetchone()
        )
        assert status == "failed" and "boom in the OOD fit" in err and attempts == 2
        assert len(ResultTable.from_sqlite(db)) == 0
        assert not any((tmp_path / "r_models" / "tmp").glob("*"))  # no half-written run left
        monkeypatch.setattr(ood_fit, "_fit_for_checkpoint", real)
        res = run_sweep(raw, db, client=client, progress=False)
        assert res.n_done == 1 and res.n_skipped == 0
    c = _counts(db)
    assert c == {**_expect(1)}


def test_killed_worker_loses_nothing_duplicates_nothing(data_path, process_client, tmp_path):
    """SIGKILL a worker process while it runs; every run still ends recorded exactly once."""
    raw = tiny_config(data_path, grid={"seeds": [7]}, transfer={"epochs": 2})
    db = tmp_path / "r.sqlite"
    killed = []

    def progress(done, total, message):
        if killed:
            return
        busy = {w: ks for w, ks in process_client.processing().items() if ks}
        pids = process_client.run(os.getpid)
        for w, keys in busy.items():
            if any(str(k).startswith("hrtem-") for k in keys):
                os.kill(pids[w], signal.SIGKILL)
                killed.append((w, keys))
                return

    res = run_sweep(raw, db, client=process_client, progress=progress)
    assert killed, "no worker was busy when the first run finished"
    assert res.n_failed == 0 and res.n_done == 4
    assert _counts(db) == _expect(4)
    n_keys = sqlite3.connect(db).execute("SELECT COUNT(DISTINCT run_key) FROM runs").fetchone()
    assert n_keys == (4,)


@pytest.mark.gpu
def test_gpu_worker_path(data_path, tmp_path):
    """One run on a local cluster whose workers each hold one GPU (resources GPU=1)."""
    raw = tiny_config(
        data_path,
        grid={"transfer_defocus_nm": [5.0], "freeze": ["encoder"]},
        run={"device": "cuda", "precision": "auto", "resources": {"GPU": 1}},
    )
    db = tmp_path / "r.sqlite"
    res = run_sweep(raw, db, workers=1, progress=False)
    assert res.n_done == 1 and res.n_failed == 0
    device, precision = sqlite3.connect(db).execute("SELECT device, precision FROM runs").fetchone()
    assert device.startswith("cuda")
    assert _counts(db) == _expect(1)


def test_run_sweep_from_a_thread_with_its_own_cluster(data_path, tmp_path):
    """As napari calls it: from a worker thread, starting (and closing) its own LocalCluster."""
    raw = tiny_config(data_path, grid={"transfer_defocus_nm": [5.0], "freeze": ["none"]})
    db = tmp_path / "r.sqlite"
    box = {}

    def target():
        try:
            box["res"] = run_sweep(raw, db, workers=1, progress=lambda *a: box.setdefault("p", a))
        except BaseException as exc:  # noqa: BLE001 - reported below
            box["exc"] = exc

    th = threading.Thread(target=target)
    th.start()
    th.join(timeout=300)
    assert not th.is_alive()
    assert "exc" not in box, box.get("exc")
    assert box["res"].n_done == 1 and box["p"][:2] == (1, 1)
    assert _counts(db) == _expect(1)
