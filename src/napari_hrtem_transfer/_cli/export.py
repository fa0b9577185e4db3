"""``hrtem-transfer export``: write a model as a bioimage.io model package (spec 0.5).

A thin caller of :func:`napari_hrtem_transfer.bioimageio.export_bioimageio`; option defaults
come from :class:`~napari_hrtem_transfer.bioimageio.BioimageioExportConfig`.
"""

from __future__ import annotations

import argparse

#: BioimageioExportConfig field -> its command-line option (for error messages).
FLAGS = {
    "which": "--which",
    "name": "--name",
    "description": "--description",
    "authors": "--author",
    "license": "--license",
    "test": "--no-test",
    "torchscript": "--torchscript",
    "overwrite": "--overwrite",
}

HELP = (
    "Export a model as a bioimage.io model package (.zip, spec 0.5): weights, architecture, "
    "standardisation and sigmoid, pixel size in Å, test tensors, cover, model card, and the "
    "OOD reference, so that 'bioimageio test' and other bioimage.io tools run it and "
    "'segment --model PACKAGE.zip' imports it losslessly."
)


def _help(name: str) -> str:
    from ..bioimageio import BioimageioExportConfig

    return (BioimageioExportConfig.model_fields[name].description or name).replace("%", "%%")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Declare the options (defaults from BioimageioExportConfig)."""
    from ..bioimageio import BioimageioExportConfig

    d = BioimageioExportConfig()
    p.add_argument(
        "--model",
        default="pretrained",
        metavar="MODEL",
        help="'pretrained' (the model shipped with the package) or a checkpoint folder",
    )
    p.add_argument("--out", required=True, metavar="PACKAGE.zip", help="the package to write")
    p.add_argument("--which", default=d.which, choices=("best", "last"), help=_help("which"))
    p.add_argument("--name", default=d.name, help=_help("name"))
    p.add_argument("--description", default=d.description, help=_help("description"))
    p.add_argument(
        "--author",
        dest="authors",
        action="append",
        default=argparse.SUPPRESS,
        metavar="NAME",
        help=f"{_help('authors')} Repeat for several (default: {', '.join(d.authors)}).",
    )
    p.add_argument("--license", default=d.license, metavar="SPDX", help=_help("license"))
    p.add_argument("--torchscript", action="store_true", help=_help("torchscript"))
    p.set_defaults(test=d.test)  # before the flag: set_defaults would overwrite its default
    p.add_argument(
        "--no-test",
        dest="test",
        action="store_false",
        default=argparse.SUPPRESS,
        help="skip the check that the written package passes bioimageio.core.test_model (by "
        "default the export fails, exit code 2, if the package does not reproduce its test "
        "output)",
    )
    p.add_argument("--overwrite", action="store_true", help=_help("overwrite"))


def run(args: argparse.Namespace) -> int:
    """Export; print what was written."""
    from pydantic import ValidationError

    from ..bioimageio import BioimageioExportConfig, export_bioimageio
    from ..errors import config_error_from_validation

    values = {
        "which": args.which,
        "name": args.name,
        "description": args.description,
        "license": args.license,
        "test": args.test,
        "torchscript": args.torchscript,
        "overwrite": args.overwrite,
    }
    if getattr(args, "authors", None):
        values["authors"] = list(args.authors)
    try:
        cfg = BioimageioExportConfig(**values)
    except ValidationError as exc:
        raise config_error_from_validation(exc, FLAGS) from None
    res = export_bioimageio(args.model, args.out, config=cfg)
    print(f"wrote {res.path} ({res.n_bytes / 1e6:.1f} MB, sha256 {res.sha256[:12]}…): {res.name}")
    if res.ood_reference:
        print(f"  OOD reference included (caution level {res.caution_level:.2f})")
    for note in res.notes:
        print(f"  note: {note}")
    if res.test_passed:
        print("  bioimageio test: passed (the package reproduces its test output)")
    elif res.test_passed is None:
        print(f"  not tested; run: bioimageio test {res.path}")
    return 0


COMMANDS = [("export", HELP, add_arguments, run)]
