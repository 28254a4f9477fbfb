"""Attacks: equivalence with torchattacks, per-sample epsilon, side effects, bad input.

Every test runs on ``$DPAAT_TEST_DEVICE`` (see conftest.py): models, images and budgets live there.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

torchattacks = pytest.importorskip("torchattacks")

from dpaat_core.attack.attacks import ATTACKS, Attack, attack_mode, fgsm, ifgsm, perturb, pgd  # noqa: E402
from dpaat_core.data import load_dataset  # noqa: E402
from dpaat_core.evaluate.robustness import evaluate  # noqa: E402
from dpaat_core.models import build_model  # noqa: E402
from conftest import TEST_DEVICE, on_device  # noqa: E402

pytestmark = pytest.mark.device

B, C, S, K = 6, 3, 16, 4


class PlainNet(nn.Module):
    """No BatchNorm: the attacks' default path runs the model itself."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(C, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, K))

    def forward(self, x):
        return self.body(x)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return on_device(torch.rand(B, C, S, S, generator=g), torch.randint(0, K, (B,), generator=g))


@pytest.fixture
def resnet():
    torch.manual_seed(0)
    return build_model("resnet8", K).to(TEST_DEVICE).eval()


@pytest.fixture
def plain():
    torch.manual_seed(0)
    return PlainNet().to(TEST_DEVICE).eval()


def _peer(name, model, eps, alpha, steps):
    if name == "pgd_l2":
        return torchattacks.PGDL2(model, eps=eps, alpha=alpha, steps=steps, random_start=False)
    if name == "pgd_linf":
        return torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=False)
    if name == "bim":
        return torchattacks.BIM(model, eps=eps, alpha=alpha, steps=steps)
    return torchattacks.FGSM(model, eps=eps)


def _ours(name, model, x, y, eps, alpha, steps, **kw):
    if name == "pgd_l2":
        return pgd(model, x, y, eps, alpha, steps, norm="l2", random_start=False, **kw)
    if name == "pgd_linf":
        return pgd(model, x, y, eps, alpha, steps, norm="linf", random_start=False, **kw)
    if name == "bim":
        return ifgsm(model, x, y, eps, alpha, steps, **kw)
    return fgsm(model, x, y, eps, **kw)


CASES = [("pgd_l2", 1.0, 0.2, 7), ("pgd_linf", 8 / 255, 2 / 255, 7), ("bim", 8 / 255, 1 / 255, 5), ("fgsm", 8 / 255, None, 1)]


@pytest.mark.parametrize("name,eps,alpha,steps", CASES)
def test_default_path_matches_torchattacks(plain, batch, name, eps, alpha, steps):
    x, y = batch
    ours = _ours(name, plain, x, y, eps, alpha, steps)
    theirs = _peer(name, plain, eps, alpha, steps)(x, y)
    assert (ours - x).abs().max() > 1e-3  # the attack did something
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name,eps,alpha,steps", CASES)
def test_batchnorm_model_matches_torchattacks(resnet, batch, name, eps, alpha, steps):
    x, y = batch
    theirs = _peer(name, resnet, eps, alpha, steps)(x, y)
    torch.testing.assert_close(_ours(name, resnet, x, y, eps, alpha, steps, fold_bn=False), theirs, atol=1e-5, rtol=0)
    # Folded BatchNorm is the same function up to float rounding: one step agrees as tightly.
    if steps == 1 or name == "pgd_l2":
        one = _ours(name, resnet, x, y, eps, alpha if alpha else eps, 1)
        torch.testing.assert_close(one, _peer(name, resnet, eps, alpha if alpha else eps, 1)(x, y), atol=1e-5, rtol=0)


@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("random_start", [False, True])
def test_per_sample_eps_stays_in_each_ball(resnet, batch, norm, random_start):
    x, y = batch
    eps = torch.tensor([0.0, 0.05, 0.1, 0.5, 1.0, 2.0], device=TEST_DEVICE) * (1 if norm == "l2" else 0.03)
    x_adv = pgd(resnet, x, y, eps, eps / 4, 5, norm=norm, random_start=random_start,
                generator=torch.Generator().manual_seed(1))
    delta = (x_adv - x).flatten(1)
    size = delta.norm(dim=1) if norm == "l2" else delta.abs().max(dim=1).values
    assert torch.all(size <= eps * (1 + 1e-5) + 1e-7)
    assert torch.all(size[1:] > 0.2 * eps[1:])  # and uses its budget
    assert torch.equal(x_adv[0], x[0])  # eps 0: unchanged
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert x_adv.dtype == x.dtype and x_adv.shape == x.shape and not x_adv.requires_grad


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_per_sample_eps_equals_one_sample_at_a_time(resnet, batch, norm):
    x, y = batch
    eps = torch.linspace(0.1, 1.0, B, device=TEST_DEVICE) * (1 if norm == "l2" else 0.05)
    together = pgd(resnet, x, y, eps, eps / 3, 4, norm=norm, random_start=False)
    for i in range(B):
        alone = pgd(resnet, x[i : i + 1], y[i : i + 1], float(eps[i]), float(eps[i]) / 3, 4, norm=norm, random_start=False)
        torch.testing.assert_close(together[i : i + 1], alone, atol=1e-5, rtol=0)


def test_tensor_eps_equals_float_eps(resnet, batch):
    x, y = batch
    a = pgd(resnet, x, y, 0.5, 0.1, 3, random_start=False)
    # budgets given on the CPU for images elsewhere are the attack's to move
    b = pgd(resnet, x, y, torch.full((B,), 0.5), torch.tensor(0.1), 3, random_start=False)
    assert torch.equal(a, b)


def test_attack_raises_the_loss(resnet, batch):
    x, y = batch
    clean = F.cross_entropy(resnet(x), y, reduction="none")
    for norm, eps in (("l2", 1.0), ("linf", 8 / 255)):
        adv = F.cross_entropy(resnet(pgd(resnet, x, y, eps, eps / 4, 10, norm=norm)), y, reduction="none")
        assert torch.all(adv >= clean - 1e-6) and adv.mean() > clean.mean() * 1.05


def test_random_start_follows_the_generator(resnet, batch):
    x, y = batch
    run = lambda seed: pgd(resnet, x, y, 0.5, 0.1, 2, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


def test_no_parameter_gradients_and_modes_restored(resnet, batch):
    x, y = batch
    resnet.train()
    resnet.backbone.layer2.eval()  # a mixed state must come back exactly
    before = {name: m.training for name, m in resnet.named_modules()}
    stats = resnet.backbone.bn1.running_mean.clone()
    for attack in (lambda: pgd(resnet, x, y, 0.5, 0.1, 3), lambda: fgsm(resnet, x, y, 0.03)):
        attack()
        assert all(p.grad is None for p in resnet.parameters())
        assert {name: m.training for name, m in resnet.named_modules()} == before
        assert torch.equal(resnet.backbone.bn1.running_mean, stats)  # eval mode: BN statistics untouched


def test_eval_mode_false_uses_the_model_as_it_is(resnet, batch):
    x, y = batch
    resnet.train()
    stats = resnet.backbone.bn1.running_mean.clone()
    pgd(resnet, x, y, 0.5, 0.1, 2, eval_mode=False)
    assert resnet.training and not torch.equal(resnet.backbone.bn1.running_mean, stats)


def test_modes_restored_when_the_attack_fails(resnet, batch):
    x, y = batch
    resnet.train()

    def broken_loss(logits, y):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        pgd(resnet, x, y, 0.5, 0.1, 2, loss_fn=broken_loss)
    assert all(m.training for m in resnet.modules())


def test_custom_loss_with_soft_targets(resnet, batch):
    """TRADES attacks maximise KL(clean || adversarial); y can be whatever loss_fn takes."""
    x, _ = batch
    with torch.no_grad():
        p_clean = F.softmax(resnet(x), dim=1)
    kl = lambda logits, p: F.kl_div(F.log_softmax(logits, 1), p, reduction="none").sum(1)  # noqa: E731
    x_adv = pgd(resnet, x, p_clean, 0.5, 0.1, 5, loss_fn=kl)
    with torch.no_grad():
        assert kl(resnet(x_adv), p_clean).mean() > kl(resnet(x), p_clean).mean() + 1e-6


def test_under_autocast_the_geometry_stays_float32(resnet, batch):
    x, y = batch
    with torch.autocast(TEST_DEVICE.type, dtype=torch.bfloat16):
        x_adv = pgd(resnet, x, y, 0.5, 0.2, 3)
    assert x_adv.dtype == torch.float32
    assert torch.all((x_adv - x).flatten(1).norm(dim=1) <= 0.5 * (1 + 1e-5))


def test_registry_names():
    assert set(ATTACKS) == {"pgd", "ifgsm", "fgsm"}
    assert [ATTACKS[a].title() for a in ("pgd", "ifgsm", "fgsm")] == ["PGD-20", "I-FGSM-10", "FGSM"]
    assert ATTACKS["ifgsm"].title(7) == "I-FGSM-7" and ATTACKS["ifgsm"].alpha(8) == 1 / 8


def test_perturb_runs_each_record_with_its_defaults(resnet, batch):
    """perturb takes steps and step size from the attack's record: PGD-20 at eps/4 from its seeded start, I-FGSM
    10 steps of eps/10 from the clean image, FGSM one step of eps."""
    x, y = batch
    g = torch.Generator().manual_seed(3)
    assert torch.equal(perturb(resnet, x, y, "pgd", "l2", 0.5, generator=g),
                       pgd(resnet, x, y, 0.5, 0.125, 20, norm="l2", generator=torch.Generator().manual_seed(3)))
    assert torch.equal(perturb(resnet, x, y, "ifgsm", "linf", 0.03), ifgsm(resnet, x, y, 0.03, 0.003, 10, norm="linf"))
    assert torch.equal(perturb(resnet, x, y, "fgsm", "linf", 0.03), fgsm(resnet, x, y, 0.03, norm="linf"))


def test_a_new_attack_is_one_record(resnet, batch, monkeypatch):
    """An attack added as one record is run by perturb and the evaluation, and checked against its own norms."""
    x, y = batch
    calls = []

    def half_pgd(model, x, y, eps, alpha, steps, norm="l2", **kwargs):
        calls.append((steps, round(float(torch.as_tensor(alpha).max()), 6)))
        return pgd(model, x, y, eps / 2, alpha, steps, norm=norm, random_start=False, validate=kwargs["validate"])

    monkeypatch.setitem(ATTACKS, "half", Attack("half", "Half-PGD", half_pgd, 4, lambda steps: 0.5, norms=("l2",)))
    x_adv = perturb(resnet, x, y, "half", "l2", 0.4)
    assert calls == [(4, 0.2)] and torch.all((x_adv - x).flatten(1).norm(dim=1) <= 0.2 * (1 + 1e-5))
    assert ATTACKS["half"].title(6) == "Half-PGD-6"
    with pytest.raises(ValueError, match="norm must be one of l2"):
        perturb(resnet, x, y, "half", "linf", 0.1)
    data = load_dataset(f"synthetic:n=40,classes={K}", "test", S)
    result = evaluate(resnet.cpu(), data, attack="half", norm="l2", eps=0.4, batch_size=len(data), device="cpu")
    assert calls[-1] == (4, 0.2) and 0.0 <= result.robust_accuracy <= 1.0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(eps=-0.1), "eps must be >= 0"),
        (dict(eps=float("nan")), "eps must be finite"),
        (dict(eps=torch.tensor([0.1, 0.2])), r"eps must be a scalar or have shape \[6\]"),
        (dict(eps="0.3"), "eps must be a number"),
        (dict(alpha=-1.0), "alpha must be >= 0"),
        (dict(steps=0), "steps must be an integer >= 1"),
        (dict(norm="l1"), "norm must be one of"),
        (dict(x_scale=2.0), r"x must be images in \[0, 1\]"),
        (dict(x_nan=True), "x contains NaN"),
        (dict(y=torch.zeros(3, dtype=torch.long)), r"y must be an integer tensor of shape \[6\]"),
        (dict(y=torch.zeros(6)), "y must be an integer tensor"),
        (dict(x_3d=True), r"x must be a float tensor \[B, C, H, W\]"),
    ],
)
def test_bad_input_is_a_clear_value_error(resnet, batch, kwargs, match):
    x, y = batch
    x = x * kwargs.pop("x_scale", 1.0)
    if kwargs.pop("x_nan", False):
        x = x.clone()
        x[0, 0, 0, 0] = float("nan")
    if kwargs.pop("x_3d", False):
        x = x[0]
    args = dict(eps=0.3, alpha=0.1, steps=2, norm="l2", y=y)
    args.update(kwargs)
    y = args.pop("y")
    with pytest.raises(ValueError, match=match):
        pgd(resnet, x, y, **args)


def test_attack_mode_restores_on_error(resnet):
    resnet.train()
    with pytest.raises(KeyError):
        with attack_mode(resnet):
            assert not resnet.training
            raise KeyError("x")
    assert resnet.training


def test_per_sample_eps_on_real_lesion_images(shared_data):
    """DPAAT's use: one budget per real HAM10000 image, on a model that has learned a little."""
    from dpaat_core.data import load_dataset

    data = load_dataset(f"npz:{shared_data / 'ham10000_sample.npz'}", "test", 32, max_samples=16)
    x, y = on_device(data.images.float() / 255, data.labels)
    torch.manual_seed(0)
    model = build_model("resnet8", data.num_classes).to(TEST_DEVICE)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(15):  # fit these 16 images so that the attack has margins to cross
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    eps = torch.linspace(0, 1.0, len(x), device=TEST_DEVICE)
    x_adv = pgd(model, x, y, eps, eps / 4, 10, generator=torch.Generator().manual_seed(0))
    norms = (x_adv - x).flatten(1).norm(dim=1)
    assert torch.all(norms <= eps * (1 + 1e-5) + 1e-7) and torch.equal(x_adv[0], x[0])
    with torch.no_grad():
        clean = F.cross_entropy(model(x), y, reduction="none")
        adv = F.cross_entropy(model(x_adv), y, reduction="none")
    gain = adv - clean
    assert torch.all(gain >= -1e-5)
    # a bigger budget buys a bigger loss increase: compare the smallest and largest quarters
    assert gain[-4:].mean() > gain[1:5].mean()


def test_half_precision_images_keep_their_dtype(resnet, batch):
    x, y = batch
    x_adv = pgd(resnet, x.bfloat16(), y, 0.5, 0.2, 2)
    assert x_adv.dtype == torch.bfloat16 and x_adv.min() >= 0 and x_adv.max() <= 1
