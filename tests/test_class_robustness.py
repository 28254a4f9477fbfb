"""Robustness class by class: the per-class table from each source holds the hand-computed numbers, the weakest class
is the one a clinician should hear about, and the figure draws robust inside clean with each class's count."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from dpaat_core.evaluate import class_robustness as by_class
from dpaat_core.evaluate.robustness import accuracy_row
from dpaat_core.plots import per_class_chart

CLASSES = ["nv", "mel", "df"]


def _outcomes() -> pd.DataFrame:
    # nv: 3 images, 2 right, 1 of them survives (the third "survives" but was wrong on the clean image: not robust)
    # mel: 2 images, 1 right and robust; df: 1 image, right, taken by the attack
    return by_class.from_outcomes(labels=[0, 0, 0, 1, 1, 2], correct=[1, 1, 0, 1, 0, 1], robust=[1, 0, 1, 1, 0, 0],
                                  classes=CLASSES)


def test_per_class_from_each_images_outcome_by_hand():
    table = _outcomes()
    assert list(table.columns) == by_class.COLUMNS and list(table["class"]) == CLASSES
    assert list(table.n) == [3, 2, 1]
    np.testing.assert_allclose(table.accuracy, [2 / 3, 1 / 2, 1])
    np.testing.assert_allclose(table.robust_accuracy, [1 / 3, 1 / 2, 0])
    assert by_class.balanced(table) == pytest.approx((1 / 3 + 1 / 2 + 0) / 3)          # robust balanced accuracy
    assert by_class.balanced(table, "accuracy") == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)


def test_the_weakest_class_is_set_against_the_most_common_one():
    table = _outcomes()
    assert by_class.weakest(table) == {"class": "df", "robust": 0.0, "ties": 0, "against": "nv",
                                       "against_robust": pytest.approx(1 / 3)}
    assert by_class.weakest_sentence("run X", table) == "run X: robust accuracy 0.00 on df against 0.33 on nv"
    # the most common class is the weakest: set against the most robust other class
    common_weak = table.assign(robust_accuracy=[0.1, 0.5, 0.7])
    assert by_class.weakest_sentence("r", common_weak) == "r: robust accuracy 0.10 on nv against 0.70 on df"
    # a tie goes to the rarer class and says how many more are as low; a class without images is left out
    tied = pd.DataFrame({"class": ["nv", "mel", "df", "vasc"], "n": [50, 10, 5, 0], "accuracy": [0.9, 0.5, 0.4, np.nan],
                         "robust_accuracy": [0.6, 0.0, 0.0, np.nan]})
    assert (by_class.weakest_sentence("r", tied)
            == "r: robust accuracy 0.00 on df (and 1 more class as low) against 0.60 on nv")
    assert by_class.weakest_sentence("r", tied.assign(robust_accuracy=0.0)) == "r: robust accuracy 0.00 on every class"
    assert by_class.weakest(tied.iloc[3:]) is None


def _curve(with_counts: bool) -> pd.DataFrame:
    """A saved PGD-20 l2 curve over 6 images (nv 3, mel 2, df 1) at eps 0, 0.3 and 0.6."""
    rows = [{"eps": 0.0, "n": 6, "accuracy:nv": 2 / 3, "accuracy:mel": 0.5, "accuracy:df": 1.0},
            {"eps": 0.3, "n": 6, "accuracy:nv": 1 / 3, "accuracy:mel": 0.5, "accuracy:df": 0.0},
            {"eps": 0.6, "n": 6, "accuracy:nv": 0.0, "accuracy:mel": 0.0, "accuracy:df": 0.0}]
    frame = pd.DataFrame(rows).assign(attack="pgd", norm="l2", steps=20, monotone=True, split="test", data="d")
    return frame.assign(**{"n:nv": 3, "n:mel": 2, "n:df": 1}) if with_counts else frame


def test_per_class_from_a_saved_curve_with_and_without_its_counts():
    table = by_class.from_curve(_curve(True), 0.3000001, CLASSES)          # a grid eps saved to 6 digits still matches
    pd.testing.assert_frame_equal(table, _outcomes().assign(n=[3.0, 2.0, 1.0]))
    assert not len(by_class.from_curve(_curve(True), 0.45, CLASSES))        # no row at this eps: nothing
    old = _curve(False)                                                     # saved before curves kept their counts
    assert by_class.from_curve(old, 0.3, CLASSES).n.isna().all()
    labels = np.array([0, 0, 0, 1, 1, 2])                                   # the whole split: the draw is all of it
    assert list(by_class.from_curve(old, 0.3, CLASSES, labels).n) == [3, 2, 1]
    assert by_class.from_curve(old, 0.3, CLASSES, np.array([0, 0, 1, 1, 2, 2])).n.isna().all()   # numbers do not fit
    drawn = by_class.drawn_counts(np.arange(40) % 3, 3, 12, seed=1)          # --max-samples 12 of 40
    assert drawn.sum() == 12 and len(drawn) == 3


def test_the_audit_comes_first_then_the_curve_then_nothing():
    per_class = pd.DataFrame({"preset": "pgd20_l2", "class_index": [2, 0, 1], "class": ["df", "nv", "mel"],
                              "n": [10, 30, 20], "accuracy": [0.5, 0.9, 0.6], "robust_accuracy": [0.1, 0.7, 0.3],
                              "average_precision": 0.5})
    protocol = pd.DataFrame({"preset": ["pgd20_l2"], "eps": [0.3]})
    table, source = by_class.saved(protocol, per_class, _curve(True), "pgd", "l2", 20, 0.3, CLASSES)
    assert list(table["class"]) == CLASSES and list(table.robust_accuracy) == [0.7, 0.3, 0.1]
    assert source == "the audit (per_class.csv, 60 images)"
    table, source = by_class.saved(protocol, per_class, _curve(True), "pgd", "l2", 20, 0.6, CLASSES)   # not audited
    assert list(table.robust_accuracy) == [0, 0, 0] and source == "the saved curve (robustness.csv, 6 images)"
    assert not len(by_class.saved(protocol, per_class, _curve(True), "ifgsm", "l2", 10, 0.6, CLASSES)[0])
    assert by_class.preset("ifgsm", "linf", 10) == "ifgsm_linf" and by_class.preset("fgsm", "l2", 1) is None


def test_curves_and_corruption_grids_keep_each_classs_count():
    dataset = SimpleNamespace(num_classes=3, classes=CLASSES)
    row = accuracy_row(np.array([0, 0, 0, 1, 1, 2]), np.array([0, 0, 1, 1, -1, -1]), dataset)
    assert {k: row[k] for k in ("n:nv", "n:mel", "n:df")} == {"n:nv": 3, "n:mel": 2, "n:df": 1}
    assert row["accuracy:nv"] == pytest.approx(2 / 3) and row["accuracy:df"] == 0


def test_the_figure_draws_robust_inside_clean_with_each_classs_count():
    two = pd.concat([_outcomes().assign(run="a"), _outcomes().assign(run="<b>b</b>", n=[3, 2, 4])])
    fig = per_class_chart(two)
    assert [t.name for t in fig.data] == ["a · clean", "a · robust", "&lt;b&gt;b&lt;/b&gt; · clean",
                                          "&lt;b&gt;b&lt;/b&gt; · robust"]
    assert list(fig.data[0].x) == ["nv (n=3)", "mel (n=2)", "df (n=1/4)"]        # counts differ: each one
    np.testing.assert_allclose(fig.data[1].y, [1 / 3, 1 / 2, 0])
    np.testing.assert_allclose(fig.data[0].y, [2 / 3, 1 / 2, 1])
    assert fig.data[0].offsetgroup == fig.data[1].offsetgroup != fig.data[2].offsetgroup   # robust sits inside clean
    assert fig.data[1].marker.color == fig.data[0].marker.line.color
    assert math.isclose(fig.layout.yaxis.range[1], 1.02)
    assert per_class_chart(pd.DataFrame()).layout.annotations[0].text == "no data yet"
