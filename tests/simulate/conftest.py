from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def small_config():
    from napari_hrtem_transfer.simulate import SimulationConfig

    return SimulationConfig.from_preset(
        "laptop",
        n_structures=3,
        image_size_px=160,
        radius_nm=(0.5, 0.8),
        particles_per_image=(1, 2),
        substrate_thickness_nm=(1.5, 2.0),
        defocus_nm=[-10.0, 0.0, 10.0],
        seed=7,
    )


@pytest.fixture(scope="session")
def small_dataset(small_config):
    from napari_hrtem_transfer.simulate import simulate_dataset

    return simulate_dataset(small_config)
