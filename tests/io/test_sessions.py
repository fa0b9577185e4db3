"""Experimental sessions: many files -> one HRTEM stack with a defocus/time/frame axis."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from napari_hrtem_transfer.errors import ReaderError
from napari_hrtem_transfer.io.readers import ExperimentalImage, ReaderWarning
from napari_hrtem_transfer.io.sessions import _vendor_defocus, load_session, session_files

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("HRTEM_TRANSFER_SHARED_DIR") or REPO.parent / "shared")
VELOX_STACK = SHARED / "data" / "emd_velox" / "rsciio_fei_example_tem_stack.emd"


def velox(path: Path, defocus_m: float | None, frame: int = 0) -> Path:
    """A one-frame Velox file cut from the real 2-frame Ceta stack, its Optics.Defocus set."""
    import h5py

    shutil.copy(VELOX_STACK, path)
    os.chmod(path, 0o644)
    with h5py.File(path, "r+") as f:
        group = f["Data/Image"]
        g = group[next(iter(group))]
        data = g["Data"][:, :, frame : frame + 1]
        meta = g["Metadata"][:, frame : frame + 1]
        md = json.loads(bytes(meta[:, 0]).rstrip(b"\0").decode())
        if defocus_m is None:
            md["Optics"].pop("Defocus", None)
        else:
            md["Optics"]["Defocus"] = repr(defocus_m)
        raw = np.frombuffer(json.dumps(md).encode(), np.uint8)
        col = np.zeros((meta.shape[0], 1), np.uint8)
        col[: raw.size, 0] = raw
        table = g["FrameLookupTable"][frame : frame + 1]
        for key in ("Data", "Metadata", "FrameLookupTable"):
            del g[key]
        g.create_dataset("Data", data=data)
        g.create_dataset("Metadata", data=col)
        g.create_dataset("FrameLookupTable", data=table)
    return path


def image_file(path: Path, data, nm_per_px: float | None, date=None, time=None) -> Path:
    """A calibrated image written with HyperSpy (.tif or .hspy)."""
    import hyperspy.api as hs

    s = hs.signals.Signal2D(np.asarray(data, np.float32))
    if nm_per_px is not None:
        for ax in s.axes_manager.signal_axes:
            ax.scale, ax.units = nm_per_px, "nm"
    if date:
        s.metadata.General.date, s.metadata.General.time = date, time
    s.save(path, overwrite=True)
    return path


needs_velox = pytest.mark.skipif(not VELOX_STACK.exists(), reason="shared Velox file absent")


@needs_velox
def test_velox_session_stacks_by_vendor_defocus(tmp_path):
    # read-outs are Thermo Fisher's (negative = underfocus); the axis is abTEM's (positive)
    velox(tmp_path / "a.emd", -20e-9)  # -> +20 nm
    velox(tmp_path / "b.emd", 10e-9, frame=1)  # -> -10 nm
    velox(tmp_path / "c.emd", -4e-9)  # -> +4 nm
    (tmp_path / "notes.txt").write_text("operator notes")
    with pytest.warns(ReaderWarning, match="notes.txt"):
        s = load_session(tmp_path)
    assert s.metadata.Signal.signal_type == "HRTEM"  # an HRTEM signal once registered
    nav = s.axes_manager.navigation_axes[0]
    assert (nav.name, nav.units, nav.is_uniform) == ("defocus", "nm", False)
    np.testing.assert_allclose(nav.axis, [-10.0, 4.0, 20.0])
    meta = s.metadata.HRTEM_transfer.session
    assert [Path(p).name for p in meta.files] == ["b.emd", "c.emd", "a.emd"]
    assert all(src.startswith("Velox Optics.Defocus") for src in meta.defocus_source)
    assert meta.axis == "defocus"
    from napari_hrtem_transfer.io.readers import read_images

    for i, name in enumerate(["b.emd", "c.emd", "a.emd"]):
        np.testing.assert_array_equal(s.data[i], read_images(tmp_path / name)[0].data[0])
    # the signal axes are the file's (pm, with the file's offset)
    first = read_images(tmp_path / "b.emd")[0].axes[2]
    x = s.axes_manager.signal_axes[0]
    assert (x.units, x.scale, x.offset) == (first["units"], first["scale"], first["offset"])
    assert s.metadata.Acquisition_instrument.TEM.beam_energy == pytest.approx(300.0)


@needs_velox
def test_user_defocus_wins_and_is_recorded(tmp_path):
    velox(tmp_path / "x1.emd", -20e-9)
    velox(tmp_path / "x2.emd", -30e-9)
    s = load_session([tmp_path / "x2.emd", tmp_path / "x1.emd"], defocus_nm=[8.0, -2.0])
    nav = s.axes_manager.navigation_axes[0]
    assert (nav.name, nav.offset, nav.scale) == ("defocus", -2.0, 10.0)
    meta = s.metadata.HRTEM_transfer.session
    assert [Path(p).name for p in meta.files] == ["x1.emd", "x2.emd"]
    assert list(meta.defocus_source) == ["user (defocus_nm)"] * 2
    table = json.loads(meta.table_json)
    assert "vendor metadata says 20 nm" in table[0]["notes"][0]


def test_without_defocus_time_then_file_order(tmp_path):
    rng = np.random.default_rng(0)
    frames = rng.random((3, 16, 16))
    image_file(tmp_path / "img10.hspy", frames[0], 0.05, "2024-05-01", "10:00:30")
    image_file(tmp_path / "img2.hspy", frames[1], 0.05, "2024-05-01", "10:00:00")
    image_file(tmp_path / "img1.hspy", frames[2], 0.05, "2024-05-01", "10:01:10")
    with pytest.warns(ReaderWarning, match="acquisition time"):
        s = load_session(tmp_path)
    nav = s.axes_manager.navigation_axes[0]
    assert (nav.name, nav.units) == ("time", "s")
    np.testing.assert_allclose(nav.axis, [0.0, 30.0, 70.0])
    np.testing.assert_allclose(s.data, frames[[1, 0, 2]].astype(np.float32))
    # no times: natural file order, index axis
    for i, name in enumerate(["b10.hspy", "b2.hspy"]):
        image_file(tmp_path / name, frames[i], 0.05)
    with pytest.warns(ReaderWarning, match="file order"):
        s = load_session([tmp_path / "b2.hspy", tmp_path / "b10.hspy"])
    assert s.axes_manager.navigation_axes[0].name == "frame"
    np.testing.assert_allclose(s.data, frames[[1, 0]].astype(np.float32))
    assert [p.name for p in session_files(tmp_path)][:3] == ["b2.hspy", "b10.hspy", "img1.hspy"]


def test_mixed_pixel_sizes_are_reported_and_resampled_on_request(tmp_path):
    yy, xx = np.mgrid[:64, :64]
    fine = np.sin(xx / 5.0) + np.cos(yy / 7.0)
    image_file(tmp_path / "f1.tif", fine, 0.1)
    image_file(tmp_path / "f2.tif", fine + 1, 0.1)
    image_file(tmp_path / "coarse.tif", fine[::2, ::2], 0.2)
    with pytest.raises(ReaderError, match=r"coarse.*32x32 px, 2 Å/px.*resample=True"):
        load_session(tmp_path, defocus_nm=[0, 10, 20])
    s = load_session(tmp_path, defocus_nm=[0, 10, 20], resample=True)
    assert s.data.shape == (3, 64, 64)
    assert s.axes_manager.signal_axes[0].scale == pytest.approx(0.1)
    notes = list(s.metadata.HRTEM_transfer.session.notes)
    assert any("coarse" in n and "resampled from 2 to 1 Å/px" in n for n in notes)
    # resampled frame follows the fine one (linear interpolation of a smooth pattern)
    i = [Path(p).name for p in s.metadata.HRTEM_transfer.session.files].index("coarse.tif")
    assert np.corrcoef(s.data[i][4:-4, 4:-4].ravel(), fine[4:-4, 4:-4].ravel())[0, 1] > 0.95


def test_not_images_are_skipped_by_name_and_the_rest_loads(tmp_path):
    import hyperspy.api as hs

    image_file(tmp_path / "good1.tif", np.ones((8, 8)), 0.1)
    image_file(tmp_path / "good2.tif", np.zeros((8, 8)), 0.1)
    hs.signals.Signal1D(np.ones(100)).save(tmp_path / "spectrum.hspy")
    dp = hs.signals.Signal2D(np.ones((8, 8)))
    for ax in dp.axes_manager.signal_axes:
        ax.units = "1/nm"
    dp.save(tmp_path / "diffraction.hspy")
    (tmp_path / "labels.csv").write_text("a,b\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = load_session(tmp_path)
    text = " ".join(str(w.message) for w in caught)
    for name in ("spectrum.hspy", "diffraction.hspy", "labels.csv"):
        assert name in text
    assert "1/nm" in text and "1-D signal" in text
    assert s.data.shape == (2, 8, 8)
    skipped = " ".join(s.metadata.HRTEM_transfer.session.skipped)
    assert "spectrum.hspy" in skipped and "diffraction.hspy" in skipped


def test_bad_sessions(tmp_path):
    with pytest.raises(ReaderError, match="not found"):
        load_session(tmp_path / "nope")
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(ReaderError, match="no image files"), pytest.warns(ReaderWarning):
        load_session(tmp_path)
    image_file(tmp_path / "one.tif", np.ones((8, 8)), 0.1)
    image_file(tmp_path / "two.tif", np.ones((8, 8)), 0.1)
    with pytest.raises(ReaderError, match="defocus_nm has 3 values.*2 file"):
        load_session([tmp_path / "one.tif", tmp_path / "two.tif"], defocus_nm=[1, 2, 3])


def test_digitalmicrograph_defocus_tag_needs_a_unit():
    def image(tag, value):
        return ExperimentalImage(
            np.zeros((4, 4)), 0.1, [], metadata={"vendor_defocus": {"tag": tag, "value": value}}
        )

    value, source = _vendor_defocus(image("Microscope Info.Defocus (um)", 0.25))
    assert value == pytest.approx(250.0) and "DigitalMicrograph" in source
    value, source = _vendor_defocus(image("Microscope Info.Defocus", 12))
    assert value is None and "unit unknown" in source


def test_real_tia_files_record_their_defocus_source():
    folder = SHARED / "data" / "tia_ser_emi"
    if not folder.exists():
        pytest.skip("shared TIA files absent")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = load_session([folder / "64x64x5_TEM_preview.emi"])
    meta = s.metadata.HRTEM_transfer.session
    assert s.data.shape == (5, 64, 64)
    assert all("TIA ExperimentalDescription.Defocus_um" in x for x in meta.defocus_source)
    # all five frames say 0 nm: not a defocus series, so an index axis, and a note says why
    assert meta.axis == "frame"
    assert any("same defocus" in n for n in meta.notes)


def test_read_session_is_the_core_without_hyperspy_signals(tmp_path):
    from napari_hrtem_transfer.io.sessions import read_session

    image_file(tmp_path / "a.tif", np.ones((8, 8)), 0.1)
    image_file(tmp_path / "b.tif", np.zeros((8, 8)), 0.1)
    im = read_session(tmp_path, defocus_nm=[30.0, -5.0])
    assert isinstance(im, ExperimentalImage)
    assert im.nav_axes[0]["name"] == "defocus" and im.nav_axes[0]["units"] == "nm"
    assert (im.nav_axes[0]["offset"], im.nav_axes[0]["scale"]) == (-5.0, 35.0)
    assert im.sampling_A == pytest.approx(1.0)
    np.testing.assert_array_equal(im.data[:, 0, 0], [0.0, 1.0])  # b (-5 nm) first
    assert [r["defocus_source"] for r in im.metadata["session"]["table"]] == [
        "user (defocus_nm)"
    ] * 2
