"""The importer of the published table and the study's aggregated views."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_hrtem_transfer.errors import ConfigError, DatasetError
from napari_hrtem_transfer.evaluation import (
    ResultTable,
    domain_profile,
    generalization_by,
    generalization_matrix,
    load_reference_table,
    shift_matrix,
    target_matrix,
)

REPO = Path(__file__).resolve().parents[2]
REFERENCE_CSV = REPO.parent / "shared" / "reference" / "paper_defocus_sweep.csv"


@pytest.fixture(scope="module")
def paper():
    if not REFERENCE_CSV.is_file():
        pytest.skip(f"published table not found at {REFERENCE_CSV}")
    return load_reference_table(REFERENCE_CSV)


def test_published_generalization_after_pretraining(paper):
    g = generalization_by(paper, ("pretrain_defocus_nm",), stage="pretrain", reduction="median")
    assert g[(0.0,)] == pytest.approx(0.0028, abs=1e-4)
    assert g[(10.0,)] == pytest.approx(0.058, abs=1e-4)
    # in focus is the best pretraining domain, +10 nm the worst
    assert min(g, key=g.get) == (0.0,)
    assert max(g, key=g.get) == (10.0,)


def test_importer_converts_angstrom_to_nm_and_keeps_provenance(paper):
    assert sorted(paper.unique("pretrain_defocus_nm")) == [-10.0, -5.0, 0.0, 5.0, 10.0]
    assert paper.unique("domain_defocus_nm") == [float(d) for d in range(-25, 26, 5)]
    assert len(paper) == 7200 * 11 * 2
    assert set(paper.unique("stage")) == {"pretrain", "transfer"}
    assert "Rangel DaCosta" in paper["source"][0]


def test_study_findings_visible_in_views(paper):
    before = target_matrix(paper, "pretrain")
    after = target_matrix(paper, "transfer")
    assert before.values.shape == (5, 11)
    # finding 1: after fine-tuning the target loss hardly depends on the pretraining domain
    spread_after = np.nanstd(after.values[:, [0, 10]], axis=0).max()
    spread_before = np.nanstd(before.values[:, [0, 10]], axis=0).max()
    assert spread_after < spread_before / 5
    # finding 3: +10 -> +5 nm makes OOD worse; +10 -> -25 nm much better
    s = shift_matrix(paper)
    assert s.at(10.0, 5.0) > 0
    assert s.at(10.0, -25.0) < -0.02
    gm_before = generalization_matrix(paper, "pretrain")
    gm_after = generalization_matrix(paper, "transfer")
    assert s.at(10, 5) == pytest.approx(gm_after.at(10, 5) - gm_before.at(10, 5))
    prof = domain_profile(paper, 10.0, 5.0)
    assert prof.domains_nm.size == 11 and np.all(np.isfinite(prof.after))


def test_missing_columns_named(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("pretrain_defocus,transfer_defocus,best_pretrain_val_0\n0,50,0.1\n")
    with pytest.raises(DatasetError, match="freeze_option.*best_transfer_performance"):
        load_reference_table(p)
    t = ResultTable.from_records([{"model_id": "a", "loss": 0.1}])
    with pytest.raises(DatasetError, match="stage, pretrain_defocus_nm, transfer_defocus_nm"):
        target_matrix(t)


def _toy_table():
    recs = []
    # two models pretrained at 0 nm, one fine-tuned to 5 nm each; domains -5, 0, 5
    for k, scale in enumerate((1.0, 3.0)):
        for d, loss in ((-5.0, 0.1), (0.0, 0.5), (5.0, 0.3)):
            recs.append(
                dict(
                    model_id=f"m{k}/pretrain",
                    stage="pretrain",
                    pretrain_defocus_nm=0.0,
                    transfer_defocus_nm=5.0,
                    domain_defocus_nm=d,
                    loss=loss * scale,
                )
            )
        for d, loss in ((-5.0, 0.2), (0.0, 0.5), (5.0, 0.2)):
            recs.append(
                dict(
                    model_id=f"m{k}/transfer",
                    stage="transfer",
                    pretrain_defocus_nm=0.0,
                    transfer_defocus_nm=5.0,
                    domain_defocus_nm=d,
                    loss=loss * scale,
                )
            )
    return ResultTable.from_records(recs)


def test_aggregation_reductions_hand_computed(tmp_path):
    t = _toy_table()
    # median over two models = mean: before (-5: 0.2, 5: 0.6) -> std = 0.2; after equal -> 0
    gb = generalization_by(t, stage="pretrain")[(0.0,)]
    assert gb == pytest.approx(0.2)
    ga = generalization_by(t, ("pretrain_defocus_nm",), stage="transfer")[(0.0,)]
    assert ga == pytest.approx(0.0)
    assert shift_matrix(t).at(0.0, 5.0) == pytest.approx(-0.2)
    # min picks model 0: before (0.1, 0.3) -> 0.1; max picks model 1: (0.3, 0.9) -> 0.3
    assert generalization_by(t, reduction="min")[(0.0,)] == pytest.approx(0.1)
    assert generalization_by(t, reduction="max")[(0.0,)] == pytest.approx(0.3)
    assert target_matrix(t, "pretrain").at(0.0, 5.0) == pytest.approx(0.6)
    assert target_matrix(t, "transfer", reduction="min").at(0.0, 5.0) == pytest.approx(0.2)
    with pytest.raises(ConfigError, match="median, mean, min, max"):
        generalization_by(t, reduction="mode")
    # round trip through CSV keeps numbers and text
    t.to_csv(tmp_path / "r.csv")
    t2 = ResultTable.from_csv(tmp_path / "r.csv")
    assert generalization_by(t2, stage="pretrain")[(0.0,)] == pytest.approx(0.2)
    assert list(t2["model_id"][:1]) == ["m0/pretrain"]
