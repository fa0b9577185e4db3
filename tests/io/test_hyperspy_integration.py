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
            {
                "name": "Time",
                "size": 2,
                "scale": 0.8,
                "offset": 0.0,
                "units": "s",
                "navigate": True,
            },
            {
                "name": "y",
                "size": 4,
                "scale": 0.15,
                "offset": 0.0,
                "units": "nm",
                "navigate": False,
            },
            {
                "name": "x",
                "size": 4,
                "scale": 0.15,
                "offset": 0.0,
                "units": "nm",
                "navigate": False,
            },
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

    ds = HRTEMDataset(
        images=np.zeros((2, 1, 4, 4)),
        defocus_nm=[-5, 5],
        sampling_A=0.2,
        masks=np.zeros((1, 4, 4), bool),
    )
    s = to_signal(ds)
    assert s.data.shape == (2, 1, 4, 4)
    assert s.metadata.has_item("HRTEM_transfer.masks")


@pytest.mark.parametrize(
    ("config", "cs"),
    [({"Cs_A": 2.5e5}, 2.5e5), ({"Cs_A": 2.5e5, "Cs_range_A": [1e4, 5e5]}, None), ({}, None)],
)
def test_a_simulated_signal_carries_its_cs_to_the_reader(config, cs, tmp_path):
    """A dataset saved and loaded with hs.load records the one Cs of its simulation, which
    the OOD verdict fits the Thon rings with; none when Cs was drawn per image."""
    import hyperspy.api as hs

    from napari_hrtem_transfer.io import HRTEMDataset, save_dataset

    ds = HRTEMDataset(
        images=np.ones((2, 1, 8, 8)),
        defocus_nm=[-5, 5],
        sampling_A=0.2,
        masks=np.zeros((1, 8, 8), bool),
        info={"config": config},
    )
    assert ds.recorded_conditions().get("Cs_A") == cs
    save_dataset(ds, tmp_path / "series.hspy")
    md = from_signal(hs.load(tmp_path / "series.hspy"), compute=False).metadata
    assert md.get("Cs_A") == cs
    assert md["energy_eV"] == pytest.approx(ds.energy_eV)


# ----------------------------------------------------------------------------- axes kept exactly


def _fields(s):
    from napari_hrtem_transfer.io.readers import normalise_units

    out = []
    for ax in s.axes_manager._axes:
        # "" and HyperSpy's <undefined> both mean "none"; the reader maps both to None
        d = {
            "name": normalise_units(ax.name),
            "units": normalise_units(ax.units),
            "size": ax.size,
            "navigate": ax.navigate,
            "uniform": ax.is_uniform,
            "axis": np.asarray(ax.axis).tolist(),
        }
        if ax.is_uniform:
            d.update(scale=ax.scale, offset=ax.offset)
        out.append(d)
    return out


def _assert_same(a, b):
    fa, fb = _fields(a), _fields(b)
    assert len(fa) == len(fb)
    for x, y in zip(fa, fb, strict=True):
        for key in x:
            assert x[key] == pytest.approx(y[key]) if key == "axis" else x[key] == y[key], (
                key,
                x,
                y,
            )


def test_two_by_three_navigation_offsets_and_non_uniform_axis_survive():
    import hyperspy.api as hs

    s = hs.signals.Signal2D(
        np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5),
        axes=[
            {"name": "defocus", "axis": np.array([-3.0, 11.0]), "units": "nm", "navigate": True},
            {
                "name": "Time",
                "size": 3,
                "scale": 0.8,
                "offset": 2.0,
                "units": "s",
                "navigate": True,
            },
            {"name": "y", "size": 4, "scale": 8.2, "offset": -16738.0, "units": "pm"},
            {"name": "x", "size": 5, "scale": 8.2, "offset": 12.0, "units": "pm"},
        ],
    )
    s.metadata.General.title = "series"
    s.metadata.set_item("Acquisition_instrument.TEM.beam_energy", 300.0)
    s.metadata.set_item("Acquisition_instrument.TEM.magnification", 640000.0)
    s.original_metadata.set_item("Optics.Defocus", "-2e-08")
    back = to_signal(from_signal(s))
    _assert_same(s, back)
    np.testing.assert_array_equal(back.data, s.data)
    assert back.metadata.General.title == "series"
    assert back.metadata.Acquisition_instrument.TEM.magnification == 640000.0
    assert back.original_metadata.Optics.Defocus == "-2e-08"


def test_array_with_axes_from_a_segmentation_result():
    axes = [
        {"name": "defocus", "axis": np.array([0.0, 5.0, 20.0]), "units": "nm"},
        {"name": "y", "size": 4, "scale": 0.1, "offset": 1.0, "units": "nm"},
        {"name": "x", "size": 4, "scale": 0.1, "offset": 2.0, "units": "nm"},
    ]
    s = to_signal(np.zeros((3, 4, 4), np.uint8), axes=axes)
    nav = s.axes_manager.navigation_axes[0]
    assert (nav.name, nav.is_uniform) == ("defocus", False)
    np.testing.assert_array_equal(nav.axis, [0.0, 5.0, 20.0])
    assert s.axes_manager.signal_axes[1].offset == 1.0
    with pytest.raises(ReaderError, match="do not fit"):
        to_signal(np.zeros((2, 4, 4)), axes=axes)
    # sampling_A overrides the calibration and converts the offsets to nm
    pm = [dict(a, units="pm", scale=10.0, offset=50.0) for a in axes[1:]]
    r = to_signal(np.zeros((4, 4)), axes=pm, sampling_A=0.5)
    assert (r.axes_manager[0].scale, r.axes_manager[0].offset) == (0.05, pytest.approx(0.05))


def _shared_signals():
    import os
    from pathlib import Path

    root = (
        Path(
            os.environ.get("HRTEM_TRANSFER_SHARED_DIR")
            or Path(__file__).resolve().parents[2].parent / "shared"
        )
        / "data"
    )
    if not root.exists():
        return []
    skip = {".md", ".csv", ".mat", ".png"}
    return [
        pytest.param(p, id=f"{p.parent.name}/{p.name}")
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.suffix.lower() not in skip and not p.name.endswith("_1.ser")
    ]


@pytest.mark.parametrize("path", _shared_signals())
def test_every_shared_file_round_trips_its_axes(path):
    import warnings

    import hyperspy.api as hs

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = hs.load(path)
    for s in loaded if isinstance(loaded, list) else [loaded]:
        if s.axes_manager.signal_dimension != 2 or s.data.dtype.names:
            continue  # spectra; RGB is converted to grey by the reader (values change)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            back = to_signal(from_signal(s, allow_reciprocal=True))
        _assert_same(s, back)
        np.testing.assert_allclose(back.data, s.data.astype(np.float32))
        assert back.metadata.General.title == s.metadata.General.title
        assert sorted(back.original_metadata.keys()) == sorted(s.original_metadata.keys())
