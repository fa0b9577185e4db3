"""Model-card breakdowns: grouping, bins, bootstrap coverage, markdown, evaluation rows."""

from __future__ import annotations

import numpy as np
import pytest

from napari_hrtem_transfer.evaluation.breakdown import (
    breakdown,
    breakdown_markdown,
    frame_rows_from_evaluation,
)
from napari_hrtem_transfer.evaluation.table import ResultTable


def _rows(n=40, seed=0, model="m"):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        out.append(
            {
                "model_id": model,
                "defocus_nm": [-10.0, 0.0, 10.0][i % 3],
                "material": ["Au", "CdSe"][i % 2],
                "dose_e_per_A2": [80.0, 400.0, 1000.0][i % 3],
                "diameter_nm": [2.5, 4.0, 9.0, 12.0][i % 4],
                "dice": float(np.clip(rng.normal(0.9, 0.03), 0, 1)),
            }
        )
    return out


def test_levels_counts_and_means():
    rows = _rows()
    out = breakdown(rows, n_boot=200)
    by = {(r["factor"], r["level"]): r for r in out}
    for df in (-10.0, 0.0, 10.0):
        vals = [r["dice"] for r in rows if r["defocus_nm"] == df]
        got = by[("defocus_nm", f"{df:g} nm")]
        assert got["n_frames"] == len(vals)
        assert got["dice"] == pytest.approx(np.mean(vals))
        assert got["dice_ci_low"] <= got["dice"] <= got["dice_ci_high"]
    assert by[("material", "Au")]["n_frames"] == 20
    # dose bins: 80 -> low, 400 -> medium, 1000 -> high; sizes: 2.5 / 4 / 9 / 12 nm bins
    assert by[("dose", "0-150 e/Å²")]["n_frames"] == 14
    assert by[("dose", "150-600 e/Å²")]["n_frames"] == 13
    assert by[("dose", ">= 600 e/Å²")]["n_frames"] == 13
    sizes = [r["level"] for r in out if r["factor"] == "size"]
    assert sizes == ["0-3 nm", "3-5 nm", "8-12.5 nm"]
    assert by[("size", "8-12.5 nm")]["n_frames"] == 20  # 9 and 12 nm
    # ordered: defocus ascending
    assert [r["level"] for r in out if r["factor"] == "defocus_nm"] == ["-10 nm", "0 nm", "10 nm"]


def test_rows_without_a_factor_are_left_out_of_it():
    rows = _rows(12)
    for r in rows[:4]:
        r["diameter_nm"] = float("nan")
        r["dose_e_per_A2"] = None
    out = breakdown(rows, by=("size", "dose"), n_boot=50)
    assert sum(r["n_frames"] for r in out if r["factor"] == "size") == 8
    assert sum(r["n_frames"] for r in out if r["factor"] == "dose") == 8
    with pytest.raises(ValueError, match="unknown factor"):
        breakdown(rows, by=("colour",))


def test_bootstrap_interval_covers_the_true_mean_about_95_percent():
    rng = np.random.default_rng(1)
    hits = 0
    trials = 200
    for t in range(trials):
        vals = rng.normal(0.9, 0.05, 30)
        rows = [{"material": "Au", "dice": v} for v in vals]
        r = breakdown(rows, by=("material",), n_boot=400, seed=t)[0]
        hits += r["dice_ci_low"] <= 0.9 <= r["dice_ci_high"]
    assert 0.88 <= hits / trials <= 0.99


def test_interval_shrinks_with_more_frames():
    small = breakdown(_rows(12, seed=2), by=("material",), n_boot=500)[0]
    large = breakdown(_rows(400, seed=2), by=("material",), n_boot=500)[0]
    w = lambda r: r["dice_ci_high"] - r["dice_ci_low"]  # noqa: E731
    assert w(large) < 0.5 * w(small)


def test_markdown_has_a_table_per_factor_and_a_column_per_model():
    rows = _rows(30, model="old") + _rows(30, seed=5, model="new")
    out = breakdown(rows, n_boot=100)
    md = breakdown_markdown(out)
    assert md.count("| Defocus") == 1 and md.count("| Material") == 1
    assert "| Dose" in md and "| Mean particle diameter" in md
    header = [ln for ln in md.splitlines() if ln.startswith("| Material")][0]
    assert header.split("|")[2].strip() == "old" and header.split("|")[3].strip() == "new"
    au_new = [r for r in out if r["model_id"] == "new" and r["level"] == "Au"][0]
    line = [ln for ln in md.splitlines() if ln.startswith("| Au ")][0]
    assert f"{au_new['dice']:.3f} [{au_new['dice_ci_low']:.3f}" in line
    assert f"(n={au_new['n_frames']})" in line


class _Result:
    def __init__(self, frames):
        self.frames = ResultTable.from_records(frames)
        self.model_id = "shipped"


class _Dataset:
    info = {"structures": [{"radii_nm": [1.0, 2.0]}, {"radii_nm": [3.0]}]}


def test_rows_from_an_evaluation_result_join_the_structure_sizes():
    frames = [
        {
            "model_id": "shipped",
            "image_index": i,
            "structure_id": f"s{i}",
            "material": "CdSe",
            "domain_defocus_nm": df,
            "dose_e_per_A2": 400.0,
            "dice": 0.5 + 0.1 * i,
        }
        for df in (-5.0, 5.0)
        for i in (0, 1)
    ]
    rows = frame_rows_from_evaluation(_Result(frames), _Dataset())
    assert [r["diameter_nm"] for r in rows] == [3.0, 6.0, 3.0, 6.0]
    assert {r["defocus_nm"] for r in rows} == {-5.0, 5.0}
    out = breakdown(rows, by=("size",), n_boot=50)
    assert [(r["level"], r["n_frames"]) for r in out] == [
        ("3-5 nm", 2),
        ("5-8 nm", 2),
    ]
    no_sizes = frame_rows_from_evaluation(_Result(frames))
    assert all(np.isnan(r["diameter_nm"]) for r in no_sizes)


def test_per_image_doses_of_the_simulator_are_used():
    frames = [
        {
            "image_index": i,
            "material": "Au",
            "domain_defocus_nm": df,
            "dice": 0.9,
            "dose_e_per_A2": 224.0,
        }
        for df in (-5.0, 5.0)
        for i in (0, 1)
    ]

    class _DS:
        defocus_nm = np.array([-5.0, 5.0])
        info = {
            "structures": [{"radii_nm": [1.0]}, {"radii_nm": [2.0]}],
            "per_image": {"dose_e_per_A2": [[60.0, 900.0], [300.0, None]]},
        }

    rows = frame_rows_from_evaluation(_Result(frames), _DS())
    assert [r["dose_e_per_A2"] for r in rows] == [60.0, 900.0, 300.0, 224.0]
