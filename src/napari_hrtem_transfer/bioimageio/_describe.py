"""What a package says about its model: the imaging domain, the README and the rdf.yaml."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ._common import (
    ARCHITECTURE_CALLABLE,
    ARCHITECTURE_IMPORT,
    CONFIG_KEY,
    STUDY_CITATION,
    STUDY_URL,
    BioimageioExportConfig,
    format_version,
    torch_version,
)


def _simulation_config(data: dict[str, Any]) -> dict[str, Any] | None:
    """The simulation config of the training dataset, if its file is still there and is the
    same dataset (fingerprint recorded in the sidecar); None otherwise."""
    path, fp = data.get("path"), data.get("fingerprint")
    if not path or not fp or not Path(path).is_file():
        return None
    try:
        from ..io.dataset import load_dataset
        from ..training.data import dataset_fingerprint

        ds = load_dataset(path, lazy=True)
        if dataset_fingerprint(ds) != fp:
            return None
        cfg = ds.info.get("config")
    except Exception:  # noqa: BLE001 - a missing or unreadable file only loses metadata
        return None
    return cfg if isinstance(cfg, dict) else None


def imaging_domain(side: dict[str, Any]) -> dict[str, Any]:
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


def model_card(is_pretrained: bool) -> str | None:
    """The shipped model's card (``docs/pretrained_model.md`` of a source checkout) when this
    installation has it; None for other models or an installed wheel without the docs."""
    if not is_pretrained:
        return None
    card = Path(__file__).resolve().parents[3] / "docs" / "pretrained_model.md"
    return card.read_text(encoding="utf-8") if card.is_file() else None


def _fmt(value: float | None, unit: str) -> str:
    return "not recorded" if value is None else f"{value:g} {unit}"


def documentation(
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


def rdf_description(
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
    """The package's ``rdf.yaml`` (model description, spec 0.5) as a mapping."""

    def space(axis: str, size: Any) -> dict[str, Any]:
        ax: dict[str, Any] = {"type": "space", "id": axis, "size": size}
        if sampling_A:
            ax.update(scale=float(sampling_A), unit="angstrom")
        return ax

    eps = float((side.get("normalization") or {}).get("eps", 1e-6))
    arch = "ResNet-18 U-Net" if side["model"].get("architecture") == "resnet18" else "U-Net"
    return {
        "format_version": format_version(),
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
        "inputs": [_input_tensor(space, stride, eps)],
        "outputs": [_output_tensor(space)],
        "weights": _weights(side["model"], cfg.torchscript),
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


def _image_tensor(
    tensor_id: str, description: str, channel: str, yx: list[dict[str, Any]], stem: str
) -> dict[str, Any]:
    """A (batch, channel, y, x) tensor with its test (``.npy``) and sample (``.tif``) files."""
    return {
        "id": tensor_id,
        "description": description,
        "axes": [{"type": "batch"}, {"type": "channel", "channel_names": [channel]}, *yx],
        "test_tensor": {"source": f"test_{stem}.npy"},
        "sample_tensor": {"source": f"sample_{stem}.tif"},
    }


def _input_tensor(space: Any, stride: int, eps: float) -> dict[str, Any]:
    """The raw-frame input: y and x multiples of ``stride``, standardised per image."""
    size = {"min": stride, "step": stride}
    tensor = _image_tensor(
        "raw",
        "HRTEM frame, raw counts or any linear intensity",
        "intensity",
        [space("y", size), space("x", size)],
        "input",
    )
    tensor["data"] = {"type": "float32"}
    tensor["preprocessing"] = [
        {"id": "zero_mean_unit_variance", "kwargs": {"axes": ["channel", "y", "x"], "eps": eps}}
    ]
    return tensor


def _output_tensor(space: Any) -> dict[str, Any]:
    """The probability output, the input's size (sigmoid of the model's logits)."""
    tensor = _image_tensor(
        "probability",
        "particle probability (sigmoid of the logits)",
        "particle",
        [space(a, {"tensor_id": "raw", "axis_id": a}) for a in ("y", "x")],
        "output",
    )
    tensor["data"] = {"type": "float32", "range": [0.0, 1.0]}
    tensor["postprocessing"] = [{"id": "sigmoid"}]
    return tensor


def _weights(model_config: dict[str, Any], torchscript: bool) -> dict[str, Any]:
    """The state dict entry (our architecture by name), and optionally the TorchScript one."""
    weights: dict[str, Any] = {
        "pytorch_state_dict": {
            "source": "weights.pt",
            "architecture": {
                "callable": ARCHITECTURE_CALLABLE,
                "import_from": ARCHITECTURE_IMPORT,
                "kwargs": {"config": dict(model_config)},
            },
            "pytorch_version": torch_version(),
            "comment": "state dict of napari-hrtem-transfer's architecture; the same "
            "tensors as the attached safetensors file",
        }
    }
    if torchscript:
        weights["torchscript"] = {
            "source": "weights_torchscript.pt",
            "parent": "pytorch_state_dict",
            "pytorch_version": torch_version(),
            "comment": "torch.jit.trace of the pytorch_state_dict model (eval "
            "mode); never loaded by napari-hrtem-transfer itself",
        }
    return weights
