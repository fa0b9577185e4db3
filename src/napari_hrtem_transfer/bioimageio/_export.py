"""Write a checkpoint as a bioimage.io package (zip) and run bioimage.io's own test on it."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError, ConfigError
from ..io.provenance import package_version, sha256_file, utc_now
from ._common import (
    PACKAGE_FORMAT,
    PACKAGE_FORMAT_VERSION,
    STUDY_URL,
    BioimageioExportConfig,
    ExportResult,
    Progress,
    is_bioimageio_package,
    need_spec,
)
from ._describe import documentation, imaging_domain, model_card, rdf_description


def _model_folder(model: Any) -> Path:
    from ..segmentation import PRETRAINED, pretrained_model_dir

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


def _sample_frame(
    sampling_A: float | None, train_defocus: list[float]
) -> tuple[np.ndarray, np.ndarray, str]:
    """A simulated frame (raw counts) and its mask from the shipped sample series, resampled
    to the model's pixel size when that differs by more than 5 %."""
    from importlib import resources

    from ..io.dataset import load_dataset

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


def _require_expressible_preprocessing(side: dict[str, Any], folder: Path) -> None:
    """Refuse a model whose input pipeline bioimage.io preprocessing cannot express.

    A package declares its preprocessing as bioimage.io steps, which are pointwise maps or
    whole-tensor statistics (``zero_mean_unit_variance``, ``scale_range``, ``scale_linear``,
    ``clip``, ...); none is a spatial filter. The flat-field correction
    (``flat_field_standardize``: divide by a Gaussian-blurred copy of the frame, then
    standardise) therefore has no faithful declaration, and the architecture comes from the
    installed library (no source file in the package) with optional *traced* TorchScript
    weights, whose shapes and branches are frozen at the trace; so folding the correction into
    the network is not exact either. Such a package would feed the network standardised frames
    only and disagree with the model's own segmentation: a ConfigError instead.
    """
    record = side.get("normalization") or {}
    method = record.get("method", "per_image_standardize")
    if method == "per_image_standardize":
        return
    if method == "flat_field_standardize":
        sigma = float(record["flat_field_sigma_A"])
        px = float(record["sampling_A"])
        raise ConfigError(
            f"the model {folder} flat-field corrects its input (each frame is divided by a "
            f"copy blurred with a Gaussian of sigma {sigma:g} Å, {sigma / px:.4g} px at "
            f"{px:g} Å/px, then standardised), which bioimage.io preprocessing cannot express "
            "(its steps are pointwise or whole-image statistics such as "
            "zero_mean_unit_variance and scale_range; no spatial filter): the package would "
            "feed the network standardised frames only and give other probabilities than "
            "this model. Export a model trained with standardisation only (PreprocessConfig "
            "without flat_field_sigma_A), or share the checkpoint folder itself "
            "(hrtem-transfer segment --model FOLDER).",
            "model",
        )
    raise ConfigError(
        f"the model {folder} uses the input normalisation {method!r}, which this version "
        "cannot declare in a bioimage.io package; export a model trained with "
        "standardisation only.",
        "model",
    )


def _reference_probability(lm: Any, frame: np.ndarray) -> np.ndarray:
    """What the bioimage.io pipeline computes: standardise, the plain model in fp32, sigmoid
    (``lm.standardize`` is exactly that once :func:`_require_expressible_preprocessing`
    passed)."""
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
        # tracing warns that the input-shape check becomes a constant (TracerWarning) and
        # that torch.jit.trace is deprecated; the traced program is checked by the package
        # test, and bioimage.io's torchscript weights are made with it
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # (Python 3.14+: "... is not supported")
        warnings.filterwarnings("ignore", r"`torch\.jit\.trace.*` is (deprecated|not supported)")
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


def _export_config(
    config: BioimageioExportConfig | None, options: dict[str, Any]
) -> BioimageioExportConfig:
    """``config`` (default: the defaults) with ``options`` applied; a ConfigError if invalid."""
    from pydantic import ValidationError

    from ..errors import config_error_from_validation

    base = config if config is not None else BioimageioExportConfig()
    try:
        return BioimageioExportConfig(**{**base.model_dump(), **options}) if options else base
    except ValidationError as exc:
        raise config_error_from_validation(exc) from None


def _check_out(out: str | os.PathLike, overwrite: bool) -> Path:
    from ..io.atomic import check_writable

    out = Path(out).expanduser()
    if out.suffix.lower() != ".zip":
        raise ConfigError(f"--out {out}: a bioimage.io package is a .zip file.", "out")
    check_writable(out)
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} exists; use --overwrite to replace it.", "overwrite")
    return out


def _test_frame(
    test_image: np.ndarray | None,
    test_mask: np.ndarray | None,
    lm: Any,
    train_defocus_nm: list[float],
) -> tuple[np.ndarray, np.ndarray, str]:
    """The frame (raw counts) and mask for the test tensors and cover, cut to the model's
    stride, and what they are."""
    if test_image is None:
        frame, mask, what = _sample_frame(lm.sampling_A, train_defocus_nm)
        what = f"a simulated frame ({what})"
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
        what = "a frame supplied at export"
    stride = int(lm.output_stride)
    return _crop_to_stride(frame, stride), _crop_to_stride(mask, stride), what


def _name_and_description(
    cfg: BioimageioExportConfig,
    side: dict[str, Any],
    sampling_A: float | None,
    domain: dict[str, Any],
    is_pretrained: bool,
) -> tuple[str, str]:
    """The package's name and one-paragraph description (the config's, else generated)."""
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
        + (f" at {sampling_A:g} Å/px" if sampling_A else "")
        + f" ({kind}, {how}"
        + (f" on defocus {rng[0]:g} to {rng[1]:g} nm" if rng else "")
        + "). Input: a raw frame; output: the particle probability."
    )
    return name, description


def _copy_checkpoint(
    tmp: Path, folder: Path, side: dict[str, Any], side_path: Path, which: str, ood: list[Path]
) -> list[str]:
    """Copy our own files into ``tmp`` unchanged (the sidecar of 'last' without its optimizer
    state); return the attachment names. A CheckpointError if they changed meanwhile."""
    if which == "best":
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
        or sha256_file(tmp / side["weights_file"]) != side["weights_sha256"]
    ):
        raise CheckpointError(
            f"the checkpoint in {folder} changed while it was being exported (a training "
            "run still writing to it?); export it again when it is finished."
        )
    for f in ood:
        shutil.copyfile(f, tmp / f.name)
    return ["best.json", side["weights_file"], *[f.name for f in ood]]


def _our_section(
    side: dict[str, Any],
    ood: list[Path],
    caution: float | None,
    sampling_A: float | None,
    threshold: float,
    domain: dict[str, Any],
) -> dict[str, Any]:
    """``config.napari_hrtem_transfer`` of the package: how to read our attachments."""
    return {
        "format": PACKAGE_FORMAT,
        "format_version": PACKAGE_FORMAT_VERSION,
        "package_version": package_version(),
        "sidecar": "best.json",
        "weights_file": side["weights_file"],
        "weights_sha256": side["weights_sha256"],
        "ood_reference": (
            {"json": ood[0].name, "arrays": ood[1].name, "caution_level": caution} if ood else None
        ),
        "sampling_A": sampling_A,
        "normalization": side.get("normalization"),
        "output": side.get("output"),
        "threshold": threshold,
        "imaging_domain": domain,
        "exported": utc_now(),
    }


def _write_tensors(
    tmp: Path, lm: Any, torchscript: bool, frame: np.ndarray, proba: np.ndarray
) -> None:
    """The weights (state dict, optionally TorchScript) and the test and sample tensors."""
    import tifffile
    import torch

    from ..training.checkpoint import state_tensors

    torch.save(state_tensors(lm.model), tmp / "weights.pt")
    if torchscript:
        _write_torchscript(lm.model, frame, tmp / "weights_torchscript.pt")
    np.save(tmp / "test_input.npy", frame[None, None].astype(np.float32))
    np.save(tmp / "test_output.npy", proba)
    tifffile.imwrite(tmp / "sample_input.tif", frame.astype(np.float32))
    tifffile.imwrite(tmp / "sample_output.tif", proba[0, 0])


def _write_rdf(spec: Any, rdf: dict[str, Any], path: Path) -> Any:
    """Write ``rdf.yaml`` and return bioimageio.spec's validated description of it."""
    import yaml

    path.write_text(yaml.safe_dump(rdf, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return _load_description(spec, path)


def _require_test_passes(out: Path) -> None:
    ok, detail = test_package(out)
    if not ok:
        raise CheckpointError(
            f"the written package {out} does not pass 'bioimageio test': {detail}"
        )


def _save_zip(spec: Any, descr: Any, out: Path) -> None:
    """bioimageio.spec's packaging into a temporary name, renamed over ``out``."""
    part = out.with_name(f".{out.stem}.tmp-{uuid.uuid4().hex[:8]}.zip")
    try:
        spec.save_bioimageio_package(descr, output_path=part)
        os.replace(part, out)
    finally:
        with contextlib.suppress(OSError):
            part.unlink()


def _loaded(model: Any, which: str) -> tuple[Path, Any, Path, dict]:
    """Folder, loaded checkpoint, sidecar path and sidecar of ``model``; refused early (a
    :class:`ConfigError`) when its preprocessing has no bioimage.io equivalent."""
    from ..training.checkpoint import load_checkpoint

    folder = _model_folder(model)
    lm = load_checkpoint(folder, which, device="cpu")
    side = {k: v for k, v in lm.info.items() if k != "_path"}
    _require_expressible_preprocessing(side, folder)
    return folder, lm, Path(lm.info["_path"]), side


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
        ``overwrite``), bad options, or the model flat-field corrects its input (its
        ``flat_field_standardize`` record has no bioimage.io preprocessing equivalent;
        nothing is written).
    CheckpointError
        The model cannot be loaded, or the written package does not pass
        ``bioimageio.core.test_model`` (with ``test=True``).
    """
    cfg = _export_config(config, options)
    step = (lambda i, msg: progress(i, 5, msg)) if progress else (lambda i, msg: None)
    spec = need_spec()
    from ..segmentation import PRETRAINED, SegmentConfig

    out = _check_out(out, cfg.overwrite)
    is_pretrained = str(model) == PRETRAINED
    folder, lm, side_path, side = _loaded(model, cfg.which)
    sampling = lm.sampling_A
    ood, caution, why = _ood_files(folder, side["weights_sha256"])
    notes = [f"no OOD reference in the package: {why}"] if why else []
    domain = imaging_domain(side)
    step(1, "test frame and cover")
    stride = int(lm.output_stride)
    frame, mask, test_what = _test_frame(test_image, test_mask, lm, domain["train_defocus_nm"])
    proba = _reference_probability(lm, frame)
    threshold = float(SegmentConfig().threshold)
    name, description = _name_and_description(cfg, side, sampling, domain, is_pretrained)
    with tempfile.TemporaryDirectory(prefix="hrtem-bioimageio-") as tmpdir:
        tmp = Path(tmpdir)
        _write_tensors(tmp, lm, cfg.torchscript, frame, proba)
        _cover(tmp / "cover.png", frame, mask, proba[0, 0], test_what, threshold)
        readme = documentation(
            side, model_card(is_pretrained), domain, caution, name, test_what, threshold
        )
        (tmp / "README.md").write_text(readme, encoding="utf-8")
        attachments = _copy_checkpoint(tmp, folder, side, side_path, cfg.which, ood)
        rdf = rdf_description(
            name=name,
            description=description,
            cfg=cfg,
            side=side,
            stride=stride,
            n_params=sum(int(p.numel()) for p in lm.model.parameters()),
            attachments=attachments,
            ours=_our_section(side, ood, caution, sampling, threshold, domain),
            sampling_A=sampling,
        )
        step(2, "validating the description")
        descr = _write_rdf(spec, rdf, tmp / "rdf.yaml")
        step(3, "writing the package")
        _save_zip(spec, descr, out)
    if cfg.test:
        step(4, "bioimageio test")
        _require_test_passes(out)
    step(5, "done")
    return ExportResult(
        path=out,
        sha256=sha256_file(out),
        name=name,
        n_bytes=out.stat().st_size,
        ood_reference=bool(ood),
        caution_level=caution,
        test_passed=True if cfg.test else None,
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
    need_spec()
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
