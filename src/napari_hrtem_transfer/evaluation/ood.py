"""Label-free out-of-distribution (OOD) score of HRTEM frames.

How far is a frame from what the model was trained on?  Ground truth is not needed.

Method
------
1. Features: every encoder stage's feature map of the standardised frame, pooled over space
   by its mean and its standard deviation per channel; by default all stages but the deepest
   (for the compact U-Net: stages at 1/2, 1/4 and 1/8 resolution; they see the imaging
   conditions — contrast transfer, noise — more than the content).
2. Reference: at the end of training, the features of the training-domain images (with the 8
   dihedral transforms) are summarised by their mean and per-feature standard deviation
   (``method="diag"``; ``"mahalanobis"`` adds a shrunk correlation matrix).  It is stored
   beside the checkpoint as ``ood_reference.safetensors`` (arrays) and
   ``ood_reference.json`` (the rest, including the sha256 of the weights it belongs to, so a
   replaced checkpoint never uses a stale reference); no pickle.  The sidecar's ``extra``
   records a summary under ``"ood_reference"``.
3. Distance: root-mean-square standardised distance of a frame's features from the training
   mean, ``sqrt(mean_j ((f_j - mu_j) / s_j)^2)``.
4. Scale: ``feature_score = distance / median training distance - 1``: training-like frames
   score about 0 (half of the training images below 0); 1 means twice as far from the
   training distribution as a typical training image.
5. Uncertainty: ``entropy_score = mean predictive entropy / median training entropy - 1``;
   the score is ``feature_score + w * max(entropy_score, 0)`` with ``w = 1``
   (``entropy_mode="excess"``): unusual uncertainty raises the score, while a confidently
   wrong model (e.g. in focus, where the particles have almost no contrast) cannot hide a
   feature shift.

Choice by measurement (``benchmarks/bench_ood.py``): laptop-preset abTEM series, 11 defoci
-25 ... +25 nm, 128 px at 0.2 Å/px, 48 or 160 structures (20% held out), compact U-Net
(channels 16/32/64/96) pretrained on one defocus for 6 or 15 epochs; Spearman rank correlation
of the score with the true loss over the 11 domains (median score of each domain's held-out
frames vs. its mean loss).  Nine runs (series A: 160 structures, B: 48, C: 160 with smaller
particles, 6 epochs, D: as C, 15 epochs; pretraining defocus in nm):

========================================  ====  ====  ====  ====  ====  ====  ====  ====  ====  ====
score                                     A-10  B+10  C-10  C+10  D-10  D-5   D0    D+5   D+10  mean
========================================  ====  ====  ====  ====  ====  ====  ====  ====  ====  ====
stages 0-2, diag, + 1.0 x entropy excess  0.89  0.82  0.73  0.88  0.68  0.72  0.42  0.23  0.86  0.69
all stages, diag, + 1.0 x entropy excess  0.94  0.79  0.65  0.89  0.82  0.68  0.45  0.09  0.91  0.69
all stages, shrunk Mahalanobis + 0.5 x    0.94  0.48  0.49  0.73  0.88  0.70  0.46  0.27  0.69  0.63
deepest stage, diag, features only        0.86  0.40  0.44  0.35  0.75  0.08  0.20  0.26  0.42  0.42
predictive entropy only                  -0.08 -0.08 -0.19  0.27  0.50  0.65  0.85  0.59  0.67  0.35
========================================  ====  ====  ====  ====  ====  ====  ====  ====  ====  ====

The default (first row) has the best mean.  It reaches the goal (>= 0.8) for models
pretrained at +-10 nm in four of six runs; for models pretrained at 0 or +5 nm the losses
of the other domains hardly differ from each other (0.11-0.19, with one hard domain), so
their ranking is mostly noise and the correlation is low, although the score still grows
with the distance from the training domain.  Per frame the rank correlation is modest (mean
0.31, 0.35-0.46 at +-10 nm): within a domain the loss varies with the content (particle size
and number), which a domain-shift score does not see.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError, ConfigError
from .metrics import predictive_entropy

__all__ = [
    "OOD_ARRAYS",
    "OOD_JSON",
    "OODReference",
    "OODScores",
    "fit_ood_reference",
    "fit_ood_reference_for_checkpoint",
    "load_ood_reference",
    "ood_scores",
]

#: File names of the stored reference, in the model folder.
OOD_ARRAYS = "ood_reference.safetensors"
OOD_JSON = "ood_reference.json"
METHODS = ("diag", "mahalanobis")
#: Default distance method, chosen by measurement (see module docstring).
DEFAULT_METHOD = "diag"
#: Encoder stages pooled into the features by default (0 = highest resolution).
DEFAULT_STAGES: str | tuple[int, ...] = "all-but-deepest"
#: Default weight of the predictive entropy in the score.
DEFAULT_ENTROPY_WEIGHT = 1.0
FORMAT_VERSION = "1"


@dataclass
class OODReference:
    """The training-domain feature distribution of one model.

    Attributes
    ----------
    method
        ``"diag"`` or ``"mahalanobis"``.
    mean, scale
        Mean and standard deviation of each pooled feature over the training images, (D,).
    precision
        Inverse of the shrunk correlation matrix (D, D) for ``"mahalanobis"``, else None.
    distance_ref
        Median distance of the training images (the unit of the score).
    entropy_ref
        Median mean predictive entropy of the training images [nats].
    entropy_weight
        Weight of the entropy term in the score, in [0, 1].
    n_images
        Number of training images the reference was fitted on.
    info
        Provenance: training domain(s) (defocus [nm]), dataset, date, ...
    """

    method: str
    mean: np.ndarray
    scale: np.ndarray
    precision: np.ndarray | None = None
    distance_ref: float = 1.0
    entropy_ref: float = 1.0
    entropy_weight: float = DEFAULT_ENTROPY_WEIGHT
    n_images: int = 0
    info: dict = field(default_factory=dict)
    weights_sha256: str | None = None
    columns: np.ndarray | None = None
    entropy_mode: str = "excess"

    def _select(self, features: np.ndarray) -> np.ndarray:
        f = np.asarray(features, dtype=np.float64)
        if self.columns is not None and f.ndim == 2 and f.shape[1] != self.mean.size:
            if f.shape[1] <= int(np.max(self.columns)):
                raise CheckpointError(
                    f"features of shape {f.shape} do not match the stored OOD reference: was "
                    "the reference fitted on another model?"
                )
            f = f[:, self.columns]
        return f

    def distance(self, features: np.ndarray) -> np.ndarray:
        """Distance (N,) of pooled features from the training distribution.

        ``features`` is either the full pooled vector of :class:`~._model.ScoringModel.run`
        (the stored ``columns`` are selected) or already the selected (N, D) columns.
        """
        f = self._select(features)
        if f.ndim != 2 or f.shape[1] != self.mean.size:
            raise CheckpointError(
                f"features of shape {f.shape} do not match the stored OOD reference "
                f"({self.mean.size} features): was the reference fitted on another model?"
            )
        z = (f - self.mean) / self.scale
        if self.method == "mahalanobis" and self.precision is not None:
            d2 = np.einsum("ni,ij,nj->n", z, self.precision, z) / z.shape[1]
        else:
            d2 = np.mean(z * z, axis=1)
        return np.sqrt(np.maximum(d2, 0.0))

    def score(self, features: np.ndarray, entropy: np.ndarray | None = None) -> np.ndarray:
        """The readable OOD score (N,): ~0 for training-like frames, growing with distance."""
        s = self.distance(features) / self.distance_ref - 1.0
        w = float(self.entropy_weight)
        if w > 0:
            if entropy is None:
                raise ConfigError("this OOD reference mixes in the predictive entropy; pass it.")
            e = np.asarray(entropy, float) / self.entropy_ref - 1.0
            if self.entropy_mode == "mix":
                s = (1 - w) * s + w * e
            else:
                s = s + w * np.maximum(e, 0.0)
        return s

    # storage --------------------------------------------------------------------------
    def save(self, model_dir: str | os.PathLike) -> tuple[Path, Path]:
        """Write ``ood_reference.safetensors`` and ``ood_reference.json`` atomically."""
        from safetensors.numpy import save_file

        from ..io._atomic import atomic_path
        from ._files import write_text_atomic

        d = Path(model_dir)
        d.mkdir(parents=True, exist_ok=True)
        arrays = {"mean": self.mean.astype(np.float64), "scale": self.scale.astype(np.float64)}
        if self.precision is not None:
            arrays["precision"] = self.precision.astype(np.float64)
        if self.columns is not None:
            arrays["columns"] = np.asarray(self.columns, dtype=np.int64)
        with atomic_path(d / OOD_ARRAYS) as tmp:
            save_file(arrays, str(tmp))
        meta = {
            "format_version": FORMAT_VERSION,
            "method": self.method,
            "distance_ref": float(self.distance_ref),
            "entropy_ref": float(self.entropy_ref),
            "entropy_weight": float(self.entropy_weight),
            "entropy_mode": self.entropy_mode,
            "n_images": int(self.n_images),
            "n_features": int(self.mean.size),
            "stages": self.info.get("stages"),
            "weights_sha256": self.weights_sha256,
            "score": "distance / distance_ref - 1 (0 = typical training image)",
            "info": self.info,
        }
        write_text_atomic(d / OOD_JSON, json.dumps(meta, indent=1))
        return d / OOD_ARRAYS, d / OOD_JSON

    @classmethod
    def load(cls, model_dir: str | os.PathLike) -> OODReference:
        """Read the reference stored in ``model_dir``.

        Raises
        ------
        CheckpointError
            If the files are missing or unreadable.
        """
        from safetensors.numpy import load_file

        d = Path(model_dir)
        a, j = d / OOD_ARRAYS, d / OOD_JSON
        if not (a.is_file() and j.is_file()):
            raise CheckpointError(
                f"{d} has no OOD reference ({OOD_ARRAYS} + {OOD_JSON}); fit one with "
                "napari_hrtem_transfer.evaluation.fit_ood_reference(model_dir, training_images)."
            )
        try:
            arrays = load_file(str(a))
            meta = json.loads(j.read_text())
        except Exception as exc:  # noqa: BLE001 - corrupted file of any kind
            raise CheckpointError(f"cannot read the OOD reference in {d}: {exc}") from exc
        return cls(
            method=meta["method"],
            mean=arrays["mean"],
            scale=arrays["scale"],
            precision=arrays.get("precision"),
            distance_ref=float(meta["distance_ref"]),
            entropy_ref=float(meta.get("entropy_ref", 1.0)),
            entropy_weight=float(meta.get("entropy_weight", 0.0)),
            entropy_mode=str(meta.get("entropy_mode", "excess")),
            n_images=int(meta.get("n_images", 0)),
            info=dict(meta.get("info", {})),
            weights_sha256=meta.get("weights_sha256"),
            columns=arrays.get("columns"),
        )


def load_ood_reference(
    model_dir: str | os.PathLike, weights_sha256: str | None = None
) -> OODReference | None:
    """The stored reference of a model folder, or None if it has none.

    Parameters
    ----------
    model_dir
        The checkpoint folder.
    weights_sha256
        The sha256 of the weights being scored (``weights_sha256`` of the sidecar).  When
        given and the reference was fitted on other weights, None is returned (a reference
        left behind by a replaced checkpoint is never used).
    """
    d = Path(model_dir)
    if not (d / OOD_ARRAYS).is_file():
        return None
    ref = OODReference.load(d)
    if weights_sha256 and ref.weights_sha256 and ref.weights_sha256 != weights_sha256:
        return None
    return ref


def fit_reference_from_features(
    features: np.ndarray,
    entropy: np.ndarray | None = None,
    method: str = DEFAULT_METHOD,
    entropy_weight: float = DEFAULT_ENTROPY_WEIGHT,
    shrinkage: float = 0.2,
    info: dict | None = None,
    columns: np.ndarray | None = None,
    entropy_mode: str = "excess",
) -> OODReference:
    """Fit an :class:`OODReference` to pooled training features (N, D) (pure numpy).

    Parameters
    ----------
    features
        Pooled encoder features of the training images, (N, D), N >= 2.
    entropy
        Mean predictive entropy of each training image [nats], (N,).
    method
        ``"diag"`` or ``"mahalanobis"``.
    entropy_weight
        Weight of the entropy in the score, in [0, 1].
    shrinkage
        Weight ``a`` of the identity in the shrunk correlation (``"mahalanobis"`` only).
    info
        Provenance stored with the reference.
    columns
        Indices of the columns of ``features`` to use (None: all).
    entropy_mode
        ``"excess"``: ``score = feature_score + w * max(entropy_score, 0)`` (uncertainty can
        raise the score but a confidently wrong model cannot hide a feature shift);
        ``"mix"``: ``(1 - w) * feature_score + w * entropy_score``.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown OOD method {method!r}; choose one of {', '.join(METHODS)}.")
    if not 0 <= entropy_weight <= (1 if entropy_mode == "mix" else 10):
        raise ConfigError(
            f"entropy_weight out of range for mode {entropy_mode!r}: {entropy_weight}."
        )
    if entropy_mode not in ("excess", "mix"):
        raise ConfigError(f"entropy_mode must be 'excess' or 'mix'; got {entropy_mode!r}.")
    if entropy_weight > 0 and entropy is None:
        raise ConfigError("entropy_weight > 0 needs the training images' predictive entropy.")
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ConfigError(f"need pooled features of at least 2 images; got shape {f.shape}.")
    if columns is not None:
        columns = np.asarray(columns, dtype=np.int64)
        f = f[:, columns]
    mean = f.mean(axis=0)
    sd = f.std(axis=0)
    # features that are (almost) constant on the training data would make any deviation
    # infinitely far; floor their scale at a small fraction of the typical feature scale
    floor = max(1e-3 * float(np.median(sd[sd > 0])) if np.any(sd > 0) else 1e-6, 1e-8)
    scale = np.maximum(sd, floor)
    precision = None
    if method == "mahalanobis":
        z = (f - mean) / scale
        corr = (z.T @ z) / f.shape[0]
        a = float(np.clip(shrinkage, 1e-3, 1.0))
        precision = np.linalg.inv((1 - a) * corr + a * np.eye(corr.shape[0]))
    ref = OODReference(
        method=method,
        mean=mean,
        scale=scale,
        precision=precision,
        n_images=int(f.shape[0]),
        entropy_weight=float(entropy_weight),
        info=dict(info or {}),
        columns=columns,
        entropy_mode=entropy_mode,
    )
    d = ref.distance(f)
    ref.distance_ref = float(np.median(d)) if np.median(d) > 0 else 1.0
    if entropy is not None:
        e = float(np.median(np.asarray(entropy, float)))
        ref.entropy_ref = e if e > 0 else 1.0
    return ref


def fit_ood_reference(
    model: Any,
    images,
    *,
    method: str = DEFAULT_METHOD,
    entropy_weight: float = DEFAULT_ENTROPY_WEIGHT,
    stages: str | tuple[int, ...] = "default",
    augment: bool = True,
    save: bool | str | os.PathLike = True,
    batch_size: int = 8,
    info: dict | None = None,
) -> OODReference:
    """Fit the training-domain feature distribution of a model and store it with the model.

    Call at the end of training with the training images of the training domain(s).

    Parameters
    ----------
    model
        Model folder, loaded checkpoint or torch module with ``encoder_features``.
    images
        Raw training images (N, H, W) (electron counts, as the model receives them).
    method, entropy_weight
        See :func:`fit_reference_from_features`.
    stages
        Encoder stages whose pooled features enter the distance, 0 = first (highest
        resolution): a tuple of indices, ``"all"``, ``"all-but-deepest"`` or ``"default"``
        (:data:`DEFAULT_STAGES`).
    augment
        Also use the 8 dihedral (D4) transforms of each image, as in training: 8x more samples
        for the statistics.
    save
        True: write into the model folder (when the model came from one); a path: write there;
        False: do not write.
    batch_size
        Images per forward pass.
    info
        Provenance to store (training defocus [nm], dataset, ...).

    Returns
    -------
    OODReference
    """
    from ._model import ScoringModel

    sm = model if isinstance(model, ScoringModel) else ScoringModel(model)
    x = np.asarray(images)
    if x.ndim == 2:
        x = x[None]
    if augment:
        x = np.concatenate([_d4(x, k) for k in range(8)])
    logits, feats = sm.run(x, batch_size=batch_size)
    ent = predictive_entropy(1.0 / (1.0 + np.exp(-logits.astype(np.float64))))
    sizes = sm.stage_sizes or [feats.shape[1]]
    if stages == "default":
        stages = DEFAULT_STAGES
    if stages == "all":
        stages = tuple(range(len(sizes)))
    elif stages == "all-but-deepest":
        stages = tuple(range(max(1, len(sizes) - 1)))
    stages = tuple(int(k) for k in stages if int(k) < len(sizes)) or tuple(range(len(sizes)))
    starts = np.cumsum([0, *sizes])
    columns = np.concatenate([np.arange(starts[k], starts[k + 1]) for k in stages])
    info = {**(info or {}), "stages": list(stages)}
    ref = fit_reference_from_features(
        feats, ent, method, entropy_weight, info=info, columns=columns
    )
    ref.weights_sha256 = sm.info.get("weights_sha256")
    target = None
    if save is True:
        target = sm.model_dir
    elif save:
        target = Path(save)
    if target is not None:
        ref.save(target)
        if sm.loaded is not None and target == sm.model_dir:
            _register_in_sidecar(sm, ref)
    return ref


def _register_in_sidecar(sm, ref: OODReference) -> None:
    """Note the reference in the checkpoint sidecar's ``extra`` (summary, not the arrays)."""
    try:
        from ..training import update_checkpoint_extra
    except ImportError:  # pragma: no cover - training core missing
        return
    which = getattr(sm.loaded, "which", "best")
    update_checkpoint_extra(
        sm.model_dir,
        "ood_reference",
        {
            "files": [OOD_ARRAYS, OOD_JSON],
            "method": ref.method,
            "n_images": ref.n_images,
            "distance_ref": ref.distance_ref,
            "weights_sha256": ref.weights_sha256,
        },
        which=which,
    )


def _d4(x: np.ndarray, k: int) -> np.ndarray:
    y = np.rot90(x, k % 4, axes=(-2, -1))
    if k >= 4:
        y = y[..., ::-1]
    return np.ascontiguousarray(y)


@dataclass
class OODScores:
    """Label-free scores of frames.

    Attributes
    ----------
    score
        The readable OOD score (N,): ~0 training-like, growing with distance.
    distance
        Raw feature distance (N,).
    entropy
        Mean predictive entropy per frame [nats] (N,).
    proba
        Foreground probabilities (N, H, W), float32.
    """

    score: np.ndarray
    distance: np.ndarray
    entropy: np.ndarray
    proba: np.ndarray


def ood_scores(
    model: Any, images, reference: OODReference | None = None, batch_size: int = 8
) -> OODScores:
    """Score frames (N, H, W) (raw counts) against the model's training distribution.

    Parameters
    ----------
    model
        Model folder, loaded checkpoint or torch module.
    images
        Frames (N, H, W) or one frame (H, W), at the model's pixel size.
    reference
        The reference; by default the one stored in the model folder.

    Raises
    ------
    CheckpointError
        If no reference is given and the model folder has none.
    """
    from ._model import ScoringModel

    sm = model if isinstance(model, ScoringModel) else ScoringModel(model)
    if reference is None:
        if sm.model_dir is None:
            raise CheckpointError("pass the OOD reference for a model that is not a folder.")
        reference = OODReference.load(sm.model_dir)
    x = np.asarray(images)
    if x.ndim == 2:
        x = x[None]
    logits, feats = sm.run(x, batch_size=batch_size)
    proba = (1.0 / (1.0 + np.exp(-logits.astype(np.float64)))).astype(np.float32)
    ent = predictive_entropy(proba)
    return OODScores(reference.score(feats, ent), reference.distance(feats), ent, proba)


def fit_ood_reference_for_checkpoint(
    model_dir, dataset, which: str = "best", device: str | None = None, refit: bool = False
) -> str:
    """Fit and store a checkpoint's OOD reference from its own training images.

    The training structures and defocus domains are read from the checkpoint's sidecar, and the
    matching images are taken from ``dataset``.  Called at the end of ``pretrain``/``finetune``
    (command line and napari) so that every trained model can score frames without labels.

    Parameters
    ----------
    model_dir
        Checkpoint folder.
    dataset
        :class:`~napari_hrtem_transfer.io.HRTEMDataset` the model was trained on.
    which
        ``"best"`` or ``"last"``.
    device
        Torch device (``None`` = auto).
    refit
        Fit again even if a reference for these exact weights exists.

    Returns
    -------
    str
        What was done, in words (also when nothing could be done).
    """
    from ..training import load_checkpoint

    lm = load_checkpoint(model_dir, which=which, device=device or "auto")
    if not refit and load_ood_reference(model_dir, lm.info.get("weights_sha256")) is not None:
        return f"{model_dir}: OOD reference already present."
    data = lm.info.get("data") or {}
    doms = data.get("train_defocus_nm") or []
    # the exact (defocus index, image index) pairs trained on, else all training structures
    items = np.asarray(data.get("train_items") or [], dtype=int).reshape(-1, 2)
    train_ids = [str(s) for s in data.get("train_structures") or []]
    sids = np.asarray(dataset.structure_ids).astype(str)
    same_file = (
        items.size
        and items[:, 0].max() < dataset.n_defocus
        and items[:, 1].max() < dataset.n_images
        and set(sids[items[:, 1]]) <= set(train_ids)
    )
    if same_file:
        x = np.stack([np.asarray(dataset.images[d, i]) for d, i in items])
    else:
        idx = np.flatnonzero(np.isin(sids, train_ids))
        if not idx.size or not doms:
            return (
                f"{model_dir}: no OOD reference and its training images are not in the dataset; "
                "label-free OOD scores are not available for this model."
            )
        x = np.concatenate(
            [np.asarray(dataset.images[dataset.defocus_index(d)][idx]) for d in doms]
        )
    path = getattr(dataset, "path", None)
    fit_ood_reference(lm, x, info={"train_defocus_nm": doms, "dataset": str(path)})
    doms_txt = ", ".join(f"{d:g}" for d in doms)
    return f"{model_dir}: OOD reference fitted on {len(x)} training images ({doms_txt} nm)."
