"""The Evaluate / explore dock: the study's views (generalization after pretraining, the
pretrain x target matrices after transfer, the shift) from the published table or the
user's own evaluation records, and a before/after evaluation of one or two models on a
labelled dataset (per-defocus loss and Dice with confidence intervals; clicking a defocus
bar moves the viewer there). All numbers come from :mod:`napari_hrtem_transfer.evaluation`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import ComboBox, FileEdit, PushButton

from ...errors import ConfigError
from .._workers import JobStage
from ._base import JobDock, ThemedPlot, WrapLabel, notify
from ._models import ModelPicker, resolve_model

if TYPE_CHECKING:
    import napari

PUBLISHED = "published table (the study)"
MY_FILE = "my results file (CSV/JSON records)"
VIEWS = (
    "generalization after pretraining",
    "generalization after transfer",
    "shift of generalization (transfer − pretraining)",
    "target loss after transfer",
)
ALL = "all"
#: What the closed combo boxes show (short enough for a 360 px dock; the values stay).
SHORT = {
    PUBLISHED: "the study's table",
    MY_FILE: "my records (CSV/JSON)",
    VIEWS[0]: "generalization: pretrained",
    VIEWS[1]: "generalization: transfer",
    VIEWS[2]: "shift (transfer − pretrain)",
    VIEWS[3]: "target loss: transfer",
}


def evaluate_job(report: Any, dataset: str, models: list[tuple[str, str]],
                 stop: Any = None, device: str = "auto") -> list[Any]:
    """Evaluate each ``(name, model)`` on ``dataset`` (held-out structures): a thin call of
    :func:`napari_hrtem_transfer.evaluation.evaluate_model` per model."""
    from ...evaluation import evaluate_model
    from .._jobs import device_description
    from .._workers import JobProgress, JobStopped

    report(JobStage("device", "running", device_description(device)))
    results = []
    for k, (name, model) in enumerate(models):
        if stop is not None and stop.is_set():
            raise JobStopped(f"stopped after {k} of {len(models)} model(s); nothing shown")

        def progress(done: int, total: int, message: str = "", k=k, name=name) -> None:
            report(JobProgress(k * total + done, len(models) * total,
                               f"{name}: {message or f'{done}/{total}'}"))

        results.append(evaluate_model(model, dataset, model_id=name, progress=progress,
                                      device=None if device == "auto" else device))
    return results


def choice_text(value: Any) -> str:
    """A filter value as shown: whole numbers without a decimal point (N = 64, not 64.0)."""
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return str(int(value))
    return str(value)


class EvaluateWidget(JobDock):
    """Explore the study's numbers and evaluate your models before/after fine-tuning."""

    job_title = "Evaluation"
    prewarm_modules = ("napari_hrtem_transfer.evaluation",)

    def __init__(self, napari_viewer: napari.Viewer) -> None:
        from ...evaluation.table import REDUCTIONS

        super().__init__(napari_viewer, "Evaluate models")
        self.source = ComboBox(label="table", choices=[(SHORT[v], v) for v in (PUBLISHED, MY_FILE)],
                               value=PUBLISHED,
                               tooltip="The study's published results (packaged), or your "
                               "evaluation records (CSV/JSON written by evaluate or a sweep).")
        self.records = FileEdit(label="records file", mode="r", filter="*.csv *.json",
                                value="")
        self.view = ComboBox(label="view", choices=[(SHORT[v], v) for v in VIEWS], value=VIEWS[0],
                             tooltip="; ".join(VIEWS))
        self.reduction = ComboBox(label="reduction", choices=list(REDUCTIONS), value="median",
                                  tooltip="How the models of a cell are reduced (the study: "
                                  "median).")
        # choices from the loaded table, through callables: magicgui's reset_choices (napari
        # calls it whenever a layer is added or removed) asks them again instead of falling
        # back to the choices the widget was built with
        self._filter_choices: dict[str, list[str]] = {"freeze": [ALL], "n_transfer": [ALL]}
        self.freeze = ComboBox(label="freezing", value=ALL,
                               choices=lambda *_: self._filter_choices["freeze"])
        self.n_transfer = ComboBox(label="N images", value=ALL,
                                   tooltip="N: the number of fine-tuning images",
                                   choices=lambda *_: self._filter_choices["n_transfer"])
        self.show_button = PushButton(text="Show")
        self.dataset = FileEdit(label="labelled dataset", mode="r", filter="*.hspy", value="",
                                tooltip="A simulated (labelled) dataset to evaluate on.")
        self.before = ModelPicker(label="model (before)")
        self.after = ModelPicker(label="model (after)", allow_none="none")
        self.after.value = ""
        self.form.extend([self.source, self.records, self.view, self.reduction, self.freeze,
                          self.n_transfer, self.show_button])
        self.summary = WrapLabel("")
        self.add_row(self.summary)
        self.plot = ThemedPlot(napari_viewer, figsize=(3.4, 2.6), min_height=230,
                               min_interval_ms=50)
        self.add_row(self.plot.canvas)
        self.eval_form_label = WrapLabel("Evaluate one model, or two (before → after "
                                         "fine-tuning), on a labelled dataset:")
        self.add_row(self.eval_form_label)
        from magicgui.widgets import Container

        self.eval_form = Container(widgets=[self.dataset, *self.before.widgets,
                                            *self.after.widgets], labels=True)
        self.add_row(self.eval_form.native)
        self.add_row(self.before.card)
        self.add_job_rows()
        self.run_button.setText("Evaluate")
        #: what the explorer shows: {row key: value} or a Matrix
        self.values: Any = None
        self.results: list[Any] = []
        self._table: Any = None
        self._bars: list[tuple[Any, float]] = []
        self.show_button.changed.connect(lambda *_: self.show_view())
        for w in (self.view, self.reduction, self.freeze, self.n_transfer):
            w.changed.connect(lambda *_: self.show_view())
        self.source.changed.connect(lambda *_: self._load_table())
        self.records.changed.connect(lambda *_: self._load_table())
        self.plot.canvas.mpl_connect("pick_event", self._on_pick)
        self.plot.on_theme_change.append(self._redraw_for_theme)
        #: what the figure shows: "view" (the explorer) or "evaluation" (before/after)
        self.showing = "view"
        self.records.visible = False
        self._load_table()

    # -- the explorer
    def _load_table(self) -> None:
        from ...evaluation import load_reference_table
        from ...evaluation.table import ResultTable

        self.records.visible = self.source.value == MY_FILE
        try:
            if self.source.value == PUBLISHED:
                table = load_reference_table()
            else:
                path = str(self.records.value)
                if path in ("", "."):
                    self.summary.set_message("pick a records file (CSV or JSON).")
                    return
                table = (ResultTable.from_csv(path) if path.endswith(".csv")
                         else ResultTable.from_records(__import__("json").loads(
                             Path(path).read_text())))
        except Exception as exc:  # noqa: BLE001 - shown, nothing lost
            self.summary.set_message(f"cannot read the table: {exc}")
            notify("error", f"cannot read the table: {exc}")
            return
        self._table = table
        for w, col in ((self.freeze, "freeze"), (self.n_transfer, "n_transfer")):
            vals = [v for v in table.unique(col) if v is not None and v == v] if col in table \
                else []
            self._filter_choices[col] = [ALL, *[choice_text(v) for v in vals]]
            with w.changed.blocked():
                w.reset_choices()
                w.value = ALL
        self.show_view()

    def _filtered(self) -> Any:
        t = self._table
        conds: dict[str, Any] = {}
        if self.freeze.value != ALL:
            conds["freeze"] = self.freeze.value
        if self.n_transfer.value != ALL:
            conds["n_transfer"] = float(self.n_transfer.value)
        if not conds:
            return t
        # pretraining records carry no freezing/N: keep them, filter the transfer records
        pre = t.where(stage="pretrain")
        tra = t.where(stage="transfer").where(**conds)
        from ...evaluation.table import ResultTable

        return ResultTable.concat([pre, tra])

    def show_view(self) -> None:
        """Compute and draw the selected view (values kept in :attr:`values`)."""
        from ...evaluation.aggregate import (
            generalization_by,
            generalization_matrix,
            shift_matrix,
            target_matrix,
        )

        if self._table is None:
            return
        self.showing = "view"
        red = self.reduction.value
        try:
            t = self._filtered()
            view = self.view.value
            if view == VIEWS[0]:
                self.values = {k[0]: v for k, v in
                               generalization_by(t, stage="pretrain", reduction=red).items()}
                self._draw_bars(self.values, f"generalization after pretraining ({red})")
            else:
                m = (generalization_matrix(t, reduction=red) if view == VIEWS[1] else
                     shift_matrix(t, reduction=red) if view == VIEWS[2] else
                     target_matrix(t, reduction=red))
                self.values = m
                self._draw_matrix(m)
        except Exception as exc:  # noqa: BLE001 - e.g. the records lack a column
            self.summary.set_message(f"this view needs other records: {exc}")
            return

    def _redraw_for_theme(self) -> None:
        """Draw the figure again in the new theme's colours (bars, error bars, legend)."""
        if self.closed:
            return
        if self.showing == "evaluation" and self.results:
            self._plot_results(self.results)
        else:
            self.show_view()

    def _draw_bars(self, values: dict[float, float], title: str) -> None:
        ax = self.plot.ax
        ax.clear()
        self.plot.style_axes(ax)
        xs = sorted(values)
        ax.bar([f"{x:+g}" for x in xs], [values[x] for x in xs], color="C0")
        ax.set_xlabel("pretraining defocus [nm]", fontsize=8)
        ax.set_ylabel("generalization", fontsize=8)
        ax.set_title(title, fontsize=8)
        self.plot.request_draw(now=True)
        self.summary.set_message(title + ": " + ", ".join(
            f"{x:+g} nm → {values[x]:.2g}" for x in xs) + " (lower = more even across "
            "defoci; std of the per-defocus losses, 0 nm excluded).")

    def _draw_matrix(self, m: Any) -> None:
        self.plot.figure.clear()
        ax = self.plot.figure.add_subplot(111)
        self.plot.ax = ax
        self.plot.style_axes(ax)
        im = ax.imshow(m.values, aspect="auto", cmap="viridis", origin="lower")
        ax.set_xticks(range(len(m.cols_nm)), [f"{c:g}" for c in m.cols_nm], fontsize=6)
        ax.set_yticks(range(len(m.rows_nm)), [f"{r:g}" for r in m.rows_nm], fontsize=6)
        ax.set_xlabel(m.col_label, fontsize=8)
        ax.set_ylabel(m.row_label, fontsize=8)
        ax.set_title(m.title, fontsize=8)
        cb = self.plot.figure.colorbar(im, ax=ax)
        cb.ax.tick_params(labelsize=6, colors=self.plot.colors["text"])
        self.plot.request_draw(now=True)
        finite = m.values[np.isfinite(m.values)]
        self.summary.set_message(
            f"{m.title} ({m.value_label}): {len(m.rows_nm)} × {len(m.cols_nm)} cells, "
            f"median {np.median(finite):.2g}, range {finite.min():.2g} … {finite.max():.2g}."
            if finite.size else f"{m.title}: no cell with data.")

    # -- before/after evaluation (a job)
    def _prepare(self) -> tuple[Any, tuple, dict]:
        data = str(self.dataset.value)
        if data in ("", ".") or not Path(data).is_file():
            raise ConfigError("'labelled dataset': choose a simulated .hspy dataset (with "
                              "masks) to evaluate on.", "dataset")
        models = []
        for picker, name in ((self.before, "before"), (self.after, "after")):
            v = picker.value
            if v == "":
                continue
            path = resolve_model(v)
            if path is None:
                raise ConfigError(f"'model ({name})': the shipped pretrained model is not "
                                  "available in this installation; pick a model folder.",
                                  "model")
            models.append((name, str(path)))
        return evaluate_job, (data, models), {}

    def on_done(self, results: list[Any]) -> None:
        """Per-defocus loss and Dice before/after, with confidence intervals."""
        self.results = results
        self._plot_results(results)

    def _plot_results(self, results: list[Any]) -> None:
        from ...evaluation.metrics import generalization

        self.showing = "evaluation"
        self.plot.figure.clear()
        ax_l = self.plot.figure.add_subplot(211)
        ax_d = self.plot.figure.add_subplot(212, sharex=ax_l)
        self.plot.ax = ax_l
        self._bars = []
        lines = []
        width = 0.8 / max(1, len(results))
        for k, res in enumerate(results):
            d = res.domains
            x = np.asarray(d["domain_defocus_nm"], float)
            order = np.argsort(x)
            pos = np.arange(len(x)) + (k - (len(results) - 1) / 2) * width
            for ax, col in ((ax_l, "loss"), (ax_d, "dice")):
                self.plot.style_axes(ax)
                y = np.asarray(d[col], float)[order]
                lo = np.asarray(d[f"{col}_ci_low"], float)[order] if f"{col}_ci_low" in d \
                    else y
                hi = np.asarray(d[f"{col}_ci_high"], float)[order] if f"{col}_ci_high" in d \
                    else y
                bars = ax.bar(pos, y, width, yerr=[y - lo, hi - y], color=f"C{k}",
                              label=res.model_id, picker=True, ecolor=self.plot.colors["text"])
                for b, xv in zip(bars, x[order], strict=True):
                    self._bars.append((b, float(xv)))
                ax.set_ylabel(col, fontsize=8)
            ax_d.set_xticks(np.arange(len(x)), [f"{v:+g}" for v in x[order]], fontsize=7)
            gen = generalization(np.asarray(d["loss"], float), x)
            lines.append(f"{res.model_id}: generalization {gen:.3g}")
        ax_d.set_xlabel("defocus [nm] (click a bar: go there)", fontsize=8)
        ax_l.legend(fontsize=7)
        self.plot.style_axes(ax_l)  # the legend too
        if len(results) == 2:
            from ...evaluation.metrics import shift

            g = [generalization(np.asarray(r.domains["loss"], float),
                                np.asarray(r.domains["domain_defocus_nm"], float))
                 for r in results]
            lines.append(f"shift {shift(g[1], g[0]):+.3g} (positive = worse after)")
        self.plot.request_draw(now=True)
        self.set_fraction(1.0)
        self.set_status("; ".join(lines))

    def _on_pick(self, event: Any) -> None:
        for bar, defocus in self._bars:
            if event.artist is bar:
                self.go_to_defocus(defocus)
                return

    def go_to_defocus(self, defocus_nm: float) -> bool:
        """Move the viewer's defocus slider to ``defocus_nm`` (a layer with a defocus axis)."""
        for layer in self._viewer.layers:
            labels = list(getattr(layer, "axis_labels", ()))
            if "defocus" not in labels:
                continue
            a = labels.index("defocus")
            values = (layer.metadata or {}).get("defocus_nm")
            if values is not None:
                i = int(np.argmin(np.abs(np.asarray(values, float) - defocus_nm)))
                world = layer.translate[a] + i * layer.scale[a]
            else:
                world = defocus_nm
            off = self._viewer.dims.ndim - layer.ndim
            self._viewer.dims.set_point(a + off, world)
            return True
        return False
