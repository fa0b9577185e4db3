"""Packaging: the manifest, sample data and published table reach users; imports stay light and
follow the import contracts; CI runs the README."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
import sysconfig
import zipfile
from importlib.metadata import entry_points
from importlib.resources import files
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "napari_hrtem_transfer"


def test_manifest_entry_point_and_installed_resources():
    eps = [ep for ep in entry_points(group="napari.manifest") if ep.name == "napari-hrtem-transfer"]
    assert len(eps) == 1 and eps[0].value == "napari_hrtem_transfer:napari.yaml"
    pkg = files("napari_hrtem_transfer")
    # the entry point's target exists in the installed package (an editable install's package
    # is the source folder; that a wheel ships the source manifest byte for byte is checked
    # by test_wheel_contains_package_data_and_compare_reference_runs_from_it)
    assert (pkg / "napari.yaml").is_file()
    assert (pkg / "sample_data" / "defocus_series_small.hspy").is_file()


def test_package_resources_are_real_files_and_the_root_layout_points_at_them():
    """A checkout without symlinks (Windows) must still have a working package: the manifest
    and the sample data are real files inside it; the root names only point there."""
    assert (PKG / "napari.yaml").is_file() and not (PKG / "napari.yaml").is_symlink()
    folder = PKG / "sample_data"
    assert folder.is_dir() and not folder.is_symlink()
    assert not any(f.is_symlink() for f in folder.iterdir())
    assert {"defocus_series_small.hspy", "hrtem_soot_ucam_como.tif"} <= {
        f.name for f in folder.iterdir()
    }
    for name in ("napari.yaml", "sample_data"):
        root = ROOT / name
        assert root.resolve() == (PKG / name).resolve(), f"{root} must lead to {PKG / name}"


@pytest.mark.slow
def test_wheel_contains_package_data_and_compare_reference_runs_from_it(tmp_path):
    """Build the wheel, check its contents, install it into a fresh venv outside the repository
    and run ``hrtem-transfer compare-reference`` there on the packaged published table."""
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(wheels)],
        check=True,
    )
    (wheel,) = wheels.glob("napari_hrtem_transfer-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        assert z.read("napari_hrtem_transfer/napari.yaml") == (PKG / "napari.yaml").read_bytes()
        for f in (PKG / "sample_data").iterdir():
            if f.is_file() and not f.name.startswith("."):
                assert f"napari_hrtem_transfer/sample_data/{f.name}" in names, f.name
        data = PKG / "data"
        for name in ("paper_defocus_sweep.csv", "CITATION.md", "LICENSE_paper_defocus_sweep.txt"):
            assert z.read(f"napari_hrtem_transfer/data/{name}") == (data / name).read_bytes()
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        assert "License-Expression: BSD-3-Clause AND CC-BY-4.0 AND MIT" in meta
        for licence in (
            "licenses/src/napari_hrtem_transfer/data/LICENSE_paper_defocus_sweep.txt",
            "licenses/src/napari_hrtem_transfer/sample_data/LICENSE_hrtem_soot_ucam_como.txt",
        ):
            assert any(n.endswith(licence) for n in names), licence
        ep = next(n for n in names if n.endswith("entry_points.txt"))
        text = z.read(ep).decode()
        assert "[napari.manifest]" in text and "napari_hrtem_transfer:napari.yaml" in text
        assert "hrtem-transfer = napari_hrtem_transfer.cli:main" in text
        # HyperSpy finds the signal types through this entry point and the package's yaml
        assert "[hyperspy.extensions]\nnapari_hrtem_transfer = napari_hrtem_transfer" in text
        assert "napari_hrtem_transfer/hyperspy_extension.yaml" in names

    # A venv of its own for the wheel; the dependencies come from the test venv through a
    # plain path entry (its .pth files, among them the editable install, are not processed).
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    bindir = "Scripts" if os.name == "nt" else "bin"
    vpython = venv / bindir / ("python.exe" if os.name == "nt" else "python")
    vsite = subprocess.run(
        [str(vpython), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(vsite, "_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(vpython),
            "install",
            "--no-deps",
            "--no-index",
            "-q",
            str(wheel),
        ],
        check=True,
    )
    work = tmp_path / "elsewhere"  # no shared/ above it, not inside the repository
    work.mkdir()
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "HRTEM_TRANSFER_REFERENCE_CSV")
    }
    where = subprocess.run(
        [str(vpython), "-c", "import napari_hrtem_transfer as p; print(p.__file__)"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(where).resolve().is_relative_to(venv.resolve()), where
    exe = venv / bindir / "hrtem-transfer"
    res = subprocess.run(
        [str(exe), "compare-reference", "--out", "report"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    # the study's published generalization after pretraining (SCIENCE.md): 0.0028 in focus,
    # 0.058 at +10 nm
    assert re.search(r"pretrained at \+0 nm: 0\.0028\b", res.stdout), res.stdout
    assert re.search(r"pretrained at \+10 nm: 0\.058", res.stdout), res.stdout
    page = (work / "report" / "report.html").read_text()
    assert "Rangel DaCosta" in page and "CC-BY-4.0" in page


def test_import_and_cli_help_stay_light():
    code = (
        "import sys, napari_hrtem_transfer, napari_hrtem_transfer.cli as c; c.build_parser();"
        "import napari_hrtem_transfer.simulate, napari_hrtem_transfer.io;"
        "heavy = [m for m in ('torch', 'abtem', 'hyperspy', 'napari', 'qtpy', 'matplotlib', 'dask')"
        " if m in sys.modules]; print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"importing the package pulled in: {out.stdout.strip()}"


# ----------------------------------------------------------------------------- import contracts
def _contracts():
    """The contracts of pyproject.toml as import-linter objects, and a fresh import graph."""
    import grimp
    import importlinter.api  # noqa: F401  (configures import-linter)
    from importlinter.application import use_cases
    from importlinter.contracts.forbidden import ForbiddenContract
    from importlinter.contracts.layers import LayersContract

    opts = use_cases.read_user_options(str(ROOT / "pyproject.toml"))
    kinds = {"forbidden": ForbiddenContract, "layers": LayersContract}
    contracts = {
        c["type"]: kinds[c["type"]](c["name"], opts.session_options, c)
        for c in opts.contracts_options
    }
    assert sorted(contracts) == ["forbidden", "layers"]
    graph = grimp.build_graph(
        *opts.session_options["root_packages"], include_external_packages=True, cache_dir=None
    )
    return contracts, graph


def test_import_contracts_hold(capsys):
    """import-linter in-process (not `lint-imports` on PATH), so this runs in every test run."""
    import importlinter.api  # noqa: F401
    from importlinter.application import use_cases

    ok = use_cases.lint_imports(str(ROOT / "pyproject.toml"), no_logo=True, cache_dir=None)
    out = capsys.readouterr().out
    assert ok, out
    assert re.search(r"Contracts: 2 kept, 0 broken", out), out


def test_import_contracts_catch_violations():
    """The contracts can fail: upward, Qt and unplaced imports break them.

    Checked on a graph holding every module of the package but only known-good imports (the
    real imports are checked by test_import_contracts_hold), plus one violation at a time.
    """
    import grimp

    contracts, real = _contracts()
    forbidden, layers = contracts["forbidden"], contracts["layers"]
    root = "napari_hrtem_transfer"
    clean = grimp.ImportGraph()
    for m in real.modules:
        clean.add_module(m, is_squashed=real.is_module_squashed(m))
    good = [
        (f"{root}._napari._reader", "napari"),  # the napari front end may import napari and Qt
        (f"{root}._napari._reader", "qtpy"),
        (f"{root}._napari._reader", f"{root}.io.readers"),
        (f"{root}._cli.train", f"{root}.training.loop"),
        (f"{root}.evaluation.ood", f"{root}.training.checkpoint"),
        (f"{root}.training.loop", f"{root}.models.unet"),
        (f"{root}.simulate.series", f"{root}.io.dataset"),
        (f"{root}.io.dataset", f"{root}.errors"),
        (f"{root}.io.dataset", "numpy"),
    ]
    for m in ("napari", "qtpy", "magicgui", "PyQt6", "numpy"):
        if m not in clean.modules:
            clean.add_module(m, is_squashed=True)
    for a, b in good:
        clean.add_import(importer=a, imported=b)

    def kept(contract, *edges, new=()):
        g = copy.deepcopy(clean)
        for m in new:
            g.add_module(m)
        for a, b in edges:
            g.add_import(importer=a, imported=b)
        return contract.check(g, verbose=False).kept

    assert kept(forbidden) and kept(layers)
    # no core module imports Qt/napari, nor the package __init__
    assert not kept(forbidden, (f"{root}.io.dataset", "qtpy"))
    assert not kept(forbidden, (f"{root}.training.loop", "napari"))
    assert not kept(forbidden, (f"{root}.cli", "PyQt6"))
    assert not kept(forbidden, (root, "magicgui"))
    # a core module written later is covered without editing the contract ...
    assert not kept(forbidden, (f"{root}.newcore", "PyQt6"), new=[f"{root}.newcore"])
    # ... and must be placed in a layer (exhaustive)
    assert not kept(layers, new=[f"{root}.newcore"])
    # upward imports: training -> evaluation, io -> training, core -> front end
    assert not kept(layers, (f"{root}.training.loop", f"{root}.evaluation.ood"))
    assert not kept(layers, (f"{root}.io.dataset", f"{root}.training"))
    assert not kept(layers, (f"{root}.evaluation.report", f"{root}._napari._reader"))
    assert not kept(layers, (f"{root}.errors", f"{root}.io"))
    # nothing but the napari front end reaches napari/Qt, not even through it
    assert not kept(layers, (f"{root}.cli", f"{root}._napari._widgets"))
    # models and simulate are independent of each other
    assert not kept(layers, (f"{root}.models.unet", f"{root}.simulate"))
    # downward imports are allowed
    assert kept(layers, (f"{root}._cli.evaluate", f"{root}.evaluation.report"))


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/test.sh" in readme and "bash scripts/test.sh" in ci
    # CI fails instead of skipping GUI and shared-data tests (tests/conftest.py)
    assert re.search(r"^export HRTEM_TRANSFER_STRICT=1$", ci, re.MULTILINE)
    assert ci.index("HRTEM_TRANSFER_STRICT=1") < ci.index("bash scripts/test.sh")
    assert "bash scripts/demo.sh" in readme and (ROOT / "scripts" / "demo.sh").is_file()
    # the linters run beside the tests, on the venv the test script made, and all three decide
    tests_at = ci.index("bash scripts/test.sh")
    for lint in (".venv/bin/ruff check src tests", ".venv/bin/lint-imports"):
        assert lint in ci and ci.index(lint) > tests_at, lint
    assert 'exit "$status"' in ci
    # coverage is measured and reported by the test command itself
    test_sh = (ROOT / "scripts" / "test.sh").read_text()
    (pytest_line,) = [ln for ln in test_sh.splitlines() if "-m pytest" in ln]
    assert "--cov=napari_hrtem_transfer" in pytest_line and "--cov-report=term" in pytest_line
    assert pytest_line.rstrip().endswith('"$@"')
