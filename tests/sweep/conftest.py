"""Fixtures of the sweep tests: a tiny labelled dataset on disk and tiny sweep configs.

Runs train a 4/8/8/8-channel compact U-Net for one epoch on 64x64 discs (about a second per
run on one core), so a sweep of a few runs on a LocalCluster of processes takes seconds.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from napari_hrtem_transfer.io.dataset import HRTEMDataset, save_dataset

DEFOCI = (-5.0, 0.0, 5.0)
N_IMAGES = 10  # 2 structures held out (val_fraction 0.2), 8 to train on per domain


def make_dataset(
    n_images: int = N_IMAGES, size: int = 64, defoci=DEFOCI, seed: int = 0
) -> HRTEMDataset:
    """Discs, bright at negative defocus, dark at positive, faint in focus; Poisson noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    masks = np.zeros((n_images, size, size), bool)
    for i in range(n_images):
        for _ in range(int(rng.integers(1, 3))):
            cy, cx = rng.uniform(10, size - 10, 2)
            r = rng.uniform(4, 9)
            masks[i] |= (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
    imgs = np.empty((len(defoci), n_images, size, size))
    for d, df in enumerate(defoci):
        contrast = -0.4 if df > 0 else (0.4 if df < 0 else 0.15)
        imgs[d] = 200.0 * (1.0 + contrast * masks)
    return HRTEMDataset(
        images=rng.poisson(imgs).astype(np.uint16),
        defocus_nm=list(defoci),
        sampling_A=0.2,
        masks=masks,
        structure_ids=[f"st{i:03d}" for i in range(n_images)],
        dose_e_per_A2=5000.0,
    )


@pytest.fixture(scope="session")
def data_path(tmp_path_factory) -> Path:
    """The tiny dataset saved as .hspy."""
    path = tmp_path_factory.mktemp("sweepdata") / "discs.hspy"
    save_dataset(make_dataset(), path)
    return path


def tiny_config(data_file: Path, **sections) -> dict:
    """A sweep config dict: pretrain at -5 nm, targets 0 and +5 nm, freezing none/encoder."""
    cfg = {
        "name": "tiny",
        "data": {"pretrain": str(data_file)},
        "grid": {
            "pretrain_defocus_nm": [-5.0],
            "transfer_defocus_nm": [0.0, 5.0],
            "freeze": ["none", "encoder"],
            "n_transfer": [4],
            "pretrain_lr": [3e-3],
            "transfer_lr": [1e-3],
            "seeds": [0],
        },
        "model": {"architecture": "compact", "channels": [4, 8, 8, 8]},
        "pretrain": {"epochs": 1, "batch_size": 4},
        "transfer": {"epochs": 1, "batch_size": 4},
        "run": {"device": "cpu", "precision": "fp32", "n_boot": 20, "retries": 1},
    }
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    return cfg


def file_digest(path: Path) -> str | None:
    """sha256 of a file's bytes (None if it does not exist)."""
    p = Path(path)
    return hashlib.sha256(p.read_bytes()).hexdigest() if p.exists() else None


@pytest.fixture(scope="module")
def process_client():
    """A LocalCluster of 2 worker processes, one thread each (as the CLI starts it)."""
    import logging

    from distributed import Client, LocalCluster

    cluster = LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=":0",
        scheduler_kwargs={"dashboard": False},
        silence_logs=logging.ERROR,
    )
    client = Client(cluster, set_as_default=False)
    yield client
    client.close()
    cluster.close()
