"""The one tiler: where the tiles of a frame start and which output pixels each one owns.

A frame padded to a multiple of the model's output stride is covered by overlapping tiles
whose starts are multiples of the stride (every tile sees the same down-sampling grid as
the whole frame).  Each output pixel is taken from the tile in which it lies farthest from
an edge: overlaps are split near their middle, on multiples of the stride, so that every
encoder stage's grid is split on a pixel edge too.  With an overlap of at least the
receptive field plus one stride, tiled and whole-frame outputs agree up to floating-point
rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: Bytes of working memory per tile pixel assumed when no measurement of the model is
#: known [B/px]: the compact U-Net measured 124-158 B/px in bf16 (activations, the fp32
#: output and the input tile), so fp32 is about twice that.
DEFAULT_BYTES_PER_PX = {"bf16": 160, "fp16": 160, "fp32": 320}


def round_up(n: int, stride: int) -> int:
    """``n`` rounded up to a multiple of ``stride``."""
    return -(-int(n) // int(stride)) * int(stride)


def overlap_for(receptive_field_px: int, stride: int) -> int:
    """The least overlap [px] that makes tiled output equal whole-frame output.

    Output pixels are at least ``overlap / 2 - stride / 2`` from a tile edge (the split is
    rounded to the stride), so the overlap is the receptive field rounded up to the stride,
    plus one stride.
    """
    return round_up(max(int(receptive_field_px), 0), stride) + int(stride)


def tile_starts(size: int, tile: int, overlap: int, stride: int) -> list[int]:
    """Start offsets of overlapping tiles along one axis of length ``size`` [px].

    Tiles are ``tile`` long, consecutive starts are at most ``tile - overlap`` apart and are
    multiples of ``stride``; the last tile ends at ``size``.  ``size`` and ``tile`` should
    be multiples of ``stride``.  The starts are spread evenly (no thin last tile).
    """
    if size <= tile:
        return [0]
    step = max((tile - overlap) // stride * stride, stride)
    n = 1 + math.ceil((size - tile) / step)
    last = size - tile
    starts = sorted({min(last, round(k * last / (n - 1) / stride) * stride) for k in range(n)})
    starts[-1] = last
    # rounding to the stride may stretch a gap past ``step``: fall back to fixed steps
    if any(b - a > step for a, b in zip(starts[:-1], starts[1:], strict=True)):
        starts = sorted({*range(0, last, step), last})
    return starts


def tile_bounds(starts: list[int], tile: int, size: int, stride: int) -> list[tuple[int, int]]:
    """The part of the axis each tile is responsible for: overlaps split near their middle,
    on multiples of ``stride``."""
    b = [0]
    for a, c in zip(starts[:-1], starts[1:], strict=True):
        mid = (c + min(a + tile, size)) // 2
        b.append(int(round(mid / stride)) * stride)
    b.append(size)
    return list(zip(b[:-1], b[1:], strict=True))


def tile_for_budget(budget_bytes: int, bytes_per_px: float, stride: int, overlap: int) -> int:
    """Largest square tile side [px] (multiple of ``stride``) whose working memory fits
    ``budget_bytes`` at ``bytes_per_px``; never smaller than two overlaps plus a stride."""
    side = int(math.sqrt(max(float(budget_bytes), 1.0) / max(float(bytes_per_px), 1.0)))
    side = side // stride * stride
    return max(side, 2 * overlap + stride, stride)


def balanced_tile(size: int, max_tile: int, overlap: int, stride: int) -> int:
    """The smallest tile side [px] that covers ``size`` px with as few tiles as ``max_tile``.

    With ``n`` tiles per axis the least tile is ``(size + (n - 1) * overlap) / n``; using it
    instead of ``max_tile`` wastes no pixels on a thin last tile.
    """
    if size <= max_tile:
        return round_up(size, stride)
    n = math.ceil((size - overlap) / max(max_tile - overlap, stride))
    return min(round_up(math.ceil((size + (n - 1) * overlap) / n), stride), round_up(size, stride))


@dataclass(frozen=True)
class TilePlan:
    """Tiles of a padded frame (``ph`` x ``pw`` px): starts, sides and owned regions."""

    ph: int
    pw: int
    ty: int
    tx: int
    ys: tuple[int, ...]
    xs: tuple[int, ...]
    cy: tuple[tuple[int, int], ...]
    cx: tuple[tuple[int, int], ...]

    @property
    def n_tiles(self) -> int:
        """Tiles per frame."""
        return len(self.ys) * len(self.xs)

    def jobs(self) -> list[tuple[int, int, tuple[int, int], tuple[int, int]]]:
        """``(y0, x0, (a0, a1), (b0, b1))`` per tile, row by row."""
        return [
            (y0, x0, a, b)
            for y0, a in zip(self.ys, self.cy, strict=True)
            for x0, b in zip(self.xs, self.cx, strict=True)
        ]


def plan_tiles(
    h: int, w: int, *, stride: int, max_tile: int, overlap: int, balance: bool = True
) -> TilePlan:
    """Plan the tiles of an ``h`` x ``w`` frame (padded to the stride) of at most
    ``max_tile`` px per side, overlapping by at least ``overlap`` px."""
    ph, pw = round_up(h, stride), round_up(w, stride)
    tile = max(int(max_tile) // stride * stride, stride)
    overlap = min(int(overlap), tile - stride) if tile > stride else 0
    ty = balanced_tile(ph, tile, overlap, stride) if balance else min(tile, ph)
    tx = balanced_tile(pw, tile, overlap, stride) if balance else min(tile, pw)
    ys, xs = tile_starts(ph, ty, overlap, stride), tile_starts(pw, tx, overlap, stride)
    return TilePlan(
        ph,
        pw,
        ty,
        tx,
        tuple(ys),
        tuple(xs),
        tuple(tile_bounds(ys, ty, ph, stride)),
        tuple(tile_bounds(xs, tx, pw, stride)),
    )
