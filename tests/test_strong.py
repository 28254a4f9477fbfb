"""The strong check: APGD (torchattacks) counted as the worst case with PGD-20, per sample.

The model (test_evaluate's ``trained``) and the images attacked live on ``$DPAAT_TEST_DEVICE`` (see conftest.py).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dpaat_core.evaluate.robustness import evaluate
from dpaat_core.evaluate.strong import apgd, strong_robustness
from test_evaluate import trained  # noqa: F401  (a resnet8 trained briefly on the synthetic set, and its test split)
from conftest import on_device

pytest.importorskip("torchattacks")

pytestmark = pytest.mark.device


@pytest.mark.parametrize("norm,eps", [("l2", 0.5), ("linf", 8 / 255)])
def test_apgd_stays_in_the_ball_and_the_image_range(trained, norm, eps):
    _, model, data = trained
    x, y = on_device(data.images[:8].float() / 255, data.labels[:8])
    x_adv = apgd(model, x, y, norm, eps, "ce", steps=5)
    delta = (x_adv - x).flatten(1)
    size = delta.norm(dim=1) if norm == "l2" else delta.abs().amax(1)
    assert (size <= eps * (1 + 1e-4) + 1e-6).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1


def test_apgd_leaves_the_global_random_state_alone(trained):
    _, model, data = trained
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    apgd(model, *on_device(data.images[:4].float() / 255, data.labels[:4]), "l2", 0.5, "dlr", steps=3)
    assert torch.equal(torch.rand(3), expected)


def test_strong_check_is_the_worst_case_with_pgd(trained):
    _, model, data = trained
    eps = 1.0   # large enough that some samples break
    pgd = evaluate(model, data, "pgd", "l2", eps, 20)
    alone = strong_robustness(model, data, "l2", eps, steps=20)
    both = strong_robustness(model, data, "l2", eps, steps=20, survivors=pgd.samples["robust"].to_numpy())
    correct = pgd.samples["correct_clean"].to_numpy()
    assert not (alone["robust"] & ~correct).any()                    # robust implies correct
    assert not (both["robust"] & ~pgd.samples["robust"].to_numpy()).any()
    assert both["robust_accuracy"] <= min(alone["robust_accuracy"], pgd.robust_accuracy) + 1e-12
    assert both["robust_accuracy"] < pgd.accuracy                      # the attacks broke something
    assert both["attacks"] == "apgd-ce+apgd-dlr" and both["n"] == len(data)
    assert 0 <= both["robust_balanced_accuracy"] <= 1


def test_bad_arguments_are_refused_with_the_reason(trained):
    _, model, data = trained
    x, y = on_device(data.images[:2].float() / 255, data.labels[:2])
    with pytest.raises(ValueError, match="norm"):
        apgd(model, x, y, "l1", 0.3)
    with pytest.raises(ValueError, match="eps"):
        apgd(model, x, y, "l2", float("nan"))
    with pytest.raises(ValueError, match="loss"):
        apgd(model, x, y, "l2", 0.3, loss="hinge")
    with pytest.raises(ValueError, match="survivors"):
        strong_robustness(model, data, "l2", 0.3, survivors=np.ones(3, dtype=bool))
