"""Fixtures for the HyperSpy extension tests.

``registered``: HyperSpy knows the package's signal types, read from the package's own
``hyperspy_extension.yaml`` exactly as HyperSpy does for an installed entry point (restored
afterwards). ``fake_core``: a stand-in for the segmentation core that follows its contract
(labels/proba of the input's shape, one OOD score per frame, frames independent) with
values simple enough to check by hand; it records every call.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _hs_helpers import FAKE_CAUTION, FakeResult, fake_ood, fake_proba  # noqa: E402


@pytest.fixture
def registered(monkeypatch):
    import yaml
    from hyperspy.extensions import ALL_EXTENSIONS

    import napari_hrtem_transfer

    path = Path(napari_hrtem_transfer.__file__).parent / "hyperspy_extension.yaml"
    signals = yaml.safe_load(path.read_text())["signals"]
    for name, spec in signals.items():
        monkeypatch.setitem(ALL_EXTENSIONS["signals"], name, spec)
    return signals


@pytest.fixture
def fake_core(monkeypatch):
    from napari_hrtem_transfer.hyperspy import _core

    calls: list[dict[str, Any]] = []

    def segment(
        data,
        model="pretrained",
        *,
        sampling_A=None,
        axes=None,
        threshold=None,
        ood=True,
        probabilities=True,
        which="best",
        device="auto",
        progress=None,
        stop=None,
    ):
        if hasattr(data, "axes_manager"):  # a signal: read as the core does (RGB -> grey)
            from napari_hrtem_transfer.io.readers import images_from_signals

            arr = images_from_signals(data, allow_reciprocal=True)[0].frames()
        elif hasattr(data, "nav_axes"):  # a lazy signal's chunk (io.frames.Frames)
            arr = data.frames()
        else:
            arr = np.asarray(data)
        calls.append(
            {
                "shape": arr.shape,
                "sampling_A": sampling_A,
                "model": model,
                "threshold": threshold,
                "signal": hasattr(data, "axes_manager"),
            }
        )
        p = fake_proba(arr)
        t = 0.5 if threshold is None else threshold
        return FakeResult(
            labels=(p > t).astype(np.uint8),
            proba=p if probabilities else None,
            ood_score=fake_ood(arr) if ood else None,
            provenance={
                "model": str(model),
                "weights_sha256": "0" * 64,
                "threshold": t,
                "version": "test",
            },
            notes=["fake core"],
        )

    def _ood_reference(loaded, notes):
        return SimpleNamespace(caution_level=FAKE_CAUTION)

    module = SimpleNamespace(segment=segment, ood_reference=_ood_reference)
    monkeypatch.setattr(_core, "_core", lambda: module)
    module.calls = calls
    return module
