"""Export and import bioimage.io model packages (BioImage Model Zoo, spec 0.5).

Export (:func:`export_bioimageio`, ``hrtem-transfer export``) writes one zip that bioimage.io
tools (``bioimageio test model.zip``, ``bioimageio predict``, the napari/Fiji/ilastik
consumers) run without this package's own code paths:

* **architecture** -- ``napari_hrtem_transfer.models.factory.build_model(config=...)`` from the
  installed package (``ArchitectureFromLibraryDescr``: no source file in the zip);
* **weights** -- ``pytorch_state_dict`` (``weights.pt``: ``torch.save`` of a plain state dict
  of tensors, loadable with ``torch.load(weights_only=True)``); optionally also
  ``torchscript`` (a ``torch.jit.trace``, for consumers that cannot import this package);
* **preprocessing** -- ``zero_mean_unit_variance`` per sample over (channel, y, x) with the
  checkpoint's ``eps``: exactly the models' per-image standardisation
  (:mod:`napari_hrtem_transfer.models.normalization`; the input is raw counts, the whole
  image is standardised before any tiling). A model that flat-field corrects its input
  (``flat_field_standardize`` record) is refused with a ConfigError: no bioimage.io step is
  a spatial filter, so the package could not reproduce its input pipeline;
* **postprocessing** -- ``sigmoid`` (the models output logits), so the output tensor is the
  particle probability; threshold it at 0.5 (``SegmentConfig.threshold``) for the mask;
* **pixel size** -- the ``y``/``x`` axes' ``scale`` in ``angstrom``;
* **test tensors** -- a simulated frame (``sample_data/defocus_series_small.hspy``) and the
  model's fp32 probabilities for it; a **cover** (the frame, its ground-truth mask and the
  model's mask); **documentation** from the model card (``docs/pretrained_model.md`` for the
  shipped model, else generated from the checkpoint sidecar); licence and the study's
  citation.

Our own files travel as ``attachments`` (the sidecar ``best.json``, its
``best-<sha>.safetensors`` and, when it belongs to these weights, the OOD reference
``ood_reference.json/.safetensors``) and are described under ``config.napari_hrtem_transfer``
(format, weights sha256, pixel size, training imaging domain, OOD caution level).

Import (:func:`import_bioimageio`; :func:`napari_hrtem_transfer.segmentation.resolve_model`
and ``segment --model model.zip`` call it) turns a package into an ordinary checkpoint
folder in a cache keyed by the package's sha256:

* **our own package** -- the attachments are unpacked unchanged (lossless: same weights, same
  OOD reference and verdict); the ``weights.pt`` that bioimage.io tools run must hold exactly
  the same tensors as the safetensors attachment;
* **a foreign package** with one input and one output 2-D image tensor whose architecture is
  one of ours (``build_model``/``compact_unet``/``resnet18_unet`` of this package, with valid
  arguments), per-sample zero-mean/unit-variance preprocessing and a sigmoid: its state dict
  (``.pt`` read only with ``torch.load(weights_only=True)``, or ``.safetensors``) is loaded
  into our own architecture class and saved as safetensors + JSON. It has no OOD reference.
* anything else is refused before any of it runs: an architecture that is not ours, an
  architecture source file in the package (never imported), a pickle that
  ``weights_only=True`` refuses, remote files, other pre-/postprocessing.

Loading a package never executes code from it: the YAML is parsed with ``yaml.safe_load``,
only named members of the zip are read, and nothing of the package is imported.
``bioimageio.spec``/``bioimageio.core`` (extra ``[bioimageio]``) are needed for export and
for :func:`test_package`, not for import.

Layout: ``_common`` (names of the format, :class:`BioimageioExportConfig`, the cache),
``_describe`` (imaging domain, README, ``rdf.yaml``), ``_export`` (:func:`export_bioimageio`,
:func:`test_package`) and ``_import`` (:func:`import_bioimageio`).
"""

from __future__ import annotations

from ._common import (
    ARCHITECTURE_CALLABLE,
    ARCHITECTURE_IMPORT,
    CACHE_ENV,
    CONFIG_KEY,
    PACKAGE_FORMAT,
    PACKAGE_FORMAT_VERSION,
    RDF_NAMES,
    STUDY_CITATION,
    STUDY_URL,
    BioimageioExportConfig,
    ExportResult,
    is_bioimageio_package,
    package_cache_dir,
)
from ._export import MAX_TEST_PX, export_bioimageio, test_package
from ._import import import_bioimageio

__all__ = [
    "ARCHITECTURE_CALLABLE",
    "ARCHITECTURE_IMPORT",
    "CACHE_ENV",
    "CONFIG_KEY",
    "MAX_TEST_PX",
    "PACKAGE_FORMAT",
    "PACKAGE_FORMAT_VERSION",
    "RDF_NAMES",
    "STUDY_CITATION",
    "STUDY_URL",
    "BioimageioExportConfig",
    "ExportResult",
    "export_bioimageio",
    "import_bioimageio",
    "is_bioimageio_package",
    "package_cache_dir",
    "test_package",
]
