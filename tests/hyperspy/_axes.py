"""Compare HyperSpy axes field by field (name, units, size, navigate, scale, offset, values)."""

from __future__ import annotations

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
