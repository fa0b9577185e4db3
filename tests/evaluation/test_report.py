"""Reports: files written, numbers in summary.json computed correctly, CLI errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from napari_hrtem_transfer.cli import main
from napari_hrtem_transfer.evaluation.labelled import EvaluationResult
from napari_hrtem_transfer.evaluation.reference import packaged_reference_csv
from napari_hrtem_transfer.evaluation.report import write_evaluation_report, write_reference_report
from napari_hrtem_transfer.evaluation.table import ResultTable

REPO = Path(__file__).resolve().parents[2]
# the published table ships with the package, so these tests never skip
REFERENCE_CSV = Path(str(packaged_reference_csv()))
DEFOCI = [-10.0, -5.0, 0.0, 5.0, 10.0]


def _result(stage: str, losses: list[float], model_id: str) -> EvaluationResult:
    rows, frames = [], []
    for d, loss in zip(DEFOCI, losses, strict=True):
        base = dict(
            model_id=model_id,
            stage=stage,
            pretrain_defocus_nm=-10.0,
            transfer_defocus_nm=5.0 if stage == "transfer" else None,
            domain_defocus_nm=d,
            structures="validation",
            source="test",
        )
        rows.append(
            dict(
                base,
                material="all",
                n_images=3,
                loss=loss,
                loss_ci_low=loss - 0.01,
                loss_ci_high=loss + 0.01,
                dice=0.8,
                dice_ci_low=0.7,
                dice_ci_high=0.9,
                iou=0.7,
                iou_ci_low=0.6,
                iou_ci_high=0.8,
                ood_score=abs(d) / 10,
                entropy=0.1,
            )
        )
        for k in range(3):
            frames.append(
                dict(
                    base,
                    image_index=k,
                    loss=loss + 0.01 * k,
                    dice=0.8,
                    iou=0.7,
                    ood_score=abs(d) / 10 + 0.01 * k,
                    entropy=0.1,
                )
            )
    rng = np.random.default_rng(0)
    samples = [
        dict(
            defocus_nm=d,
            image=rng.normal(size=(32, 32)),
            proba=rng.uniform(size=(32, 32)),
            mask=rng.uniform(size=(32, 32)) > 0.5,
            ood_score=0.1,
            dice=0.5,
            structure_id="s0",
        )
        for d in (-10.0, 10.0)
    ]
    return EvaluationResult(
        ResultTable.from_records(rows),
        ResultTable.from_records(frames),
        True,
        ["a note"],
        samples,
        model_id,
    )


def test_evaluation_report_files_and_numbers(tmp_path):
    before = _result("pretrain", [0.1, 0.2, 0.9, 0.3, 0.4], "pre")
    after = _result("transfer", [0.2, 0.2, 0.9, 0.2, 0.2], "ft")
    page = write_evaluation_report(tmp_path / "rep", after, before)
    out = tmp_path / "rep"
    assert page == out / "report.html"
    for name in (
        "report.md",
        "summary.json",
        "domains.csv",
        "domains.json",
        "frames.csv",
        "figures/domain_metrics.png",
        "figures/domain_bars.png",
        "figures/generalization.png",
        "figures/ood_vs_loss.png",
        "figures/samples.png",
    ):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert not list(out.rglob(".*tmp-*")), "temporary files left behind"
    s = json.loads((out / "summary.json").read_text())
    gb = s["models"]["before (pretrained)"]["generalization"]
    ga = s["models"]["after (fine-tuned)"]["generalization"]
    # before: std(0.1, 0.2, 0.3, 0.4) (0 nm excluded) = sqrt(0.0125); after: all 0.2 -> 0
    assert gb == pytest.approx(np.sqrt(0.0125))
    assert ga == pytest.approx(0.0)
    assert s["shift"] == pytest.approx(-np.sqrt(0.0125))
    assert "data:image/png;base64," in page.read_text()
    md = (out / "report.md").read_text()
    assert "figures/samples.png" in md and "a note" in md
    back = ResultTable.from_csv(out / "domains.csv")
    assert len(back) == 10 and set(back["stage"]) == {"pretrain", "transfer"}


def test_unlabelled_report_is_degraded_not_wrong(tmp_path):
    res = _result("pretrain", [np.nan] * 5, "pre")
    res.labelled = False
    write_evaluation_report(tmp_path / "u", res)
    s = json.loads((tmp_path / "u" / "summary.json").read_text())
    assert s["labelled"] is False
    assert s["models"]["model"]["generalization"] is None


def test_reference_report_from_own_records(tmp_path):
    recs = []
    for stage, losses in (("pretrain", [0.1, 0.2, 0.9, 0.3, 0.4]), ("transfer", [0.2] * 5)):
        for d, loss in zip(DEFOCI, losses, strict=True):
            recs.append(
                dict(
                    model_id=f"m/{stage}",
                    stage=stage,
                    pretrain_defocus_nm=-10.0,
                    transfer_defocus_nm=5.0,
                    domain_defocus_nm=d,
                    loss=loss,
                    source="mine",
                )
            )
    t = ResultTable.from_records(recs)
    write_reference_report(tmp_path / "r", t)
    s = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert s["reference_generalization_after_pretraining"]["-10"] == pytest.approx(np.sqrt(0.0125))
    cell = [c for c in s["reference_shift"] if c["value"] is not None][0]
    assert cell["value"] == pytest.approx(-np.sqrt(0.0125))
    for f in ("reference_target_before.png", "reference_shift.png", "reference_pair_bars.png"):
        assert (tmp_path / "r" / "figures" / f).is_file()


def test_cli_compare_reference_missing_columns_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("pretrain_defocus,transfer_defocus\n0,50\n")
    assert main(["compare-reference", "--csv", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "freeze_option" in err and "best_pretrain_val" in err


def test_cli_evaluate_missing_model_exit_2(tmp_path, capsys):
    code = main(
        [
            "evaluate",
            "--model",
            str(tmp_path / "nope"),
            "--data",
            str(tmp_path / "d.hspy"),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_compare_reference_published(tmp_path, capsys):
    assert REFERENCE_CSV.is_file()
    code = main(
        [
            "compare-reference",
            "--csv",
            str(REFERENCE_CSV),
            "--out",
            str(tmp_path / "ref"),
            "--freeze",
            "encoder",
            "--pair",
            "10",
            "5",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "report:" in out
    s = json.loads((tmp_path / "ref" / "summary.json").read_text())
    assert s["reference_pair"]["pretrain_defocus_nm"] == 10.0


def test_ood_axes_turn_symlog_when_one_frame_scores_far_above_the_rest(tmp_path):
    """A frame in which the model finds nothing can score ~40 where the others score ~1:
    the OOD axis becomes a symmetric log axis so that the others stay readable."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from napari_hrtem_transfer.evaluation.figures import _symlog_if_wide

    fig, (a, b) = plt.subplots(1, 2)
    _symlog_if_wide(a, [0.2, -1.0, 1.5, np.nan])
    _symlog_if_wide(b, [0.2, -1.0, 1.5, 41.0], axis="x")
    assert a.get_yscale() == "linear" and b.get_xscale() == "symlog"
    plt.close(fig)


def test_sample_frames_get_a_scale_bar_of_a_round_length(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from napari_hrtem_transfer.evaluation.figures import _scale_bar, plot_samples

    # 128 px at 0.2 A/px = 2.56 nm wide: a fifth is 0.51 nm -> a 0.5 nm bar of 25 px
    fig, ax = plt.subplots()
    ax.imshow(np.zeros((128, 128)))
    assert _scale_bar(ax, (128, 128), 0.2) == pytest.approx(0.5)
    (line,) = ax.lines
    x = line.get_xdata()
    assert x[1] - x[0] == pytest.approx(25.0)
    assert [t.get_text() for t in ax.texts] == ["0.5 nm"]
    # 512 px at 0.555 A/px = 28.4 nm: a 5 nm bar
    assert _scale_bar(ax, (512, 512), 0.555) == pytest.approx(5.0)
    plt.close(fig)

    rng = np.random.default_rng(0)
    sample = {
        "defocus_nm": 10.0,
        "image": rng.normal(size=(64, 64)),
        "proba": rng.uniform(size=(64, 64)),
        "mask": None,
        "ood_score": 0.1,
        "dice": 0.9,
        "sampling_A": 0.2,
    }
    assert plot_samples([sample], tmp_path / "s.png").stat().st_size > 1000


def test_generalization_legend_covers_neither_bars_nor_shift_labels(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from napari_hrtem_transfer.evaluation import figures

    seen = {}

    def keep(fig, path):
        fig.canvas.draw()
        ax = fig.axes[0]
        r = fig.canvas.get_renderer()
        legend = ax.get_legend().get_window_extent(r)
        seen["overlaps"] = [
            t.get_text() for t in ax.texts if t.get_window_extent(r).overlaps(legend)
        ]
        # outside the axes: it can cover neither a bar nor a label, whatever the values
        seen["outside"] = legend.x0 >= ax.get_window_extent(r).x1
        plt.close(fig)
        return Path(path)

    monkeypatch.setattr(figures, "savefig_atomic", keep)
    # the demo's figure: one model, generalization 0.036 -> 0.082
    figures.plot_generalization(["this model"], [0.036], [0.082], tmp_path / "g.png")
    assert seen["overlaps"] == []
    assert seen["outside"]


def test_overlap_vs_loss_figure_reports_the_rank_correlation(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from napari_hrtem_transfer.evaluation import figures

    dom = np.repeat([-20.0, -10.0, 0.0, 10.0, 20.0], 4)
    overlap = np.repeat([0.2, 0.6, 0.95, 0.7, 0.3], 4) + np.tile([0, 0.01, 0.02, 0.03], 5)
    loss = 1.0 - overlap  # lower overlap, higher loss: a perfect negative rank order
    seen = {}

    def keep(fig, path):
        seen["legend"] = fig.axes[0].get_legend().get_texts()[0].get_text()
        plt.close(fig)
        return Path(path)

    monkeypatch.setattr(figures, "savefig_atomic", keep)
    t = ResultTable({"ctf_overlap": overlap, "loss": loss, "domain_defocus_nm": dom})
    figures.plot_overlap_vs_loss(t, tmp_path / "o.png")
    assert "Spearman -1.00" in seen["legend"] and "frames -1.00" in seen["legend"]


@pytest.mark.parametrize("diverging", [False, True])
def test_matrix_missing_cells_are_grey_without_touching_the_shared_colormap(
    tmp_path, monkeypatch, diverging
):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from napari_hrtem_transfer.evaluation import figures
    from napari_hrtem_transfer.evaluation.aggregate import Matrix

    seen = {}

    def keep(fig, path):
        seen["bad"] = fig.axes[0].images[0].cmap.get_bad()
        plt.close(fig)
        return Path(path)

    monkeypatch.setattr(figures, "savefig_atomic", keep)
    m = Matrix(
        values=np.array([[0.1, np.nan], [-0.2, 0.3]]),
        rows_nm=np.array([-10.0, 10.0]),
        cols_nm=np.array([-10.0, 10.0]),
    )
    figures.plot_matrix(m, tmp_path / "m.png", diverging=diverging)
    np.testing.assert_allclose(seen["bad"], (0.85, 0.85, 0.85, 1.0))
    name = "RdBu_r" if diverging else "viridis"
    assert tuple(plt.get_cmap(name).get_bad()) != (0.85, 0.85, 0.85, 1.0)
