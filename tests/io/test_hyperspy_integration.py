"""to_signal / from_signal: HyperSpy signals <-> calibrated arrays."""

from __future__ import annotations

import numpy as np
import pytest

from napari_hrtem_transfer.errors import ReaderError
from napari_hrtem_transfer.io.hyperspy_integration import from_signal, to_signal
from napari_hrtem_transfer.io.readers import ExperimentalImage


def test_array_roundtrip_keeps_values_and_sampling():
    data = np.arange(3 * 8 * 10, dtype=np.float32).reshape(3, 8, 10)
    s = to_signal(data, sampling_A=0.25, title="stack")
    assert s.data.shape == (3, 8, 10)
    sy, sx = s.axes_manager.signal_axes[::-1]
    assert (sy.units, sx.units) == ("nm", "nm")
    assert sx.scale == pytest.approx(0.025)
    assert s.metadata.General.title == "stack"
    back = from_signal(s)
    np.testing.assert_array_equal(back.data, data)
    assert back.sampling_A == pytest.approx(0.25)


def test_single_image_is_a_2d_signal_and_uncalibrated_stays_uncalibrated():
    s = to_signal(np.ones((5, 6)))
    assert s.axes_manager.navigation_dimension == 0
    assert s.data.shape == (5, 6)
    im = from_signal(s)
    assert im.data.shape == (1, 5, 6)
    assert im.sampling_A is None
    assert all(a["units"] is None for a in im.axes)


def test_experimental_image_keeps_energy_and_frame_axis():
    im = ExperimentalImage(
        data=np.zeros((2, 4, 4)),
        sampling_A=1.5,
        axes=[
            {"name": "Time", "size": 2, "scale": 0.8, "offset": 0.0, "units": "s",
             "navigate": True},
            {"name": "y", "size": 4, "scale": 0.15, "offset": 0.0, "units": "nm",
             "navigate": False},
            {"name": "x", "size": 4, "scale": 0.15, "offset": 0.0, "units": "nm",
             "navigate": False},
        ],
        metadata={"energy_eV": 300e3},
        name="series",
    )
    s = to_signal(im)
    nav = s.axes_manager.navigation_axes[0]
    assert (nav.name, nav.units, nav.scale) == ("Time", "s", pytest.approx(0.8))
    assert s.metadata.Acquisition_instrument.TEM.beam_energy == pytest.approx(300.0)
    back = from_signal(s)
    assert back.metadata["energy_eV"] == pytest.approx(300e3)
    assert back.axes[0]["units"] == "s"
    # explicit sampling overrides the image's own
    assert from_signal(to_signal(im, sampling_A=2.0)).sampling_A == pytest.approx(2.0)


def test_lazy_signal_is_computed():
    s = to_signal(np.ones((2, 4, 4)), sampling_A=1.0).as_lazy()
    im = from_signal(s)
    assert isinstance(im.data, np.ndarray) and im.data.shape == (2, 4, 4)


def test_errors():
    import hyperspy.api as hs

    with pytest.raises(ReaderError, match="1-D signal"):
        from_signal(hs.signals.Signal1D(np.ones(10)))
    with pytest.raises(ReaderError, match="one signal"):
        from_signal([to_signal(np.ones((2, 2)))])
    with pytest.raises(ReaderError, match="shape"):
        to_signal(np.ones(5))
    with pytest.raises(ReaderError, match="positive"):
        to_signal(np.ones((4, 4)), sampling_A=0.0)


def test_dataset_goes_through_dataset_writer():
    from napari_hrtem_transfer.io import HRTEMDataset

    ds = HRTEMDataset(images=np.zeros((2, 1, 4, 4)), defocus_nm=[-5, 5], sampling_A=0.2,
                      masks=np.zeros((1, 4, 4), bool))
    s = to_signal(ds)
    assert s.data.shape == (2, 1, 4, 4)
    assert s.metadata.has_item("HRTEM_transfer.masks")
