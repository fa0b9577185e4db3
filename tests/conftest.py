"""Shared test configuration.

Tests live in sub-folders mirroring the package (tests/simulate, tests/io, tests/training, ...).
Markers: ``slow`` (seconds to a minute on 2 cores), ``gpu`` (skipped without CUDA), ``gui``
(napari + Qt under Xvfb).
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
