"""The npe2 manifest: valid, lazy, discoverable, and pointing only into _napari."""

from __future__ import annotations

import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


def _manifest():
    from npe2 import PluginManifest

    return PluginManifest.from_file(ROOT / "napari.yaml")


def test_manifest_validates_and_imports():
    pm = _manifest()
    assert pm.name == "napari-hrtem-transfer"
    pm.validate_imports()  # every python_name resolves to an importable callable


def test_npe2_cli_validate():
    out = subprocess.run(
        [sys.executable, "-m", "npe2", "validate", str(ROOT / "napari.yaml")],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "valid" in out.stdout


def test_every_command_points_into_the_napari_subpackage():
    pm = _manifest()
    assert pm.contributions.commands
    for cmd in pm.contributions.commands:
        assert cmd.python_name.startswith("napari_hrtem_transfer._napari."), cmd.python_name
    ids = {c.id for c in pm.contributions.commands}
    used = (
        [r.command for r in pm.contributions.readers]
        + [w.command for w in pm.contributions.widgets]
        + [s.command for s in pm.contributions.sample_data]
    )
    assert set(used) == ids


def test_reader_patterns_match_supported_extensions():
    from napari_hrtem_transfer.io.readers import SUPPORTED_EXTENSIONS

    (reader,) = _manifest().contributions.readers
    assert sorted(p.removeprefix("*") for p in reader.filename_patterns) == sorted(
        SUPPORTED_EXTENSIONS
    )


def test_npe2_discovers_the_installed_plugin():
    """npe2 (and so napari) finds the plugin through the installed distribution's
    ``napari.manifest`` entry point, not only as a file in the checkout.

    The manifest's content is checked on the repository file above (an editable install loads
    that same file); the root napari.yaml leading to the package's file and the wheel shipping it
    byte for byte are checked in tests/test_packaging.py.
    """
    from npe2 import PluginManager, PluginManifest

    pm = PluginManifest.from_distribution("napari-hrtem-transfer")  # via the entry point
    assert pm.name == "napari-hrtem-transfer"
    assert pm.package_metadata is not None
    assert pm.package_metadata.name == "napari-hrtem-transfer"
    manager = PluginManager()  # a fresh one, discovering from the environment as napari does
    manager.discover()
    assert manager.get_manifest("napari-hrtem-transfer").name == "napari-hrtem-transfer"
    widgets = [
        w.display_name
        for w in manager.iter_widgets()
        if w.command.startswith("napari-hrtem-transfer.")
    ]
    assert widgets == [
        "Simulate defocus series",
        "Train / fine-tune",
        "Segment",
        "OOD per frame",
        "Evaluate / explore",
    ]
    readers = [r.plugin_name for r in manager.iter_compatible_readers(["series.hspy"])]
    assert "napari-hrtem-transfer" in readers


def test_sample_files_are_reachable_from_the_package():
    folder = files("napari_hrtem_transfer") / "sample_data"
    assert (folder / "hrtem_soot_ucam_como.tif").is_file()
    assert (folder / "LICENSE_hrtem_soot_ucam_como.txt").is_file()


def test_importing_package_and_reader_does_not_import_qt_or_napari():
    code = (
        "import sys\n"
        "import napari_hrtem_transfer, napari_hrtem_transfer.io.readers\n"
        "import napari_hrtem_transfer._napari._reader, napari_hrtem_transfer._napari._jobs\n"
        "bad = [m for m in ('napari', 'qtpy', 'PyQt6', 'magicgui', 'hyperspy', 'torch', 'abtem')"
        " if m in sys.modules]\n"
        "print(bad)\n"
        "assert not bad, bad\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("key", ["defocus_series_small", "real_hrtem_soot"])
def test_sample_data_keys(key):
    assert key in {s.key for s in _manifest().contributions.sample_data}
