"""The tiny demo runs the whole protocol end to end; `evaluate` then runs on its outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_hrtem_transfer.cli import main


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    code = main(["demo", "--tiny", "--out", str(out)])
    assert code == 0
    return out


def _numbers(obj, path=""):
    """Every number of a JSON document, keyed by its path (strings such as paths are left out)."""
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in _numbers(val, f"{path}/{key}").items()}
    if isinstance(obj, list):
        return {k: v for i, val in enumerate(obj) for k, v in _numbers(val, f"{path}[{i}]").items()}
    if isinstance(obj, (int, float)) and not isinstance(obj, bool):
        return {path: obj}
    return {}


@pytest.mark.slow
def test_same_seed_same_summary_numbers(tmp_path):
    """A second tiny demo with the same seed repeats every number of summary.json exactly.

    The simulation is bitwise reproducible and training runs in deterministic mode.  Both runs
    use the same number of torch threads (CPU results depend on it); the module's ``demo``
    fixture is not reused, since it runs before this module's one-thread autouse fixture.
    """
    demo, out = tmp_path / "first", tmp_path / "again"
    assert main(["demo", "--tiny", "--out", str(demo)]) == 0
    assert main(["demo", "--tiny", "--out", str(out)]) == 0
    first = _numbers(json.loads((demo / "report" / "summary.json").read_text()))
    second = _numbers(json.loads((out / "report" / "summary.json").read_text()))
    assert "/shift" in first and any(k.endswith("/generalization") for k in first)
    assert len(first) >= 10
    assert second == first
    # and every number per frame (losses, Dice, OOD scores), compared as written
    import csv

    def frame_numbers(run):
        rows = list(csv.DictReader(open(run / "report" / "frames.csv")))
        return {
            (i, k): v for i, r in enumerate(rows) for k, v in r.items() if _is_number(v)
        }

    frames = frame_numbers(demo)
    assert len(frames) > 50
    assert frame_numbers(out) == frames


def _is_number(text):
    try:
        float(text)
    except (TypeError, ValueError):
        return False
    return True


def test_demo_cli_words_setting_errors_with_its_flags(tmp_path, capsys):
    """The protocol names its settings (pretrain_defocus_nm); the CLI user reads the flag."""
    code = main(["demo", "--tiny", "--out", str(tmp_path / "d"), "--pretrain-defocus", "7"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "--pretrain-defocus 7 nm is not one of the defoci" in err
    assert "pretrain_defocus_nm" not in err
    assert not (tmp_path / "d").exists()


@pytest.mark.slow
def test_demo_writes_report_models_and_records(demo, capsys):
    rep = demo / "report"
    for name in (
        "report.html",
        "report.md",
        "summary.json",
        "domains.csv",
        "frames.csv",
        "figures/domain_bars.png",
        "figures/samples.png",
        "figures/generalization.png",
    ):
        assert (rep / name).is_file(), name
    for m in ("pretrained", "finetuned"):
        assert (demo / m / "best.json").is_file()
        assert (demo / m / "ood_reference.safetensors").is_file()
        side = json.loads((demo / m / "best.json").read_text())
        assert "ood_reference" in side["extra"]
    s = json.loads((rep / "summary.json").read_text())
    before = s["models"]["before (pretrained)"]
    after = s["models"]["after (fine-tuned)"]
    assert set(before["loss_per_domain"]) == {"-10.0", "-5.0", "0.0", "5.0", "10.0"}

    # the shift is recomputed from the per-domain losses shown in the report
    def gen(d):
        return float(np.std([v for k, v in d.items() if float(k) != 0.0]))

    assert s["shift"] == pytest.approx(
        gen(after["loss_per_domain"]) - gen(before["loss_per_domain"])
    )
    # provenance of the fine-tuned model in the tidy records
    import csv

    rows = list(csv.DictReader(open(rep / "domains.csv")))
    ft = [r for r in rows if r["model_id"] == "finetuned"]
    assert ft and all(r["stage"] == "transfer" for r in ft)
    assert (
        float(ft[0]["pretrain_defocus_nm"]) == -10.0 and float(ft[0]["transfer_defocus_nm"]) == 5.0
    )
    assert all(r["structures"].startswith("validation") for r in ft)


@pytest.mark.slow
def test_evaluate_cli_on_demo_outputs(demo, tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(
        [
            "evaluate",
            "--model",
            str(demo / "finetuned"),
            "--before",
            str(demo / "pretrained"),
            "--data",
            str(demo / "series.hspy"),
            "--out",
            str(out),
            "--n-boot",
            "50",
        ]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "report:" in text and (out / "report.html").is_file()
    s = json.loads((out / "summary.json").read_text())
    assert s["labelled"] is True and "shift" in s
    import csv

    rows = list(csv.DictReader(open(out / "domains.csv")))
    # the file is the training dataset (same fingerprint): the held-out structures are used
    assert rows and all(r["structures"].startswith("validation") for r in rows)


@pytest.mark.slow
def test_evaluate_cli_sampling_mismatch(demo, tmp_path, capsys):
    from napari_hrtem_transfer.io import load_dataset, save_dataset

    ds = load_dataset(demo / "series.hspy", lazy=False)
    ds.sampling_A = 0.2  # the demo model was trained at 0.4 Å/px
    ds.path = None
    p = save_dataset(ds, tmp_path / "other.hspy")
    code = main(
        [
            "evaluate",
            "--model",
            str(demo / "pretrained"),
            "--data",
            str(p),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2
    assert "Å/px" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_records_aggregate_beside_the_published_table(demo, tmp_path, capsys):
    from pathlib import Path

    from napari_hrtem_transfer.evaluation.reference import packaged_reference_csv

    csv_path = Path(str(packaged_reference_csv()))  # ships with the package: never skipped
    assert csv_path.is_file()
    out = tmp_path / "cmp"
    code = main(
        [
            "compare-reference",
            "--csv",
            str(csv_path),
            "--results",
            str(demo / "report" / "domains.csv"),
            "--out",
            str(out),
            "--freeze",
            "encoder",
        ]
    )
    assert code == 0
    s = json.loads((out / "summary.json").read_text())
    # the demo's pair (-10 -> +5 nm) appears as one cell of the user's own shift matrix
    cells = [c for c in s["own_shift"] if c["value"] is not None]
    assert [(c["row_defocus_nm"], c["col_defocus_nm"]) for c in cells] == [(-10.0, 5.0)]
    assert cells[0]["value"] == pytest.approx(
        json.loads((demo / "report" / "summary.json").read_text())["shift"]
    )


@pytest.mark.slow
def test_evaluate_cli_without_masks_reports_label_free_only(demo, tmp_path, capsys):
    from napari_hrtem_transfer.io import load_dataset, save_dataset

    ds = load_dataset(demo / "series.hspy", lazy=False)
    ds.masks = None
    ds.path = None
    p = save_dataset(ds, tmp_path / "unlabelled.hspy")
    out = tmp_path / "u"
    code = main(
        [
            "evaluate",
            "--model",
            str(demo / "pretrained"),
            "--data",
            str(p),
            "--out",
            str(out),
            "--n-boot",
            "20",
        ]
    )
    assert code == 0
    captured = capsys.readouterr()
    assert "only label-free scores" in captured.err
    s = json.loads((out / "summary.json").read_text())
    assert s["labelled"] is False
    assert any("no ground-truth masks" in n for n in s["notes"])
    import csv

    rows = list(csv.DictReader(open(out / "domains.csv")))
    assert all(r["loss"] == "" and r["ood_score"] != "" for r in rows)
