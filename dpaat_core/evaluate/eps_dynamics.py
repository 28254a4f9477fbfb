"""What a DPAAT run's epsilon memory did, read from the dynamics its training stored.

Each ``dynamics/epoch_NNN.npz`` holds the eps every training sample was attacked with in that epoch and
whether it was fragile (``runs.load_dynamics``); ``metrics.jsonl`` holds the fragile/stable transition
counts. From those: how far the per-sample eps spread (quantiles, the share of samples pinned at the
memory's lower and upper bounds), whether fragile samples stay fragile, and how the eps differ by class.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from dpaat_core.config import RunConfig
from dpaat_core.store import runs

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
#: a sample is "at a bound" within this relative distance of it (the memory clamps exactly; float32 rounding)
BOUND_RTOL = 1e-4


def eps_bounds(config: RunConfig) -> tuple[float, float, float]:
    """``(eps0, eps_min, eps_max)`` of a trained run's config (``runs.read_record(run_dir).config``)."""
    eps0 = float(config.attack.eps)
    return eps0, eps0 * config.method.eps_min_ratio, eps0 * config.method.eps_max_ratio


def spread(eps, eps_min: float, eps_max: float) -> dict:
    """Mean, quantiles (``q05`` … ``q95``) and the shares at the lower (``at_min``) and upper (``at_max``) bound
    of a 1-D array of per-sample eps."""
    eps = np.asarray(eps, dtype=np.float64)
    eps = eps[np.isfinite(eps)]
    if not len(eps):
        return {"n": 0}
    q = np.quantile(eps, QUANTILES)
    return {"n": len(eps), "mean": float(eps.mean()), **{f"q{round(100 * p):02d}": float(v) for p, v in zip(QUANTILES, q)},
            "at_min": float(np.mean(eps <= eps_min * (1 + BOUND_RTOL))),
            "at_max": float(np.mean(eps >= eps_max * (1 - BOUND_RTOL)))}


def per_class(dyn: dict, classes: list[str], eps_min: float, eps_max: float) -> pd.DataFrame:
    """One row per class of one epoch's dynamics: n, mean and median eps, the shares at each bound and the
    fragile fraction."""
    label, eps, fragile = (np.asarray(dyn[k]) for k in ("label", "eps", "fragile"))
    rows = []
    for k, name in enumerate(classes):
        mine = label == k
        s = spread(eps[mine], eps_min, eps_max)
        rows.append({"class": name, "n": int(mine.sum()), "eps_mean": s.get("mean", np.nan),
                     "eps_median": s.get("q50", np.nan), "at_min": s.get("at_min", np.nan),
                     "at_max": s.get("at_max", np.nan),
                     "fragile_fraction": float(fragile[mine].mean()) if mine.any() else np.nan})
    return pd.DataFrame(rows)


def transition_rates(metrics: pd.DataFrame) -> pd.DataFrame:
    """Per epoch (from the second): the fragile fraction, ``stay_fragile`` = P(fragile now | fragile the epoch
    before) and ``become_fragile`` = P(fragile now | stable before), from the transition counts in
    ``metrics.jsonl``. If fragility were a lasting property of a sample, stay_fragile would sit well above
    become_fragile; equal rates mean the split is redrawn every epoch."""
    cols = [f"transitions.{a}_to_{b}" for a in ("fragile", "stable") for b in ("fragile", "stable")]
    if not len(metrics) or not all(c in metrics for c in cols):
        return pd.DataFrame(columns=["epoch", "fragile_fraction", "stay_fragile", "become_fragile"])
    m = metrics[metrics["epoch"] >= 2]
    ff, fs, sf, ss = (pd.to_numeric(m[c], errors="coerce").to_numpy(dtype=float) for c in cols)
    with np.errstate(invalid="ignore", divide="ignore"):
        return pd.DataFrame({"epoch": m["epoch"].to_numpy(), "fragile_fraction": m["fragile_fraction"].to_numpy(),
                             "stay_fragile": ff / (ff + fs), "become_fragile": sf / (sf + ss)})


def run_memory(run_dir) -> dict:
    """A run's memory at a glance: its bounds, the best epoch, ``spread`` and ``per_class`` at the best epoch,
    ``by_epoch`` (the spread of every epoch, one row each) and ``transitions`` (:func:`transition_rates`)."""
    run_dir = Path(run_dir)
    record, metrics = runs.read_record(run_dir), runs.read_metrics(run_dir)
    if record.imported:
        raise runs.RunError(f"{run_dir}: an imported model has no eps memory")
    eps0, lo, hi = eps_bounds(record.config)
    classes = record.classes
    epochs = runs.dynamics_epochs(run_dir)
    if not epochs:
        raise runs.RunError(f"{run_dir}: no dynamics/epoch_NNN.npz to read")
    best = runs.read_status(run_dir).get("best_epoch") or epochs[-1]
    best = best if best in epochs else epochs[-1]
    by_epoch = pd.DataFrame([{"epoch": e, **spread(runs.load_dynamics(run_dir, e)["eps"], lo, hi)} for e in epochs])
    dyn = runs.load_dynamics(run_dir, best)
    return {"run": run_dir.name, "eps0": eps0, "eps_min": lo, "eps_max": hi, "best_epoch": int(best),
            "epochs": len(epochs), "spread": spread(dyn["eps"], lo, hi),
            "per_class": per_class(dyn, classes, lo, hi), "by_epoch": by_epoch,
            "transitions": transition_rates(metrics)}
