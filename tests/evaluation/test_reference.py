"""The importer of the published table and the study's aggregated views."""

from __future__ import annotations

import hashlib
import re
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
from napari_hrtem_transfer.evaluation.reference import (
    REFERENCE_ENV,
    find_reference_csv,
    packaged_reference_csv,
)


@pytest.fixture(scope="module")
def paper():
    """The published table as shipped with the package (no ../shared needed)."""
    return load_reference_table()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_packaged_table_is_the_published_one_with_its_attribution():
    csv_file = packaged_reference_csv()
    data = csv_file.read_bytes()
    notes = csv_file.parent
    licence = (notes / "LICENSE_paper_defocus_sweep.txt").read_text()
    citation = (notes / "CITATION.md").read_text()
    # the checksum recorded beside the file (README and licence notice) matches its bytes
    recorded = set(re.findall(r"[0-9a-f]{64}", licence + (notes / "README.md").read_text()))
    assert recorded == {_sha256(data)}
    assert "Creative Commons Attribution 4.0" in licence
    assert "https://creativecommons.org/licenses/by/4.0/legalcode" in licence
    for text in (licence, citation):
        assert "Rangel DaCosta" in text and "Scott" in text and "EM000010" in text
    assert data.startswith(b"pretrain_lr,transfer_lr,pretrain_defocus,transfer_defocus,")
    assert data.count(b"\n") == 7201  # header + 7,200 models


def test_packaged_table_equals_the_shared_copy(shared_data_dir):
    shared = shared_data_dir / "reference" / "paper_defocus_sweep.csv"
    assert shared.is_file(), f"{shared} missing from the shared folder"
    assert _sha256(packaged_reference_csv().read_bytes()) == _sha256(shared.read_bytes())


def test_path_and_environment_override_the_packaged_table(tmp_path, monkeypatch):
    small = tmp_path / "two_rows.csv"
    with packaged_reference_csv().open("r", newline="") as fh:
        small.write_text("".join(next(fh) for _ in range(3)))
    assert len(load_reference_table(small)) == 2 * 11 * 2
    monkeypatch.setenv(REFERENCE_ENV, str(small))
    assert find_reference_csv() == small
    assert len(load_reference_table()) == 2 * 11 * 2
    monkeypatch.setenv(REFERENCE_ENV, str(tmp_path / "missing.csv"))
    with pytest.raises(DatasetError, match=f"missing.csv.*{REFERENCE_ENV}"):
        load_reference_table()
    monkeypatch.delenv(REFERENCE_ENV)
    assert find_reference_csv() == Path(str(packaged_reference_csv()))
    with pytest.raises(DatasetError, match="nothere.csv does not exist"):
        load_reference_table(tmp_path / "nothere.csv")


def test_cli_compare_reference_names_a_bad_table(tmp_path, capsys):
    """A table without the study's columns: exit 2 naming the column (the default, packaged
    table through the CLI is run from an installed wheel in tests/test_packaging.py)."""
    from napari_hrtem_transfer.cli import main

    bad = tmp_path / "copy.csv"
    bad.write_text(packaged_reference_csv().read_text().replace("freeze_option", "freeze", 1))
    assert main(["compare-reference", "--csv", str(bad), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "freeze_option" in err and "Traceback" not in err


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
