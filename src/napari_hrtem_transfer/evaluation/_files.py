"""Atomic writers for report files (temporary name, then rename).

Text and bytes go through the one implementation in :mod:`napari_hrtem_transfer.io.atomic`;
only the matplotlib figure writer lives here.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..io.atomic import atomic_path, write_bytes_atomic, write_text_atomic

__all__ = ["savefig_atomic", "write_bytes_atomic", "write_text_atomic"]


def savefig_atomic(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Save a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
    finally:
        plt.close(fig)
    return path
