"""Run a sweep of transfer experiments on dask.distributed, recording results in SQLite.

:func:`run_sweep` is the one job; the CLI (``hrtem-transfer sweep``) and napari call it.

How it works
------------
1. **Validate** everything before anything runs: the config, the datasets (every defocus of
   the grid present, masks, N not larger than the training images, image/patch sizes), the
   database (writable, not locked, not of a newer schema), the scheduler (reachable).
   Nothing is written if any check fails.
2. **Plan**: every grid point becomes a run spec (plain dicts: the two ``TrainConfig`` s, the
   dataset paths and fingerprints).  The *run key* is a hash of what determines the run's
   result, so re-running the same config skips runs already recorded as ``done``.
3. **Submit** pure functions to the workers: one :func:`pretrain_task` per distinct
   pretrained model (key = hash of the pretraining config + dataset fingerprint; cached on
   disk under ``<models>/pretrained/<key>/``) and one :func:`run_task` per run depending on
   it (``reuse_pretrained = false`` pretrains inside every run instead, as the study did).
4. **Record**: the client (the only writer) writes one SQLite transaction per finished run
   as results arrive.  A run that raises is retried ``retries`` times by dask; a worker that
   dies is handled by the scheduler (its tasks are rescheduled, at most
   ``distributed.scheduler.allowed-failures`` times); then the run is recorded ``failed``
   with its error.  A result reaches the client once, and the run key is the primary key,
   so nothing is duplicated.

The three parts live in three modules: planning in :mod:`.plan`, the worker tasks in
:mod:`.tasks` (each run is one :func:`~napari_hrtem_transfer.evaluation.workflows.run_transfer`),
the client (this module: cluster, submission, recording) here; the SQLite schema in
:mod:`.store`.

Workers use ``TrainConfig(deterministic=True, num_threads=threads_per_worker)``: a run's result
does not depend on where or alongside what it ran.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..training.progress import Progress, stop_checker
from .config import SweepConfig
from .plan import EXCLUDE_NM, SweepPlan, plan_sweep, sweep_versions
from .store import ResultStore, check_database, read_status
from .tasks import pretrain_task, run_task, warm_worker

__all__ = [
    "EXCLUDE_NM",
    "SweepInterrupted",
    "SweepPlan",
    "SweepResult",
    "check_workers",
    "plan_sweep",
    "pretrain_task",
    "run_sweep",
    "run_task",
]

#: ``progress(done, total, message)`` of a sweep (runs recorded / runs to do).
ProgressCallback = Progress

#: How long to try to reach an existing scheduler before giving up.
SCHEDULER_TIMEOUT = "10s"


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C during a sweep: finished runs are recorded; ``result`` says how far it got."""

    def __init__(self, result: SweepResult) -> None:
        super().__init__("sweep interrupted")
        self.result = result


@dataclass
class SweepResult:
    """What :func:`run_sweep` did.

    Attributes
    ----------
    db
        The database.
    n_runs
        Runs in the grid.
    n_skipped
        Runs already recorded as done (not run again).
    n_done, n_failed
        Runs recorded as done / failed by this call.
    interrupted
        Stopped early (Ctrl-C or ``stop``); rerun the same call to continue.
    failed
        ``{run key: error}`` of the runs recorded as failed by this call.
    wall_s
        Wall time of the call [s], from the first submission to the last record.
    n_workers
        Workers of the cluster when the runs started.
    """

    db: Path
    n_runs: int
    n_skipped: int = 0
    n_done: int = 0
    n_failed: int = 0
    interrupted: bool = False
    failed: dict[str, str] = field(default_factory=dict)
    wall_s: float = 0.0
    n_workers: int = 0
    n_pretrained: int = 0


def _default_workers(threads: int) -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        n = os.cpu_count() or 1
    return max(1, n // max(1, threads))


@contextlib.contextmanager
def _db_lock(db: Path):
    """An exclusive lock held for the whole sweep (one writer per database)."""
    lock = db.with_name(db.name + ".lock")
    fh = open(lock, "a+")  # noqa: SIM115 - held for the duration
    try:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: SQLite's own locking only
            fcntl = None
        if fcntl is not None:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                # the holder may have unlinked the file between our open and our lock
                if os.fstat(fh.fileno()).st_ino != os.stat(lock).st_ino:
                    raise OSError("lock file replaced")
            except OSError:
                fh.close()
                fh = None  # not ours: leave the holder's lock file alone
                raise ConfigError(
                    f"--db {db} is locked: another sweep is writing to it (lock file {lock}); "
                    "wait until it finishes or use another database file.",
                    "--db",
                ) from None
        yield
    finally:
        if fh is not None:
            # unlink while still holding the lock, so no one locks a file about to vanish
            with contextlib.suppress(OSError):
                lock.unlink()
            fh.close()


def _connect(scheduler: str | None, workers: int | None, cfg: SweepConfig):
    """A client of an existing scheduler, or of a new LocalCluster of processes."""
    from distributed import Client

    if scheduler:
        try:
            return Client(scheduler, timeout=SCHEDULER_TIMEOUT, set_as_default=False), None
        except (OSError, TimeoutError) as exc:
            raise ConfigError(
                f"--scheduler {scheduler} cannot be reached ({exc}); check the address "
                "(tcp://HOST:PORT of 'dask scheduler') and that it is running, or leave "
                "--scheduler out to start a local cluster.",
                "--scheduler",
            ) from None
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers must be at least 1 (got {workers}).", "--workers")
    threads = cfg.run.threads_per_worker
    n = workers or _default_workers(threads)
    # Worker processes inherit an ignored SIGINT: Ctrl-C reaches only this process, which
    # cancels the runs and closes the cluster (instead of every worker dying with a traceback).
    old = None
    if threading.current_thread() is threading.main_thread():
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        cluster = _local_cluster(n, threads, dict(cfg.run.resources))
    finally:
        if old is not None:
            signal.signal(signal.SIGINT, old)
    return Client(cluster, set_as_default=False), cluster


#: How long to wait for the first worker of an existing scheduler [s].
WORKER_WAIT_S = 30.0


def _worker_probe():
    """The function sent to every worker to check it can run the sweep.

    Built inside a function so that cloudpickle sends it by value: a worker that cannot
    import this package can still run it (and say why), where a function of the package
    could not even be unpickled there.
    """

    def probe(module_name: str, dist_name: str) -> dict[str, str]:
        import importlib
        import importlib.metadata
        import sys

        try:
            importlib.import_module(module_name)
        except BaseException as exc:  # noqa: BLE001 - reported to the client as text
            return {"error": f"{type(exc).__name__}: {exc}", "python": sys.executable}
        try:
            version = importlib.metadata.version(dist_name)
        except Exception:  # noqa: BLE001
            version = ""
        return {"version": version, "python": sys.executable}

    return probe


def check_workers(client: Any, *, wait_s: float = WORKER_WAIT_S) -> dict[str, str]:
    """Check that every worker of ``client`` imports this package, at the client's version.

    A worker that cannot import the package would otherwise fail every task without a
    message (the scheduler logs "Lost all workers" and the sweep waits forever).

    Returns
    -------
    dict
        ``{worker address: package version}``.

    Raises
    ------
    ConfigError
        No worker joined within ``wait_s``; a worker cannot import the package (the message
        gives its Python and the import error); a worker has another version.
    """
    from .. import __version__

    try:
        client.wait_for_workers(1, timeout=wait_s)
    except (TimeoutError, OSError):
        raise ConfigError(
            f"the dask scheduler has no worker (waited {wait_s:g} s); start workers with "
            "'dask worker ADDRESS' in the environment where napari-hrtem-transfer is "
            "installed.",
            "--scheduler",
        ) from None
    found = client.run(_worker_probe(), __name__, "napari-hrtem-transfer")
    broken = {w: r for w, r in found.items() if "error" in r}
    if broken:
        lines = "; ".join(f"{w} ({r['python']}): {r['error']}" for w, r in broken.items())
        raise ConfigError(
            f"{len(broken)} of {len(found)} dask worker(s) cannot import napari-hrtem-transfer, "
            f"so they cannot run the sweep: {lines}. Install the package (version "
            f"{__version__}) in the workers' environment, or start the workers from this "
            "environment.",
            "--scheduler",
        )
    other = {w: r["version"] for w, r in found.items() if r["version"] != __version__}
    if other:
        lines = "; ".join(f"{w}: {v or 'unknown'}" for w, v in other.items())
        raise ConfigError(
            f"dask worker(s) run another version of napari-hrtem-transfer than this client "
            f"({__version__}): {lines}. Install the same version on every worker (results "
            "of different versions must not be mixed in one database).",
            "--scheduler",
        )
    return {w: r["version"] for w, r in found.items()}


def _local_cluster(n: int, threads: int, resources: dict[str, float]):
    import logging

    from distributed import LocalCluster

    return LocalCluster(
        n_workers=n,
        threads_per_worker=threads,
        processes=True,
        dashboard_address=":0",  # no fixed port (several sweeps may run on one machine)
        scheduler_kwargs={"dashboard": False},
        silence_logs=logging.ERROR,
        resources=resources or None,
        env={"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)},
    )


def _progress_fn(progress, total: int):
    """(update(message), close()) for ``progress``: True (tqdm), False/None, or a callable."""
    if progress is True:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="run", desc="sweep", dynamic_ncols=True, smoothing=0.1)

        def update(done: int, message: str) -> None:
            bar.set_postfix_str(message[:60], refresh=False)
            bar.update(done - bar.n)

        return update, bar.close
    if callable(progress):
        return (lambda done, message: progress(done, total, message)), (lambda: None)
    return (lambda done, message: None), (lambda: None)


def _error_text(fut) -> str:
    try:
        exc = fut.exception()
    except Exception as e:  # noqa: BLE001 - cancelled futures raise here
        return f"{type(e).__name__}: {e}"
    tb = fut.traceback()
    text = f"{type(exc).__name__}: {exc}"
    if tb is not None:
        text += "\n" + "".join(traceback.format_tb(tb)[-3:])
    return text


def _failure_row(spec: dict[str, Any], plan: SweepPlan) -> dict[str, Any]:
    return {
        "run_key": spec["run_key"],
        "sweep_id": plan.sweep_id,
        "sweep_name": spec["sweep_name"],
        "pretrain_key": spec["pretrain_key"],
        **spec["point"],
        "architecture": spec["architecture"],
        "config_json": json.dumps(spec["determines"], sort_keys=True),
        "versions_json": spec["client_versions"],
    }


def _check_resources(client: Any, cfg: SweepConfig) -> None:
    """Some worker of the cluster has ``run.resources`` (else ConfigError)."""
    if not cfg.run.resources:
        return
    have = client.run_on_scheduler(
        lambda dask_scheduler: [dict(w.resources) for w in dask_scheduler.workers.values()]
    )
    ok = any(all(r.get(k, 0) >= v for k, v in cfg.run.resources.items()) for r in have)
    if not ok:
        raise ConfigError(
            f"run.resources = {cfg.run.resources}: no worker of the cluster has "
            f"them (workers have {have}); start workers with e.g. "
            "'dask worker ADDRESS --resources GPU=1'.",
            "run.resources",
        )


def _remove_leftovers(model_dir: Path) -> None:
    """The temporary folders of runs and pretrainings that did not finish."""
    tmp = model_dir / "tmp"
    if tmp.is_dir():
        shutil.rmtree(tmp, ignore_errors=True)
    pre = model_dir / "pretrained"
    if pre.is_dir():
        for p in pre.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)


def run_sweep(
    config: SweepConfig | dict | str | os.PathLike,
    db: str | os.PathLike,
    client: Any = None,
    workers: int | None = None,
    progress: bool | ProgressCallback | None = True,
    *,
    scheduler: str | None = None,
    stop: Any = None,
    retry_failed: bool = True,
) -> SweepResult:
    """Run every run of a sweep that is not yet recorded as done; record each as it finishes.

    Parameters
    ----------
    config
        A :class:`SweepConfig`, a dict, or the path of a TOML file.
    db
        The SQLite results database (created if missing).
    client
        A ``distributed.Client`` to use (then ``workers`` and ``scheduler`` are ignored and
        the client is left open).
    workers
        Workers of the LocalCluster started when neither ``client`` nor ``scheduler`` is
        given (default: one per CPU core / ``threads_per_worker``).
    progress
        True: a tqdm bar (runs, ETA); a callable ``progress(done, total, message)``; or
        False/None.
    scheduler
        Address of an existing dask scheduler (``tcp://host:8786``).
    stop
        A ``threading.Event`` or callable; when set, pending runs are cancelled and the call
        returns with ``interrupted=True`` (finished runs stay recorded).
    retry_failed
        Run again the runs recorded as failed by an earlier call (default); False skips them.

    Returns
    -------
    SweepResult

    Raises
    ------
    ConfigError, DatasetError
        Before anything runs and with the database unchanged: an invalid config or grid, a
        domain missing from a dataset, N larger than the data, an unreachable scheduler, a
        scheduler without workers or with workers that cannot import this package (or run
        another version of it: :func:`check_workers`), a locked, read-only or
        newer-schema database.
    SweepInterrupted
        On Ctrl-C (a ``KeyboardInterrupt``); finished runs are recorded.
    """
    from distributed import as_completed

    should_stop = stop_checker(stop)
    db_path = check_database(db)
    with _db_lock(db_path):
        check_database(db_path)  # again, under the lock
        plan = plan_sweep(config, db_path)
        cfg = plan.config
        status = read_status(db_path)
        todo = [
            s
            for s in plan.specs
            if status.get(s["run_key"]) != "done"
            and (retry_failed or status.get(s["run_key"]) != "failed")
        ]
        if not todo:
            return SweepResult(db=db_path, n_runs=len(plan.specs), n_skipped=len(plan.specs))
        own_cluster = None
        if client is None:
            client, own_cluster = _connect(scheduler, workers, cfg)
        try:
            check_workers(client)  # before anything is submitted: no silent hang
            _check_resources(client, cfg)
            with ResultStore(db_path) as store:
                store.record_sweep(
                    plan.sweep_id,
                    cfg.name,
                    cfg.model_dump_json(),
                    sweep_versions().get("napari-hrtem-transfer", ""),
                )
                return _execute(plan, todo, store, client, progress, should_stop, as_completed)
        finally:
            if own_cluster is not None:
                with contextlib.suppress(Exception):
                    client.close()
                with contextlib.suppress(Exception):
                    own_cluster.close()
            _remove_leftovers(plan.model_dir)


def _execute(plan, todo, store, client, progress, should_stop, as_completed):
    cfg = plan.config
    result = SweepResult(
        db=store.path,
        n_runs=len(plan.specs),
        n_skipped=len(plan.specs) - len(todo),
        n_workers=len(client.scheduler_info().get("workers", {})),
    )
    if not todo:
        return result
    plan.model_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(Exception):
        client.run(warm_worker)
    token = uuid.uuid4().hex[:6]
    retries = cfg.run.retries
    res = dict(cfg.run.resources) or None
    pre_futs: dict[str, Any] = {}
    if cfg.run.reuse_pretrained:
        for s in todo:
            k = s["pretrain_key"]
            if k not in pre_futs:
                pre_futs[k] = client.submit(
                    pretrain_task,
                    s,
                    key=f"hrtem-pretrain-{k}-{token}",
                    retries=retries,
                    pure=False,
                    resources=res,
                )
    result.n_pretrained = len(pre_futs)
    futs = {}
    for s in todo:
        f = client.submit(
            run_task,
            s,
            pre_futs.get(s["pretrain_key"]),
            key=f"hrtem-run-{s['run_key']}-{token}",
            retries=retries,
            pure=False,
            resources=res,
        )
        futs[f.key] = (f, s)
    del pre_futs  # dependents hold them; released when the runs are done
    update, close = _progress_fn(progress, len(todo))
    t0 = time.perf_counter()
    ac = as_completed([f for f, _ in futs.values()], loop=client.loop)
    done = 0
    try:
        while not ac.is_empty():
            if should_stop():
                result.interrupted = True
                break
            if not ac.has_ready():
                time.sleep(0.1)
                continue
            for fut in ac.next_batch(block=False):
                _, spec = futs.pop(fut.key)
                if fut.status == "finished":
                    out = fut.result()
                    out["run"]["sweep_id"] = plan.sweep_id
                    store.record_run(out)
                    result.n_done += 1
                    msg = f"done {spec['label']}"
                else:
                    err = _error_text(fut)
                    attempts = retries + 1
                    if "KilledWorker" in err:
                        import dask

                        allowed = dask.config.get("distributed.scheduler.allowed-failures")
                        attempts = int(allowed) + 1
                    store.record_failure(_failure_row(spec, plan), err, attempts)
                    result.n_failed += 1
                    result.failed[spec["run_key"]] = err
                    msg = f"FAILED {spec['label']}"
                fut.release()
                done += 1
                update(done, msg)
    except KeyboardInterrupt:
        result.interrupted = True
        _cancel(client, futs)
        result.wall_s = time.perf_counter() - t0
        close()
        raise SweepInterrupted(result) from None
    finally:
        _cancel(client, futs)  # whatever ended the loop, nothing keeps running for us
        close()
    result.wall_s = time.perf_counter() - t0
    return result


def _cancel(client, futs) -> None:
    pending = [f for f, _ in futs.values()]
    if pending:
        with contextlib.suppress(Exception):
            client.cancel(pending, force=True)
