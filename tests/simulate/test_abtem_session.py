"""The simulator's abTEM settings hold only while it works: the user's session is left as it was."""

from __future__ import annotations

import numpy as np
import pytest

abtem = pytest.importorskip("abtem")


def _tiny():
    from napari_hrtem_transfer.simulate import SimulationConfig

    return SimulationConfig.from_preset(
        "laptop", n_structures=1, image_size_px=96, radius_nm=(0.4, 0.4),
        particles_per_image=(1, 1), substrate_thickness_nm=(0.0, 0.0), defocus_nm=[0.0, 5.0],
        n_phonons=1, dose_e_per_A2=None, seed=3,
    )


def test_settings_apply_inside_and_are_restored_after():
    from napari_hrtem_transfer.simulate.physics import ABTEM_SETTINGS, abtem_settings

    with abtem.config.set({"fft": "fftw", "dask.lazy": True}):
        with abtem_settings() as mod:
            assert mod is abtem
            for key, value in ABTEM_SETTINGS.items():
                assert abtem.config.get(key) == value
        assert abtem.config.get("fft") == "fftw" and abtem.config.get("dask.lazy") is True


def test_simulation_leaves_the_users_abtem_config_unchanged():
    from napari_hrtem_transfer.simulate import simulate_structure

    cfg = _tiny()
    reference = simulate_structure(cfg, 0)
    # a user's session with other settings (lazy dask arrays, FFTW)
    with abtem.config.set({"fft": "fftw", "dask.lazy": True}):
        before = abtem.config.config.copy()
        before = {k: (v.copy() if isinstance(v, dict) else v) for k, v in before.items()}
        got = simulate_structure(cfg, 0)
        assert abtem.config.config == before
        assert abtem.config.get("fft") == "fftw" and abtem.config.get("dask.lazy") is True
    # ... and the simulator still ran with its own settings: the same (bitwise) result
    assert np.array_equal(got["images"], reference["images"])
    assert np.array_equal(got["mask"], reference["mask"])


def test_overlapping_threads_keep_the_settings_until_the_last_one_leaves():
    """Threads of one process share abTEM's config: the first out must not undo the settings
    under the second (dask clusters with processes=False run structures like this)."""
    import threading

    from napari_hrtem_transfer.simulate.physics import abtem_settings

    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def first():
        with abtem_settings():
            a_in.set()
            b_in.wait(5)
        a_out.set()

    def second():
        a_in.wait(5)
        with abtem_settings():
            b_in.set()
            a_out.wait(5)
            seen["fft while the first is gone"] = abtem.config.get("fft")

    with abtem.config.set({"fft": "fftw"}):
        threads = [threading.Thread(target=first), threading.Thread(target=second)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert seen == {"fft while the first is gone": "numpy"}
        assert abtem.config.get("fft") == "fftw"
