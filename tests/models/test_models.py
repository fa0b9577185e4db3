"""Architecture, receptive field, freezing and factory of the U-Nets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_hrtem_transfer.errors import ConfigError  # noqa: E402
from napari_hrtem_transfer.models import (  # noqa: E402
    CompactUNetConfig,
    ResNet18UNetConfig,
    build_model,
    parse_model_config,
)


@pytest.fixture(params=["compact", "resnet18"])
def arch(request):
    return request.param


def _calibrate_bn(model, size=64, n=3):
    """Give BatchNorm realistic running statistics (forward passes in train mode)."""
    model.train()
    with torch.no_grad():
        for _ in range(n):
            model(torch.randn(4, 1, size, size))
    model.eval()


class TestShapes:
    def test_logits_shape_and_features(self, arch):
        torch.manual_seed(0)
        model = build_model(arch).eval()
        x = torch.randn(2, 1, 64, 96)
        with torch.no_grad():
            y = model(x)
            f = model.encoder_features(x)
        assert y.shape == (2, 1, 64, 96)
        s = model.output_stride
        assert f.shape == (2, model.encoder.out_channels[-1], 64 // s, 96 // s)
        # logits, not probabilities: unbounded values of both signs are possible
        assert y.dtype == torch.float32

    def test_bad_size_suggests_padding(self, arch):
        model = build_model(arch)
        with pytest.raises(ValueError, match="Pad the input to"):
            model(torch.randn(1, 1, 70, 64))
        with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
            model(torch.randn(1, 3, 64, 64))


def test_resnet18_matches_the_study():
    model = build_model("resnet18")
    n = model.n_parameters()
    enc = sum(p.numel() for p in model.encoder.parameters())
    assert 14.2e6 < n < 14.45e6, n  # the study: ~14.3 M
    assert 0.76 < enc / n < 0.80  # ~78 % in the encoder
    assert model.encoder.out_channels[1:] == (64, 128, 256, 512)
    assert [b.conv2[0].out_channels for b in model.decoder.blocks] == [256, 128, 64, 32, 16]


@pytest.mark.slow
def test_compact_is_small_with_large_receptive_field():
    torch.manual_seed(0)
    model = build_model("compact")
    assert model.n_parameters() <= 2_000_000
    _calibrate_bn(model)
    size = 448
    x = torch.randn(1, 1, size, size, requires_grad=True)
    y = model(x)
    y[0, 0, size // 2, size // 2].backward()
    nz = (x.grad[0, 0].abs() > 0).nonzero()
    extent = int(nz[:, 0].max() - nz[:, 0].min() + 1), int(nz[:, 1].max() - nz[:, 1].min() + 1)
    assert min(extent) >= 200, extent
    assert max(extent) < size  # the measurement itself is not clipped by the input


def test_factory_unknown_architecture_lists_valid_names():
    with pytest.raises(ConfigError, match="compact, resnet18"):
        build_model("vgg")
    with pytest.raises(Exception, match="extra"):
        parse_model_config({"architecture": "compact", "depth": 5})


def test_config_round_trip():
    for cfg in (CompactUNetConfig(channels=(16, 32, 64, 96)), ResNet18UNetConfig()):
        again = parse_model_config(cfg.model_dump(mode="json"))
        assert again == cfg


class TestFreezing:
    def test_encoder_freeze_sets_grad_and_bn_eval(self, arch):
        model = build_model(arch)
        frozen = model.freeze("encoder")
        assert frozen and all(n.startswith("encoder.") for n in frozen)
        model.train()  # must not re-enable BN statistics updates in frozen parts
        for p in model.encoder.parameters():
            assert not p.requires_grad
        for p in model.decoder.parameters():
            assert p.requires_grad
        bns = [m for m in model.encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert bns and not any(m.training for m in bns)
        assert any(
            m.training for m in model.decoder.modules() if isinstance(m, torch.nn.BatchNorm2d)
        )
        before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
        model(torch.randn(2, 1, 64, 64)).sum().backward()
        for k, v in model.encoder.state_dict().items():
            assert torch.equal(v, before[k]), k
        assert all(p.grad is None for p in model.encoder.parameters())

    def test_decoder_freeze_keeps_head_trainable(self):
        model = build_model("compact")
        model.freeze("decoder")
        assert all(not p.requires_grad for p in model.decoder.parameters())
        assert all(p.requires_grad for p in model.head.parameters())
        assert all(p.requires_grad for p in model.encoder.parameters())

    def test_gradual_unfreezes_from_head_backwards(self, arch):
        model = build_model(arch)
        names = [n for n, _ in model.parts()]
        n_epochs = 4
        trainable_counts = []
        for epoch in range(n_epochs):
            frozen = set(model.freeze("gradual", epoch, n_epochs))
            trainable = [n for n in names if n not in frozen]
            # the trainable parts are always a suffix of the input->output order
            assert trainable == names[len(names) - len(trainable) :]
            trainable_counts.append(len(trainable))
        assert trainable_counts[0] >= 1 and "head" not in model.freeze("gradual", 0, n_epochs)
        assert trainable_counts == sorted(trainable_counts)
        assert trainable_counts[-1] == len(names)
        assert trainable_counts[0] < len(names)

    def test_none_unfreezes_and_unknown_mode(self):
        model = build_model("compact")
        model.freeze("encoder")
        assert model.freeze("none") == ()
        assert all(p.requires_grad for p in model.parameters())
        with pytest.raises(KeyError, match="gradual"):
            model.freeze("everything")


def test_blockwise_standardize_equals_the_float64_formula(monkeypatch):
    """The block-by-block standardisation (bounded memory) gives the float64 formula's result,
    for stacks of any leading shape, with blocks smaller than one image."""
    import napari_hrtem_transfer.models.normalization as norm

    rng = np.random.default_rng(3)
    x = rng.poisson(40.0, size=(2, 3, 67, 53)).astype(np.float32)
    x[0, 1] += 1e4  # a large offset: the mean must be removed in float64
    monkeypatch.setattr(norm, "_BLOCK_PX", 5 * 53)  # 5 rows per block
    got = norm.standardize(x)
    d = x.astype(np.float64)
    mean = d.mean(axis=(-2, -1), keepdims=True)
    want = ((d - mean) / (d.std(axis=(-2, -1), keepdims=True) + 1e-6)).astype(np.float32)
    assert got.shape == x.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
    np.testing.assert_allclose(got.mean(axis=(-2, -1)), 0.0, atol=1e-5)
    np.testing.assert_allclose(got.std(axis=(-2, -1)), 1.0, atol=1e-5)
    with pytest.raises(np.exceptions.AxisError):
        norm.standardize(np.zeros(5))
