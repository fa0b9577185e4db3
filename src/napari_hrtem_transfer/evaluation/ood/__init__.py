"""Label-free out-of-distribution (OOD) verdict on HRTEM frames: one per frame, with reasons.

How far is a frame from what the model was trained on?  Ground truth is not needed.  The
package has one job per module:

* :mod:`.reference` — the stored reference (schema as a pydantic model, arrays, file I/O;
  formats 2, 3 and 4 are read) and the model's :class:`ImagingDomain`;
* :mod:`.components` — the network-free components: power-spectrum profile, signal above
  shot noise, CTF physics (:mod:`napari_hrtem_transfer.evaluation.ctf`) against the domain;
* :mod:`.verdict` — the verdict (:func:`ood_scores`): score, calibrated caution flag,
  reasons, components, estimated defocus;
* :mod:`.sample` — the reference's statistics from a seeded sample of training image x D4
  transforms (and the few-image variant that adopts the parent's);
* :mod:`.calibrate` — the caution level (held-out frames, or derived from the parent's
  calibration when they are too few);
* :mod:`.domain` — the model's imaging domain from the dataset's metadata or the annotated
  frames' estimated defoci;
* :mod:`.fit` — the entry points (end of training, after fine-tuning, on demand).

``docs/ood_score.md`` describes the verdict and its measured behaviour; the names in
``__all__`` are importable from here.

The network term (format 3)
===========================

Method
------
1. One pass per frame (:meth:`~._model.ScoringModel.frame_stats`) gives the pooled encoder
   features (every stage's feature map, mean and standard deviation per channel, by default
   all stages but the deepest) and, from the particle probability ``p``, two statistics of
   the predicted particle boundary (pixels with a 4-neighbour of the other class at
   ``p = 0.5``): ``b``, the mean predictive entropy on it [nats], and ``w``, the width of the
   uncertain band around it [px] (the frame's summed entropy / (boundary pixels + 1)).  Any
   frame size works: reflect padding to the output stride, statistics over the unpadded
   frame only, tiles with overlapping margins (tiled and whole-frame values agree to
   rounding).  When the segmentation's probability map is passed, only the encoder runs.
2. Reference (end of training, :func:`fit_ood_after_training`): a seeded sample of at most
   :attr:`OODFitConfig.max_samples` training image x dihedral-transform pairs, spread over
   the training domains and structures, read lazily one batch at a time, gives the mean and
   standard deviation of every pooled feature, and the median and robust spread (1.4826 x
   MAD) of ``b`` and of ``ln w``, and the median feature distance ``d_ref``.  Stored beside
   the checkpoint (``ood_reference.safetensors`` + ``.json``, tied to the weights' sha256;
   no pickle).
3. Score: ``max(z(b), -3) + max(z(ln w), -3) + 2 * max(d / d_ref - 1, 0)``, each ``z`` in
   units of the training images' spread: ~0 for training-like frames.  A vaguer edge or a wider
   uncertain band raises it; a frame without a predicted particle (a model that finds
   nothing) gets all its entropy in ``w``; the feature distance adds only when the input
   looks unusual, and unusually sharp edges lower the score by at most 3 each, so that a
   confidently wrong model (in focus, no contrast; the wrong magnification) cannot hide a
   shift of the input.
4. Caution level: the 95th percentile of the scores of held-out frames of the training
   domain(s), found at the end of training and stored with the reference
   (:attr:`OODReference.caution`; 1 for references without one).

Format 2 references (``distance / median - 1 + w * entropy excess``) are read and scored with
their own formula; refit them to get this score.  How the score was chosen, its measured
ranking of the loss and its cost: ``docs/ood_score.md`` ("The network term").
"""

from __future__ import annotations

from . import components
from .components import power_spectrum_profiles, spectral_contrast
from .fit import (
    MIN_CALIBRATION_FRAMES,
    OODFitConfig,
    OODFitResult,
    OODFitStopped,
    ProgressCallback,
    calibrate_caution_level,
    fit_ood_after_training,
    fit_ood_reference,
    fit_ood_reference_for_checkpoint,
    fit_reference_from_features,
    imaging_domain_for,
    sample_transforms,
)
from .held_out import fit_ood_on_held_out
from .reference import (
    DEFAULT_ENTROPY_MODE,
    DEFAULT_ENTROPY_WEIGHT,
    DEFAULT_FEATURE_WEIGHT,
    DEFAULT_METHOD,
    DEFAULT_STAGES,
    ENTROPY_MODES,
    FORMAT_VERSION,
    LEGACY_CAUTION_LEVEL,
    METHODS,
    OOD_ARRAYS,
    OOD_JSON,
    SCORE_KINDS,
    SPREAD_FLOOR,
    Z_FLOOR,
    ImagingDomain,
    OODReference,
    ReferenceFile,
    load_ood_reference,
)
from .verdict import (
    OODScores,
    VerdictConfig,
    combine,
    frame_components,
    ood_scores,
    verdict,
)

__all__ = [
    "calibrate_caution_level",
    "combine",
    "components",
    "DEFAULT_ENTROPY_MODE",
    "DEFAULT_ENTROPY_WEIGHT",
    "DEFAULT_FEATURE_WEIGHT",
    "DEFAULT_METHOD",
    "DEFAULT_STAGES",
    "ENTROPY_MODES",
    "fit_ood_after_training",
    "fit_ood_on_held_out",
    "fit_ood_reference",
    "fit_ood_reference_for_checkpoint",
    "fit_reference_from_features",
    "FORMAT_VERSION",
    "frame_components",
    "imaging_domain_for",
    "ImagingDomain",
    "LEGACY_CAUTION_LEVEL",
    "load_ood_reference",
    "METHODS",
    "MIN_CALIBRATION_FRAMES",
    "OOD_ARRAYS",
    "OOD_JSON",
    "ood_scores",
    "OODFitConfig",
    "OODFitResult",
    "OODFitStopped",
    "OODReference",
    "OODScores",
    "power_spectrum_profiles",
    "ProgressCallback",
    "ReferenceFile",
    "sample_transforms",
    "SCORE_KINDS",
    "spectral_contrast",
    "SPREAD_FLOOR",
    "verdict",
    "VerdictConfig",
    "Z_FLOOR",
]
