"""Domain selection, structure split, subsets, augmentation and data errors."""

from __future__ import annotations

import numpy as np
import pytest

from napari_hrtem_transfer.errors import ConfigError, DatasetError
from napari_hrtem_transfer.training import TrainConfig
from napari_hrtem_transfer.training.data import (
    TrainingData,
    d4,
    d4_transform,
    select_domains,
    split_structures,
    training_crop,
)

from .conftest import make_dataset


@pytest.mark.parametrize("seed", [0, 1, 7])
@pytest.mark.parametrize("per_id", [1, 3])
def test_no_structure_in_both_splits(seed, per_id):
    ds = make_dataset(n_images=30, size=32, structures_per_id=per_id)
    tr, va = split_structures(ds.structure_ids, 0.25, seed)
    ids = ds.structure_ids
    assert set(ids[tr]).isdisjoint(ids[va])
    assert len(tr) + len(va) == 30 and len(va) > 0 and len(tr) > 0
    assert np.array_equal(np.sort(np.r_[tr, va]), np.arange(30))
    # and through the full pipeline, with all domains selected
    cfg = TrainConfig(train_defocus_nm="all", split_seed=seed, val_fraction=0.25, patch_size=32)
    td = TrainingData.prepare(cfg, ds)
    assert set(td.train_structures).isdisjoint(td.val_structures)
    assert set(ids[td.train_items[:, 1]]).isdisjoint(ids[td.val_images])
    assert sorted(set(td.train_items[:, 0].tolist())) == [0, 1, 2]


def test_split_is_independent_of_training_seed():
    ds = make_dataset(n_images=20, size=32)
    a = TrainingData.prepare(TrainConfig(seed=0, patch_size=32), ds)
    b = TrainingData.prepare(TrainConfig(seed=5, patch_size=32), ds)
    assert a.val_structures == b.val_structures


def test_subset_is_seeded_and_within_training_structures():
    ds = make_dataset(n_images=20, size=32)
    mk = lambda s: TrainingData.prepare(  # noqa: E731
        TrainConfig(train_defocus_nm=[5.0], n_train=6, seed=s, patch_size=32), ds
    )
    a, b, c = mk(0), mk(0), mk(1)
    assert a.n_train == 6
    assert np.array_equal(a.train_items, b.train_items)
    assert not np.array_equal(a.train_items, c.train_items)
    assert set(a.train_items[:, 0].tolist()) == {ds.defocus_index(5.0)}
    assert set(a.train_items[:, 1].tolist()).isdisjoint(a.val_images.tolist())


def test_bad_selections_are_clear_errors():
    ds = make_dataset(n_images=10, size=32)
    with pytest.raises(ConfigError, match="n_train=50 is larger than the 8 training images"):
        TrainingData.prepare(TrainConfig(train_defocus_nm=[0.0], n_train=50, patch_size=32), ds)
    with pytest.raises(DatasetError, match="defocus 7 nm is not in the dataset"):
        select_domains(ds, [7.0])
    with pytest.raises(ConfigError, match="empty"):
        select_domains(ds, [])
    with pytest.raises(ValueError, match="empty"):
        TrainConfig(train_defocus_nm=[])
    with pytest.raises(DatasetError, match="no ground-truth masks"):
        TrainingData.prepare(TrainConfig(patch_size=32), make_dataset(size=32, with_masks=False))
    with pytest.warns(UserWarning, match=r"patch_size 64 px is larger .*training on 32x32"):
        assert TrainingData.prepare(TrainConfig(patch_size=64), ds).crop_size == (32, 32)
    with pytest.raises(DatasetError, match="images are 20x20 px; training needs at least 32"):
        TrainingData.prepare(TrainConfig(patch_size=32), make_dataset(n_images=4, size=20))
    with pytest.raises(ValueError, match="multiple of 32"):
        TrainConfig(patch_size=48)
    with pytest.raises(ValueError, match="needs init_from"):
        TrainConfig(freeze="encoder")
    with pytest.raises(ValueError, match="extra"):
        TrainConfig(learning_rate=1e-3)


def test_nan_images_are_refused():
    ds = make_dataset(n_images=6, size=32)
    imgs = ds.images.astype(np.float32)
    imgs[0, 3, 5, 5] = np.nan
    ds.images = imgs
    with pytest.raises(DatasetError, match=r"image\(s\) \[3\] at defocus -5 nm contain NaN"):
        TrainingData.prepare(TrainConfig(patch_size=32, val_fraction=0.2, split_seed=0), ds)


def test_d4_gives_eight_distinct_transforms_applied_alike():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(5, 5))
    outs = [d4(img, k) for k in range(8)]
    assert len({o.tobytes() for o in outs}) == 8
    assert np.array_equal(outs[0], img)


def test_d4_transform_is_the_square_symmetry_group_on_the_last_two_axes():
    rng = np.random.default_rng(1)
    img = rng.normal(size=(4, 6))  # non-square: quarter turns swap the sizes
    # codes 0-3: k counter-clockwise quarter turns; code 4: a left-right flip
    assert np.array_equal(d4_transform(img, 1), img.T[::-1])
    assert np.array_equal(d4_transform(img, 2), img[::-1, ::-1])
    assert np.array_equal(d4_transform(img, 4), img[:, ::-1])
    assert d4_transform(img, 1).shape == (6, 4)
    # a group: each transform is undone by one of the eight, and flips are involutions
    sq = rng.normal(size=(5, 5))
    outs = {d4_transform(sq, k).tobytes(): k for k in range(8)}
    assert len(outs) == 8
    for k in range(8):
        inverses = [j for j in range(8) if np.array_equal(d4_transform(d4_transform(sq, k), j), sq)]
        assert len(inverses) == 1
        assert (inverses[0] == k) == (k in (0, 2) or k >= 4)
        for j in range(8):  # closed under composition
            assert d4_transform(d4_transform(sq, k), j).tobytes() in outs
    # leading axes are carried along: a batch transforms like each of its images
    batch = rng.normal(size=(3, 2, 5, 7))
    for k in range(8):
        got = d4_transform(batch, k)
        for i in range(3):
            for c in range(2):
                assert np.array_equal(got[i, c], d4_transform(batch[i, c], k))
    assert np.array_equal(d4(sq, 5), d4_transform(sq, 5))  # the old name stays


@pytest.mark.parametrize("k", [-1, 8])
def test_d4_transform_rejects_bad_codes_and_1d_input(k):
    with pytest.raises(ValueError, match="0..7"):
        d4_transform(np.zeros((3, 3)), k)
    with pytest.raises(ValueError, match="last two axes"):
        d4_transform(np.zeros(3), 0)


def test_batches_standardised_augmented_and_aligned(small_config):
    ds = make_dataset(n_images=12, size=64)
    td = TrainingData.prepare(small_config, ds)
    plan0, plan0b, plan1 = td.epoch_plan(0), td.epoch_plan(0), td.epoch_plan(1)
    assert np.array_equal(plan0, plan0b) and not np.array_equal(plan0, plan1)
    assert len(set(plan0[:, 1].tolist())) > 1  # several D4 codes used
    for rows in td.batches(0):
        x, y = td.load_batch(rows)
        assert x.shape == y.shape == (len(rows), 1, 32, 32)
        for (item, code, y0, x0), xi, yi in zip(rows.tolist(), x, y, strict=True):
            d, i = td.train_items[item]
            full = ds.images[d, i].astype(np.float64)
            std = (full - full.mean()) / (full.std() + 1e-6)
            np.testing.assert_allclose(xi[0], d4(std[y0 : y0 + 32, x0 : x0 + 32], code), atol=1e-5)
            np.testing.assert_array_equal(yi[0], d4(ds.masks[i][y0 : y0 + 32, x0 : x0 + 32], code))


@pytest.mark.parametrize(
    ("shape", "patch", "crop"),
    [
        ((100, 90), 256, (80, 80)),  # stride 16 (compact U-Net)
        ((525, 525), 256, (256, 256)),  # fits: the requested patch
        ((525, 525), None, (512, 512)),  # whole frames: largest multiple of 32 per side
        ((300, 200), 256, (192, 192)),  # too small: largest multiple of 32 fitting both sides
        ((300, 200), None, (288, 192)),
        ((100, 90), 256, (64, 64)),
        ((64, 64), 64, (64, 64)),
        ((32, 33), None, (32, 32)),
    ],
)
def test_training_crop_rule(shape, patch, crop):
    stride = 16 if crop == (80, 80) else 32
    assert training_crop(shape, patch, stride) == crop
    cy, cx = crop
    assert cy % stride == 0 and cx % stride == 0 and cy <= shape[0] and cx <= shape[1]
    if patch is not None:  # the largest square multiple of the stride not above the patch
        assert cy == cx and (cy == patch or cy + stride > min(shape))


def test_small_non_square_frames_give_in_bounds_aligned_crops():
    ds = make_dataset(n_images=3, size=100)
    ds.images = np.ascontiguousarray(ds.images[..., :90])  # 100 x 90 px frames
    ds.masks = np.ascontiguousarray(ds.masks[..., :90])
    cfg = TrainConfig(patch_size=None, samples_per_epoch=24, batch_size=8, val_fraction=0.3)
    td = TrainingData.prepare(cfg, ds)
    assert td.crop_size == (96, 64) and td.describe()["crop_px"] == [96, 64]
    plan = td.epoch_plan(0)
    assert set(plan[:, 1].tolist()) <= {0, 2, 4, 6}  # no quarter turns of a non-square crop
    assert plan[:, 2].max() <= 4 and plan[:, 3].max() <= 26 and plan[:, 2:].min() >= 0
    assert len(set(plan[:, 2].tolist())) > 1  # the crop moves over the frame
    for rows in td.batches(0):
        x, y = td.load_batch(rows)
        for (item, code, y0, x0), xi, yi in zip(rows.tolist(), x, y, strict=True):
            _, i = td.train_items[item]
            expect = d4_transform(ds.masks[i][y0 : y0 + 96, x0 : x0 + 64], code)
            assert xi.shape == yi.shape == (1, *expect.shape)
            np.testing.assert_array_equal(yi[0], expect)
    (xv, yv), *_ = td.val_batches(td.eval_domains[0], 4)
    assert xv.shape[-2:] == (96, 64) == yv.shape[-2:]
