"""``hrtem-transfer evaluate`` and ``hrtem-transfer compare-reference``.

Nothing heavy is imported at module level (``--help`` stays fast).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .flags import add_required_path


def _progress(prefix: str):
    def cb(done: int, total: int, message: str) -> None:
        print(
            f"\r{prefix}: {done}/{total} {message}    ",
            end="" if done < total else "\n",
            file=sys.stderr,
            flush=True,
        )

    return cb


def _check_out(out: Path) -> Path:
    from ..errors import ConfigError

    out = out.expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder for the report.", "--out")
    parent = out.parent if str(out.parent) else Path(".")
    if not out.exists() and not parent.exists():
        raise ConfigError(
            f"--out {out}: the folder {parent} does not exist. Create it first or choose "
            "another path.",
            "--out",
        )
    return out


def _add_exclude(p: argparse.ArgumentParser, note: str = "") -> None:
    p.add_argument(
        "--exclude",
        type=float,
        nargs="*",
        default=[0.0],
        metavar="NM",
        help=f"defoci [nm] left out of the generalization{note}",
    )


# ----------------------------------------------------------------------------- evaluate
def add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    """Declare the options of ``evaluate``."""
    add_required_path(
        p,
        "--model",
        "MODEL_DIR",
        "checkpoint folder of the model to evaluate (after fine-tuning, if any)",
    )
    add_required_path(
        p,
        "--data",
        "D",
        "labelled defocus series (.hspy, from 'hrtem-transfer simulate'); without masks only "
        "label-free scores are computed",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("evaluation"),
        metavar="DIR",
        help="report folder (report.html, report.md, summary.json, domains.csv, frames.csv, "
        "figures/)",
    )
    p.add_argument(
        "--before",
        type=Path,
        metavar="MODEL_DIR",
        help="the model before fine-tuning (e.g. the pretrained checkpoint), for the "
        "before/after comparison and the shift of generalization",
    )
    p.add_argument(
        "--which", choices=("best", "last"), default="best", help="checkpoint to evaluate"
    )
    p.add_argument(
        "--structures",
        choices=("validation", "all"),
        default="validation",
        help="held-out structures recorded in the checkpoint, or all structures",
    )
    _add_exclude(p, " (the study leaves out 0 nm)")
    p.add_argument(
        "--n-boot", type=int, default=1000, help="bootstrap resamples of the confidence intervals"
    )
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    p.add_argument(
        "--device", default=None, help="torch device (default: CUDA if present, else CPU)"
    )
    p.add_argument(
        "--fit-ood",
        action="store_true",
        help="(re)fit the OOD reference of --model (and --before) on its training images "
        "in --data before evaluating, if it has none",
    )
    p.add_argument(
        "--reference",
        nargs="?",
        const="auto",
        default=None,
        metavar="CSV",
        help="also show the study's published table (paper_defocus_sweep.csv; the copy "
        "that ships with the package if no path is given)",
    )


def _ensure_reference(model_dir: Path, ds, which: str, device) -> str | None:
    """Fit the OOD reference on the model's training images if the folder has none."""
    from ..evaluation.ood import fit_ood_reference_for_checkpoint

    msg = fit_ood_reference_for_checkpoint(model_dir, ds, which=which, device=device)
    return None if msg.endswith("already present.") else msg


def run_evaluate(args: argparse.Namespace) -> int:
    """Evaluate ``--model`` (and ``--before``) on ``--data`` and write the report."""
    from ..errors import ConfigError
    from ..evaluation.labelled import evaluate_model
    from ..evaluation.reference import load_reference_table
    from ..evaluation.report import write_evaluation_report
    from ..io import load_dataset

    out = _check_out(args.out)
    if args.n_boot < 1:
        raise ConfigError("--n-boot must be at least 1.", "--n-boot")
    for p in [args.model] + ([args.before] if args.before else []):
        if not p.exists():
            raise ConfigError(f"model folder {p} does not exist.", "--model")
    reference = None
    if args.reference is not None:
        reference = load_reference_table(None if args.reference == "auto" else args.reference)
    ds = load_dataset(args.data, lazy=True)
    notes = []
    if args.fit_ood:
        for m in [args.model] + ([args.before] if args.before else []):
            msg = _ensure_reference(m, ds, args.which, args.device)
            if msg:
                notes.append(msg)
                print(msg, file=sys.stderr)
    kw = dict(
        structures=args.structures,
        which=args.which,
        batch_size=args.batch_size,
        n_boot=args.n_boot,
        device=args.device,
    )
    before = None
    if args.before:
        before = evaluate_model(args.before, ds, progress=_progress("before"), **kw)
    after = evaluate_model(args.model, ds, progress=_progress("model"), **kw)
    if not after.labelled:
        print(
            "note: the dataset has no ground-truth masks; only label-free scores were computed.",
            file=sys.stderr,
        )
    page = write_evaluation_report(
        out, after, before, exclude_nm=tuple(args.exclude), notes=notes, reference=reference
    )
    _print_summary(after, before)
    print(f"report: {page}")
    print(
        f"        {out / 'report.md'}, {out / 'domains.csv'}, {out / 'frames.csv'}, "
        f"{out / 'summary.json'}"
    )
    return 0


def _print_summary(after, before) -> None:
    import numpy as np

    def rows(res):
        t = res.domains.where(material="all")
        return {float(r["domain_defocus_nm"]): r for r in t.records()}

    a = rows(after)
    b = rows(before) if before else {}
    head = f"{'defocus [nm]':>12s} {'loss':>8s} {'Dice':>6s} {'OOD':>6s}"
    if b:
        head += f"   {'loss before':>11s}"
    print(head)
    for d in sorted(a):
        r = a[d]

        def f(v, w=8, p=4):
            return f"{v:{w}.{p}f}" if v is not None and np.isfinite(v) else " " * (w - 1) + "–"

        line = f"{d:>+12g} {f(r['loss'])} {f(r['dice'], 6, 3)} {f(r['ood_score'], 6, 2)}"
        if b:
            line += f"   {f(b.get(d, {}).get('loss'), 11)}"
        print(line)


# ----------------------------------------------------------------------------- compare-reference
def add_reference_arguments(p: argparse.ArgumentParser) -> None:
    """Declare the options of ``compare-reference``."""
    p.add_argument(
        "--csv",
        type=Path,
        default=None,
        help="the published table paper_defocus_sweep.csv (default: the copy that ships "
        "with the package, or $HRTEM_TRANSFER_REFERENCE_CSV)",
    )
    p.add_argument(
        "--results",
        type=Path,
        nargs="*",
        default=[],
        metavar="CSV",
        help="your own tidy records (domains.csv written by 'evaluate' or 'demo') to "
        "aggregate beside the study's",
    )
    p.add_argument(
        "--db",
        type=Path,
        nargs="*",
        default=[],
        metavar="SQLITE",
        help="results database(s) of 'hrtem-transfer sweep' to aggregate beside the study's; "
        "also reports the rank correlation of the label-free OOD score with the true loss "
        "over all models of the sweep (per domain and per frame)",
    )
    p.add_argument(
        "--no-reference",
        action="store_true",
        help="aggregate only --results/--db (without the published table)",
    )
    p.add_argument(
        "--out", type=Path, default=Path("reference_report"), metavar="DIR", help="report folder"
    )
    p.add_argument(
        "--reduction",
        choices=("median", "mean", "min", "max"),
        default="median",
        help="reduction over the models of a cell",
    )
    p.add_argument(
        "--freeze",
        choices=("none", "encoder", "decoder"),
        default=None,
        help="only models fine-tuned with this freezing",
    )
    p.add_argument(
        "--n-transfer", type=int, default=None, help="only models fine-tuned on this many images"
    )
    _add_exclude(p)
    p.add_argument(
        "--pair",
        type=float,
        nargs=2,
        default=None,
        metavar=("PRE_NM", "TARGET_NM"),
        help="pretraining and target defocus [nm] of the per-domain bar chart",
    )


def run_reference(args: argparse.Namespace) -> int:
    """Aggregate the published table (and ``--results``) into the study's views."""
    from ..errors import ConfigError
    from ..evaluation.aggregate import generalization_by
    from ..evaluation.reference import load_reference_table
    from ..evaluation.report import write_reference_report
    from ..evaluation.table import REQUIRED_COLUMNS, ResultTable

    out = _check_out(args.out)
    if args.no_reference and not (args.results or args.db):
        raise ConfigError("--no-reference needs --results or --db to aggregate.", "--no-reference")
    table = None
    if not args.no_reference:
        table = load_reference_table(args.csv)
        table = table.where(freeze=args.freeze, n_transfer=args.n_transfer)
        if not len(table):
            raise ConfigError("no models in the table match --freeze/--n-transfer.")
    own = None
    parts = []
    if args.results:
        parts += [ResultTable.from_csv(p) for p in args.results]
    db_domains = db_frames = None
    if args.db:
        db_domains = ResultTable.concat(ResultTable.from_sqlite(p) for p in args.db)
        db_frames = ResultTable.concat(ResultTable.from_sqlite(p, "frames") for p in args.db)
        if not len(db_domains):
            raise ConfigError(
                f"no finished runs in {', '.join(map(str, args.db))}; run 'hrtem-transfer "
                "sweep' first.",
                "--db",
            )
        db_domains = db_domains.where(freeze=args.freeze, n_transfer=args.n_transfer)
        db_frames = db_frames.where(freeze=args.freeze, n_transfer=args.n_transfer)
        if not len(db_domains):
            raise ConfigError("no runs in --db match --freeze/--n-transfer.")
        parts.append(db_domains)
    if parts:
        own = ResultTable.concat(parts)
        own.require(REQUIRED_COLUMNS, "aggregating --results/--db")
    if table is None:
        table, own = own, None
    page = write_reference_report(
        out,
        table,
        args.reduction,
        tuple(args.exclude),
        tuple(args.pair) if args.pair else None,
        own,
    )
    from ..evaluation.report import describe_sources

    print(f"generalization after pretraining ({args.reduction} over models; lower = better):")
    given = ", ".join(
        [f"--results {p}" for p in args.results or []] + [f"--db {p}" for p in args.db or []]
    )
    views = [(table, own is None and args.no_reference), (own, True)]
    for tab, is_own in views:
        if tab is None or not len(tab):
            continue
        whose = (
            f"your results ({given}: {describe_sources(tab)})"
            if is_own
            else f"the published table ({describe_sources(tab)})"
        )
        print(f"  {whose}:")
        g = generalization_by(
            tab, ("pretrain_defocus_nm",), "pretrain", args.reduction, tuple(args.exclude)
        )
        for k, v in sorted(g.items()):
            print(f"    pretrained at {k[0]:+g} nm: {v:.4f}")
    if db_domains is not None:
        _report_sweep(out, db_domains, db_frames, args.reduction, tuple(args.exclude))
    print(f"report: {page}")
    return 0


def _finite(obj):
    """NaN -> None, so the JSON is standard."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and obj != obj:
        return None
    return obj


def _report_sweep(out: Path, domains, frames, reduction: str, exclude) -> None:
    """Print the sweep's generalization and OOD rank correlations; write sweep_summary.json."""
    import json

    from ..evaluation.aggregate import (
        generalization_by,
        ood_domain_ranking,
        ood_rank_correlation,
    )
    from ..io.atomic import write_text_atomic

    if "material" in domains:
        domains = domains.where(material=lambda c: (c == "all") | (c == ""))

    def keyed(d):
        return {
            "/".join(f"{x:g}" if isinstance(x, float) else str(x) for x in k) or "all": v
            for k, v in d.items()
        }

    summary = {
        "reduction": reduction,
        "exclude_nm": list(exclude),
        "n_runs": len({m.rsplit(":", 1)[0] for m in domains["model_id"]}),
        "generalization_after_pretraining": keyed(
            generalization_by(domains, ("pretrain_defocus_nm",), "pretrain", reduction, exclude)
        ),
        "generalization_after_transfer": keyed(
            generalization_by(
                domains,
                ("pretrain_defocus_nm", "transfer_defocus_nm"),
                "transfer",
                reduction,
                exclude,
            )
        ),
        "ood_spearman_domains": keyed(ood_rank_correlation(domains)),
        "ood_spearman_domains_by_stage": keyed(ood_rank_correlation(domains, ("stage",))),
        "ood_spearman_frames": keyed(ood_rank_correlation(frames)),
        "ood_spearman_frames_by_stage": keyed(ood_rank_correlation(frames, ("stage",))),
        "ood_spearman_frames_by_domain": keyed(
            ood_rank_correlation(frames, ("domain_defocus_nm",))
        ),
        "ood_domain_ranking": {
            st: ood_domain_ranking(domains, st, reduction) for st in ("pretrain", "transfer")
        },
    }
    write_text_atomic(out / "sweep_summary.json", json.dumps(_finite(summary), indent=1))
    print(f"your sweep (--db): {summary['n_runs']} runs")
    print(
        "label-free OOD score vs true loss in your sweep, Spearman rank correlation over "
        "all its models:"
    )
    d, f = summary["ood_spearman_domains"]["all"], summary["ood_spearman_frames"]["all"]
    print(f"  per domain: {d['spearman']:+.3f} ({d['n']} model x domain pairs)")
    print(f"  per frame:  {f['spearman']:+.3f} ({f['n']} frames)")
    for st, v in summary["ood_spearman_domains_by_stage"].items():
        w = summary["ood_spearman_frames_by_stage"].get(st, {})
        print(
            f"  {st:>8s}: per domain {v['spearman']:+.3f}, per frame "
            f"{w.get('spearman', float('nan')):+.3f}"
        )
    print(f"sweep summary: {out / 'sweep_summary.json'}")


COMMANDS = [
    (
        "evaluate",
        "Evaluate a model on every defocus domain of a dataset: loss, Dice, IoU with bootstrap "
        "CIs, the label-free OOD score, generalization and its shift; writes a report.",
        add_evaluate_arguments,
        run_evaluate,
    ),
    (
        "compare-reference",
        "Aggregate the study's published results table (and your own) into its views: "
        "pretrain x target matrices, generalization and shift, per-domain bars.",
        add_reference_arguments,
        run_reference,
    ),
]
