"""The study's summary: mean ± std over seeds, differences paired by seed, and bad files refused."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from dashboard import charts
from dpaat_core import reproduction as rep
from dpaat_core.runs import RunError


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
