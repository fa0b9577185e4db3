"""Packaging: the manifest and sample data reach users; imports stay light; CI runs the README."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import entry_points
from importlib.resources import files
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_manifest_entry_point_and_installed_resources():
    eps = [ep for ep in entry_points(group="napari.manifest") if ep.name == "napari-hrtem-transfer"]
    assert len(eps) == 1 and eps[0].value == "napari_hrtem_transfer:napari.yaml"
    pkg = files("napari_hrtem_transfer")
    assert (pkg / "napari.yaml").read_bytes() == (ROOT / "napari.yaml").read_bytes()
    assert (pkg / "sample_data" / "defocus_series_small.hspy").is_file()


@pytest.mark.slow
def test_wheel_contains_manifest_and_sample_data(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(tmp_path)],
        check=True,
    )
    (wheel,) = tmp_path.glob("napari_hrtem_transfer-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        assert z.read("napari_hrtem_transfer/napari.yaml") == (ROOT / "napari.yaml").read_bytes()
        for f in (ROOT / "sample_data").iterdir():
            if f.is_file() and not f.name.startswith("."):
                assert f"napari_hrtem_transfer/sample_data/{f.name}" in names, f.name
        ep = next(n for n in names if n.endswith("entry_points.txt"))
        text = z.read(ep).decode()
        assert "[napari.manifest]" in text and "napari_hrtem_transfer:napari.yaml" in text
        assert "hrtem-transfer = napari_hrtem_transfer.cli:main" in text


def test_import_and_cli_help_stay_light():
    code = (
        "import sys, napari_hrtem_transfer, napari_hrtem_transfer.cli as c; c.build_parser();"
        "import napari_hrtem_transfer.simulate, napari_hrtem_transfer.io;"
        "heavy = [m for m in ('torch', 'abtem', 'hyperspy', 'napari', 'qtpy', 'matplotlib', 'dask')"
        " if m in sys.modules]; print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"importing the package pulled in: {out.stdout.strip()}"


def test_core_never_imports_qt_or_napari():
    lint = shutil.which("lint-imports")
    if lint is None:
        pytest.skip("import-linter is not installed")
    res = subprocess.run([lint, "--config", str(ROOT / "pyproject.toml")], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/test.sh" in readme and "bash scripts/test.sh" in ci
    assert "bash scripts/demo.sh" in readme and (ROOT / "scripts" / "demo.sh").is_file()
