"""Evaluation in and out of distribution: metrics, tidy records, the study's views, reports.

Importing this package is cheap (numpy only); torch and matplotlib are imported by the
functions that need them.

* :mod:`.metrics` — Dice, IoU, loss, bootstrap intervals, generalization and shift.
* :mod:`.table` / :mod:`.aggregate` — tidy records and the study's pretrain x target views.
* :mod:`.reference` — importer of the published table (defocus in Å there, nm here).
* :mod:`.labelled` — :func:`evaluate_model` of a checkpoint on a labelled dataset.
* :mod:`.ood` — the label-free OOD score of frames.
* :mod:`.report` — figures (matplotlib, Agg) and a self-contained Markdown/HTML report.
* :mod:`.protocol` — the whole protocol on laptop defaults (``hrtem-transfer demo``).
"""

from __future__ import annotations

import importlib

from .aggregate import (
    Matrix,
    domain_losses,
    domain_profile,
    generalization_by,
    generalization_matrix,
    shift_matrix,
    target_matrix,
)
from .metrics import binary_cross_entropy, bootstrap_ci, dice, generalization, iou, shift
from .reference import find_reference_csv, load_reference_table
from .table import ResultTable

_LAZY = {
    "evaluate_model": "labelled",
    "EvaluationResult": "labelled",
    "OODFitConfig": "ood",
    "OODFitResult": "ood",
    "OODReference": "ood",
    "fit_ood_after_training": "ood",
    "fit_ood_reference": "ood",
    "fit_ood_reference_for_checkpoint": "ood",
    "load_ood_reference": "ood",
    "ood_scores": "ood",
    "write_evaluation_report": "report",
    "write_reference_report": "report",
    "CTFEstimate": "ctf",
    "ctf_overlap": "ctf",
    "ctf_overlap_for_estimate": "ctf",
    "estimate_ctf": "ctf",
    "estimate_ctf_with_metadata": "ctf",
    "DemoSettings": "protocol",
    "run_protocol": "protocol",
    "run_transfer": "workflows",
    "ScoringModel": "_model",
    "TransferEvaluation": "workflows",
    "TransferResult": "workflows",
}


def __getattr__(name: str):
    if name in _LAZY:
        mod = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(mod, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Matrix",
    "ResultTable",
    "binary_cross_entropy",
    "bootstrap_ci",
    "dice",
    "domain_losses",
    "domain_profile",
    "find_reference_csv",
    "generalization",
    "generalization_by",
    "generalization_matrix",
    "iou",
    "load_reference_table",
    "shift",
    "shift_matrix",
    "target_matrix",
    *_LAZY,
    "run_transfer",
    "TransferEvaluation",
    "TransferResult",
    "ScoringModel",
]
