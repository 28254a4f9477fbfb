"""The study's summary: mean ± std over seeds, differences paired by seed, and bad files refused."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from dashboard import charts
from dpaat_core.evaluate import reproduction as rep
from dpaat_core.store.runs import RunError


def _frame():
    rng = np.random.default_rng(0)
    rows = []
    for variant, shift in (("pgd_at", 0.0), ("dpaat", 0.02), ("erm", -0.1)):
        for seed in range(3):
            values = {m: float(np.clip(0.45 + shift + rng.normal(0, 0.01), 0, 1)) for m, _ in rep.METRICS}
            rows.append({"study": "main64", "variant": variant, "seed": seed, **values})
    rows.append({"study": "ablate28", "variant": "dpaat-gamma0.3", "seed": 0, **{m: 0.4 for m, _ in rep.METRICS}})
    return pd.DataFrame(rows)


def test_summary_is_mean_and_sample_std_in_percent():
    frame = _frame()
    summary = rep.summarize(frame).set_index(["study", "variant"])
    part = frame[(frame["study"] == "main64") & (frame["variant"] == "dpaat")]["pgd20"]
    assert summary.loc[("main64", "dpaat"), "pgd20_mean"] == pytest.approx(part.mean() * 100)
    assert summary.loc[("main64", "dpaat"), "pgd20_std"] == pytest.approx(part.std(ddof=1) * 100)
    assert summary.loc[("main64", "dpaat"), "seeds"] == 3
    assert math.isnan(summary.loc[("ablate28", "dpaat-gamma0.3"), "pgd20_std"])


def test_table_shows_spread_the_paper_and_a_lone_seed_plainly():
    table = rep.format_table(rep.summarize(_frame())).set_index("variant")
    assert " ± " in table.loc["dpaat", "PGD-20"]
    assert table.loc["dpaat-gamma0.3", "PGD-20"] == "40.0"
    assert table.loc["dpaat", "paper PGD-20 (ResNet34, 224 px)"] == "65.46"
    assert table.loc["pgd_at", "paper PGD-20 (ResNet34, 224 px)"] == "63.14"
    assert table.loc["erm", "paper PGD-20 (ResNet34, 224 px)"] == ""


def test_paired_difference_matches_a_paired_t_interval():
    frame = _frame()
    d = rep.paired_difference(frame, "dpaat", "pgd_at", "pgd20", "main64")
    a = frame[(frame.variant == "dpaat")].sort_values("seed")["pgd20"].to_numpy() * 100
    b = frame[(frame.variant == "pgd_at")].sort_values("seed")["pgd20"].to_numpy() * 100
    lo, hi = stats.t.interval(0.95, 2, loc=(a - b).mean(), scale=stats.sem(a - b))
    assert d["n"] == 3 and d["mean"] == pytest.approx((a - b).mean())
    assert (d["ci_low"], d["ci_high"]) == pytest.approx((lo, hi))
    assert rep.paired_difference(frame, "dpaat", "nope", "pgd20", "main64")["n"] == 0


def test_bad_results_files_are_refused_by_name(tmp_path):
    good = tmp_path / "good.csv"
    _frame().to_csv(good, index=False)
    assert len(rep.read_results(good)) == 10
    missing = tmp_path / "missing.csv"
    _frame().drop(columns=["apgd"]).to_csv(missing, index=False)
    with pytest.raises(RunError, match="missing columns apgd"):
        rep.read_results(missing)
    wrong = tmp_path / "wrong.csv"
    _frame().assign(pgd20=65.0).to_csv(wrong, index=False)
    with pytest.raises(RunError, match=r"\[0, 1\]"):
        rep.read_results(wrong)
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"\x00\xff" * 50)
    with pytest.raises(RunError, match="binary.csv"):
        rep.read_results(binary)


def test_study_chart_has_one_bar_series_per_metric_with_error_bars():
    summary = rep.summarize(_frame())
    fig = charts.study_chart(summary, rep.METRICS)
    assert [t.name for t in fig.data] == [label for _, label in rep.METRICS]
    assert list(fig.data[3].y) == pytest.approx(summary["pgd20_mean"].tolist())
    assert charts.study_chart(summary.iloc[:0], rep.METRICS).layout.annotations[0].text == charts.NO_DATA


def _per_image(rng, accuracies_by_run, n_per_class=(30, 10, 5)):
    rows = []
    for run, acc in accuracies_by_run.items():
        i = 0
        for c, n in enumerate(n_per_class):
            hits = np.zeros(n, bool)
            hits[: round(acc[c] * n)] = True
            for h in hits:
                rows.append({"run": run, "split": "test", "index": i, "label": c, "robust": bool(h),
                             "correct_clean": True})
                i += 1
    return pd.DataFrame(rows)


def test_class_bootstrap_point_estimates_and_intervals():
    rng = np.random.default_rng(0)
    frame = _per_image(rng, {"a0": (0.5, 0.3, 0.4), "a1": (0.7, 0.5, 0.6), "b0": (0.5, 0.3, 0.4),
                             "b1": (0.5, 0.3, 0.4)})
    one = rep.class_bootstrap(frame, ["a0", "a1"], classes=["x", "y", "z"], n_boot=500).set_index("class")
    assert one.loc["x", "mean"] == pytest.approx(60.0) and one.loc["y", "mean"] == pytest.approx(40.0)
    assert one.loc["balanced", "mean"] == pytest.approx((60 + 40 + 50) / 3)
    assert list(one["n"]) == [30, 10, 5, 45]
    assert (one["ci_low"] <= one["mean"]).all() and (one["mean"] <= one["ci_high"]).all()
    assert one.loc["z", "ci_high"] - one.loc["z", "ci_low"] > one.loc["x", "ci_high"] - one.loc["x", "ci_low"]
    diff = rep.class_bootstrap(frame, ["a0", "a1"], ["b0", "b1"], classes=["x", "y", "z"], n_boot=500)
    diff = diff.set_index("class")
    assert diff.loc["x", "mean"] == pytest.approx(10.0) and diff.loc["z", "mean"] == pytest.approx(10.0)
    same = rep.class_bootstrap(frame, ["b0", "b1"], ["b1", "b0"], classes=["x", "y", "z"], n_boot=200)
    assert (same["mean"] == 0).all() and (same["ci_low"] == 0).all() and (same["ci_high"] == 0).all()
