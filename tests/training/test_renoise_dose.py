"""Dose augmentation re-noises each image from the dose it was itself recorded at.

A dataset simulated with a per-image dose range (``dose_range_e_per_A2``) records every
image's dose in ``info["per_image"]["dose_e_per_A2"]`` (n_defocus, n_images); its file-wide
``dose_e_per_A2`` is only the range's geometric mean.  The fixtures here are flat vacuum
frames (intensity 1) of ideal Poisson counts, so a frame recorded at dose D [e/Å²] has
``D * sampling_A**2`` expected counts per pixel and, Poisson, variance = mean.  Binomial
thinning to a target dose T gives Poisson counts of mean = variance = ``T * sampling_A**2``.

Standard errors of N independent Poisson(mu) pixels: sample mean sqrt(mu / N); sample
variance sqrt((mu4 - sigma^4) / N) = sqrt((2 mu^2 + mu) / N) (Poisson mu4 = mu + 3 mu^2).
"""

from __future__ import annotations

import numpy as np
import pytest

from napari_hrtem_transfer.errors import DatasetError
from napari_hrtem_transfer.io.dataset import HRTEMDataset, load_dataset, save_dataset
from napari_hrtem_transfer.simulate.config import SimulationConfig
from napari_hrtem_transfer.simulate.series import _collect, _dataset
from napari_hrtem_transfer.training import TrainConfig
from napari_hrtem_transfer.training import data as data_mod
from napari_hrtem_transfer.training.data import TrainingData, renoise

SIZE = 128
N_PX = SIZE * SIZE
SAMPLING_A = 0.5  # 0.25 Å² per pixel: counts = dose / 4
DEFOCI = [-5.0, 5.0]
#: each image's own dose [e/Å²], (n_defocus, n_images); 80 and 600 are the two studied
DOSES = np.array([[80.0, 600.0, 150.0, 1000.0], [600.0, 80.0, 300.0, 50.0]])
TARGET = 40.0  # below every recorded dose


def _se_mean(mu: float) -> float:
    return float(np.sqrt(mu / N_PX))


def _se_var(mu: float) -> float:
    return float(np.sqrt((2 * mu**2 + mu) / N_PX))


def _simulated(doses: np.ndarray = DOSES, dose: float | None = 224.0, seed: int = 0):
    """A dataset recorded the way ``simulate_dataset`` records one with a dose range.

    The per-structure results go through the simulator's own ``_collect`` and ``_dataset``
    (the abTEM image formation is replaced by flat vacuum frames of Poisson counts at each
    image's dose; ``doses`` NaN: noise-free intensity 1).
    """
    nd, n = doses.shape
    cfg = SimulationConfig(
        n_structures=n,
        image_size_px=SIZE,
        sampling_A=SAMPLING_A,
        defocus_nm=DEFOCI,
        dose_e_per_A2=dose,
        dose_range_e_per_A2=None if dose is None else (50.0, 1000.0),
        seed=seed,
    )
    rng = np.random.default_rng(seed)
    results = []
    for i in range(n):
        if np.isnan(doses[:, i]).any():
            images = np.ones((nd, SIZE, SIZE), np.float32)
        else:
            lam = doses[:, i, None, None] * SAMPLING_A**2 * np.ones((nd, SIZE, SIZE))
            images = rng.poisson(lam).astype(np.uint16)
        mask = np.zeros((SIZE, SIZE), bool)
        mask[20 + 10 * i : 40 + 10 * i, 30:60] = True
        results.append(
            {
                "index": i,
                "images": images,
                "mask": mask,
                "actual_defocus_nm": np.asarray(DEFOCI),
                "per_image": {"dose_e_per_A2": doses[:, i]},
                "n_particles": 1,
                "radii_nm": [1.0],
                "substrate_thickness_nm": 3.0,
                "n_atoms": 100,
                "stacking_faults": [],
                "zero_defocus_offset_nm": 0.0,
            }
        )
    return _dataset(cfg, _collect(cfg, results, progress=False), elapsed_s=0.0)


def _td(ds: HRTEMDataset) -> TrainingData:
    cfg = TrainConfig(
        train_defocus_nm="all",
        patch_size=32,
        val_fraction=0.25,
        dose_augment_e_per_A2=(10.0, 100.0),
        augment=False,
    )
    return TrainingData.prepare(cfg, ds)


def test_the_fixture_records_doses_as_the_simulator_does():
    ds = _simulated()
    # the file's dose is the range's geometric mean, sqrt(50 x 1000) ~ 224
    assert ds.dose_e_per_A2 == pytest.approx(np.sqrt(50 * 1000))
    assert np.array_equal(np.asarray(ds.info["per_image"]["dose_e_per_A2"]), DOSES)
    td = _td(ds)
    for d in range(2):
        for i in range(4):
            assert td.recorded_dose(d, i) == DOSES[d, i]
            raw = td.raw_image(d, i).astype(np.float64)
            mu = DOSES[d, i] * SAMPLING_A**2  # the recorded frame itself is Poisson at D
            assert abs(raw.mean() - mu) < 4 * _se_mean(mu)
            assert abs(raw.var() - mu) < 4 * _se_var(mu)


@pytest.mark.parametrize(("d", "i"), [(0, 0), (0, 1), (1, 0), (1, 1)])  # 80 and 600 e/Å²
def test_each_image_is_renoised_to_the_target_from_its_own_dose(d, i):
    ds = _simulated()
    td = _td(ds)
    mu = TARGET * SAMPLING_A**2  # 10 counts per pixel
    low = td.renoised_image(d, i, TARGET, np.random.default_rng([7, d, i]))
    assert abs(low.mean() - mu) < 4 * _se_mean(mu)
    assert abs(low.var() - mu) < 4 * _se_var(mu)
    # the old behaviour, thinning from the file's dose, misses the target by far: the
    # 80 e/Å² frame is left with mu x 80/224 counts, the 600 e/Å² one with mu x 600/224
    old = renoise(
        td.raw_image(d, i), ds.dose_e_per_A2, TARGET, ds.sampling_A, np.random.default_rng(7)
    )
    expect_old = mu * DOSES[d, i] / ds.dose_e_per_A2
    assert abs(old.var() - expect_old) < 4 * _se_var(expect_old)
    assert abs(old.var() - mu) > 20 * _se_var(mu)


def test_the_standard_error_of_the_variance_is_the_poisson_one():
    """The spread of the measured variance over repeats is the theoretical SE used above."""
    td = _td(_simulated())
    mu = TARGET * SAMPLING_A**2
    raw = td.raw_image(0, 0)
    v = np.array(
        [
            renoise(raw, td.recorded_dose(0, 0), TARGET, SAMPLING_A, np.random.default_rng(k)).var()
            for k in range(60)
        ]
    )
    # thinning Poisson(D s²) with p = T / D is exactly Poisson(T s²): every repeat is a fresh
    # Poisson field, so the variances scatter around mu with SD sqrt((2 mu² + mu) / N)
    assert abs(v.mean() - mu) < 4 * _se_var(mu) / np.sqrt(v.size)
    assert 0.7 < v.std(ddof=1) / _se_var(mu) < 1.3


def test_a_target_above_an_images_own_dose_leaves_it_as_recorded():
    """150 e/Å² is below the file's 224 but above the 80 e/Å² of image (0, 0)."""
    ds = _simulated()
    td = _td(ds)
    raw = td.raw_image(0, 0)
    assert td.renoised_image(0, 0, 150.0, np.random.default_rng(0)) is raw  # no dose to add
    # the old behaviour would thin it further, as if it were less noisy than it is
    old = renoise(raw, ds.dose_e_per_A2, 150.0, SAMPLING_A, np.random.default_rng(0))
    assert old.mean() < 0.75 * raw.mean()
    mu = 150.0 * SAMPLING_A**2
    hi = td.renoised_image(0, 1, 150.0, np.random.default_rng(1))  # 600 -> 150 e/Å²
    assert abs(hi.mean() - mu) < 4 * _se_mean(mu)
    assert abs(hi.var() - mu) < 4 * _se_var(mu)


def test_training_samples_are_renoised_from_each_images_own_dose(monkeypatch):
    ds = _simulated()
    td = _td(ds)
    seen = []

    def spy(raw, dose, target, sampling_A, rng):
        seen.append(dose)
        return renoise(raw, dose, target, sampling_A, rng)

    monkeypatch.setattr(data_mod, "renoise", spy)
    plan = td.epoch_plan(0)
    rows = plan[plan[:, 5] > 0][:12]
    assert len(rows)
    for row in rows.tolist():
        td.sample(row)
    want = [DOSES[tuple(td.train_items[r[0]])] for r in rows.tolist()]
    assert seen == want


def test_after_saving_and_loading_the_per_image_doses_are_used(tmp_path):
    path = save_dataset(_simulated(), tmp_path / "doses.hspy")
    td = _td(load_dataset(path))
    assert [[td.recorded_dose(d, i) for i in range(4)] for d in range(2)] == DOSES.tolist()
    mu = TARGET * SAMPLING_A**2
    low = td.renoised_image(1, 1, TARGET, np.random.default_rng(3))  # recorded at 80
    assert abs(low.var() - mu) < 4 * _se_var(mu)


def test_without_per_image_doses_the_file_dose_is_used_as_before():
    ds = _simulated()
    ds.info.pop("per_image")
    td = _td(ds)
    assert all(td.recorded_dose(d, i) == ds.dose_e_per_A2 for d in range(2) for i in range(4))
    raw = td.raw_image(0, 0)
    got = td.renoised_image(0, 0, TARGET, np.random.default_rng(5))
    old = renoise(raw, ds.dose_e_per_A2, TARGET, SAMPLING_A, np.random.default_rng(5))
    np.testing.assert_array_equal(got, old)


def test_per_structure_doses_and_missing_entries():
    ds = _simulated()
    table = ds.info["per_image"]["dose_e_per_A2"]
    table[0][2] = None  # not recorded: the structure's dose, else the file's
    table[1][2] = float("nan")
    ds.info["structures"][2]["dose_e_per_A2"] = 300.0
    table[0][3] = None
    ds.info["structures"][1]["dose_e_per_A2"] = 999.0
    td = _td(ds)
    assert td.recorded_dose(0, 2) == 300.0 and td.recorded_dose(1, 2) == 300.0
    assert td.recorded_dose(0, 3) == ds.dose_e_per_A2
    assert td.recorded_dose(1, 1) == 80.0  # the per-image entry wins over the structure's
    ds.info["per_image"]["dose_e_per_A2"][0][0] = 0.0
    with pytest.raises(DatasetError, match="dose must be positive"):
        td.recorded_dose(0, 0)


def test_noise_free_images_are_sampled_at_the_target_dose():
    nan = np.full((2, 4), np.nan)  # the simulator records a noise-free run as None entries
    ds = _simulated(nan, dose=None)
    assert ds.dose_e_per_A2 is None
    assert ds.info["per_image"]["dose_e_per_A2"][0] == [None] * 4
    td = _td(ds)
    assert td.recorded_dose(0, 0) is None
    mu = TARGET * SAMPLING_A**2  # intensity 1 x dose x pixel area
    noisy = td.renoised_image(0, 0, TARGET, np.random.default_rng(0))
    assert abs(noisy.mean() - mu) < 4 * _se_mean(mu)
    assert abs(noisy.var() - mu) < 4 * _se_var(mu)
    # an infinite recorded dose is a noise-free image too, in the table or passed directly
    ds.info["per_image"]["dose_e_per_A2"][0][1] = float("inf")
    assert td.recorded_dose(0, 1) is None
    clean = np.ones((SIZE, SIZE), np.float32)
    for dose in (None, float("inf"), float("nan")):
        out = renoise(clean, dose, TARGET, SAMPLING_A, np.random.default_rng(1))
        assert abs(out.var() - mu) < 4 * _se_var(mu)


def test_augmented_validation_frames_are_renoised_once_over_the_range():
    """validation_dose="augmented": each validation frame carries a dose from the
    augmentation range (10-100 e/Å² here; recorded 80 and 600), the same draw every epoch;
    "recorded" keeps the simulated dose."""
    ds = _simulated()
    td = _td(ds)
    aug = TrainingData.prepare(td.config.model_copy(update={"validation_dose": "augmented"}), ds)
    for t in (td, aug):
        t.normalize = lambda raw: np.asarray(raw, np.float32)  # counts, to read the dose
    for d in range(2):
        for i in aug.val_images.tolist():
            recorded = td.val_image(d, i).mean() / SAMPLING_A**2
            assert recorded == pytest.approx(DOSES[d, i], rel=0.05)
            dose = aug.val_image(d, i).mean() / SAMPLING_A**2
            assert 10 * 0.85 < dose < 100 * 1.15, (d, i, dose)
            assert np.array_equal(aug.val_image(d, i), aug.val_image(d, i))
    x, _ = aug.val_batches(0, 4)[0]  # structure 1 at -5 nm: recorded at 600 e/Å²
    assert aug.val_images.tolist() == [1] and x.mean() / SAMPLING_A**2 < 115
