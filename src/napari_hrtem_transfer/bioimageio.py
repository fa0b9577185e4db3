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
  image is standardised before any tiling);
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
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import uuid
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .errors import CheckpointError, ConfigError

__all__ = [
    "ARCHITECTURE_CALLABLE",
    "ARCHITECTURE_IMPORT",
    "CACHE_ENV",
    "CONFIG_KEY",
    "PACKAGE_FORMAT",
    "STUDY_CITATION",
    "BioimageioExportConfig",
    "ExportResult",
    "export_bioimageio",
    "import_bioimageio",
    "is_bioimageio_package",
    "package_cache_dir",
    "test_package",
]

#: Key of our section in the package's ``config``.
CONFIG_KEY = "napari_hrtem_transfer"
#: ``config.napari_hrtem_transfer.format`` of the packages we write.
PACKAGE_FORMAT = "napari-hrtem-transfer bioimageio package"
PACKAGE_FORMAT_VERSION = "1"
#: The architecture callable written into every package (``import_from`` / ``callable``).
ARCHITECTURE_IMPORT = "napari_hrtem_transfer.models.factory"
ARCHITECTURE_CALLABLE = "build_model"
#: Architecture callables of this package that an imported package may name.
_OUR_CALLABLES: dict[tuple[str, str], str] = {
    ("napari_hrtem_transfer.models.factory", "build_model"): "config",
    ("napari_hrtem_transfer.models", "build_model"): "config",
    ("napari_hrtem_transfer.models.unet", "compact_unet"): "compact",
    ("napari_hrtem_transfer.models", "compact_unet"): "compact",
    ("napari_hrtem_transfer.models.unet", "resnet18_unet"): "resnet18",
    ("napari_hrtem_transfer.models", "resnet18_unet"): "resnet18",
}
#: Environment variable: where imported packages are unpacked (default: the user cache).
CACHE_ENV = "HRTEM_TRANSFER_CACHE_DIR"
RDF_NAMES = ("rdf.yaml", "bioimageio.yaml")
STUDY_CITATION = (
    'L. Rangel DaCosta, H. Oill, M. Scott, "Strategies for effective transfer learning for '
    'HRTEM analysis with neural networks", Elemental Microscopy EM000010 (2025).'
)
#: bioimage.io requires a DOI or a URL with each citation; the journal's site (no DOI known).
STUDY_URL = "https://elementalmicroscopy.com"
#: bioimage.io space units -> Å.
_UNIT_TO_A = {
    "picometer": 0.01,
    "angstrom": 1.0,
    "nanometer": 10.0,
    "micrometer": 1e4,
    "millimeter": 1e7,
    "centimeter": 1e8,
    "meter": 1e10,
}
_MAX_MEMBER_BYTES = 2 << 30  # refuse zip members above 2 GiB (zip bombs)

Progress = Callable[[int, int, str], None]


class BioimageioExportConfig(BaseModel):
    """Choices of an export, with their defaults (one source for the CLI and Python)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    which: str = Field(default="best", pattern="^(best|last)$")
    """Which checkpoint of the model folder to export."""

    name: str | None = Field(default=None, max_length=128, pattern=r"^[A-Za-z0-9_+\- ()]+$")
    """Package name: letters, digits, spaces and _+-() only (bioimage.io's rule; default:
    from the model and its training stage)."""

    description: str | None = Field(default=None, max_length=1024)
    """One-paragraph description (default: generated from the checkpoint)."""

    authors: list[str] = Field(default_factory=lambda: ["napari-hrtem-transfer developers"])
    """Authors of the model (the people who trained it)."""

    license: str = "BSD-3-Clause"
    """SPDX licence identifier of the weights."""

    torchscript: bool = False
    """Also write TorchScript weights (traced; +the weights' size again), for consumers that
    cannot import napari-hrtem-transfer, such as deepImageJ in Fiji."""

    test: bool = True
    """Run ``bioimageio.core.test_model`` on the written package (fails the export if the
    package does not reproduce its test output)."""

    overwrite: bool = False
    """Replace an existing output file."""


@dataclass
class ExportResult:
    """What :func:`export_bioimageio` wrote."""

    path: Path
    sha256: str
    name: str
    n_bytes: int
    ood_reference: bool
    caution_level: float | None
    test_passed: bool | None
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- helpers


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _need_spec() -> Any:
    try:
        import bioimageio.spec as spec
    except ImportError as exc:
        raise ConfigError(
            "exporting a bioimage.io package needs bioimageio.spec and bioimageio.core: "
            "pip install 'napari-hrtem-transfer[bioimageio]'",
            "bioimageio",
        ) from exc
    return spec


def _format_version() -> str:
    """The newest model spec version of the installed bioimageio.spec (0.5.x)."""
    from bioimageio.spec.model.v0_5 import ModelDescr

    return str(ModelDescr.implemented_format_version)


def _torch_version() -> str:
    import torch

    return str(torch.__version__).split("+", 1)[0]


def is_bioimageio_package(model: Any) -> bool:
    """True if ``model`` names a bioimage.io package: a ``.zip``, an ``rdf.yaml`` /
    ``bioimageio.yaml`` file, or a folder with one of them and no ``best.json``/``last.json``."""
    if not isinstance(model, (str, os.PathLike)):
        return False
    p = Path(model).expanduser()
    if p.suffix.lower() == ".zip" or p.name in RDF_NAMES:
        return True
    if p.is_dir() and not (p / "best.json").exists() and not (p / "last.json").exists():
        return any((p / n).is_file() for n in RDF_NAMES)
    return False


def package_cache_dir() -> Path:
    """Where imported packages are unpacked: ``$HRTEM_TRANSFER_CACHE_DIR``, else the user's
    cache folder (``$XDG_CACHE_HOME`` or ``~/.cache``) ``/napari-hrtem-transfer``; a
    ``bioimageio/<sha256>`` folder per package."""
    env = os.environ.get(CACHE_ENV)
    if env:
        root = Path(env).expanduser()
    else:
        try:
            from platformdirs import user_cache_dir

            root = Path(user_cache_dir("napari-hrtem-transfer"))
        except ImportError:
            base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
            root = Path(base) / "napari-hrtem-transfer"
    return root / "bioimageio"


# ----------------------------------------------------------------------------- export


def _model_folder(model: Any) -> Path:
    from .segmentation import PRETRAINED, pretrained_model_dir

    if hasattr(model, "path") and hasattr(model, "info"):
        return Path(model.path)
    if str(model) == PRETRAINED:
        return pretrained_model_dir()
    p = Path(model).expanduser()
    if is_bioimageio_package(p):
        raise ConfigError(
            f"{p} is already a bioimage.io package; export a checkpoint folder (or 'pretrained').",
            "model",
        )
    return p


def _ood_files(folder: Path, weights_sha256: str) -> tuple[list[Path], float | None, str]:
    """The OOD reference files of ``folder`` if they belong to these weights."""
    js, arr = folder / "ood_reference.json", folder / "ood_reference.safetensors"
    if not js.is_file() or not arr.is_file():
        return [], None, "the model folder has no OOD reference"
    try:
        meta = json.loads(js.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return [], None, f"its OOD reference is unreadable ({exc})"
    if meta.get("weights_sha256") != weights_sha256:
        return [], None, "its OOD reference belongs to other weights"
    level = meta.get("caution_level")
    return [js, arr], (None if level is None else float(level)), ""


def _simulation_config(data: dict[str, Any]) -> dict[str, Any] | None:
    """The simulation config of the training dataset, if its file is still there and is the
    same dataset (fingerprint recorded in the sidecar); None otherwise."""
    path, fp = data.get("path"), data.get("fingerprint")
    if not path or not fp or not Path(path).is_file():
        return None
    try:
        from .io.dataset import load_dataset
        from .training.data import dataset_fingerprint

        ds = load_dataset(path, lazy=True)
        if dataset_fingerprint(ds) != fp:
            return None
        cfg = ds.info.get("config")
    except Exception:  # noqa: BLE001 - a missing or unreadable file only loses metadata
        return None
    return cfg if isinstance(cfg, dict) else None


def _imaging_domain(side: dict[str, Any]) -> dict[str, Any]:
    """The training imaging domain: sidecar fields, and voltage/Cs/focal spread from the
    sidecar or the training dataset's simulation config (None where neither records them)."""
    data = side.get("data") or {}
    defoci = [float(v) for v in (data.get("train_defocus_nm") or [])]
    energy, cs, spread = data.get("energy_eV"), data.get("Cs_A"), data.get("focal_spread_A")
    source = "checkpoint sidecar"
    if energy is None or cs is None:
        sim = _simulation_config(data)
        if sim is not None:
            energy = sim.get("energy_eV") if energy is None else energy
            cs = sim.get("Cs_A") if cs is None else cs
            spread = sim.get("focal_spread_A") if spread is None else spread
            source = (
                f"checkpoint sidecar and the training dataset {data['path']} (same fingerprint)"
            )
        else:
            source = "checkpoint sidecar (voltage and Cs are not recorded there)"
    return {
        "sampling_A": side.get("sampling_A"),
        "train_defocus_nm": defoci,
        "defocus_range_nm": [min(defoci), max(defoci)] if defoci else None,
        "defocus_convention": "abTEM: defocus = -C10, positive = underfocus",
        "dose_e_per_A2": data.get("dose_e_per_A2"),
        "voltage_kV": None if energy is None else float(energy) / 1e3,
        "Cs_mm": None if cs is None else float(cs) / 1e7,
        "focal_spread_nm": None if spread is None else float(spread) / 10.0,
        "image_shape_px": data.get("image_shape"),
        "stage": side.get("stage"),
        "source": source,
    }


def _sample_frame(
    sampling_A: float | None, train_defocus: list[float]
) -> tuple[np.ndarray, np.ndarray, str]:
    """A simulated frame (raw counts) and its mask from the shipped sample series, resampled
    to the model's pixel size when that differs by more than 5 %."""
    from importlib import resources

    from .io.dataset import load_dataset

    path = Path(str(resources.files("napari_hrtem_transfer") / "sample_data"))
    path = path / "defocus_series_small.hspy"
    if not path.is_file():
        raise ConfigError(
            f"the sample series {path} is missing from this installation; pass test_image= "
            "(a raw frame) to export_bioimageio.",
            "test_image",
        )
    ds = load_dataset(path, lazy=True)
    defoci = np.asarray(ds.defocus_nm, float)
    centre = float(np.mean(train_defocus)) if train_defocus else 0.0
    # nearest the middle of the training domain, but not at the minimum-contrast focus (0 nm,
    # where the particles are nearly invisible) unless the model was trained only there
    dist = np.abs(defoci - centre)
    if any(abs(v) > 1e-9 for v in train_defocus or [1.0]):
        dist = np.where(np.abs(defoci) < 1e-9, np.inf, dist)
    d = int(np.argmin(dist))
    frame = np.asarray(ds.images[d, 0], np.float32)
    mask = np.asarray(ds.masks[0], bool) if ds.masks is not None else np.zeros(frame.shape, bool)
    what = (
        f"{path.name}, structure 0 at defocus {defoci[d]:+g} nm "
        f"({ds.sampling_A:g} Å/px, {ds.energy_eV / 1e3:g} kV, {ds.dose_e_per_A2:g} e/Å²)"
    )
    if sampling_A and abs(ds.sampling_A / sampling_A - 1.0) > 0.05:
        from scipy import ndimage

        z = ds.sampling_A / sampling_A
        frame = ndimage.zoom(frame, z, order=1).astype(np.float32)
        mask = ndimage.zoom(mask.astype(np.float32), z, order=1) >= 0.5
        what += f", resampled to the model's {sampling_A:g} Å/px"
    return frame, mask, what


#: Largest side of the test tensors [px] (a larger frame is cropped around its centre).
MAX_TEST_PX = 512


def _crop_to_stride(a: np.ndarray, stride: int) -> np.ndarray:
    """The centre of ``a`` cut to multiples of ``stride``, at most :data:`MAX_TEST_PX`."""
    ny, nx = a.shape[-2:]
    top = max(MAX_TEST_PX // stride * stride, stride)
    cy, cx = min(ny // stride * stride, top), min(nx // stride * stride, top)
    if cy == 0 or cx == 0:
        raise ConfigError(
            f"the test frame of {ny}x{nx} px is smaller than the model's stride ({stride} px).",
            "test_image",
        )
    oy, ox = (ny - cy) // 2, (nx - cx) // 2
    return a[..., oy : oy + cy, ox : ox + cx]


def _reference_probability(lm: Any, frame: np.ndarray) -> np.ndarray:
    """What the bioimage.io pipeline computes: standardise, the plain model in fp32, sigmoid."""
    import torch

    x = lm.standardize(frame[None])  # (1, H, W) float32
    model = lm.model.to("cpu").eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(np.ascontiguousarray(x[:, None])))
    return torch.sigmoid(logits).numpy().astype(np.float32)  # (1, 1, H, W)


def _write_torchscript(model: Any, frame: np.ndarray, path: Path) -> None:
    """Trace the model (eval mode, CPU) on the test frame's shape and save it."""
    import warnings

    import torch

    x = torch.zeros((1, 1, *frame.shape), dtype=torch.float32)
    with warnings.catch_warnings(), torch.no_grad():
        # tracing warns that the input-shape check becomes a constant and that
        # torch.jit.trace is deprecated; the traced program is checked by the package test
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model.to("cpu").eval(), x, check_trace=False)
        traced.save(str(path))


def _cover(
    path: Path, frame: np.ndarray, mask: np.ndarray, proba: np.ndarray, title: str, threshold: float
):
    """A 2:1 PNG: the frame, and the frame with the model's mask and the true outline."""
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4), dpi=100)
    lo, hi = np.percentile(frame, [1, 99])
    ax0 = fig.add_axes((0.0, 0.05, 0.5, 0.87))
    ax1 = fig.add_axes((0.5, 0.05, 0.5, 0.87))
    for ax in (ax0, ax1):
        ax.imshow(frame, cmap="gray", vmin=lo, vmax=hi)
        ax.set_axis_off()
    pred = np.ma.masked_where(proba < threshold, np.ones_like(proba))
    ax1.imshow(pred, cmap=ListedColormap(["#ff7f0e"]), alpha=0.45, vmin=0, vmax=1)
    if mask.any():
        ax1.contour(mask.astype(float), levels=[0.5], colors="cyan", linewidths=1.0)
    fig.text(0.25, 0.96, "simulated HRTEM frame", ha="center", va="center", fontsize=10)
    fig.text(
        0.75,
        0.96,
        "model mask (orange), true outline (cyan)",
        ha="center",
        va="center",
        fontsize=10,
    )
    fig.text(0.5, 0.005, title, ha="center", va="bottom", fontsize=7, color="0.3")
    fig.savefig(path, format="png")


def _model_card(folder: Path, is_pretrained: bool) -> str | None:
    """The shipped model's card (docs/pretrained_model.md) when this installation has it."""
    if not is_pretrained:
        return None
    for root in (Path(__file__).resolve().parents[2],):
        card = root / "docs" / "pretrained_model.md"
        if card.is_file():
            return card.read_text(encoding="utf-8")
    return None


def _fmt(value: float | None, unit: str) -> str:
    return "not recorded" if value is None else f"{value:g} {unit}"


def _documentation(
    side: dict[str, Any],
    card: str | None,
    domain: dict[str, Any],
    caution: float | None,
    name: str,
    test_what: str,
    threshold: float,
) -> str:
    """README.md of the package: the model card (or one generated from the sidecar), then how
    to use and validate it."""
    lines: list[str] = []
    if card:
        lines.append(card.rstrip())
    else:
        hist = side.get("history") or []
        lines += [
            f"# {name}",
            "",
            "A U-Net that segments nanoparticles in HRTEM (phase-contrast) images, trained with "
            "napari-hrtem-transfer. Generated from the checkpoint sidecar.",
            "",
            "## How it was trained",
            f"- **Stage**: {side.get('stage') or 'unknown'}"
            + (f" (fine-tuned from {side['parent'].get('path')})" if side.get("parent") else ""),
            f"- **Architecture**: `{json.dumps(side.get('model'))}`",
            f"- **Epochs**: {side.get('epochs_completed')}, best epoch {side.get('best_epoch')}, "
            f"validation loss {side.get('best_val_loss')}",
            f"- **Training data**: {(side.get('data') or {}).get('n_train_images')} images, "
            f"defoci {domain['train_defocus_nm']} nm, dose {domain['dose_e_per_A2']} e/Å², "
            f"pixel size {domain['sampling_A']} Å",
        ]
        if hist:
            lines.append(f"- **History**: {len(hist)} epochs recorded in `best.json`.")
    lines += [
        "",
        "## Imaging domain of the training data",
        f"- pixel size: {domain['sampling_A']} Å/px (the input axes' scale, in ångström)",
        f"- defocus: {domain['defocus_range_nm']} nm ({domain['defocus_convention']})",
        f"- dose: {domain['dose_e_per_A2']} e/Å²",
        f"- voltage: {_fmt(domain['voltage_kV'], 'kV')}; Cs: {_fmt(domain['Cs_mm'], 'mm')}; "
        f"focal spread: {_fmt(domain['focal_spread_nm'], 'nm')} (from the "
        f"{domain['source']})",
        "",
        "## Use",
        "- Input: one raw HRTEM frame (counts, any linear intensity), float32, "
        "(batch, channel=1, y, x) with y, x multiples of the model's stride. The package "
        "standardises each image (zero mean, unit variance over the whole frame) itself.",
        "- Output: the particle probability (sigmoid of the logits); threshold at "
        f"{threshold:g} for the "
        "mask.",
        "- In napari-hrtem-transfer: `hrtem-transfer segment IMAGE --model THIS.zip --out "
        "mask.hspy` (or `segmentation.resolve_model('THIS.zip')`): resampling to the model's "
        "pixel size, tiling and, when the package carries one, the label-free OOD score"
        + (f" (treat frames scoring above {caution:.2f} with caution)." if caution else "."),
        "",
        "## Validation",
        f"The test tensors are {test_what} and this model's fp32 probabilities for it; "
        "`bioimageio test THIS.zip` reproduces them. To validate on your own data, label a "
        "few frames and run `hrtem-transfer evaluate` (Dice/IoU per defocus), and watch the "
        "OOD score of unlabelled frames.",
        "",
        "## Citation",
        STUDY_CITATION,
        "",
    ]
    return "\n".join(lines)


def _rdf(
    *,
    name: str,
    description: str,
    cfg: BioimageioExportConfig,
    side: dict[str, Any],
    stride: int,
    n_params: int,
    attachments: list[str],
    ours: dict[str, Any],
    sampling_A: float | None,
) -> dict[str, Any]:
    def space(axis: str, size: Any) -> dict[str, Any]:
        ax: dict[str, Any] = {"type": "space", "id": axis, "size": size}
        if sampling_A:
            ax.update(scale=float(sampling_A), unit="angstrom")
        return ax

    eps = float((side.get("normalization") or {}).get("eps", 1e-6))
    arch = "ResNet-18 U-Net" if side["model"].get("architecture") == "resnet18" else "U-Net"
    return {
        "format_version": _format_version(),
        "type": "model",
        "name": name,
        "description": description,
        "authors": [{"name": a} for a in cfg.authors],
        "cite": [{"text": STUDY_CITATION, "url": STUDY_URL}],
        "license": cfg.license,
        "documentation": {"source": "README.md"},
        "covers": [{"source": "cover.png"}],
        "tags": [
            "napari-hrtem-transfer",
            "electron-microscopy",
            "hrtem",
            "nanoparticles",
            "semantic-segmentation",
            "2d",
            "pytorch",
            "unet",
        ],
        "inputs": [
            {
                "id": "raw",
                "description": "HRTEM frame, raw counts or any linear intensity",
                "axes": [
                    {"type": "batch"},
                    {"type": "channel", "channel_names": ["intensity"]},
                    space("y", {"min": stride, "step": stride}),
                    space("x", {"min": stride, "step": stride}),
                ],
                "test_tensor": {"source": "test_input.npy"},
                "sample_tensor": {"source": "sample_input.tif"},
                "data": {"type": "float32"},
                "preprocessing": [
                    {
                        "id": "zero_mean_unit_variance",
                        "kwargs": {"axes": ["channel", "y", "x"], "eps": eps},
                    }
                ],
            }
        ],
        "outputs": [
            {
                "id": "probability",
                "description": "particle probability (sigmoid of the logits)",
                "axes": [
                    {"type": "batch"},
                    {"type": "channel", "channel_names": ["particle"]},
                    space("y", {"tensor_id": "raw", "axis_id": "y"}),
                    space("x", {"tensor_id": "raw", "axis_id": "x"}),
                ],
                "test_tensor": {"source": "test_output.npy"},
                "sample_tensor": {"source": "sample_output.tif"},
                "data": {"type": "float32", "range": [0.0, 1.0]},
                "postprocessing": [{"id": "sigmoid"}],
            }
        ],
        "weights": {
            "pytorch_state_dict": {
                "source": "weights.pt",
                "architecture": {
                    "callable": ARCHITECTURE_CALLABLE,
                    "import_from": ARCHITECTURE_IMPORT,
                    "kwargs": {"config": dict(side["model"])},
                },
                "pytorch_version": _torch_version(),
                "comment": "state dict of napari-hrtem-transfer's architecture; the same "
                "tensors as the attached safetensors file",
            },
            **(
                {
                    "torchscript": {
                        "source": "weights_torchscript.pt",
                        "parent": "pytorch_state_dict",
                        "pytorch_version": _torch_version(),
                        "comment": "torch.jit.trace of the pytorch_state_dict model (eval "
                        "mode); never loaded by napari-hrtem-transfer itself",
                    }
                }
                if cfg.torchscript
                else {}
            ),
        },
        "attachments": [{"source": a} for a in attachments],
        "config": {
            "bioimageio": {
                "architecture_type": arch,
                "modality": "electron microscopy (HRTEM, phase contrast)",
                "target_structure": ["nanoparticles"],
                "task": "semantic segmentation",
                "model_parameter_count": int(n_params),
            },
            CONFIG_KEY: ours,
        },
    }


def export_bioimageio(
    model: Any = "pretrained",
    out: str | os.PathLike = "model.zip",
    *,
    config: BioimageioExportConfig | None = None,
    test_image: np.ndarray | None = None,
    test_mask: np.ndarray | None = None,
    progress: Progress | None = None,
    **options: Any,
) -> ExportResult:
    """Write ``model`` as a bioimage.io model package (spec 0.5, a zip).

    Parameters
    ----------
    model
        ``"pretrained"`` (the shipped model), a checkpoint folder, or a loaded model.
    out
        The ``.zip`` to write (atomically).
    config
        A :class:`BioimageioExportConfig`; ``**options`` override its fields.
    test_image, test_mask
        A raw frame (ny, nx) at the model's pixel size for the test tensors and the cover,
        and its ground-truth mask (optional); default: a simulated frame of the shipped
        sample series and its mask.
    progress
        Called as ``progress(done, total, message)``.

    Returns
    -------
    ExportResult

    Raises
    ------
    ConfigError
        ``bioimageio.spec`` missing, ``out`` not a writable ``.zip`` (or exists without
        ``overwrite``), bad options.
    CheckpointError
        The model cannot be loaded, or the written package does not pass
        ``bioimageio.core.test_model`` (with ``test=True``).
    """
    from pydantic import ValidationError

    from .errors import config_error_from_validation

    base = config if config is not None else BioimageioExportConfig()
    try:
        cfg = BioimageioExportConfig(**{**base.model_dump(), **options}) if options else base
    except ValidationError as exc:
        raise config_error_from_validation(exc) from None
    step = (lambda i, msg: progress(i, 5, msg)) if progress else (lambda i, msg: None)
    spec = _need_spec()
    from .io.atomic import check_writable
    from .segmentation import PRETRAINED
    from .training.checkpoint import load_checkpoint, state_tensors

    out = Path(out).expanduser()
    if out.suffix.lower() != ".zip":
        raise ConfigError(f"--out {out}: a bioimage.io package is a .zip file.", "out")
    check_writable(out)
    if out.exists() and not cfg.overwrite:
        raise ConfigError(f"{out} exists; use --overwrite to replace it.", "overwrite")
    folder = _model_folder(model)
    is_pretrained = str(model) == PRETRAINED
    lm = load_checkpoint(folder, cfg.which, device="cpu")
    side_path = Path(lm.info["_path"])
    side = {k: v for k, v in lm.info.items() if k != "_path"}
    stride = int(lm.output_stride)
    sampling = lm.sampling_A
    notes: list[str] = []
    ood, caution, why = _ood_files(folder, side["weights_sha256"])
    if why:
        notes.append(f"no OOD reference in the package: {why}")
    domain = _imaging_domain(side)
    step(1, "test frame and cover")
    if test_image is None:
        frame, mask, test_what = _sample_frame(sampling, domain["train_defocus_nm"])
        test_what = f"a simulated frame ({test_what})"
    else:
        frame = np.asarray(test_image, np.float32)
        if frame.ndim != 2:
            raise ConfigError(f"test_image must be one frame (ny, nx); got {frame.shape}.")
        mask = np.zeros(frame.shape, bool) if test_mask is None else np.asarray(test_mask, bool)
        if mask.shape != frame.shape:
            raise ConfigError(
                f"test_mask has shape {mask.shape} but test_image {frame.shape}; give the "
                "frame's own mask (or none).",
                "test_mask",
            )
        test_what = "a frame supplied at export"
    frame, mask = _crop_to_stride(frame, stride), _crop_to_stride(mask, stride)
    proba = _reference_probability(lm, frame)
    from .segmentation import SegmentConfig

    threshold = float(SegmentConfig().threshold)
    stage = side.get("stage") or "model"
    arch = side["model"].get("architecture", "compact")
    name = cfg.name or (
        "HRTEM nanoparticle U-Net (napari-hrtem-transfer pretrained)"
        if is_pretrained
        else f"HRTEM nanoparticle U-Net - {arch} {stage} (napari-hrtem-transfer)"
    )
    kind = "ResNet-18 U-Net" if arch == "resnet18" else "compact U-Net"
    how = "fine-tuned from a pretrained model" if stage == "finetune" else "trained"
    rng = domain["defocus_range_nm"]
    description = cfg.description or (
        "Segments nanoparticles in HRTEM phase-contrast images"
        + (f" at {sampling:g} Å/px" if sampling else "")
        + f" ({kind}, {how}"
        + (f" on defocus {rng[0]:g} to {rng[1]:g} nm" if rng else "")
        + "). Input: a raw frame; output: the particle probability."
    )
    with tempfile.TemporaryDirectory(prefix="hrtem-bioimageio-") as tmpdir:
        tmp = Path(tmpdir)
        import torch

        torch.save(state_tensors(lm.model), tmp / "weights.pt")
        if cfg.torchscript:
            _write_torchscript(lm.model, frame, tmp / "weights_torchscript.pt")
        np.save(tmp / "test_input.npy", frame[None, None].astype(np.float32))
        np.save(tmp / "test_output.npy", proba)
        import tifffile

        tifffile.imwrite(tmp / "sample_input.tif", frame.astype(np.float32))
        tifffile.imwrite(tmp / "sample_output.tif", proba[0, 0])
        _cover(tmp / "cover.png", frame, mask, proba[0, 0], test_what, threshold)
        card = _model_card(folder, is_pretrained)
        (tmp / "README.md").write_text(
            _documentation(side, card, domain, caution, name, test_what, threshold),
            encoding="utf-8",
        )
        # our own files, unchanged (the sidecar of 'last' without its optimizer state)
        if cfg.which == "best":
            shutil.copyfile(side_path, tmp / "best.json")
        else:
            s = json.loads(side_path.read_text(encoding="utf-8"))
            for k in ("optimizer_file", "optimizer_sha256", "optimizer", "resume"):
                s.pop(k, None)
            s["which"] = "best"
            (tmp / "best.json").write_text(json.dumps(s, indent=1), encoding="utf-8")
        shutil.copyfile(folder / side["weights_file"], tmp / side["weights_file"])
        copied = json.loads((tmp / "best.json").read_text(encoding="utf-8"))
        if (
            copied.get("weights_sha256") != side["weights_sha256"]
            or _sha256_file(tmp / side["weights_file"]) != side["weights_sha256"]
        ):
            raise CheckpointError(
                f"the checkpoint in {folder} changed while it was being exported (a training "
                "run still writing to it?); export it again when it is finished."
            )
        for f in ood:
            shutil.copyfile(f, tmp / f.name)
        attachments = ["best.json", side["weights_file"], *[f.name for f in ood]]
        from . import __version__

        ours = {
            "format": PACKAGE_FORMAT,
            "format_version": PACKAGE_FORMAT_VERSION,
            "package_version": __version__,
            "sidecar": "best.json",
            "weights_file": side["weights_file"],
            "weights_sha256": side["weights_sha256"],
            "ood_reference": (
                {"json": ood[0].name, "arrays": ood[1].name, "caution_level": caution}
                if ood
                else None
            ),
            "sampling_A": sampling,
            "normalization": side.get("normalization"),
            "output": side.get("output"),
            "threshold": threshold,
            "imaging_domain": domain,
            "exported": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        }
        rdf = _rdf(
            name=name,
            description=description,
            cfg=cfg,
            side=side,
            stride=stride,
            n_params=sum(int(p.numel()) for p in lm.model.parameters()),
            attachments=attachments,
            ours=ours,
            sampling_A=sampling,
        )
        import yaml

        (tmp / "rdf.yaml").write_text(
            yaml.safe_dump(rdf, sort_keys=False, allow_unicode=True), encoding="utf-8"
        )
        step(2, "validating the description")
        descr = _load_description(spec, tmp / "rdf.yaml")
        step(3, "writing the package")
        part = out.with_name(f".{out.stem}.tmp-{uuid.uuid4().hex[:8]}.zip")
        try:
            spec.save_bioimageio_package(descr, output_path=part)
            os.replace(part, out)
        finally:
            with contextlib.suppress(OSError):
                part.unlink()
    passed = None
    if cfg.test:
        step(4, "bioimageio test")
        ok, detail = test_package(out)
        if not ok:
            raise CheckpointError(
                f"the written package {out} does not pass 'bioimageio test': {detail}"
            )
        passed = True
    step(5, "done")
    return ExportResult(
        path=out,
        sha256=_sha256_file(out),
        name=name,
        n_bytes=out.stat().st_size,
        ood_reference=bool(ood),
        caution_level=caution,
        test_passed=passed,
        notes=notes,
    )


def _load_description(spec: Any, rdf: Path) -> Any:
    """Validate ``rdf`` with bioimageio.spec (offline: no URL checks); raise on errors."""
    from bioimageio.spec import ValidationContext

    with ValidationContext(perform_io_checks=True, known_files={STUDY_URL: None}):
        descr = spec.load_description(rdf, format_version="latest")
    if not isinstance(descr, spec.model.v0_5.ModelDescr):
        summary = getattr(descr, "validation_summary", None)
        raise CheckpointError(
            "the bioimage.io description did not validate: "
            + (summary.format() if summary is not None else str(descr))
        )
    return descr


def test_package(path: str | os.PathLike, devices: list[str] | None = None) -> tuple[bool, str]:
    """Run ``bioimageio.core.test_model`` on a package; return (passed, summary text).

    Devices default to the CPU (the tests' tolerance is set for fp32 on any device).
    """
    _need_spec()
    try:
        from bioimageio.core import test_model
    except ImportError as exc:
        raise ConfigError(
            "testing a package needs bioimageio.core: pip install "
            "'napari-hrtem-transfer[bioimageio]'",
            "bioimageio",
        ) from exc
    import warnings

    with warnings.catch_warnings():  # bioimage.io's TorchScript backend; not the user's concern
        warnings.filterwarnings("ignore", "`torch.jit.load` is deprecated", DeprecationWarning)
        summary = test_model(str(path), devices=devices or ["cpu"])
    ok = summary.status in ("passed", "valid-format")
    if ok:
        return True, summary.status
    failed = [
        f"{d.name}: {'; '.join(str(e.msg) for e in d.errors)}"
        for d in summary.details
        if d.status == "failed"
    ]
    return False, " | ".join(failed) or summary.status


# ----------------------------------------------------------------------------- import


class _Package:
    """Read-only access to the files of a package (zip, or a folder with its rdf)."""

    def __init__(self, source: Path) -> None:
        self.source = source
        self.zip: zipfile.ZipFile | None = None
        if source.suffix.lower() == ".zip":
            if not source.is_file():
                raise CheckpointError(f"bioimage.io package {source} does not exist.")
            try:
                self.zip = zipfile.ZipFile(source)
            except (OSError, zipfile.BadZipFile) as exc:
                raise CheckpointError(f"{source} is not a readable zip file: {exc}") from exc
            names = set(self.zip.namelist())
            rdf = next((n for n in RDF_NAMES if n in names), None)
            if rdf is None:
                raise CheckpointError(
                    f"{source} is not a bioimage.io package: it has no rdf.yaml or "
                    "bioimageio.yaml at its top level."
                )
            self.root = None
            self.rdf_name = rdf
        else:
            folder = source if source.is_dir() else source.parent
            rdf = (
                source.name
                if source.is_file()
                else next((n for n in RDF_NAMES if (folder / n).is_file()), None)
            )
            if rdf is None or not (folder / rdf).is_file():
                raise CheckpointError(f"bioimage.io description {source} does not exist.")
            self.root = folder
            self.rdf_name = rdf

    def close(self) -> None:
        if self.zip is not None:
            self.zip.close()

    def sha256(self) -> str:
        if self.zip is not None:
            return _sha256_file(self.source)
        h = hashlib.sha256()
        for name in sorted(p.name for p in self.root.iterdir() if p.is_file()):
            h.update(name.encode() + b"\0" + bytes.fromhex(_sha256_file(self.root / name)))
        return h.hexdigest()

    def read(self, name: Any, what: str) -> bytes:
        """The bytes of member ``name`` (a plain file name inside the package)."""
        if isinstance(name, dict):
            name = name.get("source")
        if not isinstance(name, str) or not name:
            raise CheckpointError(f"{self.source}: {what} names no file (got {name!r}).")
        if re.match(r"^[a-z][a-z0-9+.-]*://", name, re.IGNORECASE):
            raise CheckpointError(
                f"{self.source}: {what} is a remote file ({name}); only files inside the "
                "package are read (nothing is downloaded)."
            )
        posix = PurePosixPath(name.replace("\\", "/"))
        if posix.is_absolute() or ".." in posix.parts or posix.name != str(posix):
            raise CheckpointError(
                f"{self.source}: {what} {name!r} is not a plain file name inside the package."
            )
        if self.zip is not None:
            try:
                info = self.zip.getinfo(name)
            except KeyError:
                raise CheckpointError(
                    f"{self.source}: {what} {name} is missing from the package."
                ) from None
            if info.file_size > _MAX_MEMBER_BYTES:
                raise CheckpointError(f"{self.source}: {what} {name} is implausibly large.")
            return self.zip.read(info)
        path = self.root / name
        if not path.is_file() or path.is_symlink():
            raise CheckpointError(f"{self.source}: {what} {name} is missing (or a link).")
        return path.read_bytes()

    def rdf(self) -> dict[str, Any]:
        import yaml

        try:
            rdf = yaml.safe_load(self.read(self.rdf_name, "the description"))
        except yaml.YAMLError as exc:
            raise CheckpointError(
                f"{self.source}: {self.rdf_name} is not valid YAML: {exc}"
            ) from exc
        if not isinstance(rdf, dict):
            raise CheckpointError(f"{self.source}: {self.rdf_name} is not a YAML mapping.")
        return rdf


def _architecture(rdf: dict[str, Any], src: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model config of the package's pytorch_state_dict architecture, if it is ours.

    Returns (model config dict, weights entry).  Nothing is imported.
    """
    from .models.config import parse_model_config

    weights = rdf.get("weights") or {}
    entry = weights.get("pytorch_state_dict") if isinstance(weights, dict) else None
    if not isinstance(entry, dict):
        present = ", ".join(sorted(weights)) if isinstance(weights, dict) else "none"
        raise CheckpointError(
            f"{src}: the package has no pytorch_state_dict weights (it has: {present}); "
            "napari-hrtem-transfer imports only state dicts of its own architectures "
            "(torchscript, ONNX and TensorFlow weights are not loaded)."
        )
    arch = entry.get("architecture")
    if not isinstance(arch, dict):
        raise CheckpointError(f"{src}: weights.pytorch_state_dict has no architecture.")
    if arch.get("source") is not None or arch.get("source_file") is not None:
        raise CheckpointError(
            f"{src}: the architecture comes from a source file in the package "
            f"({arch.get('source') or arch.get('source_file')}); napari-hrtem-transfer never "
            "imports a package's code and loads only its own architectures."
        )
    where = str(arch.get("import_from") or arch.get("module_name") or "")
    fn = str(arch.get("callable") or arch.get("callable_name") or "")
    kind = _OUR_CALLABLES.get((where, fn))
    if kind is None:
        raise CheckpointError(
            f"{src}: architecture '{where}.{fn}' is not one of napari-hrtem-transfer's "
            f"({', '.join(sorted({f'{m}.{c}' for m, c in _OUR_CALLABLES}))}); this package "
            "cannot be loaded here (use the bioimage.io tools it was made for)."
        )
    kwargs = arch.get("kwargs") or {}
    if not isinstance(kwargs, dict):
        raise CheckpointError(f"{src}: architecture kwargs must be a mapping.")
    if kind == "config":
        if set(kwargs) != {"config"}:
            raise CheckpointError(
                f"{src}: build_model takes one argument, config (got {sorted(kwargs)})."
            )
        cfg = kwargs["config"]
    else:
        cfg = {"architecture": kind, **kwargs}
        if kind == "compact" and "channels" not in kwargs:
            cfg["channels"] = [32, 64, 128, 192]
    try:
        model_cfg = parse_model_config(cfg).model_dump(mode="json")
    except Exception as exc:  # noqa: BLE001 - ConfigError / pydantic ValidationError
        raise CheckpointError(f"{src}: invalid architecture arguments {cfg!r}: {exc}") from None
    return model_cfg, entry


def _state_dict(data: bytes, name: str, src: Path) -> dict[str, Any]:
    """Tensors of a weights file: safetensors, or a torch pickle read with weights_only=True."""
    import torch

    if name.endswith(".safetensors"):
        from safetensors.torch import load

        try:
            return dict(load(data))
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"{src}: {name} is not a valid safetensors file: {exc}") from exc
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - UnpicklingError, RuntimeError, ...
        raise CheckpointError(
            f"{src}: refusing the weights {name}: torch.load(weights_only=True) rejects it "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). It is a "
            "pickle with objects other than tensors, which could execute code when loaded; "
            "napari-hrtem-transfer loads only plain state dicts (or safetensors)."
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(
            f"{src}: the weights {name} are not a plain state dict (name -> tensor)."
        )
    return state


def _check_io(rdf: dict[str, Any], src: Path) -> tuple[float | None, float]:
    """Check 1 input / 1 output 2-D image tensors and our pre/postprocessing.

    Returns (pixel size [Å] or None, standardisation eps).
    """
    if not str(rdf.get("format_version", "")).startswith("0.5"):
        raise CheckpointError(
            f"{src}: model description format {rdf.get('format_version')!r}; napari-hrtem-"
            "transfer imports spec 0.5 packages (update it with 'bioimageio update-format')."
        )
    ins, outs = rdf.get("inputs") or [], rdf.get("outputs") or []
    if len(ins) != 1 or len(outs) != 1:
        raise ConfigError(
            f"{src}: the model has {len(ins)} input(s) and {len(outs)} output(s); "
            "napari-hrtem-transfer imports segmenters with one image in and one map out.",
            "model",
        )
    sampling = None
    for t, what in ((ins[0], "input"), (outs[0], "output")):
        axes = t.get("axes") or []
        space = [a for a in axes if a.get("type") == "space"]
        other = [a for a in axes if a.get("type") not in ("space", "batch", "channel")]
        chans = [a for a in axes if a.get("type") == "channel"]
        if len(space) != 2 or other or any(len(a.get("channel_names") or [0]) != 1 for a in chans):
            raise ConfigError(
                f"{src}: the {what} tensor has axes "
                f"{[a.get('id') or a.get('type') for a in axes]}; napari-hrtem-transfer "
                "imports 2-D single-channel images (batch, channel, y, x).",
                "model",
            )
        if what == "input":
            unit, scale = space[-1].get("unit"), space[-1].get("scale", 1.0)
            if unit is not None:
                if unit not in _UNIT_TO_A:
                    raise ConfigError(f"{src}: unknown space unit {unit!r} of the input.")
                sampling = float(scale) * _UNIT_TO_A[unit]
    pre = [p for p in (ins[0].get("preprocessing") or []) if p.get("id") != "ensure_dtype"]
    eps = 1e-6
    ok = len(pre) == 1 and pre[0].get("id") == "zero_mean_unit_variance"
    if ok:
        kw = pre[0].get("kwargs") or {}
        axes = kw.get("axes")
        ok = axes is None or ("batch" not in axes and {"x", "y"} <= {str(a) for a in axes})
        eps = float(kw.get("eps", 1e-6))
    if not ok:
        raise ConfigError(
            f"{src}: input preprocessing {[p.get('id') for p in pre]}; napari-hrtem-transfer "
            "models take each image standardised to zero mean and unit variance "
            "(zero_mean_unit_variance over y, x), and nothing else.",
            "model",
        )
    post = [
        p.get("id")
        for p in (outs[0].get("postprocessing") or [])
        if p.get("id") not in ("ensure_dtype", "binarize")
    ]
    if post != ["sigmoid"]:
        raise ConfigError(
            f"{src}: output postprocessing {post}; napari-hrtem-transfer models output logits "
            "and their packages end with a sigmoid (the particle probability).",
            "model",
        )
    return sampling, eps


def _publish(tmp: Path, final: Path) -> Path:
    """Rename the unpacked folder into place (another process may have won the race)."""
    try:
        os.replace(tmp, final)
    except OSError:
        if not (final / "best.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def import_bioimageio(source: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None):
    """Unpack a bioimage.io package into a checkpoint folder; return the folder.

    The folder is ``<cache>/<sha256 of the package>`` (see :func:`package_cache_dir`) and
    holds ``best.json`` + ``best-<sha>.safetensors`` (+ the OOD reference of our own
    packages); :func:`napari_hrtem_transfer.training.load_checkpoint` loads it.  A package
    already unpacked is not unpacked again.

    Raises
    ------
    CheckpointError
        Not a package, remote or missing files, an architecture that is not ours, an
        architecture source file, a pickle that ``weights_only=True`` refuses, tensors that
        do not fit the architecture, inconsistent attachments.
    ConfigError
        Not one image in / one probability map out, other pre- or postprocessing.
    """
    from .training.checkpoint import load_model_weights, save_checkpoint

    src = Path(source).expanduser()
    pkg = _Package(src)
    try:
        sha = pkg.sha256()
        root = Path(cache_dir).expanduser() if cache_dir is not None else package_cache_dir()
        final = root / sha
        if (final / "best.json").is_file():
            return final
        rdf = pkg.rdf()
        if rdf.get("type") != "model":
            raise CheckpointError(
                f"{src}: the package is a bioimage.io {rdf.get('type')!r}, not a model."
            )
        model_cfg, entry = _architecture(rdf, src)
        sampling, eps = _check_io(rdf, src)
        wname = entry.get("source")
        if isinstance(wname, dict):
            wname = wname.get("source")
        blob = pkg.read(wname, "the pytorch_state_dict weights")
        declared = entry.get("sha256")
        if declared and hashlib.sha256(blob).hexdigest() != str(declared).lower():
            raise CheckpointError(
                f"{src}: the weights {wname} do not match the sha256 the package declares; "
                "the package is damaged or was modified."
            )
        state = _state_dict(blob, str(wname), src)
        ours = (rdf.get("config") or {}).get(CONFIG_KEY)
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".{sha[:16]}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            if isinstance(ours, dict) and ours.get("format") == PACKAGE_FORMAT:
                if str(ours.get("format_version")) != PACKAGE_FORMAT_VERSION:
                    raise CheckpointError(
                        f"{src}: package format version {ours.get('format_version')!r}; this "
                        f"napari-hrtem-transfer reads version {PACKAGE_FORMAT_VERSION}. Upgrade "
                        "the package."
                    )
                _unpack_ours(pkg, rdf, ours, state, model_cfg, tmp, src)
                foreign = False
            else:
                from .models.factory import build_model
                from .training.checkpoint import load_state_into

                model = build_model(model_cfg)
                load_state_into(model, state, src)
                side = {
                    "model": model_cfg,
                    "normalization": {"method": "per_image_standardize", "eps": eps},
                    "sampling_A": sampling,
                    "output": {
                        "kind": "binary_logits",
                        "activation": "sigmoid",
                        "classes": ["background", "particle"],
                    },
                    "extra": {
                        "bioimageio": {
                            "source": str(src),
                            "sha256": sha,
                            "name": rdf.get("name"),
                            "foreign": True,
                        }
                    },
                }
                save_checkpoint(tmp, "best", model, side)
                foreign = True
            load_model_weights(tmp, "best")  # every check of a checkpoint, before publishing
            (tmp / "bioimageio_source.json").write_text(
                json.dumps(
                    {
                        "source": str(src),
                        "sha256": sha,
                        "name": rdf.get("name"),
                        "foreign": foreign,
                        "imported": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                    },
                    indent=1,
                ),
                encoding="utf-8",
            )
            return _publish(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    finally:
        pkg.close()


def _unpack_ours(
    pkg: _Package,
    rdf: dict[str, Any],
    ours: dict[str, Any],
    state: dict[str, Any],
    model_cfg: dict[str, Any],
    tmp: Path,
    src: Path,
) -> None:
    """Write our attachments unchanged into ``tmp`` and check them against the package."""
    from safetensors.torch import load

    from .training.checkpoint import validate_sidecar

    listed = {(a.get("source") if isinstance(a, dict) else a) for a in rdf.get("attachments") or []}
    names = [ours.get("sidecar"), ours.get("weights_file")]
    ref = ours.get("ood_reference")
    if ref:
        names += [ref.get("json"), ref.get("arrays")]
    for n in names:
        if n not in listed:
            raise CheckpointError(
                f"{src}: config.{CONFIG_KEY} names {n!r}, which is not among the package's "
                "attachments; the package is damaged."
            )
    blobs = {n: pkg.read(n, "attachment") for n in names}
    try:
        side = json.loads(blobs[names[0]])
    except ValueError as exc:
        raise CheckpointError(f"{src}: attachment {names[0]} is not valid JSON: {exc}") from exc
    validate_sidecar(side, f"{src}:{names[0]}", "best")
    if side.get("weights_file") != names[1] or side.get("weights_sha256") != ours.get(
        "weights_sha256"
    ):
        raise CheckpointError(f"{src}: the attached sidecar names other weights; damaged.")
    if hashlib.sha256(blobs[names[1]]).hexdigest() != side["weights_sha256"]:
        raise CheckpointError(f"{src}: the attached weights do not match their sha256.")
    from .models.config import parse_model_config

    if parse_model_config(side["model"]).model_dump(mode="json") != model_cfg:
        raise CheckpointError(
            f"{src}: the package's architecture differs from the attached sidecar's."
        )
    attached = load(blobs[names[1]])
    same = set(attached) == set(state) and all(
        attached[k].dtype == state[k].dtype
        and attached[k].shape == state[k].shape
        and bool((attached[k] == state[k]).all())
        for k in attached
    )
    if not same:
        raise CheckpointError(
            f"{src}: the package's pytorch_state_dict weights differ from its attached "
            "napari-hrtem-transfer weights, so bioimage.io tools and this package would "
            "give different results; the package was modified after export."
        )
    for n in names:
        (tmp / n).write_bytes(blobs[n])
