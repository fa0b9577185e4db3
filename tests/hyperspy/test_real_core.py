"""The HRTEM methods against the real segmentation core and a tiny trained model.

The model (a compact U-Net trained for a few epochs on dark discs in Poisson noise, with
its OOD reference) is the one tests/segmentation uses; here it checks that the methods
give exactly what the core gives, on the signal's own axes, eagerly and lazily.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _hs_helpers import assert_same_axes  # noqa: E402

pytestmark = pytest.mark.slow


def _discs(n: int, size: int = 64, seed: int = 0, contrast: float = -0.4):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    masks = np.zeros((n, size, size), bool)
    for i in range(n):
        for _ in range(int(rng.integers(1, 3))):
            cy, cx = rng.uniform(10, size - 10, 2)
            r = rng.uniform(4, 9)
            masks[i] |= (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
    frames = rng.poisson(200.0 * (1.0 + contrast * masks)).astype(np.float32)
    return frames, masks


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from napari_hrtem_transfer.evaluation.ood import fit_ood_reference_for_checkpoint
    from napari_hrtem_transfer.io import HRTEMDataset
    from napari_hrtem_transfer.models import CompactUNetConfig
    from napari_hrtem_transfer.training import TrainConfig, train

    a, masks = _discs(12, seed=1)
    ds = HRTEMDataset(images=np.stack([a, a]), defocus_nm=[-5.0, 5.0], sampling_A=0.2, masks=masks)
    out = tmp_path_factory.mktemp("hsmodel") / "model"
    cfg = TrainConfig.pretrain(
        "all",
        model=CompactUNetConfig(channels=(8, 16, 16, 16)),
        epochs=2,
        samples_per_epoch=32,
        batch_size=4,
        patch_size=64,
        lr=3e-3,
        device="cpu",
        precision="fp32",
        num_threads=1,
        deterministic=True,
    )
    train(cfg, ds, out)
    fit_ood_reference_for_checkpoint(out, ds)
    return out


def _series(lazy=False):
    """(image 3, defocus 2 | 64 x 64), non-uniform defocus, offsets, 0.2 Å/px."""
    import hyperspy.api as hs

    frames, masks = _discs(6, seed=5)
    s = hs.signals.Signal2D(
        frames.reshape(2, 3, 64, 64),
        axes=[
            {"name": "defocus", "axis": np.array([-4.0, 9.0]), "units": "nm", "navigate": True},
            {"name": "image", "size": 3, "scale": 1.0, "offset": 0.0, "navigate": True},
            {"name": "y", "size": 64, "scale": 0.02, "offset": 1.0, "units": "nm"},
            {"name": "x", "size": 64, "scale": 0.02, "offset": -3.0, "units": "nm"},
        ],
    )
    s.metadata.General.title = "discs"
    s.set_signal_type("HRTEM")
    if lazy:
        s = s.as_lazy()
        s.data = s.data.rechunk((1, 2, 64, 64))
    return s, masks.reshape(2, 3, 64, 64)


def test_methods_give_what_the_core_gives(registered, tiny_model):
    from napari_hrtem_transfer.segmentation import segment

    s, masks = _series()
    ref = segment(s.data, tiny_model, sampling_A=0.2)
    mask = s.segment(model=tiny_model)
    assert_same_axes(s, mask)
    np.testing.assert_array_equal(mask.data, ref.labels)
    prov = mask.metadata.HRTEM_transfer.segmentation
    assert len(prov.weights_sha256) == 64 and prov.threshold == 0.5
    ood = s.ood_score(model=tiny_model)
    assert ood.axes_manager.signal_shape == (3, 2)
    np.testing.assert_allclose(ood.data, ref.ood_score)
    ev = s.evaluate(masks, model=tiny_model)
    from napari_hrtem_transfer.evaluation.metrics import dice

    np.testing.assert_allclose(
        ev["dice"].data.ravel(), dice(ref.labels.reshape(-1, 64, 64), masks.reshape(-1, 64, 64))
    )


def test_lazy_equals_eager_with_the_real_core(registered, tiny_model):
    from hyperspy._signals.lazy import LazySignal

    eager, _ = _series()
    lazy, _ = _series(lazy=True)
    m_lazy = lazy.segment(model=tiny_model, probabilities=True)
    o_lazy = lazy.ood_score(model=tiny_model)
    assert isinstance(m_lazy, LazySignal) and isinstance(o_lazy, LazySignal)
    assert len(m_lazy.metadata.HRTEM_transfer.segmentation.weights_sha256) == 64
    m_lazy.compute()
    o_lazy.compute()
    np.testing.assert_allclose(
        m_lazy.data, eager.segment(model=tiny_model, probabilities=True).data, atol=1e-6
    )
    np.testing.assert_allclose(o_lazy.data, eager.ood_score(model=tiny_model).data, rtol=1e-6)
    assert_same_axes(eager, m_lazy)


def test_lazy_and_eager_ood_score_record_the_models_caution_level(registered):
    """Issue 18: a lazy ood_score recorded caution_level 1.0 (a fallback) where the shipped
    model's is 4.39. Both must record the level of the model's OOD reference."""
    import hyperspy.api as hs

    from napari_hrtem_transfer.evaluation.ood import load_ood_reference
    from napari_hrtem_transfer.segmentation import pretrained_model_dir, resolve_model

    loaded = resolve_model("pretrained", device="cpu")
    ref = load_ood_reference(pretrained_model_dir(), loaded.info.get("weights_sha256"))
    level = float(ref.caution_level)
    assert np.isfinite(level) and level != 1.0
    frames, _ = _discs(2, size=64, seed=9)
    s = hs.signals.Signal2D(frames)
    for ax in s.axes_manager.signal_axes:
        ax.scale, ax.units = loaded.sampling_A / 10.0, "nm"
    s.set_signal_type("HRTEM")
    lazy = s.as_lazy()
    o_lazy = lazy.ood_score(device="cpu")  # recorded before anything is computed
    o_eager = s.ood_score(device="cpu")
    for o in (o_eager, o_lazy):
        assert o.metadata.HRTEM_transfer.ood.caution_level == pytest.approx(level)
    o_lazy.compute()
    np.testing.assert_allclose(o_lazy.data, o_eager.data, rtol=1e-5)


def test_lazy_stack_at_a_wrong_pixel_size_is_refused_at_call_time(registered, tiny_model):
    """Issue 18: refused only at compute(), naming the frame "data"; now at the call,
    naming the signal."""
    from napari_hrtem_transfer.errors import ConfigError

    lazy, _ = _series(lazy=True)
    for ax in lazy.axes_manager.signal_axes:
        ax.scale = 2.0  # nm: 100x the model's pixel size
    lazy.metadata.General.title = "far too coarse"
    for method in (lazy.segment, lazy.ood_score):
        with pytest.raises(ConfigError, match="signal 'far too coarse'.*resampling by more"):
            method(model=tiny_model)


def test_nonuniform_defocus_hspy_survives_the_methods(registered, tiny_model, tmp_path):
    """A plain HyperSpy defocus x image .hspy with a non-uniform defocus axis: mask and OOD
    map keep its axes, eagerly and lazily."""
    import hyperspy.api as hs
    from hyperspy.axes import DataAxis, UniformDataAxis

    frames, _ = _discs(6, seed=7)
    s = hs.signals.Signal2D(
        frames.reshape(3, 2, 64, 64),
        axes=[
            DataAxis(axis=[-12.0, 0.0, 7.5], name="defocus", units="nm", navigate=True),
            UniformDataAxis(size=2, name="image", navigate=True),
            UniformDataAxis(size=64, scale=0.02, offset=1.0, units="nm", name="y"),
            UniformDataAxis(size=64, scale=0.02, offset=-2.0, units="nm", name="x"),
        ],
    )
    s.save(tmp_path / "series.hspy")
    for lazy in (False, True):
        t = hs.load(tmp_path / "series.hspy", lazy=lazy)
        t.set_signal_type("HRTEM")
        mask = t.segment(model=tiny_model)
        assert_same_axes(t, mask)
        ood = t.ood_score(model=tiny_model)
        ax = ood.axes_manager["defocus"]
        assert not ax.is_uniform
        np.testing.assert_array_equal(ax.axis, [-12.0, 0.0, 7.5])


def test_pretrained_model_on_a_single_image(registered):
    from napari_hrtem_transfer.segmentation import pretrained_model_dir

    pretrained_model_dir()  # the package ships its model: a missing one fails here
    s, _ = _series()
    one = s.inav[0, 0]
    mask = one.segment()
    assert mask.data.shape == (64, 64) and mask.axes_manager.navigation_dimension == 0
    assert_same_axes(one, mask)


def test_finetune_on_labelled_frames_gives_a_usable_checkpoint(registered, tiny_model, tmp_path):
    s, masks = _series()
    labels = masks.astype(np.uint8)
    labels[1] = 0  # the second defocus is not annotated: ignored
    out = s.finetune(
        labels,
        model=tiny_model,
        freeze="encoder",
        epochs=1,
        out=tmp_path / "ft",
        samples_per_epoch=8,
        batch_size=4,
        device="cpu",
        precision="fp32",
        num_threads=1,
    )
    assert out == tmp_path / "ft" and (out / "best.json").is_file()
    mask = s.segment(model=out)
    assert_same_axes(s, mask)
    assert mask.metadata.HRTEM_transfer.segmentation.model_path == str(out)


def test_uncalibrated_signal_is_named_in_the_core_warning(registered, tiny_model):
    from napari_hrtem_transfer.segmentation import SegmentationWarning

    s, _ = _series()
    one = s.inav[0, 0]
    for ax in one.axes_manager.signal_axes:
        ax.scale, ax.units = 1.0, ""
    one.metadata.General.title = "bare frame"
    with pytest.warns(SegmentationWarning, match="bare frame.*pixel size is unknown"):
        one.segment(model=tiny_model)


def test_ood_score_components_on_the_series_axes(registered, tiny_model):
    """components=True: the verdict's parts as signals on the input's navigation axes (the
    non-uniform defocus kept), equal to the core's frame rows; lazy gives the same."""
    from napari_hrtem_transfer.segmentation import segment

    s, _ = _series()
    parts = s.ood_score(tiny_model, device="cpu", components=True)
    rows = segment(s, tiny_model, device="cpu", probabilities=False).frame_table()
    assert {"score", "caution", "estimated_defocus_nm", "network", "blank"} <= set(parts)
    for key, sig in parts.items():
        assert sig.data.shape == (2, 3), key
        assert list(sig.axes_manager.signal_axes[1].axis) == [-4.0, 9.0], key
    score = parts["score"].data.reshape(-1)
    np.testing.assert_allclose(score, [r["ood_score"] for r in rows])
    np.testing.assert_allclose(
        parts["network"].data.reshape(-1), [r["ood_components"]["network"] for r in rows]
    )
    meta = parts["score"].metadata.HRTEM_transfer.ood
    # nested lists are stored as JSON text (HyperSpy metadata holds flat values)
    reasons = json.loads(meta.reasons) if isinstance(meta.reasons, str) else meta.reasons
    assert reasons == [r["reasons"] for r in rows]
    caution = json.loads(meta.caution) if isinstance(meta.caution, str) else meta.caution
    assert list(caution) == [r["caution"] for r in rows]
    np.testing.assert_array_equal(parts["caution"].data.reshape(-1), caution)
    assert np.isfinite(meta.caution_level)
    lazy, _ = _series(lazy=True)
    lparts = lazy.ood_score(tiny_model, device="cpu", components=True)
    np.testing.assert_allclose(lparts["score"].data, parts["score"].data, rtol=1e-5)


def test_a_lazy_signal_is_verdicted_with_its_recorded_beam_energy(registered, monkeypatch):
    """Each chunk of a lazy signal reaches the core with the conditions recorded on the
    signal (here 200 kV and, as a simulated signal records it, Cs 0.02 mm), as the eager
    signal does, not with the model's training values."""
    import hyperspy.api as hs

    from napari_hrtem_transfer.evaluation.ood import components as comp
    from napari_hrtem_transfer.segmentation import resolve_model

    seen: list[dict] = []
    orig = comp.physics_components

    def spy(*a, conditions=None, **kw):
        seen.append(dict(conditions or {}))
        return orig(*a, conditions=conditions, **kw)

    monkeypatch.setattr(comp, "physics_components", spy)
    loaded = resolve_model("pretrained", device="cpu")
    frames, _ = _discs(2, size=64, seed=4)
    s = hs.signals.Signal2D(frames)
    for ax in s.axes_manager.signal_axes:
        ax.scale, ax.units = loaded.sampling_A / 10.0, "nm"
    s.metadata.set_item("Acquisition_instrument.TEM.beam_energy", 200.0)
    s.metadata.set_item("HRTEM_transfer.info_json", json.dumps({"config": {"Cs_A": 2e5}}))
    s.set_signal_type("HRTEM")
    eager = s.ood_score(device="cpu")
    assert seen and all(c.get("energy_eV") == 200e3 and c.get("Cs_A") == 2e5 for c in seen)
    seen.clear()
    lazy = s.as_lazy()
    lazy.data = lazy.data.rechunk((1, 64, 64))
    o_lazy = lazy.ood_score(device="cpu")
    o_lazy.compute()
    assert len(seen) == 2
    assert all(c.get("energy_eV") == 200e3 and c.get("Cs_A") == 2e5 for c in seen)
    np.testing.assert_allclose(o_lazy.data, eager.data, rtol=1e-5)
