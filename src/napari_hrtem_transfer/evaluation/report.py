"""Self-contained reports of evaluations and of the published table (figures: :mod:`.figures`).

A report folder holds::

    report.md        Markdown with the figures linked (figures/*.png)
    report.html      the same page with the figures embedded (one self-contained file)
    summary.json     the numbers shown in the report
    domains.csv/json tidy records, one row per model x domain
    frames.csv       one row per frame (evaluations only)
    figures/*.png

Every file is written under a temporary name and renamed when complete.  Axes are labelled
in nm (defocus, abTEM sign: positive = underfocus).
"""

from __future__ import annotations

import base64
import html
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..io.atomic import write_text_atomic
from .aggregate import (
    domain_profile,
    generalization_by,
    generalization_matrix,
    shift_matrix,
    target_matrix,
)
from .figures import (
    plot_domain_bars,
    plot_domain_metrics,
    plot_generalization,
    plot_matrix,
    plot_ood_vs_loss,
    plot_overlap_vs_loss,
    plot_samples,
)
from .metrics import generalization, shift
from .table import ResultTable

__all__ = [
    "Report",
    "plot_domain_bars",
    "plot_domain_metrics",
    "plot_generalization",
    "plot_matrix",
    "plot_ood_vs_loss",
    "plot_overlap_vs_loss",
    "plot_samples",
    "write_evaluation_report",
    "write_reference_report",
]


# ----------------------------------------------------------------------------- report
@dataclass
class Report:
    """A page built from blocks, rendered to Markdown (linked PNGs) and HTML (embedded)."""

    title: str
    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def heading(self, text: str) -> None:
        """Add a section heading."""
        self.blocks.append(("h", text))

    def text(self, text: str) -> None:
        """Add a paragraph."""
        self.blocks.append(("p", text))

    def bullets(self, items: Sequence[str]) -> None:
        """Add a bulleted list."""
        if items:
            self.blocks.append(("ul", list(items)))

    def figure(self, path: Path, caption: str) -> None:
        """Add a figure (a PNG inside the report folder)."""
        self.blocks.append(("fig", (Path(path), caption)))

    def table(self, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """Add a table (floats shown with 4 significant digits)."""
        self.blocks.append(("table", (list(header), [list(r) for r in rows])))

    @staticmethod
    def _cell(v: Any) -> str:
        if v is None or (isinstance(v, float) and not np.isfinite(v)):
            return "–"
        if isinstance(v, float | np.floating):
            return f"{v:.4g}"
        return str(v)

    def markdown(self, root: Path) -> str:
        """The page as Markdown; figure links are relative to ``root``."""
        out = [f"# {self.title}", ""]
        for kind, b in self.blocks:
            if kind == "h":
                out += [f"## {b}", ""]
            elif kind == "p":
                out += [b, ""]
            elif kind == "ul":
                out += [f"- {x}" for x in b] + [""]
            elif kind == "fig":
                p, cap = b
                out += [f"![{cap}]({p.relative_to(root).as_posix()})", "", f"*{cap}*", ""]
            elif kind == "table":
                h, rows = b
                out += ["| " + " | ".join(h) + " |", "|" + "---|" * len(h)]
                out += ["| " + " | ".join(self._cell(v) for v in r) + " |" for r in rows]
                out.append("")
        return "\n".join(out)

    def html(self) -> str:
        """The page as one self-contained HTML file (figures embedded as base64 PNG)."""
        e = html.escape
        out = [
            "<!DOCTYPE html><html><head><meta charset='utf-8'>",
            f"<title>{e(self.title)}</title>",
            "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
            "table{border-collapse:collapse;font-size:90%}td,th{border:1px solid #ccc;"
            "padding:2px 6px;text-align:right}img{max-width:100%}figcaption{font-style:italic;"
            "font-size:90%}</style></head><body>",
            f"<h1>{e(self.title)}</h1>",
        ]
        for kind, b in self.blocks:
            if kind == "h":
                out.append(f"<h2>{e(b)}</h2>")
            elif kind == "p":
                out.append(f"<p>{e(b)}</p>")
            elif kind == "ul":
                out.append("<ul>" + "".join(f"<li>{e(x)}</li>" for x in b) + "</ul>")
            elif kind == "fig":
                p, cap = b
                data = base64.b64encode(p.read_bytes()).decode("ascii")
                out.append(
                    f"<figure><img alt='{e(cap)}' src='data:image/png;base64,{data}'>"
                    f"<figcaption>{e(cap)}</figcaption></figure>"
                )
            elif kind == "table":
                h, rows = b
                out.append("<table><tr>" + "".join(f"<th>{e(x)}</th>" for x in h) + "</tr>")
                out += [
                    "<tr>" + "".join(f"<td>{e(self._cell(v))}</td>" for v in r) + "</tr>"
                    for r in rows
                ]
                out.append("</table>")
        out.append("</body></html>")
        return "\n".join(out)

    def write(self, out_dir: Path) -> Path:
        """Write ``report.md`` and ``report.html`` into ``out_dir``; return the HTML path."""
        write_text_atomic(out_dir / "report.md", self.markdown(out_dir))
        return write_text_atomic(out_dir / "report.html", self.html())


def _prepare(out_dir: str | os.PathLike) -> tuple[Path, Path]:
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder for the report.", "--out")
    figs = out / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    return out, figs


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _clean(o):
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_clean(v) for v in o]
    if isinstance(o, float | np.floating):
        return float(o) if np.isfinite(o) else None
    return o


def _write_json(path: Path, obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(_clean(obj), indent=1, default=_json_default))


def _domain_losses(t: ResultTable) -> dict[float, float]:
    t = t.where(material="all") if "material" in t else t
    return {float(d): float(v) for d, v in zip(t["domain_defocus_nm"], t["loss"], strict=True)}


def _has_ood(res) -> bool:
    return bool(len(res.frames)) and bool(np.isfinite(res.frames["ood_score"]).any())


def _r(v) -> str:
    return "–" if v is None else f"{v:.2f}"


def _ood_spearman(res) -> dict[str, float | None]:
    """Spearman correlation of OOD score and loss, per domain and per frame."""
    from scipy.stats import spearmanr

    f = res.frames
    ok = np.isfinite(f["ood_score"]) & np.isfinite(f["loss"])
    t = res.domains.where(material="all") if "material" in res.domains else res.domains
    okd = np.isfinite(t["ood_score"]) & np.isfinite(t["loss"])
    rho_f = float(spearmanr(f["ood_score"][ok], f["loss"][ok])[0]) if ok.sum() > 2 else None
    rho_d = float(spearmanr(t["ood_score"][okd], t["loss"][okd])[0]) if okd.sum() > 2 else None
    return {"per_domain": rho_d, "per_frame": rho_f}


def _generalization_or_none(losses: dict[float, float], exclude_nm) -> float | None:
    try:
        g = generalization(losses, exclude_nm=exclude_nm)
    except ConfigError:
        return None
    return g if np.isfinite(g) else None


def write_evaluation_report(
    out_dir: str | os.PathLike,
    after: Any,
    before: Any | None = None,
    title: str = "Out-of-distribution evaluation",
    exclude_nm: Sequence[float] = (0.0,),
    notes: Sequence[str] = (),
    reference: ResultTable | None = None,
) -> Path:
    """Write the report of one evaluation (and of the model before fine-tuning, if given).

    Parameters
    ----------
    out_dir
        Report folder (created).
    after
        :class:`~.labelled.EvaluationResult` of the model (after fine-tuning, if any).
    before
        The same for the model before fine-tuning (e.g. the pretrained checkpoint).
    title
        Page title.
    exclude_nm
        Domains left out of the generalization [nm].
    notes
        Extra remarks shown at the top.
    reference
        The published table (:func:`~.reference.load_reference_table`) to show beside.

    Returns
    -------
    Path
        ``report.html`` (``report.md`` lies beside it).
    """
    out, figs = _prepare(out_dir)
    rep = Report(title)
    all_notes = (
        list(notes)
        + list(after.notes)
        + ([f"(before) {n}" for n in before.notes] if before else [])
    )
    rep.bullets(list(dict.fromkeys(all_notes)))
    tables = {"after" if before is not None else "model": after.domains}
    if before is not None:
        tables = {"before (pretrained)": before.domains, "after (fine-tuned)": after.domains}
    _write_records(out, after, before)
    summary: dict[str, Any] = {
        "title": title,
        "labelled": bool(after.labelled),
        "notes": all_notes,
        "models": {},
        "exclude_nm": list(exclude_nm),
    }
    _domain_section(rep, tables, summary, exclude_nm, figs)
    if after.labelled:
        if before is not None:
            _transfer_section(rep, before, after, summary, exclude_nm, figs)
        _ood_section(rep, before, after, summary, figs)
    if after.samples:
        rep.heading("Sample frames")
        rep.figure(
            plot_samples(after.samples, figs / "samples.png"),
            "Sample frames with the predicted mask (yellow) and the ground truth (cyan); "
            "titles give the defocus, the OOD score and the Dice.",
        )
    if reference is not None:
        _reference_section(rep, reference, figs, summary)
    _write_json(out / "summary.json", summary)
    return rep.write(out)


def _write_records(out: Path, after: Any, before: Any | None) -> None:
    """``domains.csv``/``.json`` and ``frames.csv``: the records of both models."""
    bdom = before.domains if before else ResultTable()
    bfr = before.frames if before else ResultTable()
    if before is not None and len(after.domains) and len(bdom):
        # the pretrained model is the "before" of this (pretrain, target) pair: record the
        # pair's target so that the tidy records aggregate like the study's table
        t = after.domains["transfer_defocus_nm"][0]
        if np.isfinite(t) and np.all(np.isnan(bdom["transfer_defocus_nm"])):
            bdom = bdom.with_column("transfer_defocus_nm", t)
            bfr = bfr.with_column("transfer_defocus_nm", t)
    domains = ResultTable.concat([bdom, after.domains])
    domains.to_csv(out / "domains.csv")
    domains.to_json(out / "domains.json")
    frames = ResultTable.concat([bfr, after.frames])
    frames.to_csv(out / "frames.csv")


def _domain_section(
    rep: Report, tables: dict, summary: dict, exclude_nm: Sequence[float], figs: Path
) -> None:
    """The per-domain tables and figure; each model's losses and generalization in summary."""
    rep.heading("Per-domain results")
    rep.text(
        "Loss (mean binary cross-entropy), Dice and IoU over the evaluated frames of each "
        "defocus domain, with 95% bootstrap confidence intervals; the label-free OOD score "
        "(median over frames: about 0 for training-like frames, growing as the model gets "
        "less sure of the particle edges or finds none, and as the input looks less like its "
        "training images). Defocus in nm, abTEM sign (positive = underfocus)."
    )
    for label, t in tables.items():
        tt = t.where(material="all") if "material" in t else t
        rows = [
            [
                f"{r['domain_defocus_nm']:+g}",
                r["n_images"],
                r["loss"],
                r["loss_ci_low"],
                r["loss_ci_high"],
                r["dice"],
                r["iou"],
                r.get("ood_score"),
                r.get("entropy"),
            ]
            for r in sorted(tt.records(), key=lambda r: r["domain_defocus_nm"])
        ]
        rep.text(
            f"{label.capitalize()}: model {tt['model_id'][0] if len(tt) else ''}; "
            f"structures: {tt['structures'][0] if len(tt) else ''}."
        )
        rep.table(
            [
                "defocus [nm]",
                "frames",
                "loss",
                "loss CI low",
                "loss CI high",
                "Dice",
                "IoU",
                "OOD score",
                "entropy [nats]",
            ],
            rows,
        )
        summary["models"][label] = {
            "model_id": str(tt["model_id"][0]) if len(tt) else "",
            "loss_per_domain": _domain_losses(t),
            "generalization": _generalization_or_none(_domain_losses(t), exclude_nm),
        }
    rep.figure(
        plot_domain_metrics(tables, figs / "domain_metrics.png"),
        "Loss, Dice and OOD score per defocus domain (error bars: 95% bootstrap CI).",
    )


def _transfer_section(
    rep: Report, before: Any, after: Any, summary: dict, exclude_nm: Sequence[float], figs: Path
) -> None:
    """Loss per domain before/after and the generalization shift."""
    lb, la = _domain_losses(before.domains), _domain_losses(after.domains)
    doms = sorted(set(lb) | set(la))
    prov = after.domains.records()[0] if len(after.domains) else {}
    marks = {}
    if prov.get("pretrain_defocus_nm") is not None:
        marks["pretraining"] = prov["pretrain_defocus_nm"]
    if prov.get("transfer_defocus_nm") is not None:
        marks["target"] = prov["transfer_defocus_nm"]
    rep.figure(
        plot_domain_bars(
            doms,
            [lb.get(d, np.nan) for d in doms],
            [la.get(d, np.nan) for d in doms],
            figs / "domain_bars.png",
            title="Loss per domain before and after transfer",
            marks=marks,
        ),
        "Loss per domain before (blue) and after (orange) fine-tuning.",
    )
    gb = summary["models"]["before (pretrained)"]["generalization"]
    ga = summary["models"]["after (fine-tuned)"]["generalization"]
    if gb is not None and ga is not None:
        s = shift(ga, gb)
        summary["shift"] = s
        rep.heading("Generalization and shift")
        rep.text(
            f"Generalization (population std of the per-domain losses over the defoci "
            f"except {', '.join(f'{e:g}' for e in exclude_nm)} nm; lower = better): "
            f"{gb:.4g} before, {ga:.4g} after fine-tuning; shift {s:+.4g} "
            f"({'worse' if s > 0 else 'better or equal'} out of distribution)."
        )
        rep.figure(
            plot_generalization(["this model"], [gb], [ga], figs / "generalization.png"),
            "Generalization before and after fine-tuning; the shift is after − before.",
        )


def _ood_section(rep: Report, before: Any | None, after: Any, summary: dict, figs: Path) -> None:
    """Does the label-free OOD score (and the CTF overlap) track the loss?"""
    results = {"after (fine-tuned)" if before is not None else "model": after}
    if before is not None:
        results = {"before (pretrained)": before, **results}
    rho = {k: _ood_spearman(r) for k, r in results.items() if _has_ood(r)}
    if rho:
        summary["ood_spearman"] = rho
        rep.heading("Does the label-free OOD score track the true loss?")
        rep.text(
            "Spearman rank correlation between the OOD score and the loss, per domain "
            "(median score vs. mean loss) and per frame: "
            + "; ".join(
                f"{k}: {_r(v['per_domain'])} per domain, {_r(v['per_frame'])} per frame"
                for k, v in rho.items()
            )
            + ". Each model's score is measured against its own training domain."
        )
        last = list(results)[-1] if _has_ood(results[list(results)[-1]]) else list(rho)[0]
        f = results[last].frames
        ok = np.isfinite(f["ood_score"]) & np.isfinite(f["loss"])
        rep.figure(
            plot_ood_vs_loss(f.take(ok), figs / "ood_vs_loss.png", title=last),
            f"Per-frame OOD score vs. true loss, {last} (colour: defocus).",
        )
        okc = ok & np.isfinite(f["ctf_overlap"]) if "ctf_overlap" in f else None
        if okc is not None and okc.sum() > 2:
            rep.figure(
                plot_overlap_vs_loss(f.take(okc), figs / "overlap_vs_loss.png", title=last),
                f"Per-frame CTF information-transfer overlap with the training conditions "
                f"vs. true loss, {last} (frames with Thon rings; docs/ctf.md). A physical "
                "measure of the imaging-condition shift: lower overlap, higher loss "
                "expected.",
            )


def describe_sources(table: ResultTable) -> str:
    """Whose numbers a table holds, in a few words: one source, or "N runs of sweep X"."""
    if "source" not in table or not len(table):
        return "results table"
    sources = sorted({str(v) for v in table["source"]})
    if len(sources) == 1:
        return sources[0] or "results table"
    sweeps = sorted({v.split(" run ", 1)[0] for v in sources if v.startswith("sweep ")})
    if sweeps and all(v.startswith("sweep ") and " run " in v for v in sources):
        return f"{len(sources)} runs of {', '.join(sweeps)}"
    return f"{len(sources)} sources ({', '.join(sources[:3])}{', ...' if len(sources) > 3 else ''})"


def _reference_section(
    rep: Report,
    table: ResultTable,
    figs: Path,
    summary: dict,
    reduction: str = "median",
    exclude_nm: Sequence[float] = (0.0,),
    pair: tuple[float, float] | None = None,
    prefix: str = "reference_",
) -> None:
    from .reference import REFERENCE_CITATION

    if "material" in table:
        table = table.where(material=lambda c: (c == "all") | (c == ""))
    published = "source" in table and len(table) and set(table["source"]) == {REFERENCE_CITATION}
    if published:
        rep.heading("The study's views: the published table")
        cite = REFERENCE_CITATION
    else:
        rep.heading("The study's views: your results")
        cite = describe_sources(table)
    rep.text(
        f"Source: {cite}. Reduction over models: {reduction}. Defocus in nm (the published "
        "table gives Å; converted on import)."
    )
    g = generalization_by(table, ("pretrain_defocus_nm",), "pretrain", reduction, exclude_nm)
    rows = [[f"{k[0]:+g}", v] for k, v in sorted(g.items())]
    rep.table(["pretraining defocus [nm]", f"generalization after pretraining ({reduction})"], rows)
    summary[f"{prefix}generalization_after_pretraining"] = {f"{k[0]:g}": v for k, v in g.items()}
    mats = {}
    for name, mat, div in (
        ("target_before", target_matrix(table, "pretrain", reduction), False),
        ("target_after", target_matrix(table, "transfer", reduction), False),
        (
            "generalization_after",
            generalization_matrix(table, "transfer", reduction, exclude_nm),
            False,
        ),
        ("shift", shift_matrix(table, reduction, exclude_nm), True),
    ):
        mats[name] = mat
        summary[f"{prefix}{name}"] = mat.to_records()
        if mat.values.size and np.isfinite(mat.values).any():
            rep.figure(plot_matrix(mat, figs / f"{prefix}{name}.png", diverging=div), mat.title)
        else:
            rep.text(f"{mat.title}: no (pretraining, target) pair with both stages in the table.")
    pre = list(g)
    rep.figure(
        plot_generalization(
            [f"{k[0]:+g}" for k in sorted(pre)],
            [g[k] for k in sorted(pre)],
            None,
            figs / f"{prefix}generalization_pretrain.png",
            title=f"Generalization after pretraining ({reduction} over models)",
            xlabel="pretraining defocus [nm]",
        ),
        "Generalization after pretraining per pretraining domain (lower = better).",
    )
    if pair is None:
        s = mats["shift"]
        if np.isfinite(s.values).any():
            i, j = np.unravel_index(np.nanargmax(s.values), s.values.shape)
            pair = (float(s.rows_nm[i]), float(s.cols_nm[j]))
    if pair is not None:
        prof = domain_profile(table, pair[0], pair[1], reduction)
        rep.figure(
            plot_domain_bars(
                prof.domains_nm,
                prof.before,
                prof.after,
                figs / f"{prefix}pair_bars.png",
                title=f"Pretrained at {pair[0]:+g} nm, fine-tuned at {pair[1]:+g} nm ({reduction})",
                marks={"pretraining": pair[0], "target": pair[1]},
            ),
            f"Loss per domain before and after transfer for the pair "
            f"{pair[0]:+g} → {pair[1]:+g} nm.",
        )
        summary[f"{prefix}pair"] = {
            "pretrain_defocus_nm": pair[0],
            "transfer_defocus_nm": pair[1],
            "domains_nm": prof.domains_nm.tolist(),
            "before": prof.before.tolist(),
            "after": prof.after.tolist(),
        }


def write_reference_report(
    out_dir: str | os.PathLike,
    table: ResultTable,
    reduction: str = "median",
    exclude_nm: Sequence[float] = (0.0,),
    pair: tuple[float, float] | None = None,
    own: ResultTable | None = None,
    title: str = "Transfer learning across defocus domains: the study's views",
) -> Path:
    """Aggregate a results table (the published one, a user's, or both) into the study's views.

    Parameters
    ----------
    out_dir
        Report folder (created).
    table
        Tidy records, e.g. :func:`~.reference.load_reference_table` (optionally filtered with
        ``table.where(freeze="encoder", n_transfer=64)``).
    reduction
        ``"median"``, ``"mean"``, ``"min"`` or ``"max"`` over the models of a cell.
    exclude_nm
        Domains left out of the generalization [nm].
    pair
        (pretraining, target) defocus [nm] for the per-domain bars; default: the pair whose
        generalization got most worse.
    own
        The user's own tidy records, shown in a second set of views beside the table.
    title
        Page title.
    """
    out, figs = _prepare(out_dir)
    rep = Report(title)
    summary: dict[str, Any] = {
        "reduction": reduction,
        "exclude_nm": list(exclude_nm),
        "n_rows": len(table),
    }
    _reference_section(rep, table, figs, summary, reduction, exclude_nm, pair)
    if own is not None and len(own):
        own.to_csv(out / "own_records.csv")
        _reference_section(rep, own, figs, summary, reduction, exclude_nm, None, prefix="own_")
    _write_json(out / "summary.json", summary)
    return rep.write(out)
