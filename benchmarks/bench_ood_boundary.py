"""Cost of the boundary statistics of the OOD score (issue 13) against the forward pass.

Times, on one frame of ``--size`` px with the shipped model: the whole OOD pass
(``ScoringModel.frame_stats``: forward, pooled features, entropy, boundary statistics), the
boundary statistics alone on its probability map (``boundary_statistics``) and the mean
entropy alone, each the median of ``--repeats`` runs in the same process (the machines are
shared: compare the ratio, not the seconds)::

    python benchmarks/bench_ood_boundary.py --size 1024 --repeats 5
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    from napari_hrtem_transfer.evaluation._model import (
        ScoringModel,
        _entropy_mean_chunked,
        boundary_statistics,
    )
    from napari_hrtem_transfer.segmentation import pretrained_model_dir

    rng = np.random.default_rng(0)
    frame = rng.poisson(16, size=(args.size, args.size)).astype(np.float32)
    sm = ScoringModel(pretrained_model_dir(), device="cpu")
    st = sm.frame_stats(frame, want_proba=True)  # warm-up, and the map

    def med(fn) -> float:
        t = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
        return float(np.median(t))

    t_pass = med(lambda: sm.frame_stats(frame))
    t_bnd = med(lambda: boundary_statistics(st.proba[0]))
    t_ent = med(lambda: _entropy_mean_chunked(st.proba[0]))
    print(f"frame {args.size}x{args.size} px, median of {args.repeats}")
    print(f"OOD pass (forward + features + entropy + boundary): {1e3 * t_pass:8.1f} ms")
    print(
        f"boundary statistics alone:                          {1e3 * t_bnd:8.1f} ms "
        f"({100 * t_bnd / t_pass:.1f} % of the pass)"
    )
    print(
        f"mean entropy alone:                                 {1e3 * t_ent:8.1f} ms "
        f"({100 * t_ent / t_pass:.1f} % of the pass)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
