"""The reproduction study's numbers: one row per trained run, summarised as mean ± std over seeds,
with DPAAT-minus-baseline differences paired by seed, beside the paper's figures.

The rows are what ``bench/study.py collect`` writes (``bench/results/study.csv``); a copy lives in
the run store as ``reproduction.csv`` so the dashboard's Runs page shows the same table.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from dpaat_core.errors import RunError
from dpaat_core.store.tables import read_table

REPRODUCTION_FILE = "reproduction.csv"
#: (column, label) of the headline metrics, in the order tables show them.
METRICS = (("clean_accuracy", "clean"), ("balanced_accuracy", "balanced"), ("mAP", "mAP"),
           ("pgd20", "PGD-20"), ("ifgsm", "I-FGSM"), ("apgd", "APGD (worst case)"))
REQUIRED = ("study", "variant", "seed", *(m for m, _ in METRICS))
#: the paper's ResNet34 figures on HAM10000 (224 px, l2 eps 0.3), robust accuracy under PGD-20, in percent.
PAPER = {"dpaat": {"pgd20": 65.46}, "pgd_at": {"pgd20": 63.14}}


def read_results(path) -> pd.DataFrame:
    """The per-run rows of a study (``study.csv`` or the store's ``reproduction.csv``), checked."""
    frame = read_table(path, REQUIRED, missing_ok=False)
    values = frame[[m for m, _ in METRICS]].apply(pd.to_numeric, errors="coerce")
    if not ((values >= 0) & (values <= 1)).all().all():
        raise RunError(f"{Path(path)}: metric values must be numbers in [0, 1]")
    return frame


def summarize(frame: pd.DataFrame, by=("study", "variant"), metrics=None) -> pd.DataFrame:
    """Mean, std (ddof 1; NaN for one seed) and seed count of each metric per group, in percent."""
    metrics = [m for m, _ in METRICS] if metrics is None else list(metrics)
    grouped = frame.groupby(list(by), sort=False)
    out = grouped[metrics].agg(["mean", "std"]) * 100
    out.columns = [f"{m}_{stat}" for m, stat in out.columns]
    out["seeds"] = grouped["seed"].nunique()
    return out.reset_index()


def format_table(summary: pd.DataFrame, by=("study", "variant"), metrics=METRICS, paper: bool = True) -> pd.DataFrame:
    """``mean ± std`` strings (percent, one decimal; a lone seed shows its value), with the paper's PGD-20."""
    out = summary[list(by) + ["seeds"]].copy()
    for m, label in metrics:
        mean, std = summary[f"{m}_mean"], summary[f"{m}_std"]
        out[label] = [f"{a:.1f}" if not np.isfinite(s) else f"{a:.1f} ± {s:.1f}" for a, s in zip(mean, std)]
    if paper:
        method = summary["method"] if "method" in summary else summary[by[-1]]
        out["paper PGD-20 (ResNet34, 224 px)"] = [f"{PAPER[v]['pgd20']:.2f}" if v in PAPER else "" for v in method]
    return out


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub markdown table (floats to 3 decimals); ``(no runs yet)`` for an empty frame."""
    if not len(frame):
        return "(no runs yet)"
    cell = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def paired_difference(frame: pd.DataFrame, a: str, b: str, metric: str, study: str) -> dict:
    """``a`` minus ``b`` on ``metric`` (percent points), paired by seed: mean, std, n and a 95% t interval."""
    from scipy import stats

    part = frame[frame["study"] == study]
    pa = part[part["variant"] == a].set_index("seed")[metric]
    pb = part[part["variant"] == b].set_index("seed")[metric]
    seeds = sorted(set(pa.index) & set(pb.index))
    d = (pa.loc[seeds] - pb.loc[seeds]).to_numpy(dtype=float) * 100
    n = len(d)
    if n == 0:
        return {"mean": math.nan, "std": math.nan, "n": 0, "ci_low": math.nan, "ci_high": math.nan}
    mean = float(d.mean())
    std = float(d.std(ddof=1)) if n > 1 else math.nan
    half = float(stats.t.ppf(0.975, n - 1) * std / math.sqrt(n)) if n > 1 else math.nan
    return {"mean": mean, "std": std, "n": n, "ci_low": mean - half, "ci_high": mean + half}


def class_bootstrap(per_image: pd.DataFrame, runs_a, runs_b=None, classes=None, n_boot: int = 2000,
                    seed: int = 0, column: str = "robust") -> pd.DataFrame:
    """Each class's accuracy (``column``: ``robust`` or ``correct_clean``) of the runs ``runs_a``, or its difference
    from ``runs_b``, with a 95% bootstrap interval over images and seeds, in percent.

    ``per_image``: one row per run and image (``run``, ``split``, ``index``, ``label``, ``robust``,
    ``correct_clean``: what ``bench/study.py`` keeps). With ``runs_b`` the two lists pair by position (seed) and
    the images pair too: each draw resamples the seeds, and within each class its images, once for both. One row
    per class (and ``balanced``: the mean over classes): ``n`` images, ``mean``, ``ci_low``, ``ci_high``.
    """
    rng = np.random.default_rng(seed)
    runs_a = list(runs_a)
    runs_b = list(runs_b) if runs_b is not None else None
    every = runs_a + (runs_b or [])
    part = per_image[per_image["run"].isin(every)]
    wide = part.pivot_table(index=["split", "index"], columns="run", values=column, aggfunc="first")
    labels = part.drop_duplicates(["split", "index"]).set_index(["split", "index"])["label"].reindex(wide.index)
    wide = wide.dropna()
    labels = labels.loc[wide.index].to_numpy()
    a = wide[runs_a].to_numpy(dtype=float).T                       # [seeds, images]
    b = wide[runs_b].to_numpy(dtype=float).T if runs_b else None
    k = int(labels.max()) + 1 if classes is None else len(classes)
    names = list(classes) if classes is not None else [str(c) for c in range(k)]
    members = [np.flatnonzero(labels == c) for c in range(k)]
    present = [c for c in range(k) if len(members[c])]

    def stat(seeds, picks):
        per = []
        for c in range(k):
            if not len(members[c]):
                per.append(np.nan)
                continue
            idx = picks[c]
            va = a[seeds][:, idx].mean()
            per.append((va - b[seeds][:, idx].mean()) if b is not None else va)
        per = np.asarray(per) * 100
        return np.append(per, np.nanmean(per))

    n_seeds = len(runs_a)
    point = stat(np.arange(n_seeds), members)
    draws = np.empty((n_boot, k + 1))
    for i in range(n_boot):
        seeds = rng.integers(0, n_seeds, n_seeds)
        picks = [rng.choice(m, len(m)) if len(m) else m for m in members]
        draws[i] = stat(seeds, picks)
    low, high = np.nanpercentile(draws, [2.5, 97.5], axis=0)
    out = pd.DataFrame({"class": names + ["balanced"], "n": [len(m) for m in members] + [len(labels)],
                        "mean": point, "ci_low": low, "ci_high": high})
    return out[[c in present for c in range(k)] + [True]].reset_index(drop=True)
