"""Inference: standardisation inside predict_proba, tiling, and input checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_hrtem_transfer.errors import ConfigError  # noqa: E402
from napari_hrtem_transfer.inference import tile_starts  # noqa: E402
from napari_hrtem_transfer.models import NORMALIZATION, build_model, standardize  # noqa: E402
from napari_hrtem_transfer.training import load_checkpoint  # noqa: E402
from napari_hrtem_transfer.training.checkpoint import save_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("compact")
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 1, 64, 64))
    d = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(
        d,
        "best",
        model.eval(),
        {
            "model": {"architecture": "compact"},
            "normalization": dict(NORMALIZATION),
            "sampling_A": 0.2,
        },
    )
    return load_checkpoint(d, device="cpu")


def test_predict_proba_standardises_raw_counts(loaded):
    rng = np.random.default_rng(0)
    img = rng.poisson(300, size=(64, 64)).astype(np.uint16)
    p = loaded.predict_proba(img, precision="fp32")
    assert p.shape == (1, 64, 64) and p.dtype == np.float32
    assert 0.0 <= p.min() and p.max() <= 1.0
    # same result for an affine change of intensity (standardisation is part of the pipeline)
    p2 = loaded.predict_proba(img.astype(np.float64) * 3.0 + 100.0, precision="fp32")
    np.testing.assert_allclose(p, p2, atol=1e-5)
    x = torch.from_numpy(standardize(img)[None, None])
    with torch.no_grad():
        ref = torch.sigmoid(loaded.model(x))[0].numpy()
    np.testing.assert_allclose(p, ref, atol=1e-5)  # BatchNorm is folded for inference


def test_inference_copy_follows_in_place_weight_changes(tmp_path):
    torch.manual_seed(0)
    model = build_model({"architecture": "compact", "channels": [8, 8, 8, 8]})
    save_checkpoint(
        tmp_path,
        "best",
        model.eval(),
        {
            "model": {"architecture": "compact", "channels": [8, 8, 8, 8]},
            "normalization": dict(NORMALIZATION),
            "sampling_A": 0.2,
        },
    )
    lm = load_checkpoint(tmp_path, device="cpu")
    img = np.random.default_rng(0).normal(size=(32, 32))
    a = lm.predict_logits(img, precision="fp32")
    with torch.no_grad():
        lm.model.head[0].bias.add_(1.0)
    b = lm.predict_logits(img, precision="fp32")
    np.testing.assert_allclose(b, a + 1.0, atol=1e-4)


def test_odd_sizes_are_padded(loaded):
    p = loaded.predict_proba(np.random.default_rng(1).normal(size=(2, 50, 70)), precision="fp32")
    assert p.shape == (2, 50, 70)


def test_tile_starts_cover_and_align():
    assert tile_starts(200, 256, 64, 16) == [0]
    for size in (272, 512, 1040, 2048):
        st = tile_starts(size, 256, 64, 16)
        assert st[0] == 0 and st[-1] + 256 == size and st == sorted(set(st))
        assert all(s % 16 == 0 for s in st)
        assert all(0 < b - a <= 256 - 64 for a, b in zip(st, st[1:], strict=False))


def _image(size, seed=2):
    rng = np.random.default_rng(seed)
    img = rng.poisson(200, size=(size, size)).astype(np.float32)
    yy, xx = np.mgrid[:size, :size]
    img += 80 * ((yy - 150) ** 2 + (xx - 200) ** 2 < 40**2)
    return img


@pytest.mark.slow
@pytest.mark.parametrize(
    "arch",
    [
        {"architecture": "compact", "channels": [8, 8, 8, 8], "bottleneck_dilations": []},
        {"architecture": "resnet18", "decoder_channels": [16, 8, 8, 8, 8]},
    ],
)
def test_receptive_field_bound_holds(arch):
    torch.manual_seed(0)
    model = build_model(arch).eval()
    rf = model.receptive_field
    size = (rf // 64 + 2) * 64
    x = torch.randn(1, 1, size, size, requires_grad=True)
    model(x)[0, 0, size // 2, size // 2].backward()
    nz = (x.grad[0, 0] != 0).nonzero()
    extent = int(nz[:, 0].max() - nz[:, 0].min() + 1)
    assert extent <= rf < 1.25 * extent, (extent, rf)


def test_tiled_equals_whole_image_away_from_tile_edges(tmp_path):
    torch.manual_seed(0)
    cfg = {"architecture": "compact", "channels": [8, 8, 8, 8], "bottleneck_dilations": []}
    model = build_model(cfg)
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 1, 64, 64))
    save_checkpoint(
        tmp_path,
        "best",
        model.eval(),
        {
            "model": cfg,
            "normalization": dict(NORMALIZATION),
            "sampling_A": 0.2,
        },
    )
    lm = load_checkpoint(tmp_path, device="cpu")
    img = _image(400)
    shapes = []
    make_forward = lm.forward_fn

    def spy(precision="auto"):  # every forward pass of the one engine, with its tile shape
        forward = make_forward(precision)
        return lambda x, decode: (shapes.append(tuple(x.shape)), forward(x, decode))[1]

    lm.forward_fn = spy
    whole = lm.predict_proba(img, tile_size=416, precision="fp32")[0]
    assert shapes == [(1, 400, 400)]  # one piece
    shapes.clear()
    tiled = lm.predict_proba(img, tile_size=208, batch_size=1, precision="fp32")[0]
    # the least overlap the receptive field needs (144 px + one stride) forces tiles of at
    # least 2 * 160 + 16 px, balanced over the frame: 2 x 2 tiles of 272 px
    plan = lm.tile_plan(400, 400, 208)
    assert plan.n_tiles == 4 and (plan.ty, plan.tx) == (272, 272)
    assert shapes == [(1, 272, 272)] * 4
    np.testing.assert_allclose(tiled, whole, atol=1e-5)
    # a too small overlap is only approximately equal
    rough = lm.predict_proba(img, tile_size=208, overlap=32, precision="fp32")[0]
    assert np.abs(rough - whole).max() > 1e-3


def test_default_model_tiles_match_closely(loaded):
    img = _image(1024)
    whole = loaded.predict_proba(img, tile_size=1024, precision="fp32")[0]
    # the default overlap (the receptive field, 314 px, rounded up plus a stride): equal
    # up to rounding
    exact = loaded.predict_proba(img, tile_size=512, precision="fp32")[0]
    assert loaded.tile_plan(1024, 1024, 512).n_tiles == 4
    np.testing.assert_allclose(exact, whole, atol=1e-4)
    # smaller overlaps: each output pixel sees less of its context, and the error grows
    err = [
        float(
            np.mean(
                np.abs(
                    loaded.predict_proba(img, tile_size=512, overlap=o, precision="fp32")[0] - whole
                )
            )
        )
        for o in (128, 32)
    ]
    assert err[0] < err[1] and err[1] > 1e-3, err


def test_bad_inputs(loaded):
    with pytest.raises(ConfigError, match="RGB"):
        loaded.predict_proba(np.zeros((64, 64, 3)))
    with pytest.raises(ConfigError, match=r"\(N, H, W\)"):
        loaded.predict_proba(np.zeros(64))
    bad = np.ones((2, 32, 32))
    bad[1, 3, 3] = np.nan
    with pytest.raises(ConfigError, match=r"image\(s\) \[1\] contain NaN"):
        loaded.predict_proba(bad)


def test_encoder_features_for_ood(loaded):
    f = loaded.encoder_features(np.random.default_rng(0).poisson(100, size=(3, 64, 64)))
    assert f.shape == (3, 192, 4, 4) and f.dtype == np.float32
