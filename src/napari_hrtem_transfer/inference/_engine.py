"""The one tiled pass of a segmentation network over standardised frames.

:func:`run_pass` is the only loop over tiles: segmentation (logits, probabilities) and the
label-free OOD pass (pooled encoder features, predictive entropy, boundary statistics) come
from the same forward passes.  Frames are never padded as a whole: a tile that reaches past
the frame's end is reflect-padded on its own, which gives the same values as padding the
frame (the padding is less than one stride).  Probabilities and uncertainty maps are
computed in float32 on each tile, with float64 sums.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._tiles import TilePlan

#: Elements of a feature map reduced at once when pooling (bounds the float32 temporaries).
_POOL_ELEMENTS = 1 << 20
#: Serialises passes that capture stage maps with a forward hook (modules without parts).
_HOOK_LOCK = threading.Lock()
#: Probabilities are clipped to [eps, 1 - eps] in the entropy (as the OOD reference's).
_ENTROPY_EPS = 1e-7


class Moments:
    """Running count, mean and sum of squared deviations per channel (Chan et al. update)."""

    __slots__ = ("n", "mean", "m2")

    def __init__(self, c: int) -> None:
        self.n = 0.0
        self.mean = np.zeros(c)
        self.m2 = np.zeros(c)

    def add(self, n: float, mean: np.ndarray, m2: np.ndarray) -> None:
        """Merge a block of ``n`` values per channel with its ``mean`` and ``m2``."""
        if n <= 0:
            return
        tot = self.n + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / tot)
        self.m2 = self.m2 + m2 + delta * delta * (self.n * n / tot)
        self.n = tot

    def pooled(self) -> np.ndarray:
        """Per channel: mean, then standard deviation (ddof 0)."""
        std = np.sqrt(np.maximum(self.m2 / max(self.n, 1.0), 0.0))
        return np.concatenate([self.mean, std])


@dataclass
class PassResult:
    """What one tiled pass over N frames of H x W px gives (see :func:`run_pass`)."""

    proba: np.ndarray | None = None
    logits: np.ndarray | None = None
    moments: list[list[Moments]] | None = None
    entropy_sum: np.ndarray | None = None
    boundary_sum: np.ndarray | None = None
    boundary_count: np.ndarray | None = None
    foreground: np.ndarray | None = None
    n_forward: int = 0
    stage_sizes: list[int] = field(default_factory=list)

    def features(self) -> np.ndarray | None:
        """Pooled features (N, D) float64: per stage, channel means then stds."""
        if self.moments is None:
            return None
        return np.stack([np.concatenate([m.pooled() for m in fm]) for fm in self.moments])


def boundary_mask(pred: np.ndarray) -> np.ndarray:
    """Pixels of a binary map (..., H, W) with a 4-neighbour of the other class (bool)."""
    pred = np.asarray(pred, dtype=bool)
    edge = np.zeros_like(pred)
    dy = pred[..., 1:, :] != pred[..., :-1, :]
    dx = pred[..., :, 1:] != pred[..., :, :-1]
    edge[..., 1:, :] |= dy
    edge[..., :-1, :] |= dy
    edge[..., :, 1:] |= dx
    edge[..., :, :-1] |= dx
    return edge


def _entropy(p):
    """Binary entropy [nats] of a float32 torch tensor of probabilities."""
    import torch

    q = p.clamp(_ENTROPY_EPS, 1.0 - _ENTROPY_EPS)
    return -(q * torch.log(q) + (1.0 - q) * torch.log1p(-q))


def tile_of(frame: np.ndarray, y0: int, x0: int, ty: int, tx: int) -> np.ndarray:
    """The ``ty`` x ``tx`` tile at (y0, x0) of ``frame`` reflect-padded past its end."""
    h, w = frame.shape
    t = frame[y0 : y0 + ty, x0 : x0 + tx]
    py, px = ty - t.shape[0], tx - t.shape[1]
    if py or px:
        mode = "reflect" if min(h, w) > 1 else "edge"
        if mode == "reflect" and (py >= h or px >= w):
            # repeated reflection of a frame smaller than the pad: pad the whole frame
            full = np.pad(frame, ((0, max(0, y0 + ty - h)), (0, max(0, x0 + tx - w))), mode)
            return full[y0 : y0 + ty, x0 : x0 + tx]
        t = np.pad(frame[y0:, x0:], ((0, py), (0, px)), mode=mode)[:ty, :tx]
    return t


def _pool(moments: list[Moments], maps: list, j: int, plan: TilePlan, region) -> None:
    """Add tile ``j``'s owned ``region`` (y0, x0, a0, a1, b0, b1) of every stage map.

    Welford's mean and variance per channel (``torch.var_mean``) on float32 blocks of rows
    (channels innermost: vectorised, bounded temporaries), merged in float64.
    """
    import torch

    y0, x0, a0, a1, b0, b1 = region
    for st, m in enumerate(maps):
        fy, fx = plan.ty / m.shape[2], plan.tx / m.shape[3]
        r0, r1 = int((a0 - y0) // fy), int(math.ceil((a1 - y0) / fy))
        c0, c1 = int((b0 - x0) // fx), int(math.ceil((b1 - x0) / fx))
        v = m[j].permute(1, 2, 0)[r0:r1, c0:c1]  # (rows, cols, C)
        rows = max(1, _POOL_ELEMENTS // max(1, v.shape[1] * v.shape[2]))
        cnts, mus, vs = [], [], []
        for r in range(0, v.shape[0], rows):
            blk = v[r : r + rows].float()
            var, mu = torch.var_mean(blk, dim=(0, 1), correction=0)
            cnts.append(float(blk.shape[0] * blk.shape[1]))
            mus.append(mu.double())
            vs.append(var.double())
        cnt = torch.tensor(cnts, dtype=torch.float64)[:, None]
        mu_b, var_b = torch.stack(mus), torch.stack(vs)
        total = float(cnt.sum())
        mean = (cnt * mu_b).sum(0) / total
        m2 = (cnt * (var_b + (mu_b - mean) ** 2)).sum(0)
        moments[st].add(total, mean.cpu().numpy(), m2.cpu().numpy())


@dataclass
class _Want:
    proba: bool
    logits: bool
    features: bool
    uncertainty: bool


def _take_outputs(res: PassResult, want: _Want, i: int, z, zt_part, region) -> None:
    """Write tile outputs for frame ``i``: maps, entropy and boundary sums, foreground."""
    import torch

    y0, x0, a0, a1, b0, b1 = region
    zz = z[a0 - y0 : a1 - y0, b0 - x0 : b1 - x0]
    if res.foreground is not None:
        res.foreground[i] += int((zz > 0).sum())
    if want.logits:
        res.logits[i, a0:a1, b0:b1] = zz.cpu().numpy()
    if not (want.proba or want.uncertainty):
        return
    pp = torch.sigmoid(zz)
    if want.proba:
        res.proba[i, a0:a1, b0:b1] = pp.cpu().numpy()
    if want.uncertainty:
        hh = _entropy(pp)
        res.entropy_sum[i] += float(hh.sum(dtype=torch.float64))
        # the boundary from the tile's whole unpadded part, so that pixels on the owned
        # region's edge see their neighbours
        edge = boundary_mask(zt_part.cpu().numpy() > 0)[a0 - y0 : a1 - y0, b0 - x0 : b1 - x0]
        if edge.any():
            res.boundary_sum[i] += float(hh[torch.from_numpy(edge)].sum(dtype=torch.float64))
            res.boundary_count[i] += int(edge.sum())


def run_pass(
    forward: Callable[[np.ndarray, bool], tuple[Any, list]],
    frame: Callable[[int], np.ndarray],
    n: int,
    hw: tuple[int, int],
    plan: TilePlan,
    *,
    batch_size: int = 1,
    want_proba: bool = False,
    want_logits: bool = False,
    want_features: bool = False,
    want_uncertainty: bool = False,
    max_tiles: int | None = None,
) -> PassResult:
    """One tiled pass over ``n`` standardised frames of ``hw`` px.

    Parameters
    ----------
    forward
        ``forward(tiles (B, ty, tx) float32, decode) -> (logits (B, ty, tx) torch float32
        or None, encoder stage maps)``; with ``decode`` False only the encoder is run.
    frame
        ``frame(i)`` -> standardised frame ``i`` (H, W) float32 (called once per frame).
    plan
        The tiles (:func:`~._tiles.plan_tiles` of ``hw``).
    want_proba, want_logits, want_features, want_uncertainty
        What to compute: probability / logit maps (N, H, W) float32, pooled encoder features,
        entropy and boundary sums and foreground counts.
    max_tiles
        Pool the features of at most this many tiles per frame, evenly spread over it (an
        unbiased estimate of the pooled statistics that bounds their cost on large frames);
        with nothing but features wanted, only those tiles are run.  None: every tile.
    """
    h, w = hw
    want = _Want(want_proba, want_logits, want_features, want_uncertainty)
    decode = want_proba or want_logits or want_uncertainty
    res = PassResult()
    if want_proba:
        res.proba = np.empty((n, h, w), np.float32)
    if want_logits:
        res.logits = np.empty((n, h, w), np.float32)
    if decode:
        res.foreground = np.zeros(n, np.int64)
    if want_uncertainty:
        res.entropy_sum, res.boundary_sum = np.zeros(n), np.zeros(n)
        res.boundary_count = np.zeros(n, np.int64)
    per_frame = plan.jobs()
    pooled = set(range(len(per_frame)))
    if max_tiles is not None and len(per_frame) > max_tiles > 0:
        pooled = set(np.linspace(0, len(per_frame) - 1, int(max_tiles)).round().astype(int))
        if not decode:
            per_frame = [per_frame[k] for k in sorted(pooled)]
            pooled = set(range(len(per_frame)))
    jobs = [(i, k in pooled, *job) for i in range(n) for k, job in enumerate(per_frame)]
    current: tuple[int, np.ndarray | None] = (-1, None)
    for k in range(0, len(jobs), batch_size):
        chunk = jobs[k : k + batch_size]
        tiles = []
        for i, _, y0, x0, _, _ in chunk:
            if current[0] != i:
                current = (i, frame(i))
            tiles.append(tile_of(current[1], y0, x0, plan.ty, plan.tx))
        z, maps = forward(np.stack(tiles) if len(tiles) > 1 else tiles[0][None], decode)
        res.n_forward += 1
        if want_features and res.moments is None:
            res.moments = [[Moments(int(m.shape[1])) for m in maps] for _ in range(n)]
            res.stage_sizes = [2 * int(m.shape[1]) for m in maps]
        for j, (i, pool, y0, x0, (a0, a1), (b0, b1)) in enumerate(chunk):
            a1, b1 = min(a1, h), min(b1, w)  # clip to the unpadded frame
            if a1 <= a0 or b1 <= b0:
                continue
            region = (y0, x0, a0, a1, b0, b1)
            if want_features and pool:
                _pool(res.moments[i], maps, j, plan, region)
            if z is not None:
                part = z[j, : min(plan.ty, h - y0), : min(plan.tx, w - x0)]
                _take_outputs(res, want, i, z[j], part, region)
    return res


def make_forward(
    net: Any, device: Any, precision: str, *, weights_dtype: Any = None
) -> Callable[[np.ndarray, bool], tuple[Any, list]]:
    """The ``forward(tiles, decode)`` of :func:`run_pass` for a network on ``device``.

    ``net`` maps (B, 1, h, w) to logits and has an ``encoder`` returning every stage's map
    (or an ``encoder_features`` method).  When ``weights_dtype`` is given (bf16 weights on a
    CPU) the input is cast to it and no autocast is used; otherwise ``precision`` selects
    the autocast.  Tensors are channels_last on CPU and CUDA.
    """
    import torch

    from ..training.device import autocast

    encoder = getattr(net, "encoder", None)
    is_module = isinstance(encoder, torch.nn.Module)
    # encoder -> decoder -> head called in turn: the stage maps without a forward hook (a
    # hook on a shared module would see other threads' passes, e.g. dask blocks)
    parts = is_module and all(hasattr(net, k) for k in ("decoder", "head"))
    channels_last = device.type in ("cpu", "cuda")
    prec = "fp32" if weights_dtype is not None else precision

    def as_list(out) -> list:
        return list(out) if isinstance(out, list | tuple) else [out]

    def hooked(t):
        captured: list = []

        def _grab(_m, _inp, out):
            captured.append(as_list(out))

        with _HOOK_LOCK:
            hook = encoder.register_forward_hook(_grab)
            try:
                z = net(t)
            finally:
                hook.remove()
        return z, captured[-1]

    def forward(x: np.ndarray, decode: bool):
        t = torch.from_numpy(np.ascontiguousarray(x[:, None], dtype=np.float32)).to(device)
        if channels_last:
            t = t.contiguous(memory_format=torch.channels_last)
        if weights_dtype is not None:
            t = t.to(weights_dtype)
        with torch.inference_mode(), autocast(device, prec):
            if is_module and not decode:
                return None, as_list(encoder(t))
            if parts:
                if hasattr(net, "check_input_shape"):
                    net.check_input_shape(t)
                maps = as_list(encoder(t))
                z = net.head(net.decoder(maps))
            elif is_module:
                z, maps = hooked(t)
            else:
                z = net(t) if decode else None
                maps = [net.encoder_features(t)]
        return (None if z is None else z[:, 0].float()), maps

    return forward
