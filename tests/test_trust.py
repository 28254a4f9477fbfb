"""The trust line beside every map: a model's balanced accuracy and its maps' localisation against chance, with a
plain warning when either is weak."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dpaat_core.store import runs
from dpaat_core.store.record import parse_record
from dpaat_core.evaluate import trust


def _numbers(on_lesion, chance, n=200, seed=0, method="gradcam") -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"method": method, "energy_clean": np.clip(on_lesion + rng.normal(0, 0.1, n), 0, 1),
                         "energy_other_mask": np.clip(chance + rng.normal(0, 0.1, n), 0, 1)})


def test_localisation_is_the_per_image_difference_from_chance_with_its_interval():
    where = trust.localisation(_numbers(0.7, 0.4), "gradcam")
    assert where.images == 200 and where.on_lesion == pytest.approx(0.7, abs=0.03)
    assert where.low < where.above_chance < where.high and where.low > 0.2
    assert trust.localisation(_numbers(0.7, 0.4), "saliency") is None            # no rows of that map
    assert trust.localisation(pd.DataFrame({"energy_clean": [0.5]}), "gradcam") is None   # no masks


@pytest.mark.parametrize("balanced, on, chance, level, says", [
    (0.72, 0.70, 0.40, "trust", None),
    (0.45, 0.70, 0.40, "doubt", "right on only 45% of the images"),
    (0.72, 0.40, 0.40, "doubt", "no more often than chance"),
    (0.72, 0.41, 0.40, "doubt", "no more often than chance"),     # above chance, but not by a margin one can see
])
def test_the_verdict_warns_in_words_when_accuracy_or_localisation_is_weak(balanced, on, chance, level, says):
    got, text = trust.trust_line(balanced, "test split, audit", trust.localisation(_numbers(on, chance), "gradcam"))
    assert got == level
    assert f"Balanced accuracy {balanced:.2f} (test split, audit)" in text and "by chance" in text
    if says is None:
        assert "Do not read" not in text
    else:
        assert "**Do not read these maps as the model's reasons:**" in text and says in text


def test_what_is_not_measured_is_said():
    level, text = trust.trust_line(None, "not measured yet", None)
    assert level == "unknown" and "Accuracy not measured" in text and "not been checked against lesion masks" in text


def test_the_accuracy_comes_from_the_audit_then_the_curve_then_validation(tmp_path):
    config = parse_record({"data": {"spec": "npz:x.npz"}, "dataset": {"classes": ["a", "b"]}})
    assert trust.accuracy(tmp_path, config, {"val_balanced_accuracy": 0.5}) == (0.5, "validation split, best epoch")
    pd.DataFrame({"attack": "pgd", "norm": "l2", "steps": 20, "monotone": True, "split": "test", "data": "npz:x.npz",
                  "eps": [0.0, 0.3], "accuracy": [0.7, 0.4], "balanced_accuracy": [0.61, 0.3], "n": 50}
                 ).to_csv(tmp_path / "robustness.csv", index=False)
    assert trust.accuracy(tmp_path, config, {"val_balanced_accuracy": 0.5}) == (0.61, "test split")
    pd.DataFrame({"preset": ["pgd20_l2"], "accuracy": [0.7], "robust_accuracy": [0.4], "eps": [0.3],
                  "balanced_accuracy": [0.66], "split": ["test"], "data": ["npz:x.npz"]}
                 ).to_csv(tmp_path / "protocol.csv", index=False)
    assert trust.accuracy(tmp_path, config, {}) == (0.66, "test split, audit")


def test_the_shipped_demo_maps_are_flagged_for_what_they_are():
    """The hardened MobileNet's maps sit at chance on the test split, and the line says so in words."""
    run = runs.load_run(Path(__file__).resolve().parents[1] / "checkpoints"
                        / "demo-hardened-mobilenet_v3_small-ham10000")
    balanced, source = trust.accuracy(run.path, run.record, run.best)
    where = trust.saved_localisation(run.path, run.record, "gradcam")
    level, text = trust.trust_line(balanced, source, where)
    assert where is not None and where.images > 100 and where.low < trust.LOCALISATION_MARGIN
    assert level == "doubt" and "no more often than chance" in text
