"""napari reader contribution: LayerData from real files and simulated datasets (no viewer)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pint
import pytest

from napari_hrtem_transfer._napari._reader import (
    dataset_to_layer_data,
    napari_get_reader,
    read_layers,
)
from napari_hrtem_transfer.errors import ReaderError

DATA = Path(__file__).parents[2].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"real test files not found at {DATA}")


def _read(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reader = napari_get_reader(str(path))
        assert callable(reader)
        return reader(str(path))


def _make_layer(layer_data):
    """Build the napari layer the viewer would build (validates every keyword)."""
    from napari.layers import Image, Labels

    data, kwargs, layer_type = layer_data
    return {"image": Image, "labels": Labels}[layer_type](data, **kwargs)


def test_get_reader_accepts_supported_and_declines_others(tmp_path):
    assert napari_get_reader("a.dm4") is read_layers
    assert napari_get_reader(["a.emd", "b.DM3"]) is read_layers
    assert napari_get_reader("a.png") is read_layers  # plain images too (grey)
    assert napari_get_reader("a.gif") is None
    assert napari_get_reader(["a.emd", "b.gif"]) is None
    assert napari_get_reader([]) is None


@needs_data
def test_tia_image_scale_in_nm():
    (layer,) = _read(DATA / "tia_ser_emi/128x128-TEM_search.emi")
    data, kwargs, kind = layer
    assert kind == "image" and data.shape == (128, 128)
    assert kwargs["scale"] == pytest.approx((5.26121, 5.26121), rel=1e-5)
    assert kwargs["units"] == ("nm", "nm")
    assert kwargs["metadata"]["sampling_A"] == pytest.approx(52.6121, rel=1e-5)
    layer = _make_layer(layer)
    assert [str(u) for u in layer.units] == ["nanometer", "nanometer"]


@needs_data
def test_stack_and_uncalibrated_frame_axis():
    (layer,) = _read(DATA / "tia_ser_emi/64x64x5_TEM_preview.emi")
    data, kwargs, _ = layer
    assert data.shape == (5, 64, 64)
    assert kwargs["scale"] == pytest.approx((1.0, 6.28183, 6.28183), rel=1e-5)
    assert kwargs["units"] == ("pixel", "nm", "nm")
    assert kwargs["axis_labels"] == ("frame", "y", "x")
    _make_layer(layer)


@needs_data
def test_anisotropic_pixels_keep_both_scales():
    (layer,) = _read(DATA / "dm4/ncem_dmTest_float32_nonSquare_diffPixelSize.dm4")
    _, kwargs, _ = layer
    assert kwargs["scale"] == pytest.approx((0.2, 1.0))  # y 2 Å, x 1 nm
    assert kwargs["metadata"]["sampling_A"] == pytest.approx(10.0)


@needs_data
def test_uncalibrated_image_is_in_pixels():
    (layer,) = _read(DATA / "dm3/scifi_DMReader_Image_SI-Survey.dm3")
    _, kwargs, _ = layer
    assert kwargs["scale"] == (1.0, 1.0)
    assert kwargs["units"] == ("pixel", "pixel")
    assert kwargs["metadata"]["sampling_A"] is None
    _make_layer(layer)


@needs_data
def test_diffraction_pattern_is_shown_in_reciprocal_units():
    (layer,) = _read(DATA / "dm3/rsciio_test_diffraction_pattern.dm3")
    _, kwargs, _ = layer
    assert kwargs["units"] == ("1/nm", "1/nm")
    assert kwargs["scale"] == pytest.approx((0.174433, 0.174433), rel=1e-5)
    assert kwargs["metadata"]["sampling_A"] is None
    img = _make_layer(layer)
    assert "nanometer" in str(img.units[0])


@needs_data
def test_velox_multi_detector_gives_four_layers_and_no_undefined_units():
    layers = _read(DATA / "emd_velox/ncem_STEM_HAADF-DF4-DF2-BF_Diffraction_Micro.emd")
    assert len(layers) == 4
    for layer in layers:
        assert "<undefined>" not in layer[1]["units"]
        assert layer[1]["scale"] == pytest.approx((87.37080, 87.37080), rel=1e-5)


@needs_data
def test_several_paths_at_once():
    paths = [str(DATA / "mrc/rsciio_DE_HAADFscan.mrc"), str(DATA / "tif/rsciio_TVIPS_bin4.tif")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layers = napari_get_reader(paths)(paths)
    assert [layer[0].shape for layer in layers] == [(16, 16), (1024, 1024)]
    assert layers[1][1]["scale"] == pytest.approx((1.4208, 1.4208), rel=1e-4)


def test_the_image_axes_offsets_become_the_layers_translate(tmp_path):
    """A defocus x image series with a non-uniform defocus axis and offset y/x axes (in Å
    here): the layer is placed where the file says, in nm, and the axes round-trip."""
    import hyperspy.api as hs

    s = hs.signals.Signal2D(
        np.random.default_rng(0).poisson(100, (3, 2, 40, 50)).astype(np.float32),
        axes=[
            {"name": "defocus", "axis": np.array([-10.0, -2.5, 7.0]), "units": "nm"},
            {"name": "image", "size": 2, "scale": 1.0, "offset": 0.0},
            {"name": "y", "size": 40, "scale": 0.2, "offset": 15.0, "units": "Å"},
            {"name": "x", "size": 50, "scale": 0.2, "offset": -20.0, "units": "Å"},
        ],
    )
    path = tmp_path / "offset.hspy"
    s.save(path)
    ((data, kw, kind),) = _read(path)
    assert kind == "image" and data.shape == (3, 2, 40, 50)
    assert kw["scale"] == pytest.approx((1.0, 1.0, 0.02, 0.02))
    assert kw["translate"] == pytest.approx((0.0, 0.0, 1.5, -2.0))
    assert kw["metadata"]["defocus_nm"] == [-10.0, -2.5, 7.0]


def test_other_navigation_axes_keep_their_scale_offset_and_unit(tmp_path):
    """A tilt (non-uniform, degrees) x time (uniform, 0.5 s from 10 s) series: the time slider
    is calibrated in s, the tilt values and unit survive napari into the core's axes."""
    import hyperspy.api as hs

    from napari_hrtem_transfer._napari._jobs import axes_from_layer

    s = hs.signals.Signal2D(
        np.ones((3, 4, 16, 16), np.float32),
        axes=[
            {"name": "tilt", "axis": np.array([-20.0, 0.0, 35.0]), "units": "degree"},
            {"name": "time", "size": 4, "scale": 0.5, "offset": 10.0, "units": "s"},
            {"name": "y", "size": 16, "scale": 0.02, "units": "nm"},
            {"name": "x", "size": 16, "scale": 0.02, "units": "nm"},
        ],
    )
    s.save(tmp_path / "tilt_time.hspy")
    ((data, kw, kind),) = _read(tmp_path / "tilt_time.hspy")
    assert kw["axis_labels"] == ("tilt", "time", "y", "x")
    assert kw["scale"][:2] == pytest.approx((1.0, 0.5))
    assert kw["translate"][:2] == pytest.approx((0.0, 10.0))
    assert kw["units"][:2] == ("pixel", "s")
    layer = _make_layer((data, kw, kind))
    tilt, time, _, _ = axes_from_layer(layer)
    assert tilt["axis"] == [-20.0, 0.0, 35.0] and tilt["units"] == "degree"
    assert (time["scale"], time["offset"], time["units"]) == (0.5, 10.0, "s")


@pytest.mark.parametrize(
    "tilt",
    [
        {"axis": np.array([-20.0, 0.0, 35.0])},  # non-uniform
        {"size": 3, "scale": -10.0, "offset": 30.0},  # uniform but decreasing: no layer scale
    ],
)
def test_a_single_navigation_axis_keeps_its_values(tmp_path, tilt):
    """A tilt series (one navigation axis, degrees) whose values cannot be a layer scale: the
    slider is the index, the values and unit survive napari into the core's axes."""
    import hyperspy.api as hs

    from napari_hrtem_transfer._napari._jobs import axes_from_layer

    s = hs.signals.Signal2D(
        np.ones((3, 16, 16), np.float32),
        axes=[
            {"name": "tilt", "units": "degree", **tilt},
            {"name": "y", "size": 16, "scale": 0.02, "units": "nm"},
            {"name": "x", "size": 16, "scale": 0.02, "units": "nm"},
        ],
    )
    s.save(tmp_path / "tilt.hspy")
    ((data, kw, kind),) = _read(tmp_path / "tilt.hspy")
    assert kw["axis_labels"][0] == "tilt" and kw["scale"][0] == 1.0
    expected = [float(v) for v in s.axes_manager["tilt"].axis]
    assert kw["metadata"]["axis_values"] == {"tilt": expected}
    tilt_axis = axes_from_layer(_make_layer((data, kw, kind)))[0]
    assert tilt_axis["axis"] == expected and tilt_axis["units"] == "degree"


def test_layer_metadata_of_another_shape_is_ignored_not_a_crash():
    """Metadata set by hand or by another plugin (a scalar where a list belongs, a list where a
    dict belongs): the axes are the layer's own, no TypeError."""
    from napari.layers import Image

    from napari_hrtem_transfer._napari._jobs import axes_from_layer

    layer = Image(np.zeros((2, 8, 8)), axis_labels=("defocus", "y", "x"),
                  metadata={"defocus_nm": 5.0, "axis_values": [1, 2], "axis_units": "s"})
    first = axes_from_layer(layer)[0]
    assert first["name"] == "defocus" and "axis" not in first
    layer = Image(np.zeros((2, 8, 8)), axis_labels=("tilt", "y", "x"),
                  metadata={"axis_values": {"tilt": 3.0}, "axis_units": None})
    assert "axis" not in axes_from_layer(layer)[0]


def test_reader_error_names_the_file(tmp_path):
    bad = tmp_path / "broken.emd"
    bad.write_bytes(b"not hdf5")
    with pytest.raises(ReaderError, match="broken.emd"):
        read_layers(str(bad))


def test_simulated_dataset_gives_images_and_broadcast_masks(tmp_path, tiny_dataset):
    from napari_hrtem_transfer.io import save_dataset

    path = save_dataset(tiny_dataset, tmp_path / "series.hspy")
    layers = _read(path)
    assert [kind for _, _, kind in layers] == ["image", "labels"]
    (images, ik, _), (labels, lk, _) = layers
    assert images.shape == (2, 8, 64, 64)
    np.testing.assert_array_equal(np.asarray(images), tiny_dataset.images)
    # defoci -5, +5 nm: evenly spaced, so the slider is calibrated in nm
    assert ik["scale"] == pytest.approx((10.0, 1.0, 0.02, 0.02))
    assert ik["translate"] == pytest.approx((-5.0, 0.0, 0.0, 0.0))
    assert ik["units"] == ("nm", "pixel", "nm", "nm")
    assert ik["axis_labels"] == ("defocus", "image", "y", "x")
    assert ik["metadata"]["defocus_nm"] == [-5.0, 5.0]
    assert labels.shape == images.shape and labels.dtype == np.uint8
    for d in range(2):
        np.testing.assert_array_equal(labels[d], tiny_dataset.masks.astype(np.uint8))
    assert lk["scale"] == ik["scale"] and lk["translate"] == ik["translate"]
    _make_layer(layers[0])
    lab = _make_layer(layers[1])
    lab.data[0, 0, 0, 0] = 1  # small stacks are editable copies


def test_uneven_defoci_use_an_index_axis():
    from napari_hrtem_transfer.io import HRTEMDataset

    ds = HRTEMDataset(images=np.ones((3, 1, 8, 8)), defocus_nm=[-10.0, 0.0, 3.0], sampling_A=0.5,
                      masks=np.zeros((1, 8, 8), bool))
    (_, ik, _), (_, lk, _) = dataset_to_layer_data(ds)
    assert ik["scale"] == pytest.approx((1.0, 1.0, 0.05, 0.05))
    assert ik["units"][0] == "pixel" and lk["units"][0] == "pixel"
    assert ik["metadata"]["defocus_nm"] == [-10.0, 0.0, 3.0]


def test_dataset_without_masks_gives_one_layer(tiny_dataset):
    tiny_dataset.masks = None
    layers = dataset_to_layer_data(tiny_dataset, name="x")
    assert len(layers) == 1 and layers[0][1]["name"] == "x"


def test_generic_hspy_image(tmp_path):
    import hyperspy.api as hs

    s = hs.signals.Signal2D(np.arange(64, dtype=np.float32).reshape(8, 8))
    for ax in s.axes_manager.signal_axes:
        ax.scale, ax.units = 0.5, "Å"
    s.save(tmp_path / "plain.hspy")
    ((data, kwargs, kind),) = _read(tmp_path / "plain.hspy")
    assert kind == "image" and data.shape == (8, 8)
    assert kwargs["scale"] == pytest.approx((0.05, 0.05))
    assert kwargs["contrast_limits"][0] < kwargs["contrast_limits"][1]


REAL = sorted(
    str(p.relative_to(DATA))
    for p in (DATA.glob("*/*") if DATA.is_dir() else [])
    if napari_get_reader(str(p)) is not None
)


@needs_data
@pytest.mark.parametrize("rel", REAL)
def test_every_real_file_becomes_valid_napari_layers(rel):
    layers = _read(DATA / rel)
    assert layers
    for layer_data in layers:
        data, kwargs, _ = layer_data
        assert len(kwargs["scale"]) == len(kwargs["units"]) == data.ndim
        # image axes in nm (1/nm for diffraction) or pixels; a navigation axis keeps its own
        # unit when napari (pint) knows it (a z-stack in um), else it is an index
        assert all(u in ("nm", "pixel", "1/nm") for u in kwargs["units"][-2:]), kwargs["units"]
        for u in kwargs["units"][:-2]:
            pint.get_application_registry().Unit(u)
        # ``defocus_nm`` of a layer lists its frames' defocus, one value per defocus-axis frame
        frames_defocus = kwargs["metadata"].get("defocus_nm")
        if frames_defocus is not None:
            a = kwargs["axis_labels"].index("defocus")
            assert len(frames_defocus) == data.shape[a]
        layer = _make_layer(layer_data)
        assert layer.data.shape == data.shape


@needs_data
def test_a_vendor_defocus_is_the_files_not_a_frame_list():
    """A Velox time stack reports one defocus (Optics.Defocus +30.2 nm, negative = underfocus):
    the layer keeps it in abTEM's sign as ``file_defocus_nm``, and the Time axis in s."""
    ((data, kw, _),) = _read(DATA / "emd_velox" / "rsciio_fei_example_tem_stack.emd")
    meta = kw["metadata"]
    assert "defocus_nm" not in meta
    assert meta["file_defocus_nm"] == pytest.approx(-30.2317, abs=1e-3)
    assert meta["vendor_defocus_nm"] == pytest.approx(30.2317, abs=1e-3)
    assert kw["axis_labels"][0] == "Time" and kw["units"][0] == "s"
    assert kw["scale"][0] == pytest.approx(0.8)


def _defocus_series_hspy(path, defocus_nm, uniform):
    """A plain HyperSpy defocus x image file (not this package's dataset format)."""
    import hyperspy.api as hs

    data = np.random.default_rng(0).poisson(50, (len(defocus_nm), 6, 32, 32)).astype(np.float32)
    s = hs.signals.Signal2D(data)
    image_ax, defocus_ax = s.axes_manager.navigation_axes  # HyperSpy order: fastest first
    image_ax.name = "image"
    defocus_ax.name, defocus_ax.units = "defocus", "nm"
    if uniform:
        defocus_ax.offset, defocus_ax.scale = defocus_nm[0], defocus_nm[1] - defocus_nm[0]
    else:
        defocus_ax.convert_to_non_uniform_axis()
        defocus_ax.axis = np.asarray(defocus_nm, float)
    for ax, name in zip(s.axes_manager.signal_axes, ("x", "y"), strict=True):
        ax.name, ax.units, ax.scale = name, "nm", 0.02
    s.save(path)
    return data


@pytest.mark.parametrize("uniform", [True, False])
def test_plain_hspy_defocus_by_image_keeps_its_defocus_axis(tmp_path, uniform):
    defocus = [-5.0, 0.0, 5.0] if uniform else [-8.0, 0.0, 12.0]
    data = _defocus_series_hspy(tmp_path / "series.hspy", defocus, uniform)
    ((layer_data, kwargs, kind),) = _read(tmp_path / "series.hspy")
    assert kind == "image" and np.shape(layer_data) == (3, 6, 32, 32)  # not 18 flat frames
    np.testing.assert_array_equal(np.asarray(layer_data), data)
    assert kwargs["axis_labels"] == ("defocus", "image", "y", "x")
    assert kwargs["metadata"]["defocus_nm"] == defocus
    if uniform:  # the slider shows the defocus [nm]
        assert kwargs["scale"][:2] == (5.0, 1.0) and kwargs["translate"][0] == -5.0
        assert kwargs["units"][:2] == ("nm", "pixel")
    else:  # a non-uniform axis cannot be a scale: the index, values in the metadata
        assert kwargs["scale"][:2] == (1.0, 1.0) and kwargs["units"][:2] == ("pixel", "pixel")
    layer = _make_layer((layer_data, kwargs, kind))
    assert layer.ndim == 4 and "defocus" in layer.axis_labels
    # what the Segment dock gives the core: the defocus of every frame [nm]
    from napari_hrtem_transfer._napari._jobs import axes_from_layer

    axes = axes_from_layer(layer)
    assert [a["name"] for a in axes] == ["defocus", "image", "y", "x"]
    assert axes[0]["units"] == "nm"
    coords = (axes[0]["axis"] if "axis" in axes[0]
              else [axes[0]["offset"] + i * axes[0]["scale"] for i in range(3)])
    np.testing.assert_allclose(coords, defocus)


def test_plain_hspy_defocus_series_with_one_axis(tmp_path):
    """A defocus series with only a (non-uniform) defocus axis: the index as the layer axis,
    the values [nm] in the metadata (a frame stack keeps its old conventions)."""
    import hyperspy.api as hs

    s = hs.signals.Signal2D(np.ones((3, 16, 16), np.float32))
    ax = s.axes_manager.navigation_axes[0]
    ax.name, ax.units = "defocus", "nm"
    ax.convert_to_non_uniform_axis()
    ax.axis = np.array([-4.0, 1.0, 9.0])
    s.save(tmp_path / "series1d.hspy")
    ((data, kwargs, _),) = _read(tmp_path / "series1d.hspy")
    assert np.shape(data) == (3, 16, 16) and kwargs["axis_labels"][0] == "defocus"
    assert kwargs["metadata"]["defocus_nm"] == [-4.0, 1.0, 9.0]
    assert kwargs["scale"][0] == 1.0 and kwargs["units"][0] == "pixel"
    _make_layer((data, kwargs, "image"))
