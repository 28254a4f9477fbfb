"""The eval-mode BatchNorm-folded view used by the attacks."""
import gc
import weakref

import pytest
import torch
import torch.nn as nn

from dpaat_core.attack import folding
from dpaat_core.attack.attacks import pgd
from dpaat_core.attack.folding import FoldedConvBN, folded_eval_view
from dpaat_core.models import build_model


def _trained_a_little(model, x):
    """Give BatchNorm non-trivial statistics and affine parameters."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x * torch.rand(1))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


@pytest.fixture
def model_and_x():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 16, 16)
    return _trained_a_little(build_model("resnet8", 5), x), x


def test_view_is_the_same_function_and_gradient(model_and_x):
    model, x = model_and_x
    view = folded_eval_view(model, x)
    assert view is not None
    assert sum(isinstance(m, FoldedConvBN) for m in view.modules()) == 9  # every conv of resnet8 has a BN
    assert not any(isinstance(m, nn.BatchNorm2d) for m in view.modules())
    torch.testing.assert_close(view(x), model(x), atol=1e-5, rtol=1e-5)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    (ga,) = torch.autograd.grad(view(xa).logsumexp(1).sum(), xa)
    (gb,) = torch.autograd.grad(model(xb).logsumexp(1).sum(), xb)
    torch.testing.assert_close(ga, gb, atol=1e-6, rtol=1e-4)


def test_view_follows_weight_updates(model_and_x):
    model, x = model_and_x
    folded_eval_view(model, x)
    with torch.no_grad():
        model.backbone.conv1.weight.mul_(1.7)
        model.backbone.bn1.running_var.mul_(3.0)
    view = folded_eval_view(model, x)
    torch.testing.assert_close(view(x), model(x), atol=1e-5, rtol=1e-5)


def test_replaced_submodule_rebuilds_the_view(model_and_x):
    model, x = model_and_x
    folded_eval_view(model, x)
    model.backbone.fc = nn.Linear(64, 5)
    torch.testing.assert_close(folded_eval_view(model, x)(x), model(x), atol=1e-5, rtol=1e-5)


def test_no_view_in_train_mode_with_hooks_or_nothing_to_fold(model_and_x):
    model, x = model_and_x
    model.train()
    assert folded_eval_view(model, x) is None
    model.eval()
    handle = model.backbone.layer2.register_forward_hook(lambda m, i, o: o * 0)
    assert folded_eval_view(model, x) is None
    handle.remove()
    assert folded_eval_view(nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 5)).eval(), x) is None


class Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 3)

    def forward(self, x):
        h = self.bn(self.conv(x))
        if h.mean() > 100:
            h = -h
        return self.fc(h.mean((2, 3)))


def test_untraceable_model_falls_back_and_still_attacks():
    torch.manual_seed(0)
    model = Branchy().eval()
    x, y = torch.rand(3, 3, 8, 8), torch.tensor([0, 1, 2])
    assert folded_eval_view(model, x) is None
    torch.testing.assert_close(pgd(model, x, y, 0.5, 0.1, 3, random_start=False),
                               pgd(model, x, y, 0.5, 0.1, 3, random_start=False, fold_bn=False), atol=0, rtol=0)


def test_cache_does_not_keep_models_alive():
    model, x = build_model("resnet8", 3).eval(), torch.rand(2, 3, 8, 8)
    assert folded_eval_view(model, x) is not None
    alive = weakref.ref(model)
    assert model in folding._CACHE
    del model
    gc.collect()
    assert alive() is None
