"""The worker side of a sweep: pure functions dask runs, returning plain dicts.

:func:`pretrain_task` trains (or finds in the cache) one pretrained model;
:func:`run_task` runs one transfer experiment with
:func:`~napari_hrtem_transfer.evaluation.workflows.run_transfer` (fine-tune, OOD references,
evaluation before/after) and returns the rows the client records. A run whose OOD fit failed
raises (a sweep row needs the OOD scores), so dask retries it and the client records the
error.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DatasetError
from .plan import sweep_versions

__all__ = ["pretrain_task", "run_task", "warm_worker"]

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


def _pretrained_meta(spec: dict[str, Any], stage: Any) -> dict[str, Any]:
    """The record of a pretraining stage (cached beside the model as sweep_pretrain.json)."""
    from ..training import read_sidecar

    side = read_sidecar(stage.out_dir)
    return {
        "key": spec["pretrain_key"],
        "path": str(stage.out_dir),
        "weights_sha256": side.get("weights_sha256"),
        "time_train_s": stage.time_train_s,
        "time_ood_s": stage.time_ood_s,
        "cpu_s": stage.cpu_s,
        "device": stage.train.device,
        "precision": stage.train.precision,
        "worker": _worker_name(),
        "reused": False,
    }


def _train_pretrained(spec: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    from ..evaluation.workflows import OODFitFailed, train_stage
    from ..training import TrainConfig

    ds = _dataset(spec["pretrain_data"], spec["pretrain_fingerprint"])
    stage = train_stage(TrainConfig.model_validate(spec["pretrain_config"]), ds, out_dir)
    if not stage.ood.ok:
        raise OODFitFailed(stage.ood.message)
    return _pretrained_meta(spec, stage)


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


def warm_worker() -> int:
    """Import the heavy modules on a worker before the first run (timings stay comparable)."""
    import torch  # noqa: F401

    from ..evaluation import labelled, ood, workflows  # noqa: F401
    from ..io import dataset  # noqa: F401
    from ..training import loop  # noqa: F401

    return os.getpid()


def _transfer(spec: dict[str, Any], pretrained: dict[str, Any] | None, work: Path) -> Any:
    """run_transfer for one spec: (pretrain,) fine-tune, OOD references, both evaluations."""
    from ..evaluation.workflows import TransferEvaluation, run_transfer
    from ..training import TrainConfig

    pre_dir = work / "pretrained" if pretrained is None else Path(pretrained["path"])
    cfg = TrainConfig.model_validate({**spec["transfer_config"], "init_from": str(pre_dir)})
    pre_cfg = None
    if pretrained is None:  # no reuse: pretrain inside this run, as the study did
        pre_cfg = TrainConfig.model_validate(spec["pretrain_config"])
    device = None if cfg.device == "auto" else cfg.device
    prov = {k: spec["point"][k] for k in _PROVENANCE}
    key = spec["run_key"]
    evaluation = TransferEvaluation(
        model_ids=(f"{key}:pretrain", f"{key}:transfer"),
        stages=("pretrain", "transfer"),
        provenance=prov,
        same_structures=True,
        options=dict(
            n_boot=spec["n_boot"],
            batch_size=spec["eval_batch_size"],
            device=device,
            n_samples=1,
        ),
    )
    ds = _dataset(spec["transfer_data"], spec["transfer_fingerprint"])
    pre_ds = None
    if pre_cfg is not None:
        pre_ds = _dataset(spec["pretrain_data"], spec["pretrain_fingerprint"])
    result = run_transfer(
        cfg, ds, work / "finetuned", pretrain=pre_cfg, pretrain_data=pre_ds, evaluation=evaluation
    )
    result.require_ood()
    return result


#: Grid-point fields recorded as the provenance of both evaluations.
_PROVENANCE = ("pretrain_defocus_nm", "transfer_defocus_nm", "freeze", "n_transfer", "seed")


def _run_row(spec: dict[str, Any], pretrained: dict[str, Any], tr: Any, rows: dict) -> dict:
    """The row of the ``runs`` table of a finished run (``time_run_s``/``cpu_run_s`` later)."""
    from ..training import read_sidecar

    excl = tuple(spec["exclude_nm"])
    g_before = _generalization(_domain_losses(rows["pretrain"]), excl)
    g_after = _generalization(_domain_losses(rows["transfer"]), excl)
    side = read_sidecar(tr.finetuned_dir)
    pt = spec["point"]
    config = {
        k: spec[k]
        for k in (
            "pretrain_data",
            "transfer_data",
            "pretrain_fingerprint",
            "transfer_fingerprint",
            "n_boot",
            "exclude_nm",
        )
    }
    config.update(pretrain=spec["pretrain_config"], transfer=spec["transfer_config"])
    return {
        "run_key": spec["run_key"],
        "sweep_name": spec["sweep_name"],
        "pretrain_key": spec["pretrain_key"],
        **{k: pt[k] for k in pt},
        "architecture": spec["architecture"],
        "config_json": json.dumps(config, sort_keys=True),
        "generalization_before": g_before,
        "generalization_after": g_after,
        "shift": None if g_before is None or g_after is None else g_after - g_before,
        "exclude_nm_json": list(excl),
        "pretrain_reused": int(bool(spec["reuse_pretrained"])),
        "pretrain_cached": int(bool(pretrained.get("reused"))),
        "pretrain_weights_sha256": pretrained.get("weights_sha256"),
        "transfer_weights_sha256": side.get("weights_sha256"),
        "time_pretrain_s": pretrained["time_train_s"] + pretrained["time_ood_s"],
        "time_transfer_s": tr.finetune.time_train_s,
        "time_ood_s": tr.finetune.time_ood_s,
        "time_evaluate_s": tr.time_evaluate_s,
        "cpu_pretrain_s": pretrained.get("cpu_s"),
        "device": tr.finetune.train.device,
        "precision": tr.finetune.train.precision,
        "worker": _worker_name(),
        "versions_json": sweep_versions(),
        "notes_json": sorted(set(tr.before.notes + tr.after.notes)),
        "error": None,
        "attempts": 1,
    }


def run_task(spec: dict[str, Any], pretrained: dict[str, Any] | None = None) -> dict[str, Any]:
    """One run: (pretrain,) fine-tune, fit OOD references, evaluate before/after; on a worker.

    Parameters
    ----------
    spec
        A run spec from :func:`~napari_hrtem_transfer.sweep.plan.plan_sweep`.
    pretrained
        The result of :func:`pretrain_task` (a cached pretrained model), or None to pretrain
        inside this run.

    Returns
    -------
    dict
        ``run`` (the row of the ``runs`` table), ``domains`` and ``frames`` (tidy records of
        both stages, ``stage`` = ``pretrain`` before transfer, ``transfer`` after).

    Raises
    ------
    OODFitFailed
        An OOD-reference fit failed (the message says why); nothing is kept.
    """
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
        tr = _transfer(spec, pretrained, work)
        if pretrained is None:
            pretrained = _pretrained_meta(spec, tr.pretrain)
        domains, frames = [], []
        rows: dict[str, list] = {}
        for stage, ev in (("pretrain", tr.before), ("transfer", tr.after)):
            rows[stage] = [dict(r, stage=stage) for r in ev.domains.records()]
            domains += rows[stage]
            frames += [dict(r, stage=stage) for r in ev.frames.records()]
        run = _run_row(spec, pretrained, tr, rows)
        if spec["keep_models"]:
            dest = root / "runs" / key
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.exists():
                shutil.rmtree(dest)
            os.rename(work, dest)
            work = dest
        run["time_run_s"] = time.perf_counter() - t_run
        run["cpu_run_s"] = time.process_time() - cpu_run
        return {"run": run, "domains": domains, "frames": frames}
    finally:
        if not spec["keep_models"] and work.exists():
            shutil.rmtree(work, ignore_errors=True)
