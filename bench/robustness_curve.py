"""The robustness curve over 8 eps values: the fast path vs the naive per-eps loop.

The naive loop attacks every sample at every eps; the fast path attacks only samples still
robust at the previous eps (and skips eps 0), packed into full batches. The two curves must be
equal (checked here); the time ratio is printed (target >= 3x). The raw per-eps PGD curve is
compared with the monotone one, to show how often a larger eps fails where a smaller one won.

    python bench/robustness_curve.py                        # a run from the store, its test split
    python bench/robustness_curve.py --run checkpoints/<run_id> --max-samples 256
"""
from __future__ import annotations

import argparse
import sys
import time


import pandas as pd

from dpaat_core.store import loading, runs
from dpaat_core.evaluate.robustness import robustness_curve


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", help="run folder (default: the newest done run in --store)")
    p.add_argument("--store", default="checkpoints")
    p.add_argument("--max-samples", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--norm", default="l2")
    p.add_argument("--grid", default="0,0.1,0.2,0.3,0.45,0.6,0.9,1.2")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    run = args.run or next((r.path for r in runs.list_runs(args.store) if r.state == "done" and r.has_weights), None)
    if run is None:
        sys.exit(f"no finished run in {args.store}; pass --run")
    model = loading.load_model(run, device=args.device)
    ds = loading.load_run_data(run, "test", max_samples=args.max_samples)
    grid = [float(e) for e in args.grid.split(",")]
    kw = dict(attack="pgd", norm=args.norm, steps=args.steps, device=args.device)
    t = time.perf_counter()
    naive = robustness_curve(model, ds, grid, fast=False, **kw)
    t_naive = time.perf_counter() - t
    t = time.perf_counter()
    fast = robustness_curve(model, ds, grid, fast=True, **kw)
    t_fast = time.perf_counter() - t
    raw = robustness_curve(model, ds, grid, monotone=False, **kw)
    pd.testing.assert_frame_equal(fast, naive)
    print(f"{run}\n{len(ds)} test images, PGD-{args.steps} {args.norm}, {len(grid)} eps values, {args.device}")
    print(pd.DataFrame({"eps": fast.eps, "accuracy (worst case up to eps)": fast.accuracy,
                        "accuracy (each eps alone)": raw.accuracy}).to_string(index=False, float_format="%.4f"))
    print(f"naive {t_naive:.1f} s, fast {t_fast:.1f} s: {t_naive / t_fast:.2f}x faster "
          f"(target >= 3x: {'met' if t_naive / t_fast >= 3 else 'MISSED'}); curves equal")
    gap = (raw.accuracy - fast.accuracy).max()
    print(f"largest gap between the raw per-eps curve and the worst-case curve: {gap:.4f}")


if __name__ == "__main__":
    main()
