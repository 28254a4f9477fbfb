"""What the eps memory did: spread, bounds, per-class figures and transition rates, by construction and on a run."""
import numpy as np
import pandas as pd
import pytest

from dashboard import charts
from dpaat_core.store import runs
from dpaat_core.config import RunConfig, method_config
from dpaat_core.evaluate.eps_dynamics import eps_bounds, per_class, run_memory, spread, transition_rates
from dpaat_core.train.loop import train


def test_spread_counts_the_samples_pinned_at_each_bound():
    eps = np.array([0.075] * 3 + [0.6] * 2 + [0.3] * 5, dtype=np.float32)    # float32, as the memory stores them
    s = spread(eps, 0.075, 0.6)
    assert s["n"] == 10 and s["at_min"] == pytest.approx(0.3) and s["at_max"] == pytest.approx(0.2)
    assert s["q50"] == pytest.approx(0.3) and s["q05"] == pytest.approx(0.075) and s["q95"] == pytest.approx(0.6)
    assert s["mean"] == pytest.approx(np.mean(eps.astype(np.float64)))
    assert spread(np.array([0.0751, 0.599]), 0.075, 0.6)["at_min"] == 0                      # near is not at
    assert spread(np.array([np.nan]), 0.075, 0.6) == {"n": 0}


def test_per_class_splits_by_label():
    dyn = {"label": np.array([0, 0, 1, 1, 1]), "eps": np.array([0.075, 0.075, 0.6, 0.3, 0.3]),
           "fragile": np.array([True, True, False, True, False])}
    table = per_class(dyn, ["rare", "common", "absent"], 0.075, 0.6).set_index("class")
    assert table.loc["rare", "n"] == 2 and table.loc["rare", "at_min"] == 1 and table.loc["rare", "fragile_fraction"] == 1
    assert table.loc["common", "eps_mean"] == pytest.approx(0.4) and table.loc["common", "at_max"] == pytest.approx(1 / 3)
    assert table.loc["absent", "n"] == 0 and np.isnan(table.loc["absent", "eps_mean"])


def test_transition_rates_are_conditional_probabilities():
    metrics = pd.DataFrame({"epoch": [1, 2], "fragile_fraction": [0.5, 0.4],
                            "transitions.fragile_to_fragile": [0, 30], "transitions.fragile_to_stable": [0, 10],
                            "transitions.stable_to_fragile": [0, 15], "transitions.stable_to_stable": [0, 45]})
    rates = transition_rates(metrics)
    assert list(rates["epoch"]) == [2]
    assert rates["stay_fragile"].iloc[0] == pytest.approx(0.75) and rates["become_fragile"].iloc[0] == pytest.approx(0.25)
    assert transition_rates(pd.DataFrame({"epoch": [1]})).empty


def test_a_dpaat_run_memory_moves_each_sample_by_its_split(tmp_path):
    cfg = RunConfig().replace(data={"spec": "synthetic:n=48,classes=3", "image_size": 16}, attack={"steps": 2},
                              method=method_config("dpaat", gamma=0.5),
                              train={"epochs": 3, "batch_size": 16, "device": "cpu", "early_stop": "none"})
    run = train(cfg, store=tmp_path, run_id="d")
    m = run_memory(run)
    eps0, lo, hi = eps_bounds(runs.read_record(run).config)
    assert (eps0, lo, hi) == (pytest.approx(0.3), pytest.approx(0.075), pytest.approx(0.6))
    assert list(m["by_epoch"]["epoch"]) == [1, 2, 3] and len(m["transitions"]) == 2
    first = m["by_epoch"].iloc[0]
    assert first["q05"] == pytest.approx(0.3) and first["q95"] == pytest.approx(0.3)            # everyone starts at eps0
    second = runs.load_dynamics(run, 2)["eps"].astype(np.float64)
    assert np.all(np.isclose(second, 0.15, rtol=1e-5) | np.isclose(second, 0.45, rtol=1e-5))   # 0.3 * (1 -/+ 0.5)
    best = runs.load_dynamics(run, m["best_epoch"])
    assert m["spread"] == spread(best["eps"], lo, hi)
    assert m["per_class"]["n"].sum() == len(best["eps"]) == len(runs.load_dynamics(run, 1)["index"])


def test_the_memory_charts_draw_one_group_per_run():
    by_epoch = pd.DataFrame({"run": ["a"] * 3 + ["b"] * 3, "epoch": [1, 2, 3] * 2, "q05": 0.1, "q25": 0.2, "q50": 0.3,
                             "q75": 0.4, "q95": 0.5})
    fig = charts.eps_spread_chart(by_epoch, 0.075, 0.6)
    assert [t.name for t in fig.data if t.showlegend is not False] == ["a", "b"] and len(fig.data) == 6
    rates = pd.DataFrame({"run": ["a", "a"], "epoch": [2, 3], "stay_fragile": [0.5, 0.6], "become_fragile": [0.4, 0.4]})
    fig = charts.transition_rate_chart(rates)
    assert [t.name for t in fig.data] == ["a: fragile → fragile", "a: stable → fragile"]
    assert list(fig.data[0].y) == [0.5, 0.6]
    frame = pd.DataFrame({"class": ["x", "y", "x"], "run": ["a", "a", "b"], "eps_mean": [0.1, 0.4, 0.12],
                          "n": [10, 90, 10], "pgd20": [0.2, 0.8, 0.3]})
    fig = charts.class_eps_chart(frame)
    assert [t.name for t in fig.data] == ["x (n=10)", "y (n=90)"] and list(fig.data[0].y) == [20, 30]
    for chart, empty in ((charts.eps_spread_chart, by_epoch.drop(columns="q50")),
                         (charts.transition_rate_chart, rates.iloc[:0]), (charts.class_eps_chart, frame.drop(columns="n"))):
        assert chart(empty).layout.annotations[0].text == charts.NO_DATA
