"""Fixtures for training tests: tiny labelled datasets of bright/dark discs in noise."""

from __future__ import annotations

import numpy as np
import pytest

from napari_hrtem_transfer.io.dataset import HRTEMDataset, save_dataset  # noqa: E402


def make_dataset(
    n_images: int = 12,
    size: int = 64,
    defoci: tuple[float, ...] = (-5.0, 0.0, 5.0),
    seed: int = 0,
    with_masks: bool = True,
    structures_per_id: int = 1,
) -> HRTEMDataset:
    """Discs that are bright at negative defocus and dark at positive, with Poisson noise.

    ``structures_per_id > 1`` gives several images the same structure id (to test the split).
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    masks = np.zeros((n_images, size, size), bool)
    for i in range(n_images):
        for _ in range(int(rng.integers(1, 3))):
            cy, cx = rng.uniform(10, size - 10, 2)
            r = rng.uniform(4, 9)
            masks[i] |= (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
    imgs = np.empty((len(defoci), n_images, size, size), np.float64)
    for d, df in enumerate(defoci):
        contrast = -0.4 if df > 0 else (0.4 if df < 0 else 0.15)
        imgs[d] = 200.0 * (1.0 + contrast * masks)
    imgs = rng.poisson(imgs).astype(np.uint16)
    ids = [f"st{i // structures_per_id:03d}" for i in range(n_images)]
    return HRTEMDataset(
        images=imgs,
        defocus_nm=list(defoci),
        sampling_A=0.2,
        masks=masks if with_masks else None,
        structure_ids=ids,
        dose_e_per_A2=5000.0,
    )


@pytest.fixture(scope="session")
def dataset_path(tmp_path_factory):
    """A saved 12-structure, 3-defocus 64x64 dataset (.hspy)."""
    path = tmp_path_factory.mktemp("data") / "discs.hspy"
    save_dataset(make_dataset(), path)
    return path


@pytest.fixture
def small_config():
    """Settings that train in about a second on 2 CPU cores (fp32, deterministic)."""
    from napari_hrtem_transfer.training import TrainConfig

    return TrainConfig(
        train_defocus_nm=[-5.0],
        epochs=2,
        batch_size=4,
        patch_size=32,
        lr=3e-3,
        precision="fp32",
        device="cpu",
        deterministic=True,
        num_threads=1,
    )
