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
import sys
import warnings
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
        err = exc.errors()[0]
        name = str(err["loc"][0]) if err.get("loc") else ""
        flag = FLAGS.get(name) or NEGATIVE_FLAGS.get(name) or name
        raise ConfigError(f"{flag}: {err['msg']} (got {err.get('input')!r})", flag) from None


def _read(inputs: list[str], args: argparse.Namespace) -> list[Any]:
    """Every image signal of INPUT (or the session) as ExperimentalImage; warnings to stderr."""
    from ..io.readers import read_images
    from ..io.sessions import read_session

    paths = [Path(p).expanduser() for p in inputs]
    session = len(paths) > 1 or paths[0].is_dir()
    if args.defocus is not None and not session:
        raise ConfigError("--defocus is for sessions (a folder or several files).", "--defocus")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if session:
            src = paths if len(paths) > 1 else paths[0]
            images = [read_session(src, args.defocus, args.session_resample)]
        else:
            images = read_images(paths[0])
    for w in caught:
        print(f"{PROG}: warning: {w.message}", file=sys.stderr)
    return images


def _outputs(out: Path, n: int, proba: bool) -> list[dict[str, Path | None]]:
    res = []
    for k in range(n):
        base = out if n == 1 else out.with_name(f"{out.stem}_{k}{out.suffix}")
        res.append(
            {
                "mask": base,
                "proba": base.with_name(f"{base.stem}_proba{base.suffix}") if proba else None,
                "ood": base.with_name(f"{base.stem}.ood.json"),
            }
        )
    return res


def _clean_axes(axes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    keep = ("name", "size", "scale", "offset", "units", "navigate", "axis")
    return [{k: v for k, v in a.items() if k in keep and v is not None} for a in axes]


def _write_array(path: Path, arr: Any, res: Any, title: str, image: Any) -> None:
    """Write atomically; ``.hspy`` keeps every axis, the metadata and the provenance."""
    import numpy as np

    from ..io._atomic import atomic_path

    suffix = path.suffix.lower()
    with atomic_path(path) as tmp:
        if suffix == ".npy":
            np.save(tmp, arr)
        elif suffix in (".tif", ".tiff"):
            import tifffile

            kw: dict[str, Any] = {}
            if res.sampling_A:
                nm = res.sampling_A / 10.0
                kw = {
                    "resolution": (1.0 / nm, 1.0 / nm),
                    "imagej": True,
                    "metadata": {"unit": "nm"},
                }
            flat = arr.reshape(-1, *arr.shape[-2:]) if arr.ndim > 3 else arr
            tifffile.imwrite(tmp, flat, **kw)
        else:
            import hyperspy.api as hs

            axes = _clean_axes(res.axes)
            for a in axes:
                a.setdefault("navigate", False)
            for a in axes[: arr.ndim - 2]:
                a["navigate"] = True
            s = hs.signals.Signal2D(arr, axes=axes)
            s.metadata.General.title = title
            s.metadata.set_item("Signal.quantity", title.split(" of ")[0])
            energy = (image.metadata or {}).get("energy_eV")
            if energy:
                s.metadata.set_item("Acquisition_instrument.TEM.beam_energy", energy / 1e3)
            s.metadata.set_item("HRTEM_transfer.provenance_json", json.dumps(res.provenance))
            s.metadata.set_item("HRTEM_transfer.source", str(image.path or image.name))
            s.save(tmp, overwrite=True)


def _write_ood(path: Path, res: Any, source: str, args: argparse.Namespace) -> None:
    from ..io._atomic import atomic_path

    doc = {
        "input": source,
        "model": res.provenance.get("model"),
        "weights_sha256": res.provenance.get("weights_sha256"),
        "meaning": "label-free OOD score per frame: about 0 for training-like frames, growing "
        "as the model gets less sure of the particle edges (or finds none) and as the input "
        "looks less like its training images; above 'caution_level': treat with caution",
        "caution_level": res.ood_caution,
        "frames": res.frame_table(),
        "notes": res.notes,
        "provenance": res.provenance,
    }
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(doc, indent=1, default=float))


def run(args: argparse.Namespace) -> int:
    """Segment INPUT; see the module docstring."""
    from ..io._atomic import check_writable
    from ..segmentation import SegmentationWarning, segment

    cfg = _config(args)
    out = Path(args.out).expanduser()
    if out.suffix.lower() not in (".hspy", ".tif", ".tiff", ".npy"):
        raise ConfigError(f"--out {out}: choose a name ending in .hspy, .tif or .npy.", "--out")
    check_writable(out)
    if args.sampling is not None and not args.sampling > 0:
        raise ConfigError(f"--sampling must be a positive pixel size [Å] (got {args.sampling}).")
    images = _read(args.input, args)
    source = args.input[0] if len(args.input) == 1 else ", ".join(args.input)
    targets = _outputs(out, len(images), args.proba)
    for t in targets:  # refuse before anything is computed or written
        for p in t.values():
            if p is not None and p.exists() and not args.overwrite:
                raise ConfigError(f"{p} exists; use --overwrite to replace it.", "--overwrite")
    for image, t in zip(images, targets, strict=True):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", SegmentationWarning)
            res = segment(image, args.model, sampling_A=args.sampling, config=cfg)
        for w in caught:
            print(f"{PROG}: warning: {w.message}", file=sys.stderr)
        for note in res.notes:
            if not any(str(w.message) == note for w in caught):
                print(f"{PROG}: note: {note}", file=sys.stderr)
        name = image.name or Path(args.input[0]).stem
        _write_array(t["mask"], res.labels, res, f"Particle mask of {name}", image)
        n_frames = max(1, int(res.labels.size // (res.labels.shape[-1] * res.labels.shape[-2])))
        print(
            f"wrote {t['mask']} (shape {res.labels.shape}, {n_frames} frame(s), "
            f"{100 * res.labels.mean():.1f}% particle)"
        )
        if t["proba"] is not None:
            _write_array(t["proba"], res.proba, res, f"Particle probability of {name}", image)
            print(f"wrote {t['proba']}")
        _write_ood(t["ood"], res, source, args)
        if res.ood_score is not None:
            rows = res.frame_table()
            level = res.ood_caution
            for row in rows[:20]:
                where = ", ".join(
                    f"{k} {v:g}"
                    for k, v in row.items()
                    if k not in ("frame", "ood_score", "caution") and not k.endswith("_index")
                )
                flag = (
                    "  <- treat with caution (unlike the training data)" if row["caution"] else ""
                )
                print(
                    f"  frame {row['frame']}{f' ({where})' if where else ''}: "
                    f"OOD score {row['ood_score']:.2f}{flag}"
                )
            if len(rows) > 20:
                print(
                    f"  ... {len(rows) - 20} more frames; max OOD score "
                    f"{max(r['ood_score'] for r in rows):.2f}"
                )
            print(f"  (caution level of this model: {level:.2f})")
        print(f"wrote {t['ood']}")
    return 0
