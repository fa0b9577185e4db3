"""List private names used across subpackages, and functions/modules over the size limits.

A use is "private across packages" when a module imports a dotted path with a private part
(``io.readers._calibration``, ``segmentation._zoom``) and that path lies in another
subpackage (or top-level module: ``segmentation``, ``annotations``) than the importing module,
or reads a private attribute off such a module (``readers._calibration`` after ``from ..io
import readers``).  Relative and absolute imports are both resolved; imports inside functions
count.

Usage::

    python scripts/private_imports.py [--src src] [--sizes] [--only PATH ...]

Prints one line per use (``file:line  module.name``), then the count. With ``--sizes`` it
also prints functions over 100 lines and modules over 700 lines.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

PACKAGE = "napari_hrtem_transfer"
MAX_FUNCTION_LINES = 100
MAX_MODULE_LINES = 700


def _module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _private_prefix(dotted: str) -> str | None:
    """The dotted path up to and including the first private part, or None."""
    parts = dotted.split(".")
    for index, part in enumerate(parts):
        if part.startswith("_") and not part.startswith("__"):
            return ".".join(parts[: index + 1])
    return None


def _unit(dotted: str) -> str:
    """The first part below the package: a subpackage (``io``, ``evaluation``) or a top module."""
    parts = dotted.split(".")
    return ".".join(parts[:2])


def _crosses(module: str, private: str) -> bool:
    """True when ``private`` belongs to another subpackage (or top-level module) than ``module``."""
    return _unit(module) != _unit(private)


def private_uses(src: Path, only: list[Path] | None = None) -> list[tuple[str, int, str]]:
    """``(file, line, dotted name)`` for each private name imported across packages."""
    found = []
    for path in sorted((src / PACKAGE).rglob("*.py")):
        if only and not any(path.resolve().is_relative_to(o.resolve()) for o in only):
            continue
        module = _module_name(path, src)
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                base = _resolve(node, module, is_package)
                if not base.startswith(PACKAGE):
                    continue
                targets = [f"{base}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith(PACKAGE)]
            for dotted in targets:
                private = _private_prefix(dotted)
                if private and _crosses(module, private):
                    found.append((str(path.relative_to(src.parent)), node.lineno, dotted))
        found.extend(_private_attributes(tree, module, is_package, path, src))
    return found


def _module_bindings(tree: ast.AST, module: str, is_package: bool) -> dict[str, str]:
    """Local names bound to the package's modules by imports (``from ..io import readers``,
    ``import napari_hrtem_transfer.io.readers as r``), anywhere in the file."""
    bound: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = _resolve(node, module, is_package)
            if base.startswith(PACKAGE):
                for alias in node.names:
                    bound[alias.asname or alias.name] = f"{base}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(PACKAGE) and alias.asname:
                    bound[alias.asname] = alias.name
    return bound


def _private_attributes(tree, module, is_package, path, src) -> list[tuple[str, int, str]]:
    """Private attributes read off another subpackage's module (``readers._calibration``)."""
    bound = _module_bindings(tree, module, is_package)
    found = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in bound
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            dotted = f"{bound[node.value.id]}.{node.attr}"
            if _crosses(module, dotted):
                found.append((str(path.relative_to(src.parent)), node.lineno, dotted))
    return found


def long_functions(src: Path, only: list[Path] | None = None) -> list[tuple[str, int, str, int]]:
    """``(file, line, name, lines)`` for each function longer than the limit."""
    found = []
    for path in sorted((src / PACKAGE).rglob("*.py")):
        if only and not any(path.resolve().is_relative_to(o.resolve()) for o in only):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    file = str(path.relative_to(src.parent))
                    found.append((file, node.lineno, node.name, length))
    return found


def long_modules(src: Path, only: list[Path] | None = None) -> list[tuple[str, int]]:
    found = []
    for path in sorted((src / PACKAGE).rglob("*.py")):
        if only and not any(path.resolve().is_relative_to(o.resolve()) for o in only):
            continue
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > MAX_MODULE_LINES:
            found.append((str(path.relative_to(src.parent)), lines))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=Path("src"))
    parser.add_argument("--sizes", action="store_true", help="also list long functions/modules")
    parser.add_argument("--only", type=Path, nargs="*", help="restrict to these files/folders")
    args = parser.parse_args()
    uses = private_uses(args.src, args.only)
    for file, line, dotted in uses:
        print(f"{file}:{line}  {dotted}")
    statements = len({(file, line) for file, line, _ in uses})
    print(f"private cross-package uses: {len(uses)} names at {statements} places")
    if args.sizes:
        functions = long_functions(args.src, args.only)
        for file, line, name, length in functions:
            print(f"{file}:{line}  {name}  {length} lines")
        print(f"functions over {MAX_FUNCTION_LINES} lines: {len(functions)}")
        modules = long_modules(args.src, args.only)
        for file, length in modules:
            print(f"{file}  {length} lines")
        print(f"modules over {MAX_MODULE_LINES} lines: {len(modules)}")


if __name__ == "__main__":
    main()
