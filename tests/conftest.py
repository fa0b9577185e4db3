"""Shared test configuration.

Tests live in sub-folders mirroring the package (tests/simulate, tests/io, tests/training, ...).
Markers: ``slow`` (more than ~5 s on 2 cores), ``gpu`` (skipped without CUDA), ``gui``
(napari + Qt under Xvfb).

Tests that depend on the machine
--------------------------------
* **GUI tests** -- marked ``gui``, or using ``make_napari_viewer``/``qtbot``/``qapp`` (these get
  the ``gui`` marker automatically, so ``-m "not gui"`` leaves them out).  pytest-xvfb starts
  Xvfb when it is on ``PATH``; otherwise an existing ``$DISPLAY`` is used.  Before the first GUI
  test a subprocess checks that Qt can open an application; when it cannot (no display, no
  Xvfb, missing xcb libraries) the GUI tests are *skipped* with the reason, instead of Qt
  aborting the whole run (exit 134).
* **Shared data** -- tests that read the study's files next to the repository
  (``<repo>/../shared``, or ``$HRTEM_TRANSFER_SHARED_DIR``) take the ``shared_data_dir`` fixture,
  which skips when the folder is absent (a fresh clone).
* **Strict mode** -- with ``HRTEM_TRANSFER_STRICT=1`` (``.ci/run`` sets it) every skip of those
  two kinds is reported as a *failure*, so CI cannot pass without running them.  A skip counts
  as one of them when its reason matches :data:`ENVIRONMENT_SKIP` (older tests that skip with
  "... not found at <repo>/../shared/..." or "published table not available" are covered too).
  GPU skips stay skips.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")

#: Set to 1 (``.ci/run`` does) to turn GUI and shared-data skips into failures.
STRICT_ENV = "HRTEM_TRANSFER_STRICT"
#: Overrides where the shared data folder is (default: ``<repo>/../shared``).
SHARED_ENV = "HRTEM_TRANSFER_SHARED_DIR"

REPO = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get(SHARED_ENV) or REPO.parent / "shared")

#: Fixtures that create a QApplication (a test using any of them is a GUI test).
GUI_FIXTURES = frozenset(
    {"make_napari_viewer", "make_napari_viewer_proxy", "qtbot", "qapp", "qtmodeltester"}
)
GUI_SKIP_PREFIX = "GUI test needs a display"
HOW_TO_ENABLE_GUI = (
    "install Xvfb (Debian/Ubuntu: apt-get install xvfb and the Qt xcb libraries listed in "
    ".ci/run) or run from a desktop session; see README.md, 'Set up and run the tests'"
)
#: Skip reasons that mean "this machine lacks something CI has" (failures in strict mode).
ENVIRONMENT_SKIP = re.compile(
    rf"{GUI_SKIP_PREFIX}|shared data|/shared/|\bshared\b|published table|real test files",
    re.IGNORECASE,
)


def strict_mode() -> bool:
    """True when ``$HRTEM_TRANSFER_STRICT`` asks for GUI/shared-data skips to fail."""
    return os.environ.get(STRICT_ENV, "").strip().lower() not in ("", "0", "false", "no")


# ----------------------------------------------------------------------------- shared data
@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The study's shared folder (``data/``, ``reference/``); skips when absent.

    In strict mode (``HRTEM_TRANSFER_STRICT=1``) the skip is reported as a failure.
    """
    if not SHARED_DIR.is_dir():
        pytest.skip(
            f"shared data folder not found at {SHARED_DIR} (the study's files next to the "
            f"repository; set ${SHARED_ENV} to use another place)"
        )
    return SHARED_DIR


# ----------------------------------------------------------------------------- GPU
def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


# ----------------------------------------------------------------------------- GUI
_QT_PROBE = (
    "import sys\n"
    "from qtpy.QtWidgets import QApplication\n"
    "app = QApplication(sys.argv[:1])\n"
    "print('qt-ok', flush=True)\n"
)


def _is_gui_test(item: pytest.Item) -> bool:
    return "gui" in item.keywords or bool(GUI_FIXTURES & set(getattr(item, "fixturenames", ())))


def gui_unavailable_reason() -> str | None:
    """Why Qt cannot show windows on this machine now, or None if it can.

    Qt aborts the process (SIGABRT, exit 134) when it cannot connect to a display, so it is
    tried in a subprocess, after pytest-xvfb has (or has not) started Xvfb and set $DISPLAY.
    """
    qpa = os.environ.get("QT_QPA_PLATFORM", "")
    headless_platform = qpa.startswith(("offscreen", "minimal", "vnc", "eglfs", "linuxfb"))
    if (
        sys.platform.startswith("linux")
        and not headless_platform
        and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    ):
        return f"{GUI_SKIP_PREFIX}: $DISPLAY is unset and Xvfb was not found on PATH; " + (
            HOW_TO_ENABLE_GUI
        )
    try:
        res = subprocess.run(
            [sys.executable, "-c", _QT_PROBE], capture_output=True, text=True, timeout=180
        )
    except subprocess.TimeoutExpired:
        return f"{GUI_SKIP_PREFIX}: starting a QApplication timed out; {HOW_TO_ENABLE_GUI}"
    if res.returncode == 0 and "qt-ok" in res.stdout:
        return None
    lines = [ln.strip() for ln in res.stderr.splitlines() if ln.strip()]
    why = next((ln for ln in lines if ln.startswith("qt.qpa")), lines[-1] if lines else "")
    return (
        f"{GUI_SKIP_PREFIX}: Qt could not start (exit {res.returncode}: {why[:200]}); "
        f"{HOW_TO_ENABLE_GUI}"
    )


_gui_reason_key = pytest.StashKey[object]()
_UNSET = object()


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Mark GUI tests ``gui`` before ``-m`` selection; skip GPU tests without CUDA."""
    for item in items:
        if "gui" not in item.keywords and _is_gui_test(item):
            item.add_marker(pytest.mark.gui)
    if any("gpu" in item.keywords for item in items) and not _has_cuda():
        skip = pytest.mark.skip(reason="no CUDA GPU on this machine")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session):
    """Once the selection is final, check for a display only if a GUI test will run."""
    gui_items = [it for it in session.items if "gui" in it.keywords]
    if not gui_items:
        return
    reason = session.config.stash.get(_gui_reason_key, _UNSET)
    if reason is _UNSET:
        reason = gui_unavailable_reason()
        session.config.stash[_gui_reason_key] = reason
    if reason is not None:
        skip = pytest.mark.skip(reason=str(reason))
        for item in gui_items:
            item.add_marker(skip)


def pytest_report_header(config):
    strict = "on" if strict_mode() else "off"
    return (
        f"hrtem-transfer: {STRICT_ENV}={strict} (GUI/shared-data skips "
        f"{'fail' if strict_mode() else 'are allowed'}); shared data: {SHARED_DIR}"
        f"{'' if SHARED_DIR.is_dir() else ' (absent)'}"
    )


# ----------------------------------------------------------------------------- strict mode
def _skip_reason(rep) -> str:
    lr = rep.longrepr
    if isinstance(lr, tuple) and len(lr) == 3:
        return str(lr[2])
    return str(lr)


def _fail_if_environment_skip(rep, what: str) -> None:
    if not (rep.skipped and strict_mode()) or hasattr(rep, "wasxfail"):
        return
    reason = _skip_reason(rep)
    if ENVIRONMENT_SKIP.search(reason):
        rep.outcome = "failed"
        rep.longrepr = (
            f"{STRICT_ENV}=1 forbids skipping {what}: {reason}\n"
            f"(CI must run GUI and shared-data tests; unset {STRICT_ENV} to allow the skip.)"
        )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    rep = yield
    _fail_if_environment_skip(rep, "this test")
    return rep


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    rep = yield
    _fail_if_environment_skip(rep, "this module")
    return rep
