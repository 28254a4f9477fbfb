"""The training objectives (the family table of METHOD.md) on a small real HAM10000 batch.

References are recomputed from the model's own outputs with torch's cross-entropy and a numpy KL,
never taken from :class:`StepResult`; the attack is captured by wrapping ``objectives.pgd``.
Every test runs on ``$DPAAT_TEST_DEVICE`` (see conftest.py): model, batch, memory and class weights
live there; references are computed there and compared on the CPU (numpy).
"""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dpaat_core.train.objectives as objectives
from dpaat_core.config import AttackConfig, method_config
from dpaat_core.data import load_dataset
from dpaat_core.models import build_model
from dpaat_core.train.objectives import MethodState, StepResult, training_step
from conftest import TEST_DEVICE, on_device
from references import kl, softmax

pytestmark = pytest.mark.device

METHODS = ("erm", "pgd_at", "trades", "dpaat", "dpaat_nosync", "dpaat_fixed", "gaussian")
ATTACK = AttackConfig(steps=3)          # l2, eps 0.3, alpha 0.5 * eps, eval-mode attack
ATTACK_1 = AttackConfig(steps=1)        # for side-effect checks, where the attack's strength is beside the point
SIZE = 32


@pytest.fixture(scope="module")
def ham(shared_data):
    """16 real HAM10000 images at 32 px: ``(x [16,3,32,32] in [0,1], y [16], idx [16], dataset)``, on TEST_DEVICE."""
    ds = load_dataset(f"npz:{shared_data / 'ham10000_sample.npz'}", "train", SIZE, max_samples=16)
    items = [ds[i] for i in range(len(ds))]
    x = torch.stack([it[0] for it in items])
    y = torch.tensor([it[1] for it in items])
    idx = torch.tensor([it[2] for it in items])
    assert x.shape == (16, 3, SIZE, SIZE) and 0 <= x.min() and x.max() <= 1
    assert len(torch.unique(y)) >= 3, "the sample batch should hold several classes"
    return (*on_device(x, y, idx), ds)


def _model(num_classes, seed=0):
    torch.manual_seed(seed)
    return build_model("resnet8", num_classes).to(TEST_DEVICE).train()


def _gen(seed):
    return torch.Generator().manual_seed(seed)


class PgdSpy:
    """Wraps ``objectives.pgd``: records each call's arguments and result."""

    def __init__(self, monkeypatch):
        self.calls = []
        self._pgd = objectives.pgd
        monkeypatch.setattr(objectives, "pgd", self)

    def __call__(self, model, x, y, eps, alpha, steps, norm="l2", *args, **kwargs):
        out = self._pgd(model, x, y, eps, alpha, steps, norm, *args, **kwargs)
        self.calls.append(dict(eps=eps.detach().clone() if torch.is_tensor(eps) else eps,
                               alpha=alpha, steps=steps, norm=norm, kwargs=kwargs, x_adv=out.clone()))
        return out


def _np(t):
    return t.detach().double().cpu().numpy()


def _ce(z, y):
    """Per-sample cross-entropy in float64 (numpy ``[B]``)."""
    return F.cross_entropy(z.detach().double(), y, reduction="none").cpu().numpy()


# --- every member of the family learns ----------------------------------------------------------

@pytest.mark.parametrize("name", METHODS)
def test_objective_loss_goes_down_on_a_real_batch(name, ham):
    x, y, idx, ds = ham
    method = method_config(name)
    model = _model(ds.num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    state = MethodState.create(method, ATTACK, len(ds), TEST_DEVICE)

    def measure():
        # Same seed, fresh state (eps0 everywhere), a copy of the model in train mode; plus the
        # clean cross-entropy computed here, so an objective that went the wrong way shows too.
        probe = copy.deepcopy(model).train()
        fresh = MethodState.create(method, ATTACK, len(ds), TEST_DEVICE)
        loss = training_step(probe, x, y, idx, method, ATTACK, fresh, generator=_gen(1234)).loss.item()
        with torch.no_grad():
            ce = _ce(copy.deepcopy(model).train()(x), y).mean()
        return loss, ce

    start, ce_start = measure()
    losses = []
    for step in range(15):
        result = training_step(model, x, y, idx, method, ATTACK, state, generator=_gen(step))
        assert isinstance(result, StepResult) and result.loss.shape == ()
        assert torch.isfinite(result.loss)
        losses.append(result.loss.item())
        opt.zero_grad()
        result.loss.backward()
        opt.step()
    end, ce_end = measure()
    assert min(losses + [start, end]) >= 0, f"{name}: every objective of the family is non-negative ({losses})"
    assert end < 0.6 * start, f"{name}: loss {start:.3f} -> {end:.3f} did not go down clearly ({losses})"
    assert ce_end < 0.6 * ce_start, f"{name}: clean CE {ce_start:.3f} -> {ce_end:.3f} did not go down clearly"


# --- pgd_at is dpaat with everything but adversarial CE switched off ----------------------------

def _train(method, ham, steps=4, batch=8):
    x, y, idx, ds = ham
    model = _model(ds.num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    state = MethodState.create(method, ATTACK, len(ds), TEST_DEVICE)
    losses = []
    for step in range(steps):
        part = torch.arange(step * batch, (step + 1) * batch, device=x.device) % len(x)
        result = training_step(model, x[part], y[part], idx[part], method, ATTACK, state, generator=_gen(10 + step))
        opt.zero_grad()
        result.loss.backward()
        opt.step()
        losses.append(result.loss.detach())
    return model, torch.stack(losses)


def test_pgd_at_equals_dpaat_with_gamma_beta_lam_zero(ham):
    pgd_model, pgd_losses = _train(method_config("pgd_at"), ham)
    reduced = method_config("dpaat", gamma=0.0, beta_clean=0.0, lam=0.0)
    red_model, red_losses = _train(reduced, ham)
    torch.testing.assert_close(red_losses, pgd_losses, rtol=1e-6, atol=1e-7)
    for (name, a), (_, b) in zip(pgd_model.state_dict().items(), red_model.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")

    # Non-trivially: the defaults of dpaat train a different model.
    dpaat_model, dpaat_losses = _train(method_config("dpaat"), ham)
    gap = max((a - b).abs().max().item() for a, b in zip(pgd_model.parameters(), dpaat_model.parameters()))
    assert gap > 1e-4
    assert not torch.allclose(dpaat_losses, pgd_losses, rtol=1e-3)


# --- erm --------------------------------------------------------------------------------------

def test_erm_runs_no_attack_and_reports_zeros(ham, monkeypatch):
    x, y, idx, ds = ham

    def no_attack(*args, **kwargs):
        raise AssertionError("erm must not run an attack")

    monkeypatch.setattr(objectives, "pgd", no_attack)
    method = method_config("erm")
    model = _model(ds.num_classes)
    state = MethodState.create(method, ATTACK, len(ds), TEST_DEVICE)
    assert state.memory is None
    result = training_step(model, x, y, idx, method, ATTACK, state, generator=_gen(0))

    reference = copy.deepcopy(model)   # same weights; train mode uses batch statistics
    z = reference(x)
    np.testing.assert_allclose(result.loss.item(), _ce(z, y).mean(), rtol=1e-5)
    assert (result.eps == 0).all() and (result.delta_loss == 0).all()
    assert result.fragile.dtype == torch.bool and not result.fragile.any()
    assert torch.equal(result.correct_adv, result.correct_clean)
    assert torch.equal(result.correct_clean, z.argmax(1) == y)
    assert result.sync.item() == 0


# --- dpaat: the split and the memory ----------------------------------------------------------

def test_dpaat_step_splits_by_mean_delta_loss_and_updates_memory(ham, monkeypatch):
    x, y, idx, ds = ham
    spy = PgdSpy(monkeypatch)
    method = method_config("dpaat")
    eps0, gamma = ATTACK.eps, method.gamma
    model = _model(ds.num_classes)
    # non-contiguous dataset indices in a larger memory, so index bookkeeping matters
    state = MethodState.create(method, ATTACK, 40, TEST_DEVICE)
    idx = on_device(torch.arange(16) * 2 + 5)

    result = training_step(model, x, y, idx, method, ATTACK, state, generator=_gen(0))
    assert len(spy.calls) == 1, "dpaat with a memory runs one attack per batch"
    np.testing.assert_allclose(_np(result.eps), np.full(16, eps0), rtol=1e-6)
    np.testing.assert_allclose(_np(spy.calls[0]["eps"]), np.full(16, eps0), rtol=1e-6)
    np.testing.assert_allclose(_np(spy.calls[0]["alpha"]), np.full(16, ATTACK.alpha_ratio * eps0), rtol=1e-6)

    # ΔL from the model's own outputs on the attack's x_adv (train mode, weights unchanged)
    z, z_adv = model(x), model(spy.calls[0]["x_adv"])
    dl = _ce(z_adv, y) - _ce(z, y)
    np.testing.assert_allclose(_np(result.delta_loss), dl, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(result.threshold.item(), dl.mean(), rtol=1e-4, atol=1e-6)
    assert torch.equal(result.fragile, result.delta_loss > result.threshold)
    assert 0 < result.fragile.sum() < 16, "the batch has both fragile and stable samples"

    fragile = result.fragile.cpu().numpy()
    expected = np.where(fragile, eps0 * (1 - gamma), eps0 * (1 + gamma))
    np.testing.assert_allclose(_np(state.memory[idx]), expected, rtol=1e-6)
    others = on_device(torch.tensor([i for i in range(40) if i not in set(idx.tolist())]))
    assert (state.memory[others] == torch.tensor(eps0, device=TEST_DEVICE)).all(), "samples not in the batch keep eps0"

    # The loss is METHOD.md step 9 with the defaults: CE(adv) + CE(clean) + sym-KL
    p, q = softmax(_np(z)), softmax(_np(z_adv))
    reference = _ce(z_adv, y).mean() + _ce(z, y).mean() + (0.5 * (kl(p, q) + kl(q, p))).mean()
    np.testing.assert_allclose(result.loss.item(), reference, rtol=1e-5)
    np.testing.assert_allclose(result.sync.item(), (0.5 * (kl(p, q) + kl(q, p))).mean(), rtol=1e-3)

    # Step 2 on the same samples uses the updated memory
    after_first = state.memory[idx].clone()
    second = training_step(model, x, y, idx, method, ATTACK, state, generator=_gen(1))
    torch.testing.assert_close(second.eps, after_first, rtol=0, atol=0)
    torch.testing.assert_close(spy.calls[1]["eps"], after_first, rtol=0, atol=0)
    assert not torch.equal(second.eps, result.eps)


def test_dpaat_memory_follows_permuted_batches(ham):
    """The memory is keyed by dataset index, not by position in the batch."""
    x, y, idx, ds = ham
    method = method_config("dpaat")
    model = _model(ds.num_classes)
    state = MethodState.create(method, ATTACK, len(ds), TEST_DEVICE)
    first = training_step(model, x, y, idx, method, ATTACK, state, generator=_gen(0))
    memory = state.memory.eps.clone()
    perm = on_device(torch.randperm(16, generator=_gen(5)))
    second = training_step(model, x[perm], y[perm], idx[perm], method, ATTACK, state, generator=_gen(1))
    torch.testing.assert_close(second.eps, memory[idx[perm]], rtol=0, atol=0)
    assert first.eps.unique().numel() == 1 and second.eps.unique().numel() == 2


# --- trades -----------------------------------------------------------------------------------

def test_trades_attack_maximises_kl_to_the_clean_prediction(ham, monkeypatch):
    x, y, idx, ds = ham
    # A large ball, so the KL term is big enough to tell one-sided from symmetric KL
    attack = AttackConfig(eps=4.0, steps=3)
    spy = PgdSpy(monkeypatch)
    method = method_config("trades")
    model = _model(ds.num_classes)
    with torch.no_grad():
        clean_eval = copy.deepcopy(model).eval()(x)   # the target TRADES attacks away from
    state = MethodState.create(method, attack, len(ds), TEST_DEVICE)
    assert state.memory is None
    result = training_step(model, x, y, idx, method, attack, state, generator=_gen(0))

    assert len(spy.calls) == 1
    loss_fn = spy.calls[0]["kwargs"].get("loss_fn")
    assert loss_fn is not None, "TRADES must attack the KL, not the default cross-entropy"
    np.testing.assert_allclose(_np(spy.calls[0]["eps"]), np.full(16, attack.eps), rtol=1e-6)
    probe = on_device(torch.randn(16, ds.num_classes, generator=_gen(3)) * 2)
    attack_loss = loss_fn(probe, y)
    assert attack_loss.shape == (16,)
    np.testing.assert_allclose(_np(attack_loss), kl(softmax(_np(clean_eval)), softmax(_np(probe))),
                               rtol=1e-4, atol=1e-6)
    # ... and not the CE of y: relabelling changes nothing
    torch.testing.assert_close(loss_fn(probe, (y + 1) % ds.num_classes), attack_loss)

    # The loss: beta_clean * CE(clean) + 6 * KL(p_clean || p_adv), no CE(adv) term
    z, z_adv = model(x), model(spy.calls[0]["x_adv"])
    p, q = softmax(_np(z)), softmax(_np(z_adv))
    one_sided, sym = kl(p, q).mean(), (0.5 * (kl(p, q) + kl(q, p))).mean()
    assert one_sided > 1e-3 and abs(sym - one_sided) > 1e-3 * one_sided, \
        "the check below must tell KL(p||q) from the symmetric KL"
    np.testing.assert_allclose(result.sync.item(), one_sided, rtol=1e-4)
    reference = method.beta_clean * _ce(z, y).mean() + 6.0 * one_sided
    assert method.lam == 6.0 and method.beta_clean == 1.0
    np.testing.assert_allclose(result.loss.item(), reference, rtol=1e-5)
    assert abs(result.loss.item() - (reference + _ce(z_adv, y).mean())) > 0.1


# --- class weights ----------------------------------------------------------------------------

def _weighted(ce, y, w):
    w = w[y].double().cpu().numpy()
    return (w * ce).sum() / w.sum()


def test_class_weights_apply_to_ce_terms_only(ham, monkeypatch):
    x, y, idx, ds = ham
    method = method_config("dpaat")
    base = _model(ds.num_classes)
    weights = on_device(torch.linspace(0.2, 3.0, ds.num_classes))
    results, advs, models = {}, {}, {}
    for key, w in (("none", None), ("ones", on_device(torch.ones(ds.num_classes))), ("skewed", weights)):
        spy = PgdSpy(monkeypatch)
        model = copy.deepcopy(base)
        state = MethodState.create(method, ATTACK, len(ds), TEST_DEVICE)
        results[key] = training_step(model, x, y, idx, method, ATTACK, state, class_weights=w, generator=_gen(0))
        advs[key], models[key] = spy.calls[0]["x_adv"], model
        monkeypatch.undo()

    # The attack and ΔL do not see the weights
    assert torch.equal(advs["skewed"], advs["none"])
    torch.testing.assert_close(results["skewed"].delta_loss, results["none"].delta_loss, rtol=0, atol=0)
    assert torch.equal(results["skewed"].fragile, results["none"].fragile)
    torch.testing.assert_close(results["ones"].loss, results["none"].loss, rtol=1e-6, atol=1e-7)
    assert abs(results["skewed"].loss.item() - results["none"].loss.item()) > 1e-3

    # Weighted CE (sum w_y CE / sum w_y) on both terms, unweighted sync loss
    z, z_adv = models["skewed"](x), models["skewed"](advs["skewed"])
    p, q = softmax(_np(z)), softmax(_np(z_adv))
    reference = (_weighted(_ce(z_adv, y), y, weights) + _weighted(_ce(z, y), y, weights)
                 + (0.5 * (kl(p, q) + kl(q, p))).mean())
    np.testing.assert_allclose(results["skewed"].loss.item(), reference, rtol=1e-4)


def test_class_weights_in_erm(ham):
    x, y, idx, ds = ham
    method = method_config("erm")
    weights = on_device(torch.linspace(0.2, 3.0, ds.num_classes))
    model = _model(ds.num_classes)
    state = MethodState.create(method, ATTACK, len(ds), TEST_DEVICE)
    result = training_step(copy.deepcopy(model), x, y, idx, method, ATTACK, state, class_weights=weights)
    np.testing.assert_allclose(result.loss.item(), _weighted(_ce(model(x), y), y, weights), rtol=1e-5)


# --- memoryless -------------------------------------------------------------------------------

def test_memoryless_dpaat_uses_eps0_times_one_plus_minus_gamma(ham, monkeypatch):
    x, y, idx, ds = ham
    spy = PgdSpy(monkeypatch)
    method = method_config("dpaat", memoryless=True)
    eps0, gamma = ATTACK.eps, method.gamma
    model = _model(ds.num_classes)
    before = copy.deepcopy(model).eval()
    state = MethodState.create(method, ATTACK, len(ds), TEST_DEVICE)
    assert state.memory is None
    result = training_step(model, x, y, idx, method, ATTACK, state, generator=_gen(0))

    assert len(spy.calls) == 2, "memoryless runs a probe attack at eps0, then the training attack"
    np.testing.assert_allclose(_np(spy.calls[0]["eps"]), np.full(16, eps0), rtol=1e-6)
    low, high = eps0 * (1 - gamma), eps0 * (1 + gamma)
    eps = _np(result.eps)
    assert np.all(np.isclose(eps, low, rtol=1e-6) | np.isclose(eps, high, rtol=1e-6)), eps
    assert np.isclose(eps, low).any() and np.isclose(eps, high).any()
    torch.testing.assert_close(spy.calls[1]["eps"], result.eps)

    # the split behind eps is the probe's ΔL (eval mode, weights as before the step) against its mean
    with torch.no_grad():
        dl = _ce(before(spy.calls[0]["x_adv"]), y) - _ce(before(x), y)
    expected = np.where(dl > dl.mean(), low, high)
    np.testing.assert_allclose(eps, expected, rtol=1e-6)

    # no memory means nothing carries over: a second step starts from eps0 again
    spy.calls.clear()
    training_step(model, x, y, idx, method, ATTACK, state, generator=_gen(1))
    np.testing.assert_allclose(_np(spy.calls[0]["eps"]), np.full(16, eps0), rtol=1e-6)


# --- side effects on the model ----------------------------------------------------------------

@pytest.mark.parametrize("name,overrides", [(m, {}) for m in METHODS] + [("dpaat", {"memoryless": True})])
def test_step_leaves_train_mode_and_no_grads(name, overrides, ham):
    x, y, idx, ds = ham
    method = method_config(name, **overrides)
    model = _model(ds.num_classes)
    state = MethodState.create(method, ATTACK_1, len(ds), TEST_DEVICE)
    result = training_step(model, x[:4], y[:4], idx[:4], method, ATTACK_1, state, generator=_gen(0))
    assert all(m.training for m in model.modules()), "training_step leaves the model in train mode"
    assert all(p.grad is None for p in model.parameters()), "no gradient before loss.backward()"
    result.loss.backward()
    with_grad = [p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters()]
    assert all(with_grad), f"{sum(with_grad)}/{len(with_grad)} parameters received a gradient"
    for field in ("delta_loss", "eps", "fragile", "correct_clean", "correct_adv", "threshold", "ce_clean",
                  "ce_adv", "sync"):
        assert not getattr(result, field).requires_grad, field


@pytest.mark.parametrize("name,overrides", [(m, {}) for m in METHODS] + [("dpaat", {"memoryless": True})])
def test_step_keeps_each_module_flag(name, overrides, ham):
    """A frozen BatchNorm (eval mode inside a training model, as when fine-tuning) stays frozen."""
    x, y, idx, ds = ham
    method = method_config(name, **overrides)
    model = _model(ds.num_classes)
    model.backbone.bn1.eval()
    flags = {n: m.training for n, m in model.named_modules()}
    state = MethodState.create(method, ATTACK_1, len(ds), TEST_DEVICE)
    training_step(model, x[:4], y[:4], idx[:4], method, ATTACK_1, state, generator=_gen(0))
    changed = [n for n, m in model.named_modules() if m.training != flags[n]]
    assert not changed, (f"BUG in objectives.training_step ({name}, {overrides}): the per-module train/eval "
                         f"flags were not restored (model.train(was) resets every submodule): {changed}")


# --- gaussian: randomized smoothing's base classifier ---------------------------------------------

def test_gaussian_trains_on_unclipped_noise_of_std_sigma_and_runs_no_attack(ham, monkeypatch):
    x, y, idx, ds = ham

    def no_attack(*args, **kwargs):
        raise AssertionError("gaussian must not run an attack")

    monkeypatch.setattr(objectives, "pgd", no_attack)
    method = method_config("gaussian", sigma=0.5)
    model = _model(ds.num_classes)
    reference = copy.deepcopy(model)
    state = MethodState.create(method, ATTACK, len(ds), TEST_DEVICE)
    result = training_step(model, x, y, idx, method, ATTACK, state, generator=_gen(7))

    noise = torch.randn(x.shape, generator=_gen(7)).to(x.device)   # the same draw, from the same seed
    x_noisy = x + 0.5 * noise
    assert x_noisy.min() < 0 and x_noisy.max() > 1, "the reference's noisy batch leaves [0, 1]: no clipping is checked"
    z_noisy = reference(x_noisy)                                   # train mode: the step's own BatchNorm use
    np.testing.assert_allclose(result.loss.item(), _ce(z_noisy, y).mean(), rtol=1e-5)
    assert torch.equal(result.eps.cpu(), torch.full((len(x),), 0.5))
    with torch.no_grad():
        z_clean = copy.deepcopy(reference).eval()(x)
    assert torch.equal(result.correct_clean.cpu(), (z_clean.argmax(1) == y).cpu())
    # the clean pass only measures: BatchNorm's running statistics are those of the noisy batch alone
    for (name, a), (_, b) in zip(model.named_buffers(), reference.named_buffers()):
        torch.testing.assert_close(a, b, msg=lambda m: f"{name}: {m}")


def test_sigma_belongs_to_the_gaussian_method_only():
    from dpaat_core.config import ConfigError
    assert method_config("gaussian").sigma == 0.25
    assert method_config("gaussian", sigma=0.12).sigma == 0.12
    for bad in (0, -0.1, float("nan"), 11):
        with pytest.raises(ConfigError, match="method.sigma"):
            method_config("gaussian", sigma=bad)
    with pytest.raises(ConfigError, match="sigma does not apply"):
        method_config("pgd_at", sigma=0.25)
