"""Datasets: determinism across worker counts and the .hspy round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_hrtem_transfer.io import load_dataset, save_dataset
from napari_hrtem_transfer.simulate import simulate_dataset


def test_dataset_shapes_and_metadata(small_dataset, small_config):
    ds = small_dataset
    assert ds.images.shape == (3, 3, 160, 160)
    assert ds.masks.shape == (3, 160, 160) and ds.masks.dtype == bool
    assert np.allclose(ds.defocus_nm, [-10, 0, 10])
    # actual defoci scatter around nominal with the configured jitter
    dev = ds.actual_defocus_nm - ds.defocus_nm[:, None]
    assert 0 < np.abs(dev).max() < 6 * small_config.defocus_jitter_nm
    assert len(set(ds.structure_ids)) == 3


@pytest.mark.slow
def test_same_seed_same_arrays_any_worker_count(small_config):
    from distributed import Client, LocalCluster

    cfg = small_config.model_copy(update={"n_structures": 2})
    serial = simulate_dataset(cfg, workers=1)
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None
        ) as cl,
        Client(cl) as client,
    ):
        parallel = simulate_dataset(cfg, client=client)
    assert np.array_equal(serial.images, parallel.images)
    assert np.array_equal(serial.masks, parallel.masks)
    assert np.array_equal(serial.actual_defocus_nm, parallel.actual_defocus_nm)
    other = simulate_dataset(cfg.model_copy(update={"seed": cfg.seed + 1, "n_structures": 1}))
    assert not np.array_equal(other.images[:, 0], serial.images[:, 0])


@pytest.mark.slow
def test_same_seed_bitwise_identical_in_fresh_processes(small_config):
    """Run to run, not just within one process: two fresh worker processes plan their own FFTs.

    Noise-free intensities are compared, so that a difference in the last bit of one pixel
    fails the test (abTEM's default FFTW_MEASURE planning changed most pixels run to run).
    """
    from distributed import Client, LocalCluster

    cfg = small_config.model_copy(
        update={
            "n_structures": 2,
            "dose_e_per_A2": None,
            "image_size_px": 112,
            "radius_nm": (0.4, 0.5),
            "n_phonons": 1,
        }
    )
    serial = simulate_dataset(cfg, workers=1)
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cl,
        Client(cl) as client,
    ):
        parallel = simulate_dataset(cfg, client=client)
    assert serial.images.dtype == np.float32
    assert np.array_equal(serial.images, parallel.images)
    assert np.array_equal(serial.masks, parallel.masks)
    offsets = [s["zero_defocus_offset_nm"] for s in serial.info["structures"]]
    assert offsets == [s["zero_defocus_offset_nm"] for s in parallel.info["structures"]]


def test_hspy_round_trip(small_dataset, tmp_path):
    import hyperspy.api as hs

    path = save_dataset(small_dataset, tmp_path / "series.hspy")
    assert [p.name for p in tmp_path.iterdir()] == ["series.hspy"]  # no temporary left
    s = hs.load(path)
    nav = s.axes_manager.navigation_axes
    assert [a.name for a in nav] == ["image", "defocus"]
    assert nav[1].units == "nm" and np.allclose(nav[1].axis, [-10, 0, 10])
    sig = s.axes_manager.signal_axes
    assert [a.units for a in sig] == ["nm", "nm"]
    assert sig[0].scale == pytest.approx(0.02)
    assert s.metadata.Acquisition_instrument.TEM.beam_energy == 300
    assert "positive = underfocus" in s.metadata.HRTEM_transfer.defocus_convention
    info = json.loads(s.metadata.HRTEM_transfer.info_json)
    assert info["config"]["seed"] == 7 and "abtem" in info["versions"]
    assert np.allclose(info["actual_defocus_nm"], small_dataset.actual_defocus_nm)
    assert np.array_equal(s.metadata.HRTEM_transfer.masks.data.astype(bool), small_dataset.masks)

    lazy = load_dataset(path, lazy=True)
    assert hasattr(lazy.images, "dask")
    assert lazy.images.chunks[0][0] == 1 and lazy.images.chunks[1][0] == 1  # one image per chunk
    assert np.array_equal(np.asarray(lazy.images), small_dataset.images)
    assert list(lazy.structure_ids) == list(small_dataset.structure_ids)


def test_cli_simulate_writes_a_loadable_file(tmp_path):
    from napari_hrtem_transfer.cli import main

    out = tmp_path / "cli.hspy"
    rc = main(
        [
            "simulate",
            "--out",
            str(out),
            "--quiet",
            "--n-structures",
            "1",
            "--size",
            "128",
            "--radius",
            "0.5",
            "0.6",
            "--particles",
            "1",
            "--defocus",
            "-5",
            "5",
            "--substrate-thickness",
            "1",
            "--dose",
            "100",
            "--voltage",
            "200",
            "--cs",
            "0.01",
        ]
    )
    assert rc == 0
    ds = load_dataset(out, lazy=False)
    assert ds.images.shape == (2, 1, 128, 128)
    assert ds.energy_eV == 200e3 and ds.info["config"]["Cs_A"] == pytest.approx(1e5)
    assert ds.images.mean() == pytest.approx(100 * 0.2**2, rel=0.03)


@pytest.mark.gpu
def test_gpu_matches_cpu(small_config):
    pytest.importorskip("cupy")
    cfg = small_config.model_copy(update={"dose_e_per_A2": None, "n_phonons": 1})
    from napari_hrtem_transfer.simulate import simulate_structure

    cpu = simulate_structure(cfg, 0, device="cpu")
    gpu = simulate_structure(cfg, 0, device="gpu")
    assert np.allclose(cpu["images"], gpu["images"], atol=1e-3)
    assert (cpu["mask"] == gpu["mask"]).mean() > 0.999
