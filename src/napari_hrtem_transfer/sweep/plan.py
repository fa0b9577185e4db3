"""Plan a sweep: validate the grid against its datasets and list the runs.

Every grid point becomes a run spec (plain dicts: the two ``TrainConfig`` s, the dataset paths
and fingerprints). The *run key* is a hash of what determines the run's result, so re-running
the same config skips runs already recorded as ``done``; the *pretrain key* is the hash of the
pretraining config and data (one cached pretrained model per key).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DatasetError
from .config import SweepConfig, load_sweep_config, validate_sweep_config

__all__ = ["EXCLUDE_NM", "SweepPlan", "as_config", "plan_sweep", "sweep_versions"]

#: TrainConfig fields that do not change a run's result (left out of the keys).
_NOT_IN_KEY = ("num_threads", "cache_bytes")

#: Defoci left out of the per-run generalization [nm] (the study's choice).
EXCLUDE_NM = (0.0,)


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


def _check_data(cfg: SweepConfig) -> tuple[Path, Path, dict[str, str]]:
    """Check the grid against both datasets; (pretrain path, transfer path, fingerprints)."""
    from ..training.data import dataset_fingerprint, split_structures

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
    return pre_path, tr_path, fps


def _model_dir(cfg: SweepConfig, db: str | os.PathLike | None) -> Path:
    if cfg.run.model_dir is not None:
        return Path(cfg.run.model_dir).expanduser().resolve()
    if db is not None:
        d = Path(db).expanduser().resolve()
        return d.with_name(f"{d.stem}_models")
    raise ConfigError("give run.model_dir or a database path.", "run.model_dir")


def _spec(
    cfg: SweepConfig,
    pt: Any,
    paths: tuple[Path, Path],
    fps: dict[str, str],
    model_dir: Path,
    versions: dict[str, str],
) -> dict[str, Any]:
    """The run spec (a plain dict sent to a worker) of grid point ``pt``."""
    pre_path, tr_path = paths
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
    return {
        "run_key": _hash(determines),
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
    cfg = as_config(config)
    pre_path, tr_path, fps = _check_data(cfg)
    model_dir = _model_dir(cfg, db)
    versions = sweep_versions()
    specs = [_spec(cfg, pt, (pre_path, tr_path), fps, model_dir, versions) for pt in cfg.points()]
    keys = [s["run_key"] for s in specs]
    if len(set(keys)) != len(keys):  # pragma: no cover - the grid's values are unique
        raise ConfigError("two runs of the grid have the same settings.")
    sweep_id = _hash(cfg.model_dump(mode="json"))
    return SweepPlan(cfg, specs, fps, model_dir, sweep_id)


def as_config(config: SweepConfig | dict | str | os.PathLike) -> SweepConfig:
    """A :class:`SweepConfig` from a config, a dict or the path of a TOML file."""
    if isinstance(config, SweepConfig):
        return config
    if isinstance(config, dict):
        return validate_sweep_config(config)
    return load_sweep_config(config)


def sweep_versions() -> dict[str, str]:
    """Package versions of this process (plus dask.distributed), for the runs table."""
    from ..training.checkpoint import package_versions

    out = package_versions()
    with contextlib.suppress(Exception):
        import distributed

        out["distributed"] = distributed.__version__
    return out
