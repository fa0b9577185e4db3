"""Helpers of the HyperSpy-extension tests: axes compared field by field, the stand-in core's
per-frame functions."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def axes_fields(s) -> list[dict]:
    out = []
    for ax in s.axes_manager._axes:
        d = {
            "name": ax.name,
            "units": ax.units,
            "size": ax.size,
            "navigate": ax.navigate,
            "is_uniform": ax.is_uniform,
            "axis": np.asarray(ax.axis),
        }
        if ax.is_uniform:
            d["scale"] = ax.scale
            d["offset"] = ax.offset
        out.append(d)
    return out


def assert_same_axes(a, b, *, signal_only: bool = False) -> None:
    fa, fb = axes_fields(a), axes_fields(b)
    assert len(fa) == len(fb), (fa, fb)
    for i, (x, y) in enumerate(zip(fa, fb, strict=True)):
        assert x.keys() == y.keys(), (i, x, y)
        for key in x:
            if key == "axis":
                np.testing.assert_array_equal(x[key], y[key], err_msg=f"axis {i} values")
            else:
                assert x[key] == y[key], f"axis {i} ({x['name']}): {key} {x[key]!r} != {y[key]!r}"


#: The stand-in model's caution level of the OOD score (not the core's fallback of 1.0).
FAKE_CAUTION = 2.5


@dataclass
class FakeResult:
    labels: np.ndarray
    proba: np.ndarray | None
    ood_score: np.ndarray | None
    ood_caution: float | None = FAKE_CAUTION
    axes: list = field(default_factory=list)
    provenance: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)


def fake_proba(frames: np.ndarray) -> np.ndarray:
    """Logistic of the intensity minus the frame mean (per frame, so chunks are independent)."""
    x = np.asarray(frames, dtype=np.float64)
    mu = x.mean(axis=(-2, -1), keepdims=True)
    sd = x.std(axis=(-2, -1), keepdims=True) + 1e-12
    return (1.0 / (1.0 + np.exp(-(x - mu) / sd))).astype(np.float32)


def fake_ood(frames: np.ndarray) -> np.ndarray:
    """Per-frame mean intensity: easy to recompute in a test."""
    return np.asarray(frames, dtype=np.float64).mean(axis=(-2, -1))
