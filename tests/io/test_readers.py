"""Experimental-image readers against the real files in ../shared/data (see its MANIFEST.md).

The data folder lives next to the repository (``<repo>/../shared/data``); tests that need
it are skipped when it is absent. Expected shapes and calibrations are the ones HyperSpy
reports in MANIFEST.md, converted to Å.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest

from napari_hrtem_transfer.errors import HrtemTransferError, ReaderError
from napari_hrtem_transfer.io.readers import (
    SUPPORTED_EXTENSIONS,
    ExperimentalImage,
    ReaderWarning,
    is_supported,
    length_unit_to_A,
    normalise_units,
    read_images,
)

DATA = Path(__file__).parents[2].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"real test files not found at {DATA}")

# file, number of images, data shape of the first (n_frames, ny, nx), sampling_A of the first
REAL_FILES = [
    ("dm3/rsciio_test_STEM_image.dm3", 1, (1, 68, 68), 2.48538),
    ("dm3/rsciio_test_dm_image_um_unit.dm3", 1, (1, 68, 68), 1686.75),
    ("dm3/rsciio_test_stackbuilder_imagestack.dm3", 1, (3, 2, 16), 599.829),
    ("dm3/scifi_DMReader_Image_SI-Survey.dm3", 1, (1, 512, 512), None),
    ("dm4/ncem_dmTest_float32_nonSquare_diffPixelSize.dm4", 1, (1, 64, 128), 10.0),
    ("dm4/ncem_dmTest_3D_int16_64,65,66.dm4", 1, (66, 65, 64), 0.02),
    ("dm4/vecmap_PTO100-40nm-HAADF_SIMULATED.dm4", 1, (1, 258, 244), 0.16),
    ("emd_velox/scifi_EMDReader_Image_FEI.emd", 1, (1, 512, 512), 53.0241),
    ("emd_velox/ncem_Camera_Ceta_Imaging_Micro.emd", 1, (1, 512, 512), 31.3884),
    ("emd_velox/ncem_STEM_HAADF-DF4-DF2-BF_Diffraction_Micro.emd", 4, (1, 128, 128), 873.708),
    ("emd_velox/rsciio_fei_example_tem_stack.emd", 1, (2, 3, 3), 0.0817288),
    ("tia_ser_emi/128x128-TEM_search.emi", 1, (1, 128, 128), 52.6121),
    ("tia_ser_emi/128x128-TEM_search_1.ser", 1, (1, 128, 128), 52.6121),
    ("tia_ser_emi/64x64x5_TEM_preview.emi", 1, (5, 64, 64), 62.8183),
    ("tia_ser_emi/64x64x5_TEM_preview_1.ser", 1, (5, 64, 64), 62.8183),
    ("mrc/rsciio_DE_HAADFscan.mrc", 1, (1, 16, 16), 56.7913),
    ("mrc/ncem_temp_SYNTHETIC.mrc", 1, (3, 128, 128), 2.0),
    ("tif/rsciio_TVIPS_bin4.tif", 1, (1, 1024, 1024), 14.208),
    ("tif/rsciio_test_loading_image_saved_with_DM.tif", 1, (1, 68, 68), 1686.75),
    ("tif/rsciio_test_loading_image_saved_with_imageJ.tif", 1, (1, 68, 68), 1686.75),
    ("tif/ucam_HRTEM_soot_ExampleImage.tif", 1, (1, 512, 512), None),
    ("labels/20221109_Au_UTC_330kx_2640e_0p1596s_03_label.png", 1, (1, 4096, 4096), None),
]


def _read(path: Path, **kwargs) -> list[ExperimentalImage]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ReaderWarning)
        warnings.simplefilter("ignore", ResourceWarning)
        return read_images(path, **kwargs)


@needs_data
@pytest.mark.parametrize(
    ("rel", "n", "shape", "sampling"), REAL_FILES, ids=[r[0] for r in REAL_FILES]
)
def test_real_file_shape_and_calibration(rel, n, shape, sampling):
    images = _read(DATA / rel)
    assert len(images) == n
    im = images[0]
    assert isinstance(im, ExperimentalImage)
    assert im.data.shape == shape
    assert im.data.dtype == np.float32
    assert np.isfinite(im.data).all()
    if sampling is None:
        assert im.sampling_A is None
        assert not im.is_calibrated
    else:
        assert im.sampling_A == pytest.approx(sampling, rel=1e-4)
        assert im.sampling_nm == pytest.approx(sampling / 10, rel=1e-4)
    # axes describe data and never carry HyperSpy's "<undefined>"
    assert [a["size"] for a in im.axes] == list(im.data.shape)
    for a in im.axes:
        assert a["units"] != "<undefined>"
        assert a["name"] != "<undefined>"
    assert im.path == DATA / rel
    assert isinstance(im.metadata["reader_notes"], list)


@needs_data
def test_all_manifest_files_are_covered():
    """Every hs.load target in the data folder is in REAL_FILES or refused on purpose."""
    covered = {r[0] for r in REAL_FILES} | {"dm3/rsciio_test_diffraction_pattern.dm3"}
    on_disk = {
        str(p.relative_to(DATA))
        for p in DATA.glob("*/*")
        if p.suffix.lower() in SUPPORTED_EXTENSIONS
    }
    assert on_disk <= covered, f"untested files: {sorted(on_disk - covered)}"


@needs_data
def test_tia_values_match_between_emi_and_ser():
    emi = _read(DATA / "tia_ser_emi/128x128-TEM_search.emi")[0]
    ser = _read(DATA / "tia_ser_emi/128x128-TEM_search_1.ser")[0]
    np.testing.assert_array_equal(emi.data, ser.data)
    assert emi.data.min() == 255 and emi.data.max() == pytest.approx(1.417e4, rel=1e-3)
    # the .ser given alone is read through the .emi beside it: the same microscope
    # conditions (a .ser alone is TEM, not STEM)
    assert emi.metadata["energy_eV"] == pytest.approx(200e3)
    assert emi.metadata["acquisition_mode"] == "TEM"
    assert ser.metadata["energy_eV"] == pytest.approx(200e3)
    assert ser.metadata["acquisition_mode"] == "TEM"
    assert ser.path.suffix == ".ser"


@needs_data
def test_ser_alone_is_stem_when_its_emi_says_so(tmp_path):
    """A STEM .emi/.ser pair (the shared TEM pair with the mode and camera tag edited in
    place, same byte lengths): the .ser alone is STEM, and the segmentation input warns."""
    from napari_hrtem_transfer.io.frames import as_frames, input_warnings

    src = DATA / "tia_ser_emi"
    raw = (src / "128x128-TEM_search.emi").read_bytes()
    assert raw.count(b"<Value> TEM uP") == 1
    # STEM with a camera would make RosettaSciIO guess a diffraction pattern: no camera
    stem = raw.replace(b"<Value> TEM uP", b"<Value>STEM uP")
    stem = stem.replace(b"CameraNamePath", b"DetectorNameXX")
    (tmp_path / "scan.emi").write_bytes(stem)
    (tmp_path / "scan_1.ser").write_bytes((src / "128x128-TEM_search_1.ser").read_bytes())
    (emi,) = _read(tmp_path / "scan.emi")
    (ser,) = _read(tmp_path / "scan_1.ser")
    assert emi.metadata["acquisition_mode"] == "STEM"
    assert ser.metadata["acquisition_mode"] == "STEM"
    assert any("STEM" in w for w in input_warnings(as_frames(ser)))
    # without its .emi, a .ser has no mode (and nothing is guessed)
    (tmp_path / "alone").mkdir()
    (tmp_path / "alone" / "scan_1.ser").write_bytes((tmp_path / "scan_1.ser").read_bytes())
    (bare,) = _read(tmp_path / "alone" / "scan_1.ser")
    assert "acquisition_mode" not in bare.metadata


@needs_data
def test_non_square_dm4_warns_and_uses_x():
    with pytest.warns(ReaderWarning, match="not square"):
        (im,) = read_images(DATA / "dm4/ncem_dmTest_float32_nonSquare_diffPixelSize.dm4")
    # y: 2 Å per px (units "A"), x: 1 nm per px
    assert im.metadata["sampling_A_y"] == pytest.approx(2.0)
    assert im.metadata["sampling_A_x"] == pytest.approx(10.0)
    assert im.sampling_A == pytest.approx(10.0)
    assert [a["units"] for a in im.axes[1:]] == ["A", "nm"]
    assert any("not square" in n for n in im.metadata["reader_notes"])


@needs_data
def test_stack_with_three_units():
    (im,) = _read(DATA / "dm4/ncem_dmTest_3D_int16_64,65,66.dm4")
    assert im.axes[0]["units"] == "um" and im.axes[0]["scale"] == pytest.approx(4.0)
    assert im.metadata["sampling_A_y"] == pytest.approx(30.0)  # 3 nm
    assert im.sampling_A == pytest.approx(0.02)  # 2 pm
    assert im.data.min() == 0 and im.data.max() == 63


@needs_data
def test_uncalibrated_navigation_axis_has_no_undefined_units():
    (im,) = _read(DATA / "tia_ser_emi/64x64x5_TEM_preview.emi")
    assert im.axes[0]["units"] is None
    assert im.axes[0]["name"] == "frame"
    (mrc,) = _read(DATA / "mrc/ncem_temp_SYNTHETIC.mrc")
    assert mrc.axes[0]["units"] is None


@needs_data
def test_velox_multi_detector_file_gives_one_entry_per_detector():
    images = _read(DATA / "emd_velox/ncem_STEM_HAADF-DF4-DF2-BF_Diffraction_Micro.emd")
    assert sorted(im.metadata["title"] for im in images) == ["BF", "DF2", "DF4", "HAADF"]
    assert len({im.name for im in images}) == 4
    haadf = next(im for im in images if im.metadata["title"] == "HAADF")
    assert haadf.data.min() == 9989 and haadf.data.max() == pytest.approx(1e4, abs=10)
    for im in images:
        if im.metadata["title"] != "HAADF":  # the other detectors recorded nothing
            assert not im.data.any()
    for im in images:
        assert im.metadata["energy_eV"] == pytest.approx(300e3)


@needs_data
def test_velox_defocus_is_converted_to_abtem_sign():
    (im,) = _read(DATA / "emd_velox/rsciio_fei_example_tem_stack.emd")
    # Optics.Defocus = 3.02317e-08 m in the file (Thermo Fisher read-out)
    assert im.metadata["vendor_defocus_nm"] == pytest.approx(30.2317, rel=1e-4)
    assert im.metadata["defocus_nm"] == pytest.approx(-30.2317, rel=1e-4)
    assert im.axes[0]["name"] == "Time" and im.axes[0]["units"] == "s"
    assert im.axes[0]["scale"] == pytest.approx(0.8)


@needs_data
def test_dm_metadata_energy_mode_and_cs():
    (im,) = _read(DATA / "dm3/rsciio_test_dm_image_um_unit.dm3")
    assert im.metadata["energy_eV"] == pytest.approx(200e3)
    assert im.metadata["acquisition_mode"] == "TEM"
    assert im.metadata["Cs_A"] == pytest.approx(1.31e7)  # Cs(mm) = 1.31
    (stem,) = _read(DATA / "dm3/rsciio_test_STEM_image.dm3")
    assert "Cs_A" not in stem.metadata  # DM writes Cs(mm) = 0 when unknown
    assert stem.metadata["acquisition_mode"] == "STEM"


@needs_data
def test_tvips_tif_calibration_and_energy():
    (im,) = _read(DATA / "tif/rsciio_TVIPS_bin4.tif")
    assert im.sampling_A == pytest.approx(14.208, rel=1e-4)
    assert im.metadata["energy_eV"] == pytest.approx(99e3)


@needs_data
def test_dm_and_imagej_tif_agree_with_dm3():
    (dm3,) = _read(DATA / "dm3/rsciio_test_dm_image_um_unit.dm3")
    (dmtif,) = _read(DATA / "tif/rsciio_test_loading_image_saved_with_DM.tif")
    (ijtif,) = _read(DATA / "tif/rsciio_test_loading_image_saved_with_imageJ.tif")
    np.testing.assert_allclose(dmtif.data, dm3.data)
    np.testing.assert_allclose(ijtif.data, dm3.data)
    assert dmtif.sampling_A == pytest.approx(dm3.sampling_A, rel=1e-6)
    assert ijtif.sampling_A == pytest.approx(dm3.sampling_A, rel=1e-6)


@needs_data
def test_rgb_tif_is_converted_to_grey_with_warning():
    import tifffile

    path = DATA / "tif/ucam_HRTEM_soot_ExampleImage.tif"
    with pytest.warns(ReaderWarning, match="RGB"):
        (im,) = read_images(path)
    rgb = tifffile.imread(path).astype(np.float64)
    expected = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    np.testing.assert_allclose(im.data[0], expected, rtol=1e-5, atol=1e-3)
    assert im.sampling_A is None


@needs_data
def test_diffraction_pattern_is_refused_by_default():
    path = DATA / "dm3/rsciio_test_diffraction_pattern.dm3"
    with pytest.raises(ReaderError, match=r"1/nm.*diffraction") as info:
        _read(path)
    assert str(path) in str(info.value)
    with pytest.warns(ReaderWarning, match="reciprocal"):
        (im,) = read_images(path, allow_reciprocal=True)
    assert im.sampling_A is None
    assert im.metadata["reciprocal_sampling"]["units"] == "1/nm"
    assert im.metadata["reciprocal_sampling"]["scale"] == pytest.approx(0.174433, rel=1e-5)


@needs_data
def test_unsupported_real_file_names_supported_formats():
    with pytest.raises(ReaderError, match=r"'\.mat' is not supported.*\.dm4"):
        read_images(DATA / "tif/ucam_HRTEM_soot_ExampleImage_px-nm.mat")


# ---------------------------------------------------------------- files made here


def test_missing_file(tmp_path):
    with pytest.raises(ReaderError, match="not found") as info:
        read_images(tmp_path / "nope.dm4")
    assert isinstance(info.value, HrtemTransferError)
    assert "nope.dm4" in str(info.value)


def test_folder_is_refused(tmp_path):
    with pytest.raises(ReaderError, match="folder"):
        read_images(tmp_path)


def test_corrupt_file_gives_reader_error(tmp_path):
    bad = tmp_path / "broken.dm4"
    bad.write_bytes(b"this is not a DigitalMicrograph file")
    with pytest.raises(ReaderError, match="could not read"):
        _read(bad)


@pytest.mark.parametrize("ext", [".dm3", ".dm4", ".emd"])
def test_unreadable_file_gives_only_our_message(tmp_path, ext, caplog, capfd):
    """A broken dm3/dm4/emd gives our own error only: no HyperSpy "please report this error
    to the RosettaSciIO developers" line, no .ser/.emi hint."""
    import logging

    bad = tmp_path / f"broken{ext}"
    bad.write_bytes(b"this is not a microscope file" * 10)
    with caplog.at_level(logging.DEBUG), pytest.raises(ReaderError) as info:
        read_images(bad)
    message = str(info.value)
    assert "could not read" in message and str(bad) in message
    assert ".ser" not in message and ".emi" not in message
    assert not [r for r in caplog.records if "RosettaSciIO" in r.getMessage()]
    assert "RosettaSciIO developers" not in capfd.readouterr().err


@needs_data
def test_mrc_leaves_no_file_open():
    """Reading an .mrc closes its file (no "ResourceWarning: unclosed file")."""
    import gc

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (im,) = read_images(DATA / "mrc/ncem_temp_SYNTHETIC.mrc")
        gc.collect()
    assert im.data.shape == (3, 128, 128)
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]


def test_the_mrc_reader_patch_is_one_read_at_a_time_and_restored():
    """The patch of RosettaSciIO's module-global ``open`` is held by one read at a time (napari
    reads in worker threads; interleaved patches could leave a stale one behind)."""
    import importlib
    import threading

    from napari_hrtem_transfer.io import readers

    module = importlib.import_module("rsciio.mrc._api")
    inside, release, second_in = threading.Event(), threading.Event(), threading.Event()

    def first():
        with readers._closing_files("rsciio.mrc._api"):
            inside.set()
            release.wait(5)

    def second():
        inside.wait(5)
        with readers._closing_files("rsciio.mrc._api"):
            second_in.set()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    assert inside.wait(5)
    assert not second_in.wait(0.3)  # the second read waits for the first
    release.set()
    for t in threads:
        t.join(5)
    assert second_in.is_set() and "open" not in vars(module)


def test_spectrum_is_refused(tmp_path):
    import hyperspy.api as hs

    s = hs.signals.Signal1D(np.arange(100, dtype=float))
    s.axes_manager[0].units = "eV"
    s.axes_manager[0].name = "Energy loss"
    path = tmp_path / "spectrum.hspy"
    s.save(path)
    with pytest.raises(ReaderError, match=r"1-D signal.*Energy loss.*eV"):
        read_images(path)


def test_spectrum_image_is_refused(tmp_path):
    import hyperspy.api as hs

    s = hs.signals.Signal1D(np.ones((4, 5, 20)))
    path = tmp_path / "si.hspy"
    s.save(path)
    with pytest.raises(ReaderError, match="navigation shape"):
        read_images(path)


def test_npy_image_and_stack(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.poisson(50, (32, 40)).astype(np.uint16)
    np.save(tmp_path / "img.npy", img)
    (im,) = read_images(tmp_path / "img.npy")
    assert im.data.shape == (1, 32, 40)
    np.testing.assert_array_equal(im.data[0], img)
    assert im.sampling_A is None
    stack = rng.random((3, 16, 16))
    np.save(tmp_path / "stack.npy", stack)
    (st,) = read_images(tmp_path / "stack.npy")
    assert st.data.shape == (3, 16, 16)
    assert st.nav_shape == (3,) and st.frames().shape == (3, 16, 16)
    # a 4-D array is a (defocus x image) stack: its navigation shape is kept
    four = rng.random((2, 3, 16, 16))
    np.save(tmp_path / "four.npy", four)
    (fd,) = read_images(tmp_path / "four.npy")
    assert fd.nav_shape == (2, 3)
    np.testing.assert_array_equal(fd.frames(), four.astype(np.float32))
    np.save(tmp_path / "bad.npy", np.zeros(5))
    with pytest.raises(ReaderError, match="shape"):
        read_images(tmp_path / "bad.npy")


def test_units_with_underscores_from_ncempy():
    from napari_hrtem_transfer.io.readers import length_unit_to_A, normalise_units

    assert normalise_units("n_m") == "nm"
    assert length_unit_to_A("n_m") == 10.0
    assert normalise_units("1/n_m") == "1/nm"
    assert length_unit_to_A("1/n_m") is None


def test_hspy_image_in_pm_and_undefined_units(tmp_path):
    import hyperspy.api as hs

    s = hs.signals.Signal2D(np.arange(48, dtype=np.float32).reshape(2, 4, 6))
    s.axes_manager.signal_axes[0].units = "pm"
    s.axes_manager.signal_axes[1].units = "pm"
    s.axes_manager.signal_axes[0].scale = 25.0
    s.axes_manager.signal_axes[1].scale = 25.0
    path = tmp_path / "pm.hspy"
    s.save(path)
    (im,) = read_images(path)
    assert im.sampling_A == pytest.approx(0.25)
    assert im.data.shape == (2, 4, 6)
    assert im.axes[0]["units"] is None  # HyperSpy's "<undefined>" nav axis


def test_uncalibrated_scale_without_units_warns(tmp_path):
    import hyperspy.api as hs

    s = hs.signals.Signal2D(np.ones((8, 8)))
    s.axes_manager.signal_axes[0].scale = 0.5
    s.axes_manager.signal_axes[1].scale = 0.5
    s.save(tmp_path / "nounits.hspy")
    with pytest.warns(ReaderWarning, match="no units"):
        (im,) = read_images(tmp_path / "nounits.hspy")
    assert im.sampling_A is None


def test_simulated_dataset_is_one_defocus_by_image_stack(tmp_path):
    """A simulated series is one entry with the file's defocus x image navigation (not one
    entry per defocus with the defocus in the title)."""
    from napari_hrtem_transfer.io import HRTEMDataset, save_dataset

    rng = np.random.default_rng(1)
    images = rng.poisson(40, (3, 2, 16, 16)).astype(np.uint16)
    ds = HRTEMDataset(
        images=images,
        defocus_nm=[-10.0, 0.0, 12.5],
        sampling_A=0.2,
        masks=rng.random((2, 16, 16)) > 0.5,
        dose_e_per_A2=400.0,
    )
    path = save_dataset(ds, tmp_path / "sim.hspy")
    (im,) = read_images(path)
    assert im.nav_shape == (3, 2)
    assert [a["name"] for a in im.nav_axes] == ["defocus", "image"]
    assert im.nav_axes[0]["units"] == "nm"
    np.testing.assert_array_equal(im.nav_axes[0]["axis"], [-10.0, 0.0, 12.5])
    assert im.metadata["defocus_nm"] == [-10.0, 0.0, 12.5]
    np.testing.assert_array_equal(im.frames(), images)
    assert im.sampling_A == pytest.approx(0.2)
    assert im.metadata["simulated"] is True
    assert "Cs_A" not in im.metadata  # no simulation configuration, no Cs
    ds.info["config"] = {"Cs_A": 2e5}  # as simulate records it: Cs 20 µm [Å]
    (im,) = read_images(save_dataset(ds, tmp_path / "sim_cs.hspy"))
    assert im.metadata["Cs_A"] == 2e5
    ds.info["config"] = {"Cs_A": 5e4, "Cs_range_A": [-2e5, 2e5]}  # a Cs drawn per image
    (im,) = read_images(save_dataset(ds, tmp_path / "sim_cs_range.hspy"))
    assert "Cs_A" not in im.metadata  # no single Cs to claim for every frame


def test_wrong_extension_is_refused(tmp_path):
    p = tmp_path / "x.bmp"
    p.write_bytes(b"BM")
    with pytest.raises(ReaderError, match="not supported"):
        read_images(p)
    assert not is_supported(p)
    # a broken file of a supported type is named, with what to check
    q = tmp_path / "x.jpg"
    q.write_bytes(b"\xff\xd8")
    with pytest.raises(ReaderError, match="could not read this file"):
        read_images(q)
    assert is_supported("a/B.DM4")


@pytest.mark.parametrize(
    ("units", "factor"),
    [("pm", 0.01), ("Å", 1.0), ("\u212b", 1.0), ("A", 1.0), ("nm", 10.0), ("µm", 1e4),
     ("\u03bcm", 1e4), ("um", 1e4), ("mm", 1e7), ("1/nm", None), ("mrad", None),
     ("<undefined>", None), ("", None), (None, None), ("s", None)],
)
def test_length_units(units, factor):
    got = length_unit_to_A(units)
    if factor is None:
        assert got is None
    else:
        assert math.isclose(got, factor)


def test_normalise_units_maps_undefined_to_none():
    import traits.api as t

    assert normalise_units(t.Undefined) is None
    assert normalise_units("<undefined>") is None
    assert normalise_units(" nm ") == "nm"


def test_experimental_image_validates():
    with pytest.raises(ReaderError, match="n_frames"):
        ExperimentalImage(data=np.zeros((1, 2, 3, 4)), sampling_A=None, axes=[])
    with pytest.raises(ReaderError, match="positive"):
        ExperimentalImage(data=np.zeros((4, 4)), sampling_A=-1.0, axes=[])
    im = ExperimentalImage(data=np.zeros((4, 5)), sampling_A=0.5, axes=[])
    assert im.data.shape == (1, 4, 5)
    assert im.axes[1]["units"] == "nm" and im.axes[1]["scale"] == pytest.approx(0.05)
