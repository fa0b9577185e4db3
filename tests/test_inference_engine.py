"""The one inference engine: the tiler, tiled = whole-frame output, one loader behind every
front end, and the checkpoint's preprocessing applied exactly as in training."""

from __future__ import annotations

import numpy as np
import pytest

from napari_hrtem_transfer.inference import (
    overlap_for,
    plan_tiles,
    tile_bounds,
    tile_starts,
)


@pytest.mark.parametrize(
    "size,max_tile,overlap,stride",
    [(6768, 2240, 336, 16), (1104, 688, 336, 16), (4096, 1024, 96, 32), (80, 64, 16, 16)],
)
def test_tiles_cover_the_frame_and_keep_their_reach(size, max_tile, overlap, stride):
    plan = plan_tiles(size, size, stride=stride, max_tile=max_tile, overlap=overlap)
    assert plan.ty <= max(max_tile // stride * stride, size) and plan.ty % stride == 0
    assert all(y % stride == 0 for y in plan.ys) and plan.ys[-1] + plan.ty == plan.ph
    owned = np.zeros(plan.ph, int)
    for y0, (a0, a1) in zip(plan.ys, plan.cy, strict=True):
        owned[a0:a1] += 1
        assert y0 <= a0 < a1 <= y0 + plan.ty and a0 % stride == 0
        # every owned pixel is at least (overlap - stride) / 2 from an inner tile edge
        if a0 > 0:
            assert a0 - y0 >= (overlap - stride) // 2
        if a1 < plan.ph:
            assert y0 + plan.ty - a1 >= (overlap - stride) // 2
    assert (owned == 1).all(), "owned regions must partition the axis"


def test_balanced_tiles_waste_fewer_pixels_than_fixed_steps():
    # a 6758 px frame padded to 6768 with 336 px overlap, tiles up to 2240 px
    plan = plan_tiles(6768, 6768, stride=16, max_tile=2240, overlap=336)
    fixed = tile_starts(6768, 2240, 336, 16)
    assert len(plan.ys) <= len(fixed)
    assert plan.n_tiles * plan.ty * plan.tx < len(fixed) ** 2 * 2240**2


def test_fixed_step_starts_and_bounds_helpers():
    starts = tile_starts(1000, 400, 100, 10)
    assert starts[0] == 0 and starts[-1] == 600
    assert all(0 < b - a <= 300 for a, b in zip(starts[:-1], starts[1:], strict=True))
    bounds = tile_bounds(starts, 400, 1000, 10)
    assert bounds[0][0] == 0 and bounds[-1][1] == 1000
    assert all(a[1] == b[0] for a, b in zip(bounds[:-1], bounds[1:], strict=True))
    assert overlap_for(314, 16) == 336


@pytest.fixture(scope="module")
def shipped():
    from napari_hrtem_transfer.inference import load_model

    return load_model("pretrained", device="cpu")


def _frame(shape, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    disc = ((yy % 97 - 48) ** 2 + (xx % 89 - 44) ** 2) < 20**2
    return rng.poisson(200.0 * (1.0 - 0.3 * disc)).astype(np.float32)


def test_tiled_logits_equal_whole_frame_logits_in_fp32(shipped):
    x = _frame((1000, 1040))
    whole = shipped.predict_logits(x, tile_size=2048, precision="fp32")[0]
    plan = shipped.tile_plan(1000, 1040, 600)
    assert plan.n_tiles > 1, "the test must tile"
    tiled = shipped.predict_logits(x, tile_size=600, precision="fp32")[0]
    inner = (slice(16, -16), slice(16, -16))
    # fp32 convolutions of the same inputs: only the summation order may differ
    np.testing.assert_allclose(tiled[inner], whole[inner], rtol=0, atol=1e-4)
    # too little overlap breaks the equality (the test can fail)
    bad = shipped.predict_logits(x, tile_size=600, overlap=32, precision="fp32")[0]
    assert np.abs(bad[inner] - whole[inner]).max() > 1e-3


def test_tiled_pooled_features_equal_whole_frame_features(shipped):
    from napari_hrtem_transfer.evaluation._model import ScoringModel

    sm = ScoringModel(shipped)
    x = _frame((720, 700), seed=3)[None]
    whole = sm.frame_stats(x, want_proba=True, tile_px=2048)
    tiled = sm.frame_stats(x, want_proba=True, tile_px=688)
    np.testing.assert_allclose(tiled.features, whole.features, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(tiled.proba, whole.proba, atol=1e-5)
    np.testing.assert_allclose(tiled.entropy, whole.entropy, rtol=1e-4)
    np.testing.assert_allclose(tiled.band_width_px, whole.band_width_px, rtol=1e-3)


def test_one_pass_gives_the_same_probabilities_as_predict_proba(shipped):
    from napari_hrtem_transfer.evaluation._model import ScoringModel

    x = _frame((512, 512), seed=4)
    p = shipped.predict_proba(x, precision="fp32")
    st = ScoringModel(shipped).frame_stats(x[None], want_proba=True)
    np.testing.assert_allclose(st.proba, p, atol=1e-6)
    # the entropy statistics from the pass equal those of the probability map
    from napari_hrtem_transfer.evaluation._model import boundary_statistics

    bnd, band = boundary_statistics(p)
    np.testing.assert_allclose(st.boundary_entropy, bnd, rtol=1e-4)
    np.testing.assert_allclose(st.band_width_px, band, rtol=1e-4)


def test_preprocessing_is_the_training_pipelines(shipped, monkeypatch):
    """The engine feeds the network exactly apply_normalization(x, checkpoint record), the
    same values as training.data.TrainingData.image gives for the same raw frame."""
    from napari_hrtem_transfer.inference import _engine
    from napari_hrtem_transfer.models.normalization import apply_normalization
    from napari_hrtem_transfer.training.data import TrainingData

    raw = _frame((256, 256), seed=5) * 3.0 + 17.0
    seen = []
    orig = _engine.tile_of

    def spy(frame, *a):
        seen.append(np.array(frame))
        return orig(frame, *a)

    monkeypatch.setattr(_engine, "tile_of", spy)
    shipped.predict_proba(raw, precision="fp32")
    from types import SimpleNamespace

    td = object.__new__(TrainingData)  # only what image() reads: no dataset on disk
    td._cache = {}
    td.config = SimpleNamespace(dose_augment_e_per_A2=None)
    td.normalization = dict(shipped.info["normalization"])

    class _DS:
        images = raw[None, None]
        defocus_nm = [0.0]
        sampling_A = shipped.sampling_A

    td.dataset = _DS()
    train_input = td.image(0, 0)
    np.testing.assert_array_equal(seen[0], apply_normalization(raw, shipped.info["normalization"]))
    np.testing.assert_array_equal(seen[0], train_input)


def test_one_loader_serves_cli_napari_hyperspy_and_evaluation(monkeypatch, tmp_path):
    from napari_hrtem_transfer.inference import _loader, clear_cache, pretrained_model_dir

    calls: list[str] = []
    orig = _loader._load

    def spy(path, which, device):
        calls.append(str(path))
        return orig(path, which, device)

    monkeypatch.setattr(_loader, "_load", spy)
    frame = _frame((64, 64), seed=6)
    shipped_dir = str(pretrained_model_dir())

    def loads(run) -> list[str]:
        clear_cache()
        calls.clear()
        run()
        return list(calls)

    from napari_hrtem_transfer.cli import main

    np.save(tmp_path / "f.npy", frame)
    cli = ["segment", str(tmp_path / "f.npy"), "--model", "pretrained", "--sampling", "0.2"]
    assert loads(lambda: main([*cli, "--out", str(tmp_path / "m.tif")])) == [shipped_dir]

    from napari_hrtem_transfer._napari._jobs import segment_job

    assert loads(lambda: segment_job(None, frame, "pretrained", sampling_A=0.2)) == [shipped_dir]

    from napari_hrtem_transfer.hyperspy import HRTEM

    s = HRTEM(frame)
    for ax in s.axes_manager.signal_axes:
        ax.scale, ax.units = 0.02, "nm"
    assert loads(lambda: s.segment()) == [shipped_dir]

    from napari_hrtem_transfer.evaluation._model import ScoringModel

    assert loads(lambda: ScoringModel(shipped_dir)) == [shipped_dir]
    # and a second ask is served from the cache: no second read of the weights
    calls.clear()
    ScoringModel(shipped_dir)
    assert calls == []
