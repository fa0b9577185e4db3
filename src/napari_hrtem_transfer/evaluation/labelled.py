"""Evaluation of one model on every domain of a dataset (labelled metrics + OOD score).

:func:`evaluate_model` returns tidy records: one row per domain (each defocus; each
defocus x material too when the dataset mixes materials; the dataset's dose is a column) with
loss, Dice and IoU and their bootstrap confidence intervals, plus one row per frame, so a
stack can be annotated frame by frame.  The label-free OOD score is reported beside them
when the model has a stored OOD reference.

Structures: the validation (held-out) structures listed in the checkpoint's sidecar
(``data.val_structures``) are used when the dataset has them (structure ids are
``<material>-seed<seed>-<index>``, so a re-simulation with the same settings has the same
ids); otherwise the structures the checkpoint was trained on (``data.train_structures``) are
left out, or, if the checkpoint records no data, all structures are used.  The column
``structures`` and the notes say which.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ConfigError, DatasetError
from ..training.progress import Progress
from .metrics import binary_cross_entropy, bootstrap_ci, dice, iou
from .table import ResultTable

__all__ = ["EvaluationResult", "evaluate_model", "model_provenance"]

#: ``progress(done, total, message)`` after each domain.
ProgressCallback = Progress


@dataclass
class EvaluationResult:
    """What :func:`evaluate_model` found.

    Attributes
    ----------
    domains
        One row per domain (see :mod:`.table` for the columns).
    frames
        One row per evaluated frame and domain: loss, Dice, IoU, ``ood_score`` (the network's
        label-free term), and the per-frame verdict that ``segment`` gives
        (``verdict_score``, ``ood_caution``, ``ood_reasons``, ``estimated_defocus_nm`` from
        the Thon rings, ``ctf_overlap`` with the training conditions).
    labelled
        False if the dataset has no masks (then loss, Dice and IoU are NaN).
    notes
        Plain-language remarks for the report (structures used, missing OOD reference, ...).
    samples
        A few frames for figures: dicts with ``defocus_nm``, ``image``, ``proba``, ``mask``,
        ``ood_score``, ``dice``, ``structure_id``.
    model_id
        Name of the evaluated model.
    """

    domains: ResultTable
    frames: ResultTable
    labelled: bool
    notes: list[str] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    model_id: str = ""


def _get(d: dict, *keys, default=None):
    for k in keys:
        cur: Any = d
        ok = True
        for part in k.split("."):
            if isinstance(cur, dict) and part in cur:
                cur = cur[part]
            else:
                ok = False
                break
        if ok and cur is not None:
            return cur
    return default


def _first_float(v) -> float:
    if v is None or v == "all":
        return float("nan")
    if isinstance(v, list | tuple):
        return float(v[0]) if len(v) == 1 else float("nan")
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def model_provenance(info: dict) -> dict[str, Any]:
    """Provenance columns of a model, read from its checkpoint sidecar.

    Uses the sidecar keys ``stage`` (``"pretrain"`` | ``"finetune"``), ``training.config``,
    ``data.train_defocus_nm`` and the ``parent`` chain (the checkpoint a fine-tuning started
    from; its root is the pretraining).

    Returns
    -------
    dict
        ``stage`` (``"pretrain"`` | ``"transfer"``), ``pretrain_defocus_nm``,
        ``transfer_defocus_nm`` [nm], ``freeze``, ``n_transfer``, ``seed``, ``lr``
        (NaN / '' / None when unknown).
    """
    cfg = _get(info, "training.config", "config", default={}) or {}
    train_def = _first_float(_get(info, "data.train_defocus_nm", default=None))
    if np.isnan(train_def):
        train_def = _first_float(_get(cfg, "train_defocus_nm"))
    finetuned = _get(info, "stage") in ("finetune", "transfer") or bool(_get(cfg, "init_from"))
    out: dict[str, Any] = {
        "freeze": str(_get(cfg, "freeze", default="")),
        "seed": _get(cfg, "seed", default=None),
        "lr": _get(cfg, "lr", default=None),
    }
    if finetuned:
        root = info.get("parent") or {}
        while isinstance(root.get("parent"), dict) and root["parent"]:
            root = root["parent"]
        pre = _first_float(_get(root, "train_defocus_nm", "data.train_defocus_nm"))
        out.update(
            stage="transfer",
            pretrain_defocus_nm=pre,
            transfer_defocus_nm=train_def,
            n_transfer=_get(cfg, "n_train", default=None) or _get(info, "data.n_train_images"),
        )
    else:
        out.update(
            stage="pretrain",
            pretrain_defocus_nm=train_def,
            transfer_defocus_nm=float("nan"),
            n_transfer=None,
        )
    return out


def _select_structures(info: dict, ds, structures) -> tuple[np.ndarray, str, list[str]]:
    """Image indices to evaluate, a description of them, and notes for the report."""
    sids = np.asarray(ds.structure_ids).astype(str)
    notes: list[str] = []
    if not isinstance(structures, str):
        want = [str(s) for s in structures]
        sel = np.flatnonzero(np.isin(sids, want))
        if sel.size == 0:
            raise DatasetError(f"none of the structures {want[:5]} is in the dataset.")
        return sel, f"{len(set(want))} given structure ids", notes
    if structures == "all":
        return np.arange(ds.n_images), "all", notes
    if structures != "validation":
        raise ConfigError(
            f"structures must be 'validation', 'all' or a list of ids; got {structures!r}.",
            "structures",
        )
    data = info.get("data") or {}
    val = [str(s) for s in data.get("val_structures") or []]
    trained = [str(s) for s in data.get("train_structures") or []]
    same = False
    if data.get("fingerprint"):
        try:
            from ..training.data import dataset_fingerprint

            same = dataset_fingerprint(ds) == data["fingerprint"]
        except ImportError:  # pragma: no cover - training core missing
            same = False
    if val:
        sel = np.flatnonzero(np.isin(sids, val))
        if sel.size:
            if not same:
                notes.append(
                    "The dataset is not the file the model was trained on (its fingerprint "
                    "differs); the structures with the checkpoint's held-out ids were evaluated."
                )
            return sel, "validation (held-out structures of the checkpoint)", notes
    if not data:
        notes.append(
            "The checkpoint records no training data, so all structures were evaluated; "
            "scores may include structures the model was trained on."
        )
        return np.arange(ds.n_images), "all (no split recorded)", notes
    if trained:
        sel = np.flatnonzero(~np.isin(sids, trained))
        if sel.size == 0:
            raise DatasetError(
                "every structure of this dataset was used to train the model; evaluate on "
                "another dataset or pass structures='all' to score the training images."
            )
        if sel.size < ds.n_images:
            notes.append(
                f"This is not the training dataset; the {ds.n_images - sel.size} structures "
                "whose ids the model was trained on were left out (for a fine-tuned model, "
                "structures of its pretraining are not known and may remain)."
            )
            return sel, "structures not trained on", notes
    notes.append(
        "This is not the model's training dataset and none of its structure ids were trained "
        "on: all structures were evaluated."
    )
    return np.arange(ds.n_images), "all (not the training dataset)", notes


def _reference(sm: Any, ood_reference: Any, notes: list[str]) -> Any:
    """The OOD reference to score with (None: no OOD score; the notes say why)."""
    from .ood import OODReference, load_ood_reference

    if isinstance(ood_reference, OODReference):
        return ood_reference
    if ood_reference is None:
        return None
    if ood_reference != "auto":
        raise ConfigError("ood_reference must be 'auto', an OODReference or None.")
    ref = None
    if sm.model_dir is not None:
        ref = load_ood_reference(sm.model_dir, sm.info.get("weights_sha256"))
        if ref is None and (sm.model_dir / "ood_reference.json").is_file():
            notes.append(
                "The OOD reference in the model folder belongs to other weights (the "
                "checkpoint was replaced after it was fitted); it was not used."
            )
    if ref is None and not any("OOD reference" in n for n in notes):
        notes.append(
            "The model has no stored OOD reference (ood_reference.safetensors); the "
            "label-free OOD score is missing. Fit one with "
            "napari_hrtem_transfer.evaluation.fit_ood_reference."
        )
    return ref


def _base_record(mid: str, sm: Any, ds: Any, split: str, provenance: dict | None) -> dict:
    """The provenance columns every record of this evaluation carries."""
    prov = model_provenance(sm.info)
    prov.update(provenance or {})
    return {
        "model_id": mid,
        "stage": prov.get("stage", ""),
        "pretrain_defocus_nm": prov.get("pretrain_defocus_nm"),
        "transfer_defocus_nm": prov.get("transfer_defocus_nm"),
        "freeze": prov.get("freeze", ""),
        "n_transfer": prov.get("n_transfer"),
        "seed": prov.get("seed"),
        "dose_e_per_A2": ds.dose_e_per_A2,
        "structures": split,
        "source": f"{mid} on {ds.path or 'in-memory dataset'}",
    }


_NO_MASKS = (
    "The dataset has no ground-truth masks: only label-free scores (OOD score, predictive "
    "entropy) were computed; loss, Dice and IoU are not available."
)


def _crop(ds: Any, sm: Any, sel: np.ndarray, notes: list[str]) -> tuple[tuple, Any]:
    """The centred crop to a multiple of the model's stride (as in training validation):
    ((oy, ox, cy, cx) [px], the selected masks cropped or None)."""
    ny, nx = ds.image_shape
    s = sm.output_stride
    cy, cx = ny // s * s, nx // s * s
    oy, ox = (ny - cy) // 2, (nx - cx) // 2
    if (cy, cx) != (ny, nx):
        notes.append(f"Images were centre-cropped from {ny}x{nx} to {cy}x{cx} px.")
    masks = None
    if ds.masks is not None:
        masks = np.asarray(ds.masks[sel])[:, oy : oy + cy, ox : ox + cx]
    return (oy, ox, cy, cx), masks


@dataclass
class _Pass:
    """What every domain of one evaluation shares (the frames, model, reference, settings)."""

    sm: Any
    ds: Any
    ref: Any
    sel: np.ndarray
    base: dict
    window: tuple[int, int, int, int]  # oy, ox, cy, cx: the centred crop [px]
    masks: np.ndarray | None
    batch_size: int
    n_boot: int
    confidence: float

    @property
    def labelled(self) -> bool:
        return self.masks is not None


def _frame_scores(p: _Pass, di: int) -> dict[str, Any]:
    """Per-frame arrays of one domain: metrics, OOD score, verdict, entropy."""
    from .ood import verdict

    oy, ox, cy, cx = p.window
    imgs = np.asarray(p.ds.images[di][p.sel])[:, oy : oy + cy, ox : ox + cx]
    st = p.sm.frame_stats(imgs, want_logits=True, batch_size=p.batch_size)
    logits = st.logits
    nan = np.full(p.sel.size, np.nan)
    out: dict[str, Any] = {"imgs": imgs, "entropy": st.entropy}
    out["proba"] = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    if p.labelled:
        pred = logits > 0
        out["loss"] = binary_cross_entropy(logits, p.masks)
        out["dice"], out["iou"] = dice(pred, p.masks), iou(pred, p.masks)
    else:
        out["loss"] = out["dice"] = out["iou"] = nan
    ref = p.ref
    out["ood_score"] = ref.score_stats(st) if ref is not None else nan  # the network's term
    out["ood_distance"] = ref.distance(st.features) if ref is not None else nan
    if ref is not None:  # and the verdict segment gives (network + physics + spectrum)
        v = verdict(
            ref, st, imgs, model_sampling_A=p.sm.sampling_A, conditions=p.ds.recorded_conditions()
        )
        overlap = [c.get("ctf_overlap") for c in v.components]
        out["verdict_score"] = np.asarray(v.score, float)
        out["ood_caution"] = np.asarray(v.caution, bool)
        out["ctf_overlap"] = np.array([np.nan if o is None else float(o) for o in overlap])
        out["estimated_defocus_nm"] = np.array(
            [np.nan if d is None else float(d) for d in v.estimated_defocus_nm]
        )
        out["ood_reasons"] = ["; ".join(r) for r in v.reasons]
    else:
        out.update(
            verdict_score=nan,
            ood_caution=np.zeros(p.sel.size, bool),
            ctf_overlap=nan,
            estimated_defocus_nm=nan,
            ood_reasons=[""] * p.sel.size,
        )
    return out


_FRAME_FLOATS = ("loss", "dice", "iou", "ood_score", "verdict_score")
_FRAME_FLOATS_2 = ("estimated_defocus_nm", "ctf_overlap", "ood_distance", "entropy")


def _frame_rows(p: _Pass, di: int, sc: dict[str, Any]) -> list[dict]:
    sids = np.asarray(p.ds.structure_ids).astype(str)
    materials = np.asarray(p.ds.materials).astype(str)
    actual = np.asarray(p.ds.actual_defocus_nm)[di, p.sel]
    rows = []
    for k, i in enumerate(p.sel):
        row = {
            **p.base,
            "domain_defocus_nm": float(p.ds.defocus_nm[di]),
            "actual_defocus_nm": float(actual[k]),
            "image_index": int(i),
            "structure_id": sids[i],
            "material": materials[i],
        }
        row.update({n: float(sc[n][k]) for n in _FRAME_FLOATS})
        row["ood_caution"] = bool(sc["ood_caution"][k])
        row["ood_reasons"] = sc["ood_reasons"][k]
        row.update({n: float(sc[n][k]) for n in _FRAME_FLOATS_2})
        rows.append(row)
    return rows


def _domain_rows(p: _Pass, di: int, sc: dict[str, Any]) -> list[dict]:
    """The domain's row (all frames) and, for a mixed dataset, one per material."""
    materials = np.asarray(p.ds.materials).astype(str)[p.sel]
    mats = sorted(set(materials.tolist()))
    groups = [("all", np.ones(p.sel.size, bool))]
    if len(mats) > 1:
        groups += [(m, materials == m) for m in mats]
    dnm = float(p.ds.defocus_nm[di])
    rows = []
    for mat, m in groups:
        row = {**p.base, "domain_defocus_nm": dnm, "material": mat, "n_images": int(m.sum())}
        for name in ("loss", "dice", "iou"):
            v = sc[name]
            row[name] = float(np.mean(v[m])) if p.labelled else float("nan")
            lo, hi = (
                bootstrap_ci(v[m], n_boot=p.n_boot, confidence=p.confidence, seed=di)
                if p.labelled
                else (float("nan"), float("nan"))
            )
            row[f"{name}_ci_low"], row[f"{name}_ci_high"] = lo, hi
        row["ood_score"] = float(np.median(sc["ood_score"][m]))
        row["ood_score_mean"] = float(np.mean(sc["ood_score"][m]))
        row["entropy"] = float(np.mean(sc["entropy"][m]))
        rows.append(row)
    return rows


def _sample(p: _Pass, di: int, sc: dict[str, Any]) -> dict[str, Any]:
    """The domain's first frame, kept for the report's figures."""
    return {
        "defocus_nm": float(p.ds.defocus_nm[di]),
        "image": sc["imgs"][0].astype(np.float32),
        "proba": sc["proba"][0].astype(np.float32),
        "mask": None if p.masks is None else p.masks[0],
        "ood_score": float(sc["ood_score"][0]),
        "dice": float(sc["dice"][0]),
        "structure_id": np.asarray(p.ds.structure_ids).astype(str)[p.sel[0]],
        "sampling_A": float(p.ds.sampling_A),
    }


def evaluate_model(
    model: Any,
    dataset: Any,
    *,
    structures: str | Sequence[str] = "validation",
    which: str = "best",
    ood_reference: Any = "auto",
    batch_size: int = 8,
    n_boot: int = 1000,
    confidence: float = 0.95,
    model_id: str | None = None,
    provenance: dict | None = None,
    n_samples: int = 3,
    device: str | None = None,
    progress: ProgressCallback | None = None,
) -> EvaluationResult:
    """Evaluate a model on every domain of a dataset.

    Parameters
    ----------
    model
        Model folder, loaded checkpoint (``training.load_checkpoint``) or torch module with
        ``encoder_features``.
    dataset
        :class:`~napari_hrtem_transfer.io.HRTEMDataset` or the path of a ``.hspy`` file.
    structures
        ``"validation"``: the held-out structures listed in the checkpoint (falls back to the
        structures not trained on, or to all, said in ``notes``, when none of them is in
        this dataset); ``"all"``; or an explicit list of structure ids.
    which
        Checkpoint to load from a model folder (``"best"`` or ``"last"``).
    ood_reference
        ``"auto"`` (the reference stored in the model folder, if any), an
        :class:`~.ood.OODReference`, or None (no OOD score).
    batch_size
        Images per forward pass.
    n_boot, confidence
        Bootstrap resamples and coverage of the confidence intervals (over frames).
    model_id
        Name of the model in the records (default: the model folder).
    provenance
        Overrides of the provenance columns (``stage``, ``pretrain_defocus_nm``,
        ``transfer_defocus_nm``, ``freeze``, ``n_transfer``, ``seed``).
    n_samples
        Number of domains for which one sample frame is kept for figures.
    device
        Torch device (default: where the model is).
    progress
        Called as ``progress(done, total, message)`` after each domain.

    Returns
    -------
    EvaluationResult

    Raises
    ------
    ConfigError
        The dataset's pixel size or image size does not match the model's.
    DatasetError
        The dataset cannot be read, or the requested structures are not in it.
    """
    from ..io.dataset import HRTEMDataset, load_dataset
    from ._model import ScoringModel

    ds = dataset if isinstance(dataset, HRTEMDataset) else load_dataset(dataset)
    sm = model if isinstance(model, ScoringModel) else ScoringModel(model, which, device)
    sm.check_images(ds.image_shape, ds.sampling_A, f"the dataset {ds.path or ''}".rstrip())
    sel, split, notes = _select_structures(sm.info, ds, structures)
    if ds.masks is None:
        notes.append(_NO_MASKS)
    ref = _reference(sm, ood_reference, notes)
    mid = model_id or sm.name
    window, masks = _crop(ds, sm, sel, notes)
    base = _base_record(mid, sm, ds, split, provenance)
    p = _Pass(sm, ds, ref, sel, base, window, masks, batch_size, n_boot, confidence)
    domain_rows: list[dict] = []
    frame_rows: list[dict] = []
    samples: list[dict] = []
    n_keep = max(1, min(n_samples, ds.n_defocus))
    sample_domains = set(np.linspace(0, ds.n_defocus - 1, n_keep).round().astype(int).tolist())
    for di in range(ds.n_defocus):
        sc = _frame_scores(p, di)
        frame_rows += _frame_rows(p, di, sc)
        domain_rows += _domain_rows(p, di, sc)
        if di in sample_domains:
            samples.append(_sample(p, di, sc))
        if progress is not None:
            progress(di + 1, ds.n_defocus, f"evaluated {float(ds.defocus_nm[di]):g} nm")
    if any(r.get("n_images", 0) < 5 for r in domain_rows):
        notes.append(
            "Some domains have fewer than 5 frames; their confidence intervals are unreliable."
        )
    return EvaluationResult(
        domains=ResultTable.from_records(domain_rows),
        frames=ResultTable.from_records(frame_rows),
        labelled=ds.masks is not None,
        notes=notes,
        samples=samples,
        model_id=mid,
    )
