"""The codebase's own rules, checked by scripts/private_imports.py (its docstring): no
private name used across subpackages, no function over 100 lines, no module over 700."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rules():
    spec = importlib.util.spec_from_file_location(
        "private_imports", ROOT / "scripts/private_imports.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_package_keeps_its_rules(rules):
    src = ROOT / "src"
    assert rules.private_uses(src) == []
    assert rules.long_functions(src) == []
    assert rules.long_modules(src) == []


def test_the_checker_finds_private_imports_and_attributes_across_subpackages(rules, tmp_path):
    pkg = tmp_path / "src" / rules.PACKAGE
    for sub in ("io", "hyperspy"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "io" / "readers.py").write_text("def _calibration():\n    return 1\n")
    (pkg / "io" / "other.py").write_text("from .readers import _calibration\n")  # same package
    (pkg / "hyperspy" / "core.py").write_text(
        "from ..io import readers\n"
        "from ..io.readers import _calibration\n"
        "def f():\n    return readers._calibration()\n"
    )
    (pkg / "hyperspy" / "long.py").write_text(
        "def g():\n" + "    x = 1\n" * rules.MAX_FUNCTION_LINES + "    return x\n"
    )
    found = sorted(
        (Path(f).name, line, name) for f, line, name in rules.private_uses(tmp_path / "src")
    )
    assert found == [
        ("core.py", 2, f"{rules.PACKAGE}.io.readers._calibration"),
        ("core.py", 4, f"{rules.PACKAGE}.io.readers._calibration"),
    ]
    assert [(Path(f).name, name) for f, _, name, _ in rules.long_functions(tmp_path / "src")] == [
        ("long.py", "g")
    ]
