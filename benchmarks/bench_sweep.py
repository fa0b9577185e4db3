"""Benchmark the sweep runner: scheduler overhead per run, 1 -> 2 worker scaling, reuse savings.

Run by hand (not part of the test suite), niced, on a quiet machine if you can::

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/bench_sweep.py --out bench_sweep.json

What it measures (all on a LocalCluster of processes, one thread per worker, workers started
and warmed up before any timer):

* ``overhead``: many tiny runs on 1 worker.  Per run, the wall time of the sweep minus the
  time the worker spent inside the run functions (training, OOD fit, evaluation) =
  scheduling, result transfer, the SQLite transaction and the progress bar.
* ``scaling``: a fixed tiny sweep on 1 and on 2 workers (fresh model cache each time).
  Efficiency = T1 / (2 T2); the goal is >= 0.9 (T2 <= 0.56 T1).  Both sweeps include the
  shared pretrainings, which limit the parallelism of a small grid.
* ``reuse``: the same sweep with ``reuse_pretrained`` on and off, on 1 worker: what training
  each distinct pretrained model once saves.
* ``write``: the client's SQLite transaction for one run, alone.

The dataset is the tests' synthetic discs (64x64 px, 3 defoci, 10 structures); runs train a
4/8/8/8-channel compact U-Net for one epoch.  Per-run costs at realistic sizes come from
``time_*_s`` in a real sweep's database (see docs/sweeps.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_dataset(path: Path, n_images: int = 10, size: int = 64, seed: int = 0) -> Path:
    """The tests' discs: bright at -5 nm, faint at 0, dark at +5; Poisson noise."""
    from napari_hrtem_transfer.io.dataset import HRTEMDataset, save_dataset

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    masks = np.zeros((n_images, size, size), bool)
    for i in range(n_images):
        for _ in range(int(rng.integers(1, 3))):
            cy, cx = rng.uniform(10, size - 10, 2)
            r = rng.uniform(4, 9)
            masks[i] |= (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
    defoci = (-5.0, 0.0, 5.0)
    imgs = np.empty((len(defoci), n_images, size, size))
    for d, df in enumerate(defoci):
        imgs[d] = 200.0 * (1.0 + (-0.4 if df > 0 else (0.4 if df < 0 else 0.15)) * masks)
    ds = HRTEMDataset(
        images=rng.poisson(imgs).astype(np.uint16),
        defocus_nm=list(defoci),
        sampling_A=0.2,
        masks=masks,
        structure_ids=[f"st{i:03d}" for i in range(n_images)],
        dose_e_per_A2=5000.0,
    )
    return save_dataset(ds, path)


def config(data: Path, model_dir: Path, freeze, seeds, reuse: bool = True) -> dict:
    return {
        "name": "bench",
        "data": {"pretrain": str(data)},
        "grid": {
            "pretrain_defocus_nm": [-5.0],
            "transfer_defocus_nm": [0.0, 5.0],
            "freeze": list(freeze),
            "n_transfer": [4],
            "pretrain_lr": [3e-3],
            "transfer_lr": [1e-3],
            "seeds": list(seeds),
        },
        "model": {"architecture": "compact", "channels": [4, 8, 8, 8]},
        "pretrain": {"epochs": 1, "batch_size": 4},
        "transfer": {"epochs": 1, "batch_size": 4},
        "run": {
            "device": "cpu",
            "precision": "fp32",
            "n_boot": 20,
            "reuse_pretrained": reuse,
            "model_dir": str(model_dir),
        },
    }


def cluster(n: int):
    from distributed import Client, LocalCluster

    from napari_hrtem_transfer.sweep.runner import _warm_worker

    c = LocalCluster(
        n_workers=n,
        threads_per_worker=1,
        processes=True,
        dashboard_address=":0",
        scheduler_kwargs={"dashboard": False},
        silence_logs=logging.ERROR,
    )
    client = Client(c, set_as_default=False)
    client.run(_warm_worker)
    return c, client


def sweep(cfg: dict, db: Path, client) -> dict:
    from napari_hrtem_transfer.sweep import run_sweep

    res = run_sweep(cfg, db, client=client, progress=False)
    conn = sqlite3.connect(db)
    rows = conn.execute(
        "SELECT time_run_s, time_pretrain_s, time_transfer_s, time_ood_s, time_evaluate_s, "
        "pretrain_key, cpu_run_s, cpu_pretrain_s FROM runs WHERE status = 'done'"
    ).fetchall()
    conn.close()
    pre = {r[5]: r[1] for r in rows}  # pretraining time of each distinct model
    pre_cpu = {r[5]: r[7] for r in rows}
    reuse = cfg["run"]["reuse_pretrained"]
    busy = sum(r[0] for r in rows) + (sum(pre.values()) if reuse else 0.0)
    cpu = sum(r[6] for r in rows) + (sum(pre_cpu.values()) if reuse else 0.0)
    return {
        "n_workers": res.n_workers,
        "occupancy": busy / (res.n_workers * res.wall_s),
        "worker_cpu_s": cpu,
        "n_runs": res.n_done,
        "n_failed": res.n_failed,
        "wall_s": res.wall_s,
        "worker_busy_s": busy,
        "mean_run_s": statistics.mean(r[0] for r in rows),
        "mean_transfer_s": statistics.mean(r[2] for r in rows),
        "mean_ood_s": statistics.mean(r[3] for r in rows),
        "mean_evaluate_s": statistics.mean(r[4] for r in rows),
        "pretrain_s_each": statistics.mean(pre.values()),
        "n_pretrained": len(pre),
    }


def bench_write(tmp: Path, repeats: int = 20) -> float:
    """Median seconds of one run's SQLite transaction (36 domain + 72 frame rows)."""
    from napari_hrtem_transfer.sweep.store import ResultStore

    st = ResultStore(tmp / "write.sqlite")
    times = []
    for k in range(repeats):
        doms = [
            {"stage": s, "domain_defocus_nm": float(d), "material": "all", "loss": 0.1}
            for s in ("pretrain", "transfer")
            for d in range(-25, 30, 5)
        ]
        frames = [
            {"stage": r["stage"], "domain_defocus_nm": r["domain_defocus_nm"], "image_index": i}
            for r in doms
            for i in range(8)
        ]
        run = {"run_key": f"k{k}", "config_json": "{}", "versions_json": {"torch": "x"}}
        t = time.perf_counter()
        st.record_run({"run": run, "domains": doms, "frames": frames})
        times.append(time.perf_counter() - t)
    st.close()
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="write the numbers as JSON")
    ap.add_argument("--overhead-seeds", type=int, default=4, help="seeds of the overhead sweep")
    ap.add_argument("--scaling-seeds", type=int, default=4, help="seeds of the scaling sweep")
    ap.add_argument(
        "--repeat", type=int, default=2, help="interleaved 1-/2-worker repeats (minimum kept)"
    )
    ap.add_argument("--only", choices=("all", "scaling"), default="all", help="what to measure")
    args = ap.parse_args()
    out: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "load_avg_at_start": os.getloadavg(),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
        }
    }
    with tempfile.TemporaryDirectory(prefix="bench_sweep_") as tmpd:
        tmp = Path(tmpd)
        data = make_dataset(tmp / "discs.hspy")
        c1, cl1 = cluster(1)
        c2, cl2 = cluster(2)
        try:
            if args.only == "all":
                out["write_s_per_run"] = bench_write(tmp)
                print(f"SQLite transaction per run: {1e3 * out['write_s_per_run']:.1f} ms")
                freeze = ("none", "encoder", "decoder")
                seeds = range(args.overhead_seeds)
                r = sweep(config(data, tmp / "m_over", freeze, seeds), tmp / "over.sqlite", cl1)
                r["overhead_s_per_run"] = (r["wall_s"] - r["worker_busy_s"]) / r["n_runs"]
                out["overhead"] = r
                print(
                    f"overhead: {r['n_runs']} runs in {r['wall_s']:.1f} s on 1 worker, "
                    f"{r['worker_busy_s']:.1f} s inside the runs -> "
                    f"{1e3 * r['overhead_s_per_run']:.0f} ms per run (mean run "
                    f"{r['mean_run_s']:.2f} s, pretraining {r['pretrain_s_each']:.2f} s)",
                    flush=True,
                )
            sc_seeds = range(10, 10 + args.scaling_seeds)
            fz = ("none", "encoder")
            reps: dict[int, list] = {1: [], 2: []}
            for k in range(args.repeat):  # interleaved: 1, 2, 1, 2 ... (shared machine)
                for n, cl in ((1, cl1), (2, cl2)):
                    r = sweep(
                        config(data, tmp / f"m_s{n}_{k}", fz, sc_seeds),
                        tmp / f"s{n}_{k}.sqlite",
                        cl,
                    )
                    reps[n].append(r)
                    print(
                        f"  {n} worker(s): {r['wall_s']:.1f} s wall, occupancy "
                        f"{r['occupancy']:.0%}, {r['worker_cpu_s']:.1f} CPU-s in the runs, "
                        f"load {os.getloadavg()[0]:.1f}",
                        flush=True,
                    )
            t1 = min(reps[1], key=lambda r: r["wall_s"])
            t2 = min(reps[2], key=lambda r: r["wall_s"])
            eff = t1["wall_s"] / (2 * t2["wall_s"])
            out["scaling"] = {"1_worker": reps[1], "2_workers": reps[2], "efficiency": eff}
            print(
                f"scaling: {t1['n_runs']} runs, 1 worker {t1['wall_s']:.1f} s, 2 workers "
                f"{t2['wall_s']:.1f} s (minimum of {args.repeat}) -> T2/T1 = "
                f"{t2['wall_s'] / t1['wall_s']:.2f}, efficiency {eff:.0%} (goal >= 90 %, "
                "T2/T1 <= 0.56)",
                flush=True,
            )
            if args.only == "all":
                noreuse = sweep(
                    config(data, tmp / "m_nr", fz, sc_seeds, reuse=False), tmp / "nr.sqlite", cl1
                )
                out["reuse"] = {"on": reps[1], "off": noreuse}
                print(
                    f"reuse: {t1['n_runs']} runs on 1 worker in {t1['wall_s']:.1f} s with "
                    f"{t1['n_pretrained']} shared pretrainings ({t1['worker_cpu_s']:.1f} CPU-s), "
                    f"{noreuse['wall_s']:.1f} s pretraining in every run "
                    f"({noreuse['worker_cpu_s']:.1f} CPU-s)",
                    flush=True,
                )
        finally:
            for c in (cl1, cl2, c1, c2):
                c.close()
    out["machine"]["load_avg_at_end"] = os.getloadavg()
    print(
        f"load average start {out['machine']['load_avg_at_start']}, end "
        f"{out['machine']['load_avg_at_end']} on {os.cpu_count()} CPUs"
    )
    if args.out:
        args.out.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
