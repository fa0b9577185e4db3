"""The one inference engine (core: no Qt, torch imported lazily).

* :func:`load_model` -- the one model loader (cached; BatchNorm folded once, at load);
* :func:`plan_tiles` / :func:`tile_starts` / :func:`tile_bounds` -- the one tiler;
* :func:`run_pass` -- the one tiled pass: probabilities, logits, pooled encoder features and
  the uncertainty sums of the OOD pass from the same forward passes.

Segmentation (:func:`napari_hrtem_transfer.segmentation.segment`, hence the CLI, napari and
HyperSpy), the evaluation (:class:`~napari_hrtem_transfer.evaluation._model.ScoringModel`) and
:meth:`napari_hrtem_transfer.training.LoadedModel.predict_proba` all run through it.
"""

from __future__ import annotations

from ._engine import Moments, PassResult, boundary_mask, make_forward, run_pass, tile_of
from ._loader import (
    PRETRAINED,
    clear_cache,
    configure_threads,
    is_loaded_model,
    load_model,
    pretrained_model_dir,
    resolve_model_path,
)
from ._tiles import (
    DEFAULT_BYTES_PER_PX,
    TilePlan,
    balanced_tile,
    overlap_for,
    plan_tiles,
    round_up,
    tile_bounds,
    tile_for_budget,
    tile_starts,
)

__all__ = [
    "DEFAULT_BYTES_PER_PX",
    "PRETRAINED",
    "Moments",
    "PassResult",
    "TilePlan",
    "balanced_tile",
    "boundary_mask",
    "clear_cache",
    "configure_threads",
    "is_loaded_model",
    "load_model",
    "make_forward",
    "overlap_for",
    "plan_tiles",
    "pretrained_model_dir",
    "resolve_model_path",
    "round_up",
    "run_pass",
    "tile_bounds",
    "tile_for_budget",
    "tile_of",
    "tile_starts",
]
