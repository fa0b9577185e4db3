"""Turn a bioimage.io package into a checkpoint folder, refusing what could run code."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import uuid
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import CheckpointError, ConfigError
from ..io.provenance import sha256_file, utc_now
from ._common import (
    CONFIG_KEY,
    MAX_MEMBER_BYTES,
    OUR_CALLABLES,
    PACKAGE_FORMAT,
    PACKAGE_FORMAT_VERSION,
    RDF_NAMES,
    UNIT_TO_A,
    package_cache_dir,
)


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
            return sha256_file(self.source)
        h = hashlib.sha256()
        for name in sorted(p.name for p in self.root.iterdir() if p.is_file()):
            h.update(name.encode() + b"\0" + bytes.fromhex(sha256_file(self.root / name)))
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
            if info.file_size > MAX_MEMBER_BYTES:
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
    from ..models.config import parse_model_config

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
    kind = OUR_CALLABLES.get((where, fn))
    if kind is None:
        raise CheckpointError(
            f"{src}: architecture '{where}.{fn}' is not one of napari-hrtem-transfer's "
            f"({', '.join(sorted({f'{m}.{c}' for m, c in OUR_CALLABLES}))}); this package "
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
                if unit not in UNIT_TO_A:
                    raise ConfigError(f"{src}: unknown space unit {unit!r} of the input.")
                sampling = float(scale) * UNIT_TO_A[unit]
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
        state = _declared_weights(pkg, entry, src)
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".{sha[:16]}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            foreign = _write_checkpoint(pkg, rdf, state, model_cfg, (sampling, eps), tmp, sha)
            _write_source(tmp, src, sha, rdf.get("name"), foreign)
            return _publish(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    finally:
        pkg.close()


def _declared_weights(pkg: _Package, entry: dict[str, Any], src: Path) -> dict[str, Any]:
    """The state dict of the ``pytorch_state_dict`` entry, checked against its sha256."""
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
    return _state_dict(blob, str(wname), src)


def _write_checkpoint(
    pkg: _Package,
    rdf: dict[str, Any],
    state: dict[str, Any],
    model_cfg: dict[str, Any],
    sampling_eps: tuple[float | None, float],
    tmp: Path,
    sha: str,
) -> bool:
    """Write the checkpoint folder into ``tmp`` and check it; return True for a foreign one.

    Our own packages are unpacked unchanged; a foreign state dict is loaded into our
    architecture and saved as safetensors + a sidecar built from the package's description.
    """
    from ..training.checkpoint import load_model_weights, save_checkpoint

    src = pkg.source
    ours = (rdf.get("config") or {}).get(CONFIG_KEY)
    foreign = not (isinstance(ours, dict) and ours.get("format") == PACKAGE_FORMAT)
    if not foreign:
        if str(ours.get("format_version")) != PACKAGE_FORMAT_VERSION:
            raise CheckpointError(
                f"{src}: package format version {ours.get('format_version')!r}; this "
                f"napari-hrtem-transfer reads version {PACKAGE_FORMAT_VERSION}. Upgrade "
                "the package."
            )
        _unpack_ours(pkg, rdf, ours, state, model_cfg, tmp, src)
    else:
        from ..models.factory import build_model
        from ..training.checkpoint import load_state_into

        model = build_model(model_cfg)
        load_state_into(model, state, src)
        sampling, eps = sampling_eps
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
    load_model_weights(tmp, "best")  # every check of a checkpoint, before publishing
    return foreign


def _write_source(tmp: Path, src: Path, sha: str, name: Any, foreign: bool) -> None:
    """``bioimageio_source.json``: which package the folder came from, and when."""
    record = {
        "source": str(src),
        "sha256": sha,
        "name": name,
        "foreign": foreign,
        "imported": utc_now(),
    }
    (tmp / "bioimageio_source.json").write_text(json.dumps(record, indent=1), encoding="utf-8")


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

    from ..training.checkpoint import validate_sidecar

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
    from ..models.config import parse_model_config

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
