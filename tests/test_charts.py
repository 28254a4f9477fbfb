"""The dashboard's chart builders: figures hold the right numbers, for hand-made frames and a real tiny run."""
from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from dashboard import charts
from dpaat_core.store import runs

CLASSES = ["nevus", "melanoma", "vascular"]


def has_no_data(fig: go.Figure) -> bool:
    return any(a.text == charts.NO_DATA for a in fig.layout.annotations)


def dyn_dict(delta_loss, fragile, eps=None, index=None, label=None) -> dict:
    n = len(delta_loss)
    return {"index": np.arange(n) if index is None else np.asarray(index),
            "label": np.arange(n) % 3 if label is None else np.asarray(label),
            "delta_loss": np.asarray(delta_loss, dtype=np.float32),
            "eps": np.full(n, 0.3, np.float32) if eps is None else np.asarray(eps, dtype=np.float32),
            "fragile": np.asarray(fragile, dtype=bool), "correct_clean": np.ones(n, bool),
            "correct_adv": np.zeros(n, bool)}


def metrics_frame() -> pd.DataFrame:
    return pd.DataFrame({
        "epoch": [1, 2, 3], "fragile_fraction": [0.5, 0.25, np.nan],
        "fragile_fraction_per_class.nevus": [0.6, 0.3, 0.1], "fragile_fraction_per_class.melanoma": [0.4, 0.2, 0.0],
        "val_accuracy": [0.5, 0.7, 0.6], "val_balanced_accuracy": [0.4, 0.6, 0.55],
        "val_robust_accuracy": [0.1, 0.2, np.nan], "is_best": [True, True, False],
        "transitions.fragile_to_stable": [0, 5, 2], "transitions.stable_to_fragile": [0, 1, 3],
        "transitions.fragile_to_fragile": [0, 4, 4], "transitions.stable_to_stable": [0, 10, 11]})


def test_module_does_not_import_streamlit():
    tree = ast.parse(Path(charts.__file__).read_text(encoding="utf-8"))
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not any(str(m).startswith("streamlit") for m in imported)


def test_dynamics_frame_names_classes_and_splits():
    frame = charts.dynamics_frame(dyn_dict([0.1, 0.9, 0.2, 0.5], [False, True, False, True], label=[0, 1, 2, 7]),
                                  CLASSES)
    assert frame["class"].tolist() == ["nevus", "melanoma", "vascular", "7"]  # an unnamed label keeps its number
    assert frame["split"].tolist() == ["stable", "fragile", "stable", "fragile"]
    assert len(charts.dynamics_frame({}, CLASSES)) == 0


def test_histogram_traces_hold_each_split_and_threshold_line():
    delta_loss = [0.01, 0.5, 0.02, 0.7, 0.3, -0.1]
    fragile = [False, True, False, True, True, False]
    fig = charts.delta_loss_histogram(charts.dynamics_frame(dyn_dict(delta_loss, fragile), CLASSES), 0.123, epoch=4)
    traces = {t.name: t for t in fig.data}
    assert set(traces) == {"fragile", "stable"}
    np.testing.assert_allclose(sorted(traces["fragile"].x), [0.3, 0.5, 0.7], rtol=1e-6)
    np.testing.assert_allclose(sorted(traces["stable"].x), [-0.1, 0.01, 0.02], rtol=1e-6)
    assert traces["fragile"].marker.color == charts.FRAGILE and fig.layout.barmode == "stack"
    [line] = fig.layout.shapes
    assert line.x0 == line.x1 == pytest.approx(0.123) and line.line.dash == "dash"
    assert any(a.text == "threshold ΔL = 0.123" for a in fig.layout.annotations)
    assert fig.layout.xaxis.title.text == "ΔL = CE(x_adv) − CE(x) (nats)"
    assert fig.layout.yaxis.title.text == "training samples"
    assert "epoch 4" in fig.layout.title.text


def test_histogram_edge_cases_none_threshold_nan_erm_empty():
    frame = charts.dynamics_frame(dyn_dict([0.2, np.nan, 0.4], [True, True, False]), CLASSES)
    fig = charts.delta_loss_histogram(frame, None, epoch=1)
    assert not fig.layout.shapes  # no threshold, no line
    assert {t.name: len(t.x) for t in fig.data} == {"fragile": 1, "stable": 1}  # the NaN sample is left out
    assert not charts.delta_loss_histogram(frame, math.nan, epoch=1).layout.shapes
    erm = charts.dynamics_frame(dyn_dict(np.zeros(5), np.zeros(5, bool), eps=np.zeros(5)), CLASSES)
    fig = charts.delta_loss_histogram(erm, 0.0, epoch=1)
    assert {t.name: len(t.x) for t in fig.data} == {"fragile": 0, "stable": 5} and not has_no_data(fig)
    fig.to_json()
    assert has_no_data(charts.delta_loss_histogram(charts.dynamics_frame({}, CLASSES), 0.1, epoch=1))
    assert has_no_data(charts.delta_loss_histogram(frame.assign(delta_loss=np.nan), 0.1, epoch=1))


def test_fragile_fraction_chart_one_line_per_class_plus_all():
    fig = charts.fragile_fraction_chart(metrics_frame(), ["nevus", "melanoma"])
    assert [t.name for t in fig.data] == ["nevus", "melanoma", "all"]
    assert list(fig.data[0].y) == [0.6, 0.3, 0.1] and list(fig.data[1].y) == [0.4, 0.2, 0.0]
    assert list(fig.data[2].x) == [1, 2, 3] and list(fig.data[2].y)[:2] == [0.5, 0.25] and math.isnan(fig.data[2].y[2])
    assert fig.data[2].line.width == 4 and fig.data[0].line.width is None  # "all" is the thick line
    assert tuple(fig.layout.yaxis.range) == (0, 1.02) and fig.layout.yaxis.title.text == "fragile fraction"
    # classes default to the per-class columns; a class without a column is skipped
    assert [t.name for t in charts.fragile_fraction_chart(metrics_frame()).data] == ["nevus", "melanoma", "all"]
    assert [t.name for t in charts.fragile_fraction_chart(metrics_frame(), ["melanoma", "absent"]).data] == [
        "melanoma", "all"]
    single = charts.fragile_fraction_chart(metrics_frame().iloc[:1])
    assert [list(t.y) for t in single.data] == [[0.6], [0.4], [0.5]]
    assert has_no_data(charts.fragile_fraction_chart(pd.DataFrame({"epoch": pd.Series(dtype="int64")})))


def test_eps_distribution_chart_boxes_per_epoch_and_eps0_line():
    by_epoch = {2: pd.DataFrame({"eps": [0.2, 0.4]}), 1: pd.DataFrame({"eps": [0.3, np.nan, 0.3]})}
    fig = charts.eps_distribution_chart(by_epoch, 0.3)
    [box] = fig.data
    assert list(box.x) == [1, 1, 2, 2] and list(box.y) == [0.3, 0.3, 0.2, 0.4]  # sorted by epoch, NaN left out
    [line] = fig.layout.shapes
    assert line.y0 == line.y1 == 0.3 and line.line.dash == "dash"
    assert fig.layout.yaxis.title.text == "eps (l2, [0,1] pixels)"
    assert has_no_data(charts.eps_distribution_chart({}, 0.3))
    assert not charts.eps_distribution_chart(by_epoch, None).layout.shapes


def test_transitions_chart_stacks_counts_from_epoch_two():
    fig = charts.transitions_chart(metrics_frame())
    traces = {t.name: t for t in fig.data}
    assert list(traces) == ["fragile → stable", "stable → fragile", "fragile → fragile", "stable → stable"]
    assert all(list(t.x) == [2, 3] for t in fig.data)
    assert list(traces["fragile → stable"].y) == [5, 2] and list(traces["stable → stable"].y) == [10, 11]
    assert fig.layout.barmode == "stack" and fig.layout.yaxis.title.text == "training samples"
    assert has_no_data(charts.transitions_chart(metrics_frame().iloc[:1]))  # a single epoch has no transitions


def test_transition_matrix_counts_samples_in_both_epochs_only():
    prev = charts.dynamics_frame(dyn_dict([0] * 5, [True, True, False, False, True], index=[0, 1, 2, 3, 4]), CLASSES)
    cur = charts.dynamics_frame(dyn_dict([0] * 5, [False, True, True, False, True], index=[1, 0, 2, 3, 9]), CLASSES)
    # index 0: fragile->stable, 1: fragile->fragile, 2: stable->fragile, 3: stable->stable; 4 and 9 in one epoch only
    counts = charts.transition_matrix(prev, cur)
    assert counts.loc["fragile"].tolist() == [1, 1] and counts.loc["stable"].tolist() == [1, 1]
    assert list(counts.index) == list(counts.columns) == ["fragile", "stable"]
    prev2 = pd.DataFrame({"index": [0, 1, 2], "fragile": [True, True, True]})  # split derived from 'fragile'
    cur2 = pd.DataFrame({"index": [0, 1, 2], "fragile": [True, False, False]})
    assert charts.transition_matrix(prev2, cur2).to_numpy().tolist() == [[1, 2], [0, 0]]
    fig = charts.transition_heatmap(prev2, cur2, epoch=5)
    assert fig.data[0].z.tolist() == [[1, 2], [0, 0]] and fig.data[0].text.tolist() == [[1, 2], [0, 0]]
    assert fig.layout.xaxis.title.text == "split at epoch 5" and fig.layout.yaxis.title.text == "split at epoch 4"
    empty = charts.transition_matrix(prev2, cur2.assign(index=[7, 8, 9]))
    assert empty.to_numpy().tolist() == [[0, 0], [0, 0]]
    assert has_no_data(charts.transition_heatmap(prev2, cur2.assign(index=[7, 8, 9]), epoch=5))


def test_sample_trajectory_marks_fragile_epochs():
    history = pd.DataFrame({"epoch": [3, 1, 2, 4], "delta_loss": [0.9, 0.1, np.nan, 0.2],
                            "eps": [0.25, 0.3, 0.28, 0.27], "fragile": [True, False, True, None]})
    fig = charts.sample_trajectory_chart(history)
    traces = {t.name: t for t in fig.data}
    assert list(traces["fragile"].x) == [2, 3]  # missing fragile counts as stable
    assert list(traces["stable"].x) == [1, 4]
    assert list(traces["eps"].x) == [1, 2, 3, 4] and list(traces["eps"].y) == [0.3, 0.28, 0.25, 0.27]
    assert traces["eps"].yaxis != traces["ΔL"].yaxis  # two stacked panels
    assert has_no_data(charts.sample_trajectory_chart(history.iloc[:0]))


def robustness_frame() -> pd.DataFrame:
    rows = []
    for run in ("erm", "dpaat"):
        for norm, grid in (("l2", [0.0, 0.5, 1.0]), ("linf", [0.0, 2 / 255, 4 / 255])):
            for attack in ("pgd", "fgsm"):
                for i, eps in enumerate(reversed(grid)):  # unsorted on purpose
                    rows.append({"run": run, "eps": eps, "eps_rms": eps / 10, "attack": attack, "norm": norm,
                                 "steps": 10 if attack == "pgd" else 1, "monotone": True, "n": 8,
                                 "accuracy": 0.2 * i, "split": "test", "data": "d"})
    return pd.DataFrame(rows)


def test_robustness_chart_facets_per_norm_traces_per_run_attack_norm():
    fig = charts.robustness_chart(robustness_frame())
    assert len(fig.data) == 8  # 2 runs x 2 attacks x 2 norms
    names = {(t.name, t.xaxis) for t in fig.data}
    assert names == {(f"{r} · {a}", ax) for r in ("erm", "dpaat") for a in ("PGD-10", "FGSM") for ax in ("x", "x2")}
    assert [a.text for a in fig.layout.annotations] == ["l2 norm", "linf norm"]
    assert fig.layout.xaxis.title.text == "eps (l2, [0,1] pixels)"
    assert fig.layout.xaxis2.title.text == "eps (linf, [0,1] pixels)"
    assert fig.layout.xaxis2.matches is None  # independent x axes
    assert fig.layout.yaxis.title.text == "accuracy" and tuple(fig.layout.yaxis.range) == (0, 1.02)
    erm_pgd_l2 = next(t for t in fig.data if t.name == "erm · PGD-10" and t.xaxis == "x")
    assert list(erm_pgd_l2.x) == [0.0, 0.5, 1.0] and list(erm_pgd_l2.y) == pytest.approx([0.4, 0.2, 0.0])
    assert erm_pgd_l2.line.dash == "solid" and next(t for t in fig.data if "FGSM" in t.name).line.dash == "dot"
    colours = {t.name.split(" · ")[0]: t.line.color for t in fig.data}
    assert colours["erm"] != colours["dpaat"]
    assert sum(t.showlegend for t in fig.data) == 4  # each curve once in the legend
    rms = charts.robustness_chart(robustness_frame(), x="eps_rms")
    assert max(rms.data[0].x) == pytest.approx(0.1) and "RMS" in rms.layout.xaxis.title.text


def test_robustness_chart_single_run_nan_and_empty():
    frame = robustness_frame().query("run == 'erm' and norm == 'l2'").drop(columns="run")
    frame.loc[frame.index[0], "accuracy"] = np.nan
    fig = charts.robustness_chart(frame)
    assert sorted(t.name for t in fig.data) == ["FGSM", "PGD-10"] and "xaxis2" not in fig.layout.to_plotly_json()
    assert len(next(t for t in fig.data if t.name == "PGD-10").x) == 2  # the NaN row is left out
    assert has_no_data(charts.robustness_chart(runs.read_robustness("/nonexistent")))


def test_probability_chart_and_metrics_chart():
    fig = charts.probability_chart(CLASSES, [0.7, 0.2, 0.1], np.array([0.1, 0.8, 0.1]))
    assert [t.name for t in fig.data] == ["clean", "perturbed"] and all(t.orientation == "h" for t in fig.data)
    assert list(fig.data[1].x) == [0.1, 0.8, 0.1] and list(fig.data[1].y) == CLASSES
    assert [t.name for t in charts.probability_chart(CLASSES, [0.7, 0.2, 0.1], None).data] == ["clean"]
    with pytest.raises(ValueError, match="3 classes"):
        charts.probability_chart(CLASSES, [0.5, 0.5], None)
    assert has_no_data(charts.probability_chart([], [], []))

    fig = charts.metrics_chart(metrics_frame())
    assert [t.name for t in fig.data] == ["accuracy", "balanced accuracy", "robust accuracy"]
    assert list(fig.data[0].y) == [0.5, 0.7, 0.6]
    [best] = fig.layout.shapes
    assert best.x0 == 2  # the latest epoch marked is_best
    assert any(a.text == "best epoch 2" for a in fig.layout.annotations)
    assert not charts.metrics_chart(metrics_frame().drop(columns="is_best")).layout.shapes
    assert has_no_data(charts.metrics_chart(pd.DataFrame({"epoch": pd.Series(dtype="int64")})))


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    from dpaat_core.__main__ import main
    from dpaat_core.config import RunConfig, method_config
    from dpaat_core.train.loop import train

    cfg = RunConfig().replace(data={"spec": "synthetic:n=48,classes=3", "image_size": 16}, attack={"steps": 1},
                              method=method_config("dpaat"), train={"epochs": 3, "batch_size": 16, "device": "cpu"})
    run = train(cfg, store=tmp_path_factory.mktemp("store"), run_id="r")
    main(["evaluate", str(run), "--steps", "1", "--eps-grid", "0,0.5,1", "--device", "cpu"])
    return run


def test_charts_on_a_real_run(real_run):
    classes = runs.read_config(real_run)["dataset"]["classes"]
    metrics = runs.read_metrics(real_run)
    frames = {e: charts.dynamics_frame(runs.load_dynamics(real_run, e), classes) for e in runs.dynamics_epochs(real_run)}
    dyn = frames[2]
    threshold = float(metrics.loc[metrics["epoch"] == 2, "threshold_mean"].iloc[0])
    hist = charts.delta_loss_histogram(dyn, threshold, epoch=2)
    counts = {t.name: len(t.x) for t in hist.data}
    assert counts == {"fragile": int(dyn["fragile"].sum()), "stable": int((~dyn["fragile"]).sum())}
    assert sum(counts.values()) == 48 and hist.layout.shapes[0].x0 == pytest.approx(threshold)

    fractions = charts.fragile_fraction_chart(metrics, classes)
    assert [t.name for t in fractions.data] == [*classes, "all"]
    assert list(fractions.data[-1].y) == metrics["fragile_fraction"].tolist()

    transitions = charts.transitions_chart(metrics)
    matrix = charts.transition_matrix(frames[2], frames[3])
    f2s = next(t for t in transitions.data if t.name == "fragile → stable")
    assert list(f2s.x) == [2, 3] and f2s.y[-1] == matrix.loc["fragile", "stable"]  # the trainer's count agrees
    assert matrix.to_numpy().sum() == 48

    eps = charts.eps_distribution_chart(frames, runs.read_config(real_run)["attack"]["eps"])
    assert len(eps.data[0].y) == 48 * len(frames)
    history = pd.concat([f.loc[f["index"] == 5].assign(epoch=e) for e, f in frames.items()])
    assert len(charts.sample_trajectory_chart(history).data[0].x) == len(frames)
    assert [t.name for t in charts.metrics_chart(metrics).data] == ["accuracy", "balanced accuracy", "robust accuracy"]

    curves = runs.read_robustness(real_run)
    fig = charts.robustness_chart(pd.concat([curves.assign(run="a"), curves.assign(run="b")]))
    assert sorted(t.name for t in fig.data) == ["a · PGD-1", "b · PGD-1"] and list(fig.data[0].x) == [0, 0.5, 1]
    for figure in (hist, fractions, transitions, eps, fig):
        figure.to_json()  # serialisable, NaNs included


def test_a_fixed_eps_run_is_a_flat_line_with_plain_ticks():
    import numpy as np
    fixed = {e: pd.DataFrame({"eps": np.full(5, 0.3, dtype=np.float32)}) for e in (1, 2, 3)}
    fig = charts.eps_distribution_chart(fixed, 0.3)
    assert len(fig.data) == 1 and fig.data[0].type == "scatter" and list(fig.data[0].y) == [0.3, 0.3, 0.3]
    assert "fixed at 0.3 for every sample" in fig.layout.title.text and fig.layout.yaxis.tickformat == ".3~g"
    moving = {1: pd.DataFrame({"eps": np.float32([0.3, 0.3])}), 2: pd.DataFrame({"eps": np.float32([0.27, 0.33])})}
    assert charts.eps_distribution_chart(moving, 0.3).data[0].type == "box"
