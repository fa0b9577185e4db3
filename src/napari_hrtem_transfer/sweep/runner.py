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

Workers use ``TrainConfig(deterministic=True, num_threads=threads_per_worker)``: a run's result
does not depend on where or alongside what it ran.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DatasetError
from .config import SweepConfig, load_sweep_config, validate_sweep_config
from .store import ResultStore, check_database

__all__ = [
    "SweepInterrupted",
    "SweepPlan",
    "SweepResult",
    "plan_sweep",
    "pretrain_task",
    "run_sweep",
    "run_task",
]

ProgressCallback = Callable[[int, int, str], None]

#: TrainConfig fields that do not change a run's result (left out of the keys).
_NOT_IN_KEY = ("num_threads", "cache_bytes")

#: How long to try to reach an existing scheduler before giving up.
SCHEDULER_TIMEOUT = "10s"

#: Defoci left out of the per-run generalization [nm] (the study's choice).
EXCLUDE_NM = (0.0,)


# =============================================================================== planning
def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _key_part(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg.items() if k not in _NOT_IN_KEY and k != "init_from"}


@dataclass
class SweepPlan:
    """What a sweep will run.

    Attributes
    ----------
    config
        The validated config.
    specs
        One spec (plain dict, sent to a worker) per run, in grid order.
    fingerprints
        ``{dataset path: fingerprint}``.
    model_dir
        The model cache folder.
    sweep_id
        Hash of the config.
    """

    config: SweepConfig
    specs: list[dict[str, Any]]
    fingerprints: dict[str, str]
    model_dir: Path
    sweep_id: str

    @property
    def pretrain_keys(self) -> list[str]:
        """Distinct pretrained models of the plan."""
        return sorted({s["pretrain_key"] for s in self.specs})


def _load_checked(path: Path, what: str):
    from ..io import load_dataset

    ds = load_dataset(path, lazy=True)
    if ds.masks is None:
        raise DatasetError(
            f"{what} {path} has no ground-truth masks; a sweep trains and evaluates on a "
            "labelled dataset (simulate one with 'hrtem-transfer simulate')."
        )
    return ds


def _check_domains(ds, values: list[float], path: Path, field_name: str) -> None:
    have = [float(d) for d in ds.defocus_nm]
    missing = [v for v in values if not any(abs(v - h) <= 0.05 for h in have)]
    if missing:
        raise ConfigError(
            f"grid.{field_name}: {', '.join(f'{m:g}' for m in missing)} nm not in {path} "
            f"(it has {', '.join(f'{h:g}' for h in have)} nm); remove them from the grid or "
            "simulate them.",
            f"grid.{field_name}",
        )


def _check_sizes(ds, stage, path: Path, name: str) -> None:
    ny, nx = ds.image_shape
    p = stage.patch_size
    if p is not None and p > min(ny, nx):
        raise ConfigError(
            f"{name}.patch_size = {p} px is larger than the images of {path} ({ny}x{nx} px); "
            f"choose at most {min(ny, nx) // 32 * 32} or leave it unset (whole images).",
            f"{name}.patch_size",
        )
    if p is None and (ny % 32 or nx % 32):
        raise ConfigError(
            f"{name}: whole-image training needs image sizes that are multiples of 32 "
            f"({path} has {ny}x{nx} px); set {name}.patch_size.",
            f"{name}.patch_size",
        )


def plan_sweep(
    config: SweepConfig | dict | str | os.PathLike, db: str | os.PathLike | None = None
) -> SweepPlan:
    """Validate the config against its datasets and list the runs (reads nothing else).

    Raises
    ------
    ConfigError, DatasetError
        A value of the grid does not fit the data (missing defocus, N too large, patch
        larger than the images), or a dataset cannot be read.
    """
    from ..training.data import dataset_fingerprint, split_structures

    cfg = _as_config(config)
    pre_path = Path(cfg.data.pretrain).expanduser().resolve()
    tr_path = Path(cfg.data.transfer_path).expanduser().resolve()
    ds_pre = _load_checked(pre_path, "data.pretrain")
    ds_tr = ds_pre if tr_path == pre_path else _load_checked(tr_path, "data.transfer")
    _check_domains(ds_pre, cfg.grid.pretrain_defocus_nm, pre_path, "pretrain_defocus_nm")
    _check_domains(ds_tr, cfg.grid.transfer_defocus_nm, tr_path, "transfer_defocus_nm")
    _check_sizes(ds_pre, cfg.pretrain, pre_path, "pretrain")
    _check_sizes(ds_tr, cfg.transfer, tr_path, "transfer")
    if abs(ds_pre.sampling_A - ds_tr.sampling_A) > 0.01 * ds_pre.sampling_A:
        raise ConfigError(
            f"data.transfer {tr_path} has {ds_tr.sampling_A:g} Å/px but data.pretrain "
            f"{pre_path} has {ds_pre.sampling_A:g} Å/px; a sweep needs one pixel size.",
            "data.transfer",
        )
    for what, ds, path in (("pretraining", ds_pre, pre_path), ("transfer", ds_tr, tr_path)):
        if len(set(map(str, ds.structure_ids))) < 2:
            raise DatasetError(
                f"the {what} dataset {path} has fewer than 2 structures; the train/validation "
                "split by structure needs at least 2."
            )
    train_idx, val_idx = split_structures(
        ds_tr.structure_ids, cfg.data.val_fraction, cfg.data.split_seed
    )
    n_max = max(cfg.grid.n_transfer)
    if n_max > len(train_idx):
        raise ConfigError(
            f"grid.n_transfer: N = {n_max} is larger than the {len(train_idx)} training images "
            f"per domain of {tr_path} ({len(val_idx)} of its {ds_tr.n_images} structures are "
            f"held out, data.val_fraction = {cfg.data.val_fraction:g}); use N <= "
            f"{len(train_idx)} or a larger dataset.",
            "grid.n_transfer",
        )
    fps = {str(pre_path): dataset_fingerprint(ds_pre)}
    fps[str(tr_path)] = fps[str(pre_path)] if ds_tr is ds_pre else dataset_fingerprint(ds_tr)

    if cfg.run.model_dir is not None:
        model_dir = Path(cfg.run.model_dir).expanduser().resolve()
    elif db is not None:
        d = Path(db).expanduser().resolve()
        model_dir = d.with_name(f"{d.stem}_models")
    else:
        raise ConfigError("give run.model_dir or a database path.", "run.model_dir")

    versions = _versions()
    specs = []
    for pt in cfg.points():
        pre_cfg = cfg.pretrain_config(pt).model_dump(mode="json")
        tr_cfg = cfg.transfer_config(pt, init_from=model_dir).model_dump(mode="json")
        tr_cfg.pop("init_from")
        pre_key = _hash({"train": _key_part(pre_cfg), "data": fps[str(pre_path)]})
        determines = {
            "pretrain": _key_part(pre_cfg),
            "transfer": _key_part(tr_cfg),
            "pretrain_data": fps[str(pre_path)],
            "transfer_data": fps[str(tr_path)],
            "n_boot": cfg.run.n_boot,
            "exclude_nm": list(EXCLUDE_NM),
        }
        run_key = _hash(determines)
        specs.append(
            {
                "run_key": run_key,
                "pretrain_key": pre_key,
                "point": asdict(pt),
                "label": pt.label(),
                "pretrain_config": pre_cfg,
                "transfer_config": tr_cfg,
                "pretrain_data": str(pre_path),
                "transfer_data": str(tr_path),
                "pretrain_fingerprint": fps[str(pre_path)],
                "transfer_fingerprint": fps[str(tr_path)],
                "model_dir": str(model_dir),
                "reuse_pretrained": cfg.run.reuse_pretrained,
                "keep_models": cfg.run.keep_models,
                "threads": cfg.run.threads_per_worker,
                "n_boot": cfg.run.n_boot,
                "eval_batch_size": cfg.run.eval_batch_size,
                "exclude_nm": list(EXCLUDE_NM),
                "architecture": cfg.model.architecture,
                "sweep_name": cfg.name,
                "client_versions": versions,
                "determines": determines,
            }
        )
    keys = [s["run_key"] for s in specs]
    if len(set(keys)) != len(keys):  # pragma: no cover - the grid's values are unique
        raise ConfigError("two runs of the grid have the same settings.")
    sweep_id = _hash(cfg.model_dump(mode="json"))
    return SweepPlan(cfg, specs, fps, model_dir, sweep_id)


def _as_config(config: SweepConfig | dict | str | os.PathLike) -> SweepConfig:
    if isinstance(config, SweepConfig):
        return config
    if isinstance(config, dict):
        return validate_sweep_config(config)
    return load_sweep_config(config)


def _versions() -> dict[str, str]:
    from ..training.checkpoint import package_versions

    out = package_versions()
    with contextlib.suppress(Exception):
        import distributed

        out["distributed"] = distributed.__version__
    return out


# =============================================================================== worker side
#: Datasets already read by this worker process: {(path, fingerprint): HRTEMDataset}.
_DATASETS: dict[tuple[str, str], Any] = {}
_DATA_LOCK = threading.Lock()


def _dataset(path: str, fingerprint: str):
    """The dataset at ``path`` (read once per worker), checked against the planned fingerprint."""
    key = (path, fingerprint)
    with _DATA_LOCK:
        if key in _DATASETS:
            return _DATASETS[key]
        from ..io import load_dataset
        from ..training.data import dataset_fingerprint

        ds = load_dataset(path, lazy=False)
        fp = dataset_fingerprint(ds)
        if fp != fingerprint:
            raise DatasetError(
                f"{path} on this worker is not the dataset the sweep was planned with "
                f"(fingerprint {fp[:12]} != {fingerprint[:12]}); stage the same file on every "
                "worker."
            )
        if len(_DATASETS) >= 2:
            _DATASETS.clear()
        _DATASETS[key] = ds
        return ds


def _worker_name() -> str:
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except Exception:  # noqa: BLE001 - not inside a dask worker
        return f"pid {os.getpid()}"


def _eval_device(cfg: dict[str, Any]) -> str | None:
    return None if cfg.get("device", "auto") == "auto" else cfg["device"]


def fit_ood(model_dir: Path, ds, device: str | None) -> float:
    """Fit the label-free OOD reference of a checkpoint on its training images; seconds taken.

    The only place the sweep touches the OOD fitting (swap the call here when it changes).
    """
    from ..evaluation.ood import fit_ood_reference_for_checkpoint

    t = time.perf_counter()
    fit_ood_reference_for_checkpoint(model_dir, ds, device=device)
    return time.perf_counter() - t


def _train_pretrained(spec: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    from ..training import TrainConfig, read_sidecar, train

    ds = _dataset(spec["pretrain_data"], spec["pretrain_fingerprint"])
    cfg = TrainConfig.model_validate(spec["pretrain_config"])
    t = time.perf_counter()  # (the data are read before: staging is not training time)
    cpu = time.process_time()
    res = train(cfg, ds, out_dir)
    t_train = time.perf_counter() - t
    t_ood = fit_ood(out_dir, ds, _eval_device(spec["pretrain_config"]))
    cpu = time.process_time() - cpu
    side = read_sidecar(out_dir)
    return {
        "key": spec["pretrain_key"],
        "path": str(out_dir),
        "weights_sha256": side.get("weights_sha256"),
        "time_train_s": t_train,
        "time_ood_s": t_ood,
        "cpu_s": cpu,
        "device": res.device,
        "precision": res.precision,
        "worker": _worker_name(),
        "reused": False,
    }


def pretrain_task(spec: dict[str, Any]) -> dict[str, Any]:
    """Train (or find in the cache) the pretrained model of ``spec``; runs on a worker.

    The model is trained into a temporary folder and renamed to
    ``<models>/pretrained/<pretrain key>/`` when complete, so a worker that dies leaves no
    half-written model under the final name, and two workers racing for the same key keep
    one (identical) copy.
    """
    _set_threads(spec["threads"])
    cache = Path(spec["model_dir"]) / "pretrained"
    final = cache / spec["pretrain_key"]
    meta_file = final / "sweep_pretrain.json"
    if meta_file.is_file():
        return dict(json.loads(meta_file.read_text()), path=str(final), reused=True)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".tmp-{spec['pretrain_key']}-{uuid.uuid4().hex[:8]}"
    try:
        meta = _train_pretrained(spec, tmp)
        meta["path"] = str(final)
        (tmp / "sweep_pretrain.json").write_text(json.dumps(meta, indent=1))
        try:
            os.rename(tmp, final)
        except OSError:
            if not meta_file.is_file():
                raise
            return dict(json.loads(meta_file.read_text()), path=str(final), reused=True)
        return meta
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _set_threads(n: int) -> None:
    import torch

    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def _domain_losses(rows: list[dict[str, Any]]) -> dict[float, float]:
    return {
        float(r["domain_defocus_nm"]): float(r["loss"])
        for r in rows
        if r.get("material", "all") in ("all", "", None) and r.get("loss") is not None
    }


def _generalization(losses: dict[float, float], exclude_nm) -> float | None:
    from ..evaluation.metrics import generalization

    try:
        v = generalization(losses, exclude_nm=exclude_nm)
    except ConfigError:
        return None
    return None if v != v else v


def run_task(spec: dict[str, Any], pretrained: dict[str, Any] | None = None) -> dict[str, Any]:
    """One run: (pretrain,) fine-tune, fit OOD references, evaluate before/after; on a worker.

    Parameters
    ----------
    spec
        A run spec from :func:`plan_sweep`.
    pretrained
        The result of :func:`pretrain_task` (a cached pretrained model), or None to pretrain
        inside this run.

    Returns
    -------
    dict
        ``run`` (the row of the ``runs`` table), ``domains`` and ``frames`` (tidy records of
        both stages, ``stage`` = ``pretrain`` before transfer, ``transfer`` after).
    """
    from ..evaluation.labelled import evaluate_model
    from ..training import TrainConfig, read_sidecar, train

    t_run = time.perf_counter()
    cpu_run = time.process_time()
    _set_threads(spec["threads"])
    key = spec["run_key"]
    root = Path(spec["model_dir"])
    tmp_root = root / "tmp"
    tmp_root.mkdir(parents=True, exist_ok=True)
    work = tmp_root / f"{key}-{uuid.uuid4().hex[:8]}"
    work.mkdir()
    try:
        if pretrained is None:  # no reuse: pretrain inside this run, as the study did
            pretrained = _train_pretrained(spec, work / "pretrained")
        pre_dir = Path(pretrained["path"])
        ds = _dataset(spec["transfer_data"], spec["transfer_fingerprint"])
        cfg = TrainConfig.model_validate({**spec["transfer_config"], "init_from": str(pre_dir)})
        ft_dir = work / "finetuned"
        t = time.perf_counter()
        res = train(cfg, ds, ft_dir)
        t_transfer = time.perf_counter() - t
        device = _eval_device(spec["transfer_config"])
        t_ood = fit_ood(ft_dir, ds, device)
        side = read_sidecar(ft_dir)
        val = [str(s) for s in (side.get("data") or {}).get("val_structures") or []]
        pt = spec["point"]
        prov = {
            "pretrain_defocus_nm": pt["pretrain_defocus_nm"],
            "transfer_defocus_nm": pt["transfer_defocus_nm"],
            "freeze": pt["freeze"],
            "n_transfer": pt["n_transfer"],
            "seed": pt["seed"],
        }
        kw = dict(
            structures=val or "validation",
            n_boot=spec["n_boot"],
            batch_size=spec["eval_batch_size"],
            device=device,
            n_samples=1,
        )
        t = time.perf_counter()
        before = evaluate_model(
            pre_dir, ds, model_id=f"{key}:pretrain", provenance={**prov, "stage": "pretrain"}, **kw
        )
        after = evaluate_model(
            ft_dir, ds, model_id=f"{key}:transfer", provenance={**prov, "stage": "transfer"}, **kw
        )
        t_eval = time.perf_counter() - t
        domains, frames = [], []
        for stage, ev in (("pretrain", before), ("transfer", after)):
            domains += [dict(r, stage=stage) for r in ev.domains.records()]
            frames += [dict(r, stage=stage) for r in ev.frames.records()]
        excl = tuple(spec["exclude_nm"])
        g_before = _generalization(
            _domain_losses([d for d in domains if d["stage"] == "pretrain"]), excl
        )
        g_after = _generalization(
            _domain_losses([d for d in domains if d["stage"] == "transfer"]), excl
        )
        if spec["keep_models"]:
            dest = root / "runs" / key
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.exists():
                shutil.rmtree(dest)
            os.rename(work, dest)
            work = dest
        run = {
            "run_key": key,
            "sweep_name": spec["sweep_name"],
            "pretrain_key": spec["pretrain_key"],
            **{k: pt[k] for k in pt},
            "architecture": spec["architecture"],
            "config_json": json.dumps(
                {
                    "pretrain": spec["pretrain_config"],
                    "transfer": spec["transfer_config"],
                    "pretrain_data": spec["pretrain_data"],
                    "transfer_data": spec["transfer_data"],
                    "pretrain_fingerprint": spec["pretrain_fingerprint"],
                    "transfer_fingerprint": spec["transfer_fingerprint"],
                    "n_boot": spec["n_boot"],
                    "exclude_nm": spec["exclude_nm"],
                },
                sort_keys=True,
            ),
            "generalization_before": g_before,
            "generalization_after": g_after,
            "shift": None if g_before is None or g_after is None else g_after - g_before,
            "exclude_nm_json": list(excl),
            "pretrain_reused": int(bool(spec["reuse_pretrained"])),
            "pretrain_cached": int(bool(pretrained.get("reused"))),
            "pretrain_weights_sha256": pretrained.get("weights_sha256"),
            "transfer_weights_sha256": side.get("weights_sha256"),
            "time_pretrain_s": pretrained["time_train_s"] + pretrained["time_ood_s"],
            "time_transfer_s": t_transfer,
            "time_ood_s": t_ood,
            "time_evaluate_s": t_eval,
            "time_run_s": time.perf_counter() - t_run,
            "cpu_pretrain_s": pretrained.get("cpu_s"),
            "cpu_run_s": time.process_time() - cpu_run,
            "device": res.device,
            "precision": res.precision,
            "worker": _worker_name(),
            "versions_json": _versions(),
            "notes_json": sorted(set(before.notes + after.notes)),
            "error": None,
            "attempts": 1,
        }
        return {"run": run, "domains": domains, "frames": frames}
    finally:
        if not spec["keep_models"] and work.exists():
            shutil.rmtree(work, ignore_errors=True)


# =============================================================================== client side
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


def _stop_fn(stop) -> Callable[[], bool]:
    if stop is None:
        return lambda: False
    if isinstance(stop, threading.Event):
        return stop.is_set
    if callable(stop):
        return lambda: bool(stop())
    raise ConfigError("stop must be a threading.Event or a callable returning bool.", "stop")


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

    should_stop = _stop_fn(stop)
    db_path = check_database(db)
    with _db_lock(db_path):
        check_database(db_path)  # again, under the lock
        plan = plan_sweep(config, db_path)
        cfg = plan.config
        status = _read_status(db_path)
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
            if cfg.run.resources:
                have = client.run_on_scheduler(
                    lambda dask_scheduler: [
                        dict(w.resources) for w in dask_scheduler.workers.values()
                    ]
                )
                ok = any(all(r.get(k, 0) >= v for k, v in cfg.run.resources.items()) for r in have)
                if not ok:
                    raise ConfigError(
                        f"run.resources = {cfg.run.resources}: no worker of the cluster has "
                        f"them (workers have {have}); start workers with e.g. "
                        "'dask worker ADDRESS --resources GPU=1'.",
                        "run.resources",
                    )
            with ResultStore(db_path) as store:
                store.record_sweep(
                    plan.sweep_id,
                    cfg.name,
                    cfg.model_dump_json(),
                    _versions().get("napari-hrtem-transfer", ""),
                )
                return _execute(plan, todo, store, client, progress, should_stop, as_completed)
        finally:
            if own_cluster is not None:
                with contextlib.suppress(Exception):
                    client.close()
                with contextlib.suppress(Exception):
                    own_cluster.close()
            for tmp in (plan.model_dir / "tmp",):
                if tmp.is_dir():
                    shutil.rmtree(tmp, ignore_errors=True)
            pre = plan.model_dir / "pretrained"
            if pre.is_dir():
                for p in pre.glob(".tmp-*"):
                    shutil.rmtree(p, ignore_errors=True)


def _read_status(db: Path) -> dict[str, str]:
    """``{run_key: status}`` of an existing database (read-only; empty for a new file)."""
    import sqlite3

    if not db.exists():
        return {}
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10.0)
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        if "runs" not in tables:
            return {}
        return dict(conn.execute("SELECT run_key, status FROM runs").fetchall())
    finally:
        conn.close()


def _warm_worker() -> int:
    """Import the heavy modules on a worker before the first run (timings stay comparable)."""
    import torch  # noqa: F401

    from ..evaluation import labelled, ood  # noqa: F401
    from ..io import dataset  # noqa: F401
    from ..training import loop  # noqa: F401

    return os.getpid()


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
        client.run(_warm_worker)
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
