"""``hrtem-transfer segment``: a thin caller of :func:`napari_hrtem_transfer.segmentation.segment`.

Reads an image file (anything HyperSpy/RosettaSciIO reads, ``.npy``, ``.tif``), segments every
image signal in it, and writes per signal: the mask (``.hspy`` keeps every axis of the input,
its metadata and the provenance; ``.tif``/``.npy`` keep the array), optionally the
probabilities, and ``<mask>.ood.json`` with each frame's navigation coordinates and label-free
OOD score.  Options and their defaults come from
:class:`~napari_hrtem_transfer.segmentation.SegmentConfig`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from ..errors import ConfigError

PROG = "hrtem-transfer segment"

#: SegmentConfig field -> command-line flag (the one table; help and defaults from the config).
FLAGS: dict[str, str] = {
    "threshold": "--threshold",
    "which": "--which",
    "device": "--device",
    "resample_tolerance": "--sampling-tolerance",
    "max_zoom": "--max-zoom",
    "tile_size": "--tile-size",
    "batch_size": "--batch-size",
    "precision": "--precision",
}
#: Boolean fields that default to True: a ``--no-...`` flag turns them off.
NEGATIVE_FLAGS: dict[str, str] = {"resample": "--no-resample", "ood": "--no-ood"}


def _field_help(name: str) -> str:
    from ..segmentation import SegmentConfig

    return (SegmentConfig.model_fields[name].description or name).replace("%", "%%")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Declare the options (choices and defaults from SegmentConfig)."""
    import typing

    from ..segmentation import SegmentConfig

    p.add_argument(
        "input",
        metavar="INPUT",
        nargs="+",
        help="image file (dm3, dm4, emd, ser/emi, mrc, tif, hspy, npy, png), or a session: a "
        "folder or several files, stacked into one series (defocus [nm] from the vendor "
        "metadata where recorded, else acquisition time or order)",
    )
    p.add_argument(
        "--defocus",
        nargs="+",
        type=float,
        metavar="NM",
        default=None,
        help="defocus of each file of a session [nm] (abTEM sign: positive = underfocus)",
    )
    p.add_argument(
        "--session-resample",
        action="store_true",
        help="resample session frames of other pixel sizes to the most common one",
    )
    p.add_argument(
        "--model",
        default="pretrained",
        metavar="MODEL",
        help="'pretrained' (the model shipped with the package) or a checkpoint folder",
    )
    p.add_argument(
        "--out", required=True, metavar="OUTPUT", help="mask file: .hspy, .tif/.tiff or .npy"
    )
    p.add_argument(
        "--proba", action="store_true", help="also write the probability map as OUTPUT_proba.<ext>"
    )
    p.add_argument(
        "--sampling",
        type=float,
        default=None,
        metavar="A_PER_PX",
        help="pixel size of the input [Å/px], overriding the file's calibration",
    )
    fields = SegmentConfig.model_fields
    for name, flag in FLAGS.items():
        f = fields[name]
        kw: dict[str, Any] = {"default": f.default, "help": _field_help(name), "dest": name}
        choices = typing.get_args(f.annotation)
        if typing.get_origin(f.annotation) is typing.Literal:
            kw["choices"] = choices
        elif f.annotation in (int, float):
            kw["type"] = f.annotation
        p.add_argument(flag, **kw)
    for name, flag in NEGATIVE_FLAGS.items():
        p.add_argument(flag, action="store_false", dest=name, help=f"turn off: {_field_help(name)}")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")


def _config(args: argparse.Namespace) -> Any:
    from pydantic import ValidationError

    from ..segmentation import SegmentConfig

    values = {name: getattr(args, name) for name in (*FLAGS, *NEGATIVE_FLAGS)}
    try:
        return SegmentConfig(**values)
    except ValidationError as exc:
        from ..errors import config_error_from_validation

        names = {**FLAGS, **NEGATIVE_FLAGS}
        raise config_error_from_validation(exc, names, first_only=True) from None


def _read(inputs: list[str], args: argparse.Namespace) -> list[Any]:
    """Every image signal of INPUT (or the session) as Frames; warnings to stderr."""
    from ..errors import ReaderError
    from ..io.readers import read_images
    from ..io.sessions import read_session
    from .messages import captured_warnings, print_warnings

    paths = [Path(p).expanduser() for p in inputs]
    session = len(paths) > 1 or paths[0].is_dir()
    if args.defocus is not None and not session:
        raise ConfigError("--defocus is for sessions (a folder or several files).", "--defocus")
    with captured_warnings() as caught:
        if session:
            src = paths if len(paths) > 1 else paths[0]
            try:
                images = [read_session(src, args.defocus, args.session_resample)]
            except ReaderError as exc:
                # the library's advice names the Python argument; give the flag
                text = str(exc).replace(
                    "resample=True (command line: --session-resample)", "--session-resample"
                )
                raise ReaderError(text) from None
        else:
            images = read_images(paths[0])
    print_warnings(caught, PROG)
    return images


def _outputs(out: Path, n: int, proba: bool, ood: bool) -> list[dict[str, Path | None]]:
    res = []
    for k in range(n):
        base = out if n == 1 else out.with_name(f"{out.stem}_{k}{out.suffix}")
        res.append(
            {
                "mask": base,
                "proba": base.with_name(f"{base.stem}_proba{base.suffix}") if proba else None,
                "ood": base.with_name(f"{base.stem}.ood.json") if ood else None,
            }
        )
    return res


def _ood_doc(res: Any, source: str, image: Any) -> dict[str, Any]:
    """The ``.ood.json`` document: every frame_table row, the caution level, all notes."""
    input_notes = list(getattr(image, "notes", None) or [])
    doc = {
        "input": source,
        "model": res.provenance.get("model"),
        "weights_sha256": res.provenance.get("weights_sha256"),
        "meaning": "label-free OOD score per frame: about 0 for training-like frames, growing "
        "as the model gets less sure of the particle edges (or finds none) and as the input "
        "looks less like its training images; above 'caution_level': treat with caution",
        "caution_level": getattr(res, "ood_caution", None),
        "frames": res.frame_table(),
        "notes": input_notes + [n for n in res.notes if n not in input_notes],
        "input_notes": input_notes,
        "sampling_A": res.sampling_A,
        "sampling_source": _sampling_source(res, image),
        "provenance": res.provenance,
    }
    domain = getattr(res, "imaging_domain", None)
    if domain is not None:
        doc["imaging_domain"] = domain
    if getattr(image, "sources", None):
        doc["frame_files"] = list(image.sources)
    return doc


def _sampling_source(res: Any, image: Any) -> str:
    """Where the pixel size used came from: the file (and which part), --sampling, or none."""
    own = getattr(image, "sampling_A", None)
    if res.sampling_A is None:
        return "none: the model's pixel size was assumed"
    if own is None or not math.isclose(res.sampling_A, own, rel_tol=1e-9):
        return "user (--sampling)"
    return str(getattr(image, "sampling_source", "") or "file")


def _json_default(value: Any) -> Any:
    import dataclasses

    import numpy as np

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def _coordinates(row: dict[str, Any]) -> str:
    """A frame's navigation coordinates from its frame_table row: 'defocus_nm -5, image 0'."""
    keys = list(row)
    out = []
    for k, key in enumerate(keys):
        if key.endswith("_index") and k + 1 < len(keys):
            coord = keys[k + 1]
            value = row[coord]
            shown = f"{value:g}" if isinstance(value, int | float) else str(value)
            out.append(f"{coord} {shown}")
    return ", ".join(out)


def run(args: argparse.Namespace) -> int:
    """Segment INPUT; see the module docstring."""
    from ..io.atomic import AtomicGroup, check_writable, deferred_interrupt
    from ..io.writers import RESULT_SUFFIXES, write_result
    from ..segmentation import segment
    from .messages import captured_warnings, print_warnings

    cfg = _config(args)
    out = Path(args.out).expanduser()
    if out.suffix.lower() not in RESULT_SUFFIXES:
        raise ConfigError(f"--out {out}: choose a name ending in .hspy, .tif or .npy.", "--out")
    check_writable(out)
    if args.sampling is not None and not args.sampling > 0:
        raise ConfigError(f"--sampling must be a positive pixel size [Å] (got {args.sampling}).")
    images = _read(args.input, args)
    source = args.input[0] if len(args.input) == 1 else ", ".join(args.input)
    targets = _outputs(out, len(images), args.proba, cfg.ood)
    for t in targets:  # refuse before anything is computed or written
        for p in t.values():
            if p is not None and p.exists() and not args.overwrite:
                raise ConfigError(f"{p} exists; use --overwrite to replace it.", "--overwrite")
    results = []
    for image in images:
        with captured_warnings() as caught:
            res = segment(image, args.model, sampling_A=args.sampling, config=cfg)
        printed = print_warnings(caught, PROG)
        for note in res.notes:
            if note not in printed:
                print(f"{PROG}: note: {note}", file=sys.stderr)
        results.append(res)
    # every output is written under a temporary name and renamed at the end, all together;
    # Ctrl-C while writing leaves none of them (exit 130)
    with deferred_interrupt() as check, AtomicGroup() as group:
        for image, res, t in zip(images, results, targets, strict=True):
            name = image.name or Path(args.input[0]).stem
            common = {
                "axes": res.axes,
                "sampling_A": res.sampling_A,
                "source": image,
                "provenance": res.provenance,
            }
            for key, data, what in (
                ("mask", res.labels, "Particle mask"),
                ("proba", res.proba, "Particle probability"),
            ):
                if t[key] is None:
                    continue
                write_result(
                    t[key],
                    data,
                    title=f"{what} of {name}",
                    quantity=what,
                    to=group.path(t[key]),
                    **common,
                )
                check()
            if t["ood"] is not None:
                text = json.dumps(_ood_doc(res, source, image), indent=1, default=_json_default)
                group.path(t["ood"]).write_text(text)
                check()
    for res, t in zip(results, targets, strict=True):
        _report(res, t)
    return 0


def _report(res: Any, t: dict[str, Path | None]) -> None:
    n_frames = max(1, int(res.labels.size // (res.labels.shape[-1] * res.labels.shape[-2])))
    print(
        f"wrote {t['mask']} (shape {res.labels.shape}, {n_frames} frame(s), "
        f"{100 * res.labels.mean():.1f}% particle)"
    )
    if t["proba"] is not None:
        print(f"wrote {t['proba']}")
    if res.ood_score is not None:
        rows = res.frame_table()
        for row in rows[:20]:
            where = _coordinates(row)
            caution = row.get("caution")
            flag = "  <- treat with caution (unlike the training data)" if caution else ""
            reasons = row.get("reasons") or []
            if reasons:
                flag += ": " + "; ".join(reasons)
            print(
                f"  frame {row['frame']}{f' ({where})' if where else ''}: "
                f"OOD score {row['ood_score']:.2f}{flag}"
            )
        if len(rows) > 20:
            flagged = sum(bool(r.get("caution")) for r in rows)
            print(
                f"  ... {len(rows) - 20} more frames; max OOD score "
                f"{max(r['ood_score'] for r in rows):.2f}; {flagged} of {len(rows)} frames "
                "flagged in all (every row, with its reasons, is in the .ood.json)"
            )
        if res.ood_caution is not None:
            print(f"  (caution level of this model: {res.ood_caution:.2f})")
    if t["ood"] is not None:
        print(f"wrote {t['ood']}")
