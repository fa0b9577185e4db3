"""The ``hrtem-transfer`` command line.

Each sub-command lives in ``napari_hrtem_transfer._cli.<module>``, which defines

* ``COMMANDS``: a list of ``(name, help, add_arguments, run)`` tuples, where
  ``add_arguments(parser)`` declares the options and ``run(args) -> int`` does the work.

Command modules import nothing heavy at module level, so ``--help`` is fast.  Errors caused by
the user (:class:`~napari_hrtem_transfer.errors.HrtemTransferError`, pydantic validation errors)
are printed as one clear message and exit with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from . import __version__
from .errors import HrtemTransferError

#: Modules that contribute sub-commands, in the order they appear in ``--help``.
COMMAND_MODULES = (
    "simulate",
    "train",
    "evaluate",
    "demo",
    "sweep",
    "export",
)

EPILOG = (
    "Defocus convention (as in abTEM): defocus = -C10, in nm; positive = underfocus, "
    "negative = overfocus."
)


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every available sub-command."""
    parser = argparse.ArgumentParser(
        prog="hrtem-transfer",
        description=(
            "Simulate HRTEM defocus series, train and fine-tune U-Nets that segment "
            "nanoparticles, and evaluate them in and out of distribution."
        ),
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for modname in COMMAND_MODULES:
        # every listed module must exist: a typo here must fail loudly, never hide a command
        mod = importlib.import_module(f"napari_hrtem_transfer._cli.{modname}")
        for name, help_, add_arguments, run in mod.COMMANDS:
            p = sub.add_parser(
                name,
                help=help_,
                description=help_,
                epilog=EPILOG,
                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
            )
            add_arguments(p)
            p.set_defaults(_run=run)
    return parser


def _format_validation_error(exc) -> str:
    """A pydantic error that reached the command line, with fields shown as flags."""
    from .errors import config_error_from_validation

    names = {
        str(e["loc"][0]): "--" + str(e["loc"][0]).replace("_", "-")
        for e in exc.errors()
        if e.get("loc")
    }
    return str(config_error_from_validation(exc, names))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    prog = f"hrtem-transfer {args.command}"
    try:
        return int(args._run(args) or 0)
    except HrtemTransferError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; files already written are complete.", file=sys.stderr)
        return 130
    except Exception as exc:
        try:
            from pydantic import ValidationError
        except ImportError:  # pragma: no cover
            raise exc from None
        if isinstance(exc, ValidationError):
            print(f"{prog}: error: {_format_validation_error(exc)}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
