"""Robustness evaluation: robust <= clean, monotone curves, the fast curve equals the naive one,
the evaluate command and robustness.csv.

``trained`` trains and loads its model on ``$DPAAT_TEST_DEVICE`` (see conftest.py); the tests marked
``device`` run the model there (the evaluation functions work on the model's device).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from dpaat_core.store import loading, runs
from dpaat_core.__main__ import main
from dpaat_core.config import RunConfig, method_config
from dpaat_core.data import load_dataset
from dpaat_core.attack.attacks import perturb
from dpaat_core.evaluate.robustness import average_precision, eps_rms, evaluate, protocol, robustness_curve
from dpaat_core.train.validation import roc_auc
from dpaat_core.models import build_model
from dpaat_core.train.loop import train
from conftest import TEST_DEVICE, TRAIN_COMPILE, on_device

GRID = [0, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A resnet8 trained briefly on the synthetic set (a run in a temporary store), on TEST_DEVICE, and its test split."""
    cfg = RunConfig().replace(data={"spec": "synthetic:n=96,classes=3", "image_size": 16}, attack={"steps": 2},
                              method=method_config("erm"), train={"epochs": 3, "batch_size": 16, "lr": 3e-3,
                                                                  "device": TEST_DEVICE.type, "compile": TRAIN_COMPILE})
    run = train(cfg, store=tmp_path_factory.mktemp("store"), run_id="erm")
    return run, loading.load_model(run, device=TEST_DEVICE), loading.load_run_data(run, "test")


@pytest.mark.device
def test_evaluate_reports_clean_and_robust_metrics(trained):
    _, model, ds = trained
    ev = evaluate(model, ds, attack="pgd", norm="l2", eps=0.5, steps=5)
    s = ev.samples
    assert ev.robust_accuracy <= ev.accuracy and ev.robust_balanced_accuracy <= ev.balanced_accuracy + 1e-12
    assert ev.accuracy == pytest.approx(s.correct_clean.mean()) and ev.robust_accuracy == pytest.approx(s.robust.mean())
    assert ((s.margin_clean > 0) == s.correct_clean).all()          # the margin's sign is correctness
    assert (s.robust <= s.correct_clean).all()
    assert list(ev.per_class["class"]) == ds.classes and ev.per_class["n"].sum() == len(ds)
    assert ev.settings["eps_rms"] == pytest.approx(0.5 / np.sqrt(3 * 16 * 16))
    with torch.no_grad():
        assert ev.accuracy == pytest.approx((model(on_device(ds.images.float() / 255)).argmax(1).cpu() == ds.labels)
                                            .float().mean().item())
    assert evaluate(model, ds, eps=0.0, steps=3).robust_accuracy == pytest.approx(ev.accuracy)
    strong = evaluate(model, ds, attack="pgd", norm="linf", eps=0.5, steps=10)
    assert strong.robust_accuracy < ev.accuracy                       # a large linf ball breaks it


def test_average_precision_against_a_hand_computed_case():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    positive = np.array([True, False, True, False, True])
    assert average_precision(scores, positive) == pytest.approx((1 / 1 + 2 / 3 + 3 / 5) / 3)
    assert np.isnan(average_precision(scores, np.zeros(5, bool)))


def test_roc_auc_is_the_share_of_correctly_ordered_pairs():
    rng = np.random.default_rng(0)
    scores = np.round(rng.random(40), 1)          # rounded: ties, which count half
    positive = rng.random(40) < 0.3
    pos, neg = scores[positive], scores[~positive]
    pairs = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    assert roc_auc(scores, positive) == pytest.approx(pairs)
    assert roc_auc(np.arange(4.0), np.array([False, False, True, True])) == 1.0
    assert np.isnan(roc_auc(scores, np.zeros(40, bool))) and np.isnan(roc_auc(scores, np.ones(40, bool)))


def test_evaluation_reports_macro_auc_over_the_classes(trained):
    _, model, ds = trained
    ev = evaluate(model, ds, eps=0.1, steps=2)
    assert ev.auc == pytest.approx(ev.per_class["auc"].mean()) and 0 <= ev.auc <= 1
    assert ev.summary()["auc"] == ev.auc


@pytest.mark.parametrize("attack, norm", [("pgd", "l2"), ("ifgsm", "linf"), ("fgsm", "l2")])
@pytest.mark.device
def test_fast_curve_equals_attacking_every_sample_at_every_eps(trained, attack, norm):
    _, model, ds = trained
    grid = GRID if norm == "l2" else [e / 8 for e in GRID]
    for monotone in (True, False):
        fast = robustness_curve(model, ds, grid, attack, norm, steps=4, monotone=monotone, batch_size=7)
        naive = robustness_curve(model, ds, grid, attack, norm, steps=4, monotone=monotone, fast=False, batch_size=32)
        pd.testing.assert_frame_equal(fast, naive)
    assert list(fast.eps) == sorted(grid) and fast.accuracy.iloc[0] == pytest.approx(evaluate(model, ds, eps=0, steps=1).accuracy)


@pytest.mark.device
def test_curve_is_monotone_and_ends_low(trained):
    _, model, ds = trained
    curve = robustness_curve(model, ds, list(reversed(GRID)), "pgd", "l2", steps=5)
    assert (np.diff(curve.accuracy) <= 0).all() and (np.diff(curve.balanced_accuracy) <= 1e-12).all()
    assert curve.accuracy.iloc[-1] < curve.accuracy.iloc[0]
    assert curve.eps_rms.tolist() == pytest.approx([eps_rms(e, "l2", (3, 16, 16)) for e in sorted(GRID)])
    assert {f"accuracy:{c}" for c in ds.classes} <= set(curve.columns)
    raw = robustness_curve(model, ds, GRID, "pgd", "l2", steps=5, monotone=False)
    assert (raw.accuracy >= curve.accuracy - 1e-12).all()             # the worst case is never above a single attack


def test_bad_attack_settings_are_refused(trained):
    _, model, ds = trained
    for kwargs, says in ((dict(attack="cw"), "attack must be one of"), (dict(norm="l1"), "norm must be one of"),
                         (dict(eps_grid=[0.1, -1]), "eps values"), (dict(eps_grid=[float("nan")]), "eps values"),
                         (dict(steps=0), "steps must be")):
        args = dict(eps_grid=[0.1], attack="pgd", norm="l2", steps=2) | kwargs
        with pytest.raises(ValueError, match=says):
            robustness_curve(model, ds, **args)


@pytest.mark.device
def test_evaluate_command_writes_and_merges_robustness_csv(trained, capsys):
    run, _, ds = trained
    argv = ["evaluate", str(run), "--steps", "2", "--eps-grid", "0,0.5,1", "--device", TEST_DEVICE.type]
    assert main(argv + ["--attack", "pgd,ifgsm"]) == 0
    out = capsys.readouterr().out
    assert "worst case over the grid" in out and "ifgsm" in out and "pgd" in out
    first = runs.read_robustness(run)
    assert len(first) == 6 and set(first.attack) == {"pgd", "ifgsm"} and (first.split == "test").all()
    assert main(argv + ["--norm", "linf", "--eps-grid", "0,0.01"]) == 0   # another curve is added ...
    assert main(argv + ["--attack", "pgd"]) == 0                          # ... the same curve replaced
    merged = runs.read_robustness(run)
    assert len(merged) == 6 + 2 and (merged.groupby(["attack", "norm"]).size().to_dict()
                                      == {("ifgsm", "l2"): 3, ("pgd", "l2"): 3, ("pgd", "linf"): 2})
    assert not list(run.glob(".*.tmp"))


@pytest.mark.parametrize("extra, says", [(["--eps-grid", "0,-1"], "must be >= 0"), (["--steps", "0"], "--steps"),
                                         (["--attack", "cw"], "choose from"), (["--data", "mnist:x"], "unknown data source")])
def test_evaluate_command_refuses_bad_input_with_one_line(trained, capsys, extra, says):
    run, _, _ = trained
    try:
        code = main(["evaluate", str(run), *extra])
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and says in err and len(err.splitlines()) == 1


def test_evaluating_on_data_of_another_shape_is_refused(trained, capsys):
    run, _, _ = trained
    assert main(["evaluate", str(run), "--data", "synthetic:n=16,classes=5", "--steps", "1"]) == 2
    assert "5 classes" in capsys.readouterr().err


@pytest.mark.device
def test_protocol_runs_the_papers_presets(trained, capsys):
    run, model, ds = trained
    table = protocol(model, ds, {"l2": 0.5, "linf": 0.02}, presets=("pgd20_l2", "ifgsm_linf"))
    assert list(table.preset) == ["pgd20_l2", "ifgsm_linf"] and list(table.steps) == [20, 10]
    assert list(table.eps) == [0.5, 0.02] and (table.robust_accuracy <= table.accuracy).all()
    single = evaluate(model, ds, "ifgsm", "linf", 0.02, 10)
    assert table.robust_accuracy.iloc[1] == pytest.approx(single.robust_accuracy)
    with pytest.raises(ValueError, match="unknown preset"):
        protocol(model, ds, presets=("pgd7",))
    assert main(["evaluate", str(run), "--steps", "1", "--eps-grid", "0,0.1", "--protocol", "--max-samples", "8"]) == 0
    assert "the paper's protocol" in capsys.readouterr().out
    saved = pd.read_csv(run / "protocol.csv")
    assert list(saved.preset) == ["ifgsm_l2", "ifgsm_linf", "pgd20_l2", "pgd20_linf"]     # merged, in key order
    assert (saved.split == "test").all() and (saved.data == runs.read_config(run)["data"]["spec"]).all()
    assert saved.eps.iloc[2] == pytest.approx(0.3) and saved.n.iloc[2] == 8


@pytest.mark.device
def test_curve_reports_its_progress(trained):
    _, model, ds = trained
    seen = []
    robustness_curve(model, ds, [0, 0.5, 1.0], steps=1, batch_size=8, callback=lambda done, total: seen.append((done, total)))
    assert seen and all(0 < d <= t for d, t in seen) and seen[-1][0] == seen[-1][1]
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_the_curves_progress_bar_has_one_total_from_start_to_end(trained, capsys):
    """What the dashboard reads from the log: "k/N" with the same N throughout, ending at N."""
    import re
    _, model, ds = trained
    robustness_curve(model, ds, [0, 0.3, 1.0, 3.0], steps=1, batch_size=4, progress=True)
    counts = [(int(a), int(b)) for a, b in re.findall(r"(\d+)/(\d+) \[", capsys.readouterr().err)]
    assert counts and len({total for _, total in counts}) == 1 and counts[-1][0] == counts[-1][1] > 0


@pytest.mark.device
def test_perturb_uses_the_protocol_settings(trained):
    from dpaat_core.attack.attacks import pgd
    _, model, ds = trained
    x, y = on_device(ds.images[:4].float() / 255, ds.labels[:4])
    x_adv = perturb(model, x, y, "pgd", "l2", 0.5, steps=3)
    ref = pgd(model, x, y, 0.5, 0.125, 3, "l2", generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x_adv, ref)
    assert torch.equal(perturb(model, x, y, "ifgsm", "linf", 0.0), x)
