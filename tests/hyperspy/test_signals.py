"""HRTEM signal types: type assignment, axes kept exactly, lazy twins, .hspy round trip.

The methods are tested here with a stand-in for the segmentation core (``fake_core``, see
conftest.py) whose outputs are simple functions of the input, so the tests check what
this extension does: axes, metadata, navigation shapes, chunking. test_real_core.py runs
them against the real core.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from napari_hrtem_transfer.errors import ConfigError, ReaderError

sys.path.insert(0, str(Path(__file__).parent))
from _hs_helpers import FAKE_CAUTION, assert_same_axes, fake_ood, fake_proba  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("HRTEM_TRANSFER_SHARED_DIR") or REPO.parent / "shared") / "data"


def _nav2d(lazy=False):
    """(image 3, defocus 2 non-uniform | 8 x 9) with offsets everywhere, type HRTEM."""
    import hyperspy.api as hs

    rng = np.random.default_rng(0)
    s = hs.signals.Signal2D(
        rng.poisson(50, (2, 3, 8, 9)).astype(np.float32),
        axes=[
            {"name": "defocus", "axis": np.array([-7.5, 12.0]), "units": "nm", "navigate": True},
            {
                "name": "time",
                "size": 3,
                "scale": 0.8,
                "offset": 2.0,
                "units": "s",
                "navigate": True,
            },
            {"name": "y", "size": 8, "scale": 0.05, "offset": -1.25, "units": "nm"},
            {"name": "x", "size": 9, "scale": 0.05, "offset": 3.5, "units": "nm"},
        ],
    )
    s.metadata.General.title = "focal series"
    s.metadata.set_item("Acquisition_instrument.TEM.beam_energy", 300.0)
    s.original_metadata.set_item("Optics.Defocus", -2e-8)
    s.set_signal_type("HRTEM")
    return s.as_lazy() if lazy else s


# ----------------------------------------------------------------------------- types


def test_set_signal_type_gives_hrtem_and_lazy_twin(registered):
    from napari_hrtem_transfer.hyperspy import HRTEM, LazyHRTEM

    s = _nav2d()
    assert type(s) is HRTEM
    assert s.metadata.Signal.signal_type == "HRTEM"
    lazy = s.as_lazy()
    assert type(lazy) is LazyHRTEM
    assert type(lazy.deepcopy()) is LazyHRTEM
    assert_same_axes(s, lazy)
    assert s.sampling_A == pytest.approx(0.5)  # 0.05 nm


def test_alias_and_direct_construction(registered):
    import hyperspy.api as hs

    from napari_hrtem_transfer.hyperspy import HRTEM

    s = hs.signals.Signal2D(np.ones((4, 4)))
    s.set_signal_type("HRTEM image")
    assert isinstance(s, HRTEM) and s.metadata.Signal.signal_type == "HRTEM"
    direct = HRTEM(np.ones((2, 4, 4)))
    assert direct.metadata.Signal.signal_type == "HRTEM"
    assert direct.axes_manager.navigation_shape == (2,)


def test_spectrum_does_not_become_hrtem(registered):
    import hyperspy.api as hs

    from napari_hrtem_transfer.hyperspy import HRTEM

    s = hs.signals.Signal1D(np.ones((3, 50)))
    s.set_signal_type("HRTEM")
    assert not isinstance(s, HRTEM)  # no 1-D HRTEM class: HyperSpy keeps a Signal1D


def test_spectrum_handed_to_methods_is_refused_by_name(fake_core):
    import hyperspy.api as hs

    from napari_hrtem_transfer.hyperspy import HRTEM

    sp = hs.signals.Signal1D(np.ones((3, 50)))
    sp.metadata.General.title = "EELS line"
    with pytest.raises(ReaderError, match="EELS line.*spectrum"):
        HRTEM.segment(sp)
    assert fake_core.calls == []


def _image_signals():
    import hyperspy.api as hs

    found = []
    for path in sorted(DATA.rglob("*")):
        if path.suffix.lower() in {".md", ".csv", ".mat"} or path.name.endswith("_1.ser"):
            continue
        if not path.is_file():
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = hs.load(path)
        for i, s in enumerate(loaded if isinstance(loaded, list) else [loaded]):
            if s.axes_manager.signal_dimension == 2:
                found.append(pytest.param(path, i, id=f"{path.parent.name}/{path.name}[{i}]"))
    return found


@pytest.mark.skipif(not DATA.exists(), reason="shared microscope files not present")
@pytest.mark.parametrize(("path", "index"), _image_signals() if DATA.exists() else [])
def test_every_shared_image_file_takes_the_type_and_keeps_axes(path, index, registered, fake_core):
    import hyperspy.api as hs

    from napari_hrtem_transfer.hyperspy import HRTEM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = hs.load(path)
    s = loaded[index] if isinstance(loaded, list) else loaded
    before = s.deepcopy()
    s.set_signal_type("HRTEM")
    assert isinstance(s, HRTEM)
    assert_same_axes(before, s)
    assert s.metadata.General.title == before.metadata.General.title
    units = {str(ax.units) for ax in s.axes_manager.signal_axes}
    title = s.metadata.General.title
    if any(u.startswith("1/") for u in units):
        with pytest.raises(ReaderError, match="diffraction pattern"):
            s.segment()
        assert title in str(pytest.raises(ReaderError, s.segment).value)
        return
    if s.data.dtype.names:  # RGB export: the reader converts to grey; not an HRTEM frame
        return
    mask = s.segment()
    assert_same_axes(s, mask)
    assert mask.data.dtype == np.uint8 and mask.data.shape == s.data.shape
    assert fake_core.calls[-1]["sampling_A"] == (
        pytest.approx(s.sampling_A) if s.sampling_A else None
    )
    assert mask.metadata.Signal.quantity.startswith("Particle mask")
    assert mask.metadata.Signal.signal_type == ""
    assert str(mask.original_metadata) == str(s.original_metadata)
    np.testing.assert_array_equal(mask.data, (fake_proba(s.data) > 0.5).astype(np.uint8))


# ----------------------------------------------------------------------------- methods


def test_segment_keeps_2d_navigation_metadata_and_records_provenance(registered, fake_core):
    s = _nav2d()
    mask = s.segment(model="my_model", threshold=0.7)
    assert mask.axes_manager.navigation_shape == (3, 2)
    assert_same_axes(s, mask)
    assert mask.metadata.Acquisition_instrument.TEM.beam_energy == 300.0
    assert mask.original_metadata.Optics.Defocus == -2e-8
    prov = mask.metadata.HRTEM_transfer.segmentation
    assert prov.threshold == 0.7 and prov.model == "my_model" and prov.weights_sha256 == "0" * 64
    assert prov.sampling_A == pytest.approx(0.5)
    np.testing.assert_array_equal(mask.data, fake_proba(s.data) > 0.7)
    assert fake_core.calls[-1]["sampling_A"] == pytest.approx(0.5)

    proba = s.segment(probabilities=True)
    assert proba.data.dtype == np.float32
    assert proba.metadata.Signal.quantity == "Particle probability"
    assert_same_axes(s, proba)
    # the input is untouched
    assert s.metadata.Signal.signal_type == "HRTEM"


def test_ood_score_is_a_map_over_the_navigation_axes(registered, fake_core):
    import hyperspy.api as hs

    s = _nav2d()
    ood = s.ood_score()
    assert isinstance(ood, hs.signals.Signal2D)
    assert ood.axes_manager.signal_shape == s.axes_manager.navigation_shape
    nav = [ax for ax in s.axes_manager.navigation_axes]
    for a, b in zip(ood.axes_manager.signal_axes, nav, strict=True):
        assert (a.name, a.units, a.is_uniform) == (b.name, b.units, b.is_uniform)
        np.testing.assert_array_equal(a.axis, b.axis)
    np.testing.assert_allclose(ood.data, fake_ood(s.data))
    assert ood.metadata.Signal.quantity.startswith("OOD score")
    # the model's caution level, eagerly and lazily (a lazy signal recorded 1.0: issue 18)
    assert ood.metadata.HRTEM_transfer.ood.caution_level == FAKE_CAUTION
    lazy = s.as_lazy().ood_score()
    assert lazy.metadata.HRTEM_transfer.ood.caution_level == FAKE_CAUTION
    ood.plot()  # plottable as a map


def test_ood_score_one_axis_and_single_image(registered, fake_core):
    import hyperspy.api as hs

    s = _nav2d().inav[0]  # time index 0: defocus stays
    ood = s.ood_score()
    assert isinstance(ood, hs.signals.Signal1D)
    assert ood.axes_manager.signal_axes[0].name == "defocus"
    np.testing.assert_array_equal(ood.axes_manager.signal_axes[0].axis, [-7.5, 12.0])
    single = _nav2d().inav[0, 0]
    one = single.ood_score()
    assert one.data.shape == (1,)
    assert one.data[0] == pytest.approx(float(single.data.mean()))


def test_evaluate_per_frame_against_metrics(registered, fake_core):
    from napari_hrtem_transfer.evaluation.metrics import binary_cross_entropy, dice, iou

    s = _nav2d()
    truth = s._deepcopy_with_new_data((s.data > np.median(s.data)).astype(np.uint8))
    truth.metadata.General.title = "hand labels"
    res = s.evaluate(truth, threshold=0.5)
    assert set(res) == {"loss", "dice", "iou"}
    frames = s.data.reshape(-1, 8, 9)
    t = truth.data.reshape(-1, 8, 9) > 0
    p = fake_proba(frames)
    np.testing.assert_allclose(
        res["loss"].data.ravel(), binary_cross_entropy(p, t, from_logits=False)
    )
    np.testing.assert_allclose(res["dice"].data.ravel(), dice(p > 0.5, t))
    np.testing.assert_allclose(res["iou"].data.ravel(), iou(p > 0.5, t))
    assert res["dice"].axes_manager.signal_shape == (3, 2)
    assert res["iou"].metadata.HRTEM_transfer.evaluation.masks == "hand labels"


def test_label_signal_of_another_shape_is_refused_by_name(registered, fake_core):
    import hyperspy.api as hs

    s = _nav2d()
    wrong = hs.signals.Signal2D(np.zeros((3, 8, 9), np.uint8))
    wrong.metadata.General.title = "labels of one defocus"
    with pytest.raises(ConfigError, match="labels of one defocus.*focal series"):
        s.evaluate(wrong)
    with pytest.raises(ConfigError, match="labels of one defocus"):
        s.finetune(wrong, out="never")
    assert fake_core.calls == []


def test_diffraction_units_refused_and_uncalibrated_warns(registered, fake_core):
    import hyperspy.api as hs

    dp = hs.signals.Signal2D(np.ones((6, 6)))
    for ax in dp.axes_manager.signal_axes:
        ax.units = "1/nm"
    dp.metadata.General.title = "SAED"
    dp.set_signal_type("HRTEM")
    with pytest.raises(ReaderError, match="SAED.*1/nm.*diffraction"):
        dp.segment()
    with pytest.raises(ReaderError, match="SAED"):
        dp.ood_score()
    raw = hs.signals.Signal2D(np.random.default_rng(1).random((6, 6)))
    raw.metadata.General.title = "no calibration"
    raw.set_signal_type("HRTEM")
    raw.segment()  # eager: the core gets the signal and warns itself (test_real_core)
    assert fake_core.calls[-1]["sampling_A"] is None
    # lazy: chunks reach the core as arrays, so the method warns, naming the signal
    with pytest.warns(UserWarning, match="no calibration.*no real-space calibration"):
        lazy_mask = raw.as_lazy().segment()
    lazy_mask.compute()
    assert fake_core.calls[-1]["sampling_A"] is None
    raw.segment(sampling_A=0.4)
    assert fake_core.calls[-1]["sampling_A"] == 0.4
    # the overriding pixel size also rescues a diffraction pattern? no: units still refused
    with pytest.raises(ReaderError, match="SAED"):
        dp.segment(sampling_A=0.4)


def test_finetune_passes_frames_and_returns_the_folder(registered, monkeypatch, tmp_path):
    import types

    seen = {}

    def finetune_on_annotations(images, labels, *, model, out_dir, sampling_A, freeze, **kw):
        seen.update(
            images=images, labels=labels, model=model, sampling_A=sampling_A, freeze=freeze, **kw
        )
        return types.SimpleNamespace(out_dir=out_dir)

    fake = types.ModuleType("napari_hrtem_transfer.annotations")
    fake.finetune_on_annotations = finetune_on_annotations
    monkeypatch.setitem(sys.modules, "napari_hrtem_transfer.annotations", fake)
    s = _nav2d()
    labels = s._deepcopy_with_new_data(np.zeros(s.data.shape, np.uint8))
    labels.data[1, 2, 2:4, 2:4] = 1
    out = s.finetune(labels, model="pretrained", freeze="none", epochs=3, out=tmp_path / "m")
    assert out == tmp_path / "m"
    assert seen["images"].shape == (6, 8, 9) and seen["labels"].shape == (6, 8, 9)
    assert seen["labels"][5].sum() == 4  # frame (defocus 1, time 2) in array order
    assert (seen["sampling_A"], seen["freeze"], seen["epochs"]) == (pytest.approx(0.5), "none", 3)


# ----------------------------------------------------------------------------- lazy


def test_lazy_equals_eager_and_stays_lazy_chunk_by_chunk(registered, fake_core):
    from hyperspy._signals.lazy import LazySignal

    eager = _nav2d()
    lazy = _nav2d(lazy=True)
    lazy.data = lazy.data.rechunk((1, 3, 4, 9))  # split the signal axes too: must be fixed
    mask = lazy.segment()
    ood = lazy.ood_score()
    ev = lazy.evaluate(eager._deepcopy_with_new_data((eager.data > 50).astype(np.uint8)))
    assert fake_core.calls == []  # nothing computed yet
    assert isinstance(mask, LazySignal) and isinstance(ood, LazySignal)
    assert isinstance(ev["dice"], LazySignal)
    assert_same_axes(lazy, mask)
    mask.compute()
    # one call per navigation chunk, each with whole frames
    assert [c["shape"] for c in fake_core.calls] == [(1, 3, 8, 9), (1, 3, 8, 9)]
    np.testing.assert_array_equal(mask.data, eager.segment().data)
    ood.compute()
    np.testing.assert_allclose(ood.data, eager.ood_score().data)
    ev_eager = eager.evaluate(eager._deepcopy_with_new_data((eager.data > 50).astype(np.uint8)))
    for key in ("loss", "dice", "iou"):
        ev[key].compute()
        np.testing.assert_allclose(ev[key].data, ev_eager[key].data)


# ----------------------------------------------------------------------------- files


def test_hspy_round_trip_keeps_type_and_axes(registered, tmp_path):
    import hyperspy.api as hs

    from napari_hrtem_transfer.hyperspy import HRTEM, LazyHRTEM

    s = _nav2d()
    s.save(tmp_path / "s.hspy")
    back = hs.load(tmp_path / "s.hspy")
    assert type(back) is HRTEM
    assert_same_axes(s, back)
    assert type(hs.load(tmp_path / "s.hspy", lazy=True)) is LazyHRTEM


def _dataset():
    from napari_hrtem_transfer.io import HRTEMDataset

    rng = np.random.default_rng(3)
    masks = rng.random((2, 6, 7)) > 0.6
    return HRTEMDataset(
        images=rng.poisson(20, (3, 2, 6, 7)).astype(np.uint16),
        defocus_nm=[-10.0, 0.0, 25.0],
        sampling_A=0.3,
        masks=masks,
    )


def test_defocus_series_masks_have_the_images_axes(registered, tmp_path):
    import hyperspy.api as hs

    from napari_hrtem_transfer.hyperspy import HRTEMDefocusSeries, LazyHRTEMDefocusSeries
    from napari_hrtem_transfer.io.dataset import save_dataset

    ds = _dataset()
    path = save_dataset(ds, tmp_path / "sim.hspy")
    for lazy in (False, True):
        s = hs.load(path, lazy=lazy)
        s.set_signal_type("HRTEM_defocus_series")
        assert type(s) is (LazyHRTEMDefocusSeries if lazy else HRTEMDefocusSeries)
        np.testing.assert_array_equal(s.defocus_nm, [-10.0, 0.0, 25.0])
        m = s.masks
        assert_same_axes(s, m)
        assert m._lazy == lazy
        data = np.asarray(m.data.compute() if lazy else m.data)
        np.testing.assert_array_equal(data, np.broadcast_to(ds.masks, (3, 2, 6, 7)))
        assert m.metadata.Signal.quantity.startswith("Particle mask")
        assert not m.metadata.has_item("HRTEM_transfer.masks")


def test_simulated_file_loads_with_the_type(registered, tmp_path):
    import hyperspy.api as hs

    from napari_hrtem_transfer.hyperspy import HRTEMDefocusSeries
    from napari_hrtem_transfer.io.dataset import save_dataset

    path = save_dataset(_dataset(), tmp_path / "sim.hspy")
    s = hs.load(path)
    assert s.metadata.get_item("Signal.signal_type", "") == "HRTEM_defocus_series"
    assert isinstance(s, HRTEMDefocusSeries)


def test_importing_the_subpackage_is_light():
    code = (
        "import sys, napari_hrtem_transfer.hyperspy as h; "
        "assert 'hyperspy' not in sys.modules and 'torch' not in sys.modules, "
        "sorted(m for m in sys.modules if m.split('.')[0] in ('hyperspy', 'torch'))"
    )
    import subprocess

    subprocess.run([sys.executable, "-c", code], check=True)


def test_session_folder_to_segmented_stack(registered, fake_core, tmp_path):
    import hyperspy.api as hs

    from napari_hrtem_transfer.hyperspy import HRTEM
    from napari_hrtem_transfer.io.sessions import load_session

    rng = np.random.default_rng(4)
    for name, value in (("f_b.tif", 2.0), ("f_a.tif", 1.0)):
        s = hs.signals.Signal2D(rng.random((16, 16)).astype(np.float32) + value)
        for ax in s.axes_manager.signal_axes:
            ax.scale, ax.units, ax.offset = 0.05, "nm", 0.5
        s.save(tmp_path / name)
    session = load_session(tmp_path, defocus_nm=[20.0, -10.0])  # per file, in folder order
    assert isinstance(session, HRTEM)
    mask = session.segment()
    assert_same_axes(session, mask)
    nav = mask.axes_manager.navigation_axes[0]
    assert (nav.name, nav.units, nav.offset, nav.scale) == ("defocus", "nm", -10.0, 30.0)
    assert mask.metadata.HRTEM_transfer.session.defocus_source[0] == "user (defocus_nm)"
    assert session.data[0].mean() > session.data[1].mean()  # f_b.tif (-10 nm) sorted first


def test_typed_dataset_file_still_reads_everywhere(registered, tmp_path):
    """What io/dataset.py will write (signal_type set): every reader keeps working."""
    import hyperspy.api as hs

    from napari_hrtem_transfer.hyperspy import HRTEMDefocusSeries, LazyHRTEMDefocusSeries
    from napari_hrtem_transfer.io.dataset import load_dataset, save_dataset
    from napari_hrtem_transfer.io.readers import read_images

    ds = _dataset()
    save_dataset(ds, tmp_path / "typed.hspy")  # writes the signal type
    assert type(hs.load(tmp_path / "typed.hspy")) is HRTEMDefocusSeries
    lazy = hs.load(tmp_path / "typed.hspy", lazy=True)
    assert type(lazy) is LazyHRTEMDefocusSeries
    np.testing.assert_array_equal(lazy.masks.data.compute()[2], ds.masks)
    back = load_dataset(tmp_path / "typed.hspy", lazy=False)
    np.testing.assert_array_equal(back.images, ds.images)
    (series,) = read_images(tmp_path / "typed.hspy")  # one defocus x image stack
    assert series.nav_shape == (ds.n_defocus, ds.n_images)
    np.testing.assert_array_equal(series.frames(), ds.images)
