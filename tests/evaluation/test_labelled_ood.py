"""Labelled evaluation of a trained model and the label-free OOD score."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from napari_hrtem_transfer.errors import CheckpointError, ConfigError
from napari_hrtem_transfer.evaluation.labelled import evaluate_model, model_provenance
from napari_hrtem_transfer.evaluation.ood import (
    OODReference,
    fit_ood_reference,
    fit_reference_from_features,
    load_ood_reference,
    ood_scores,
)

HELD_OUT = [f"s{i:03d}" for i in range(16, 24)]


@pytest.fixture(scope="module")
def reference(series, trained, tmp_path_factory):
    d = tmp_path_factory.mktemp("ood")
    ref = fit_ood_reference(
        trained, np.asarray(series.images[1][:16]), save=d, info={"train_defocus_nm": [-10.0]}
    )
    return ref, d


@pytest.mark.slow
def test_score_is_higher_far_from_training_domain(series, trained, reference):
    ref, _ = reference
    res = evaluate_model(trained, series, ood_reference=ref, structures=HELD_OUT, n_boot=200)
    t = res.domains
    score = dict(zip(t["domain_defocus_nm"].tolist(), t["ood_score"].tolist(), strict=True))
    loss = dict(zip(t["domain_defocus_nm"].tolist(), t["loss"].tolist(), strict=True))
    # trained at -10 nm; the in-focus domain (no phase contrast) is far from it and much worse
    assert loss[0.0] > 2 * loss[-10.0]
    assert score[0.0] > score[-10.0] + 0.1
    # training-like frames score about 0 (scale: distance / median training distance - 1)
    assert abs(score[-10.0]) < 0.5


def test_evaluate_records_and_bootstrap(series, trained, reference):
    ref, _ = reference
    res = evaluate_model(trained, series, ood_reference=ref, structures=HELD_OUT, n_boot=200)
    assert res.labelled
    d = res.domains
    assert len(d) == series.n_defocus  # one material -> one row per defocus
    assert np.all(d["n_images"] == 8)
    assert np.all(d["loss_ci_low"] <= d["loss"]) and np.all(d["loss"] <= d["loss_ci_high"])
    assert np.all((d["dice"] >= 0) & (d["dice"] <= 1))
    f = res.frames
    assert len(f) == series.n_defocus * 8
    # the domain value is the mean of its frames
    m = f.where(domain_defocus_nm=10.0)
    assert d.where(domain_defocus_nm=10.0)["loss"][0] == pytest.approx(np.mean(m["loss"]))
    assert set(m["structure_id"]) == set(HELD_OUT)
    assert res.samples and res.samples[0]["image"].shape == (64, 64)


def test_materials_split_into_domains(series, trained):
    mats = np.array(["CdSe", "Au"] * (series.n_images // 2))
    ds = dataclasses.replace(series, materials=mats)
    res = evaluate_model(trained, ds, ood_reference=None, structures="all", n_boot=50)
    assert set(res.domains["material"]) == {"all", "CdSe", "Au"}
    assert len(res.domains) == 3 * ds.n_defocus


def test_unlabelled_dataset_gives_label_free_scores_only(series, trained, reference):
    ref, _ = reference
    ds = dataclasses.replace(series, masks=None)
    res = evaluate_model(trained, ds, ood_reference=ref, structures="all", n_boot=50)
    assert not res.labelled
    assert np.all(np.isnan(res.domains["loss"])) and np.all(np.isnan(res.domains["dice"]))
    assert np.all(np.isfinite(res.domains["ood_score"]))
    assert any("no ground-truth masks" in n for n in res.notes)


def test_sampling_mismatch_is_a_clear_error(series, trained):
    class Loaded:  # the shape of training.LoadedModel
        model = trained
        info = {"sampling_A": 0.2}
        sampling_A = 0.2

    with pytest.raises(ConfigError, match=r"0.5 Å/px.*0.2 Å/px"):
        evaluate_model(Loaded(), series, ood_reference=None)

    class Loaded2:
        model = trained
        info = {"sampling_A": 0.5, "data": {"image_shape": [128, 128]}}
        sampling_A = 0.5

    with pytest.raises(ConfigError, match="64x64 px.*128x128 px"):
        evaluate_model(Loaded2(), series, ood_reference=None)


def test_reference_round_trip_without_pickle(reference, series, trained):
    ref, d = reference
    assert (d / "ood_reference.safetensors").is_file() and (d / "ood_reference.json").is_file()
    back = OODReference.load(d)
    np.testing.assert_allclose(back.mean, ref.mean)
    assert back.distance_ref == pytest.approx(ref.distance_ref)
    s = ood_scores(trained, np.asarray(series.images[2][:4]), back)
    assert s.score.shape == (4,) and s.proba.shape == (4, 64, 64)
    # a reference fitted for other weights is not used
    ref2 = dataclasses.replace(ref, weights_sha256="abc")
    ref2.save(d / "other")
    assert load_ood_reference(d / "other", "def") is None
    assert load_ood_reference(d / "other", "abc") is not None
    with pytest.raises(CheckpointError, match="no OOD reference"):
        OODReference.load(d / "missing")


def test_reference_scale_hand_computed():
    # two features, training values +-1 around (0, 10): std 1 each -> training distance 1
    f = np.array([[1.0, 11.0], [-1.0, 9.0], [1.0, 9.0], [-1.0, 11.0]])
    ref = fit_reference_from_features(f, entropy_weight=0.0)
    assert ref.distance_ref == pytest.approx(1.0)
    # a frame at (3, 10): z = (3, 0) -> rms distance sqrt(9/2); score = that / 1 - 1
    assert ref.score(np.array([[3.0, 10.0]]))[0] == pytest.approx(np.sqrt(4.5) - 1)
    assert ref.score(np.array([[0.0, 10.0]]))[0] == pytest.approx(-1.0)
    with pytest.raises(ConfigError):
        fit_reference_from_features(f, method="knn")
    # entropy excess at weight 0.5: entropies 0.1 in training -> entropy_ref 0.1
    ref = fit_reference_from_features(
        f, entropy=np.full(4, 0.1), entropy_weight=0.5, entropy_mode="excess"
    )
    feat = np.array([[3.0, 10.0], [3.0, 10.0]])
    s = ref.score(feat, entropy=np.array([0.3, 0.05]))
    assert s[0] == pytest.approx((np.sqrt(4.5) - 1) + 0.5 * (0.3 / 0.1 - 1))
    assert s[1] == pytest.approx(np.sqrt(4.5) - 1)  # low entropy never lowers the score
    signed = fit_reference_from_features(
        f, entropy=np.full(4, 0.1), entropy_weight=0.5, entropy_mode="signed"
    )
    s = signed.score(feat, entropy=np.array([0.3, 0.05]))
    assert s[1] == pytest.approx((np.sqrt(4.5) - 1) + 0.5 * (0.05 / 0.1 - 1))
    with pytest.raises(ConfigError):
        fit_reference_from_features(f, entropy=np.full(4, 0.1), entropy_mode="mix")
    with pytest.raises(ConfigError):
        fit_reference_from_features(f, entropy_weight=0.5)


def test_provenance_from_sidecar():
    pre = {
        "stage": "pretrain",
        "data": {"train_defocus_nm": [-10.0]},
        "training": {"config": {"freeze": "none", "seed": 3}},
    }
    p = model_provenance(pre)
    assert p["stage"] == "pretrain" and p["pretrain_defocus_nm"] == -10.0
    assert np.isnan(p["transfer_defocus_nm"])
    ft = {
        "stage": "finetune",
        "data": {"train_defocus_nm": [5.0]},
        "training": {"config": {"freeze": "encoder", "n_train": 64, "init_from": "pre"}},
        "parent": {"stage": "pretrain", "train_defocus_nm": [-10.0]},
    }
    p = model_provenance(ft)
    assert (p["stage"], p["pretrain_defocus_nm"], p["transfer_defocus_nm"]) == (
        "transfer",
        -10.0,
        5.0,
    )
    assert p["freeze"] == "encoder" and p["n_transfer"] == 64


def test_structure_selection_never_uses_trained_structures(series):
    from napari_hrtem_transfer.evaluation.labelled import _select_structures

    ids = list(series.structure_ids)
    info = {
        "data": {
            "fingerprint": "not-this-file",
            "val_structures": ids[20:],
            "train_structures": ids[:20],
        }
    }
    sel, what, notes = _select_structures(info, series, "validation")
    assert sel.tolist() == [20, 21, 22, 23] and what.startswith("validation")
    assert any("fingerprint" in n for n in notes)
    # held-out ids absent (another dataset sharing some trained ids): leave the trained ones out
    info = {"data": {"val_structures": ["x"], "train_structures": ids[:10]}}
    sel, what, notes = _select_structures(info, series, "validation")
    assert sel.tolist() == list(range(10, 24)) and what == "structures not trained on"
    # no record of the training data: all structures, said clearly
    sel, what, notes = _select_structures({}, series, "validation")
    assert len(sel) == 24 and "no split" in what and notes
    with pytest.raises(ConfigError):
        _select_structures({}, series, "held-out")
