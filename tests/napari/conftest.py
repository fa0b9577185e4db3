"""Fixtures for the napari-layer tests: a tiny labelled dataset and a model trained on it."""

from __future__ import annotations

import numpy as np
import pytest


def make_tiny_dataset(n_images: int = 8, size: int = 64, defocus_nm=(-5.0, 5.0), seed: int = 0):
    """Bright-background frames with darker discs (the particles) and their masks."""
    from napari_hrtem_transfer.io import HRTEMDataset

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    masks = np.zeros((n_images, size, size), bool)
    for i in range(n_images):
        cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
        masks[i] = (yy - cy) ** 2 + (xx - cx) ** 2 < (size // 6) ** 2
    images = np.stack(
        [rng.poisson(np.where(masks, 20.0 + 5 * d, 60.0)).astype(np.uint16)
         for d in range(len(defocus_nm))]
    )
    return HRTEMDataset(images=images, defocus_nm=list(defocus_nm), sampling_A=0.2, masks=masks,
                        materials=["CdSe"] * n_images, dose_e_per_A2=400.0)


@pytest.fixture(scope="session")
def tiny_dataset_path(tmp_path_factory):
    from napari_hrtem_transfer.io import save_dataset

    return save_dataset(make_tiny_dataset(), tmp_path_factory.mktemp("data") / "tiny.hspy")


@pytest.fixture(scope="session")
def tiny_train_kwargs():
    """Keyword arguments of build_train_config for a run of a few seconds on a CPU."""
    return dict(epochs=1, batch_size=4, patch_size=32, device="cpu", num_threads=1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_dataset_path, tiny_train_kwargs):
    """A checkpoint folder trained for one epoch on the tiny dataset."""
    from napari_hrtem_transfer._napari._jobs import build_train_config, train_job

    out = tmp_path_factory.mktemp("models") / "tiny"
    config = build_train_config(**tiny_train_kwargs)
    train_job(None, config, tiny_dataset_path, out)
    return out


@pytest.fixture
def tiny_dataset():
    """A fresh in-memory tiny dataset (2 defoci x 8 images of 64 x 64 px, 0.2 Å/px)."""
    return make_tiny_dataset()
