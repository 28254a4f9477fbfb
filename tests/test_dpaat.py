"""DPAAT building blocks against independent references: the sync losses (numpy / scipy), ΔL
(torch's cross-entropy), the threshold rules (numpy statistics, a hand-rolled EMA) and the
multiplicative epsilon memory (a float64 simulation of METHOD.md step 7)."""
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.spatial.distance import jensenshannon

from dpaat_core.config import ConfigError
from dpaat_core.train.dpaat import EpsMemory, Threshold, delta_loss, memoryless_eps, sync_loss
from references import kl, softmax

B, K = 6, 5


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    return 2 * torch.randn(B, K, generator=g), 2 * torch.randn(B, K, generator=g)


# --- references, in numpy float64 ------------------------------------------------------------

def _reference(kind, z, z_adv):
    p, q = softmax(z), softmax(z_adv)
    if kind == "sym_kl":
        return 0.5 * (kl(p, q) + kl(q, p))
    if kind == "kl":
        return kl(p, q)
    if kind == "js":
        return np.array([jensenshannon(p[i], q[i]) ** 2 for i in range(len(p))])
    assert kind == "l1_logprob"
    return np.abs(np.log(p) - np.log(q)).sum(axis=1)


def _np(t):
    return t.detach().double().numpy()


# --- sync_loss --------------------------------------------------------------------------------

KINDS = ("sym_kl", "kl", "js", "l1_logprob")


@pytest.mark.parametrize("kind", KINDS)
def test_sync_loss_matches_numpy_reference_per_sample_and_mean(kind, logits):
    z, z_adv = logits
    expected = _reference(kind, _np(z), _np(z_adv))
    assert expected.min() > 1e-3, "the reference must be non-trivial for the test to mean anything"

    per_sample = sync_loss(z, z_adv, kind, reduction="none")
    assert per_sample.shape == (B,) and per_sample.dtype == torch.float32
    np.testing.assert_allclose(_np(per_sample), expected, rtol=1e-5, atol=1e-6)

    mean = sync_loss(z, z_adv, kind, reduction="mean")
    assert mean.shape == ()
    np.testing.assert_allclose(mean.item(), expected.mean(), rtol=1e-5, atol=1e-6)
    # "mean" is the default reduction, sym_kl the default kind
    np.testing.assert_allclose(sync_loss(z, z_adv, kind).item(), expected.mean(), rtol=1e-5, atol=1e-6)


def test_sync_loss_default_kind_is_symmetric_kl(logits):
    z, z_adv = logits
    np.testing.assert_allclose(sync_loss(z, z_adv).item(), _reference("sym_kl", _np(z), _np(z_adv)).mean(), rtol=1e-5)


def test_js_uses_natural_log():
    # Disjoint-ish distributions: JS tends to ln 2 in nats (1 in bits).
    z = torch.tensor([[30.0, -30.0]])
    z_adv = torch.tensor([[-30.0, 30.0]])
    np.testing.assert_allclose(sync_loss(z, z_adv, "js").item(), np.log(2), rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_sync_loss_is_zero_for_identical_logits(kind, logits):
    z, _ = logits
    out = sync_loss(z, z.clone(), kind, reduction="none")
    torch.testing.assert_close(out, torch.zeros(B), atol=1e-6, rtol=0)


def test_sync_loss_shift_invariant(logits):
    # Logits that differ by a per-row constant give the same distribution.
    z, _ = logits
    for kind in KINDS:
        out = sync_loss(z, z + torch.arange(B, dtype=torch.float32)[:, None], kind, reduction="none")
        torch.testing.assert_close(out, torch.zeros(B), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ("sym_kl", "js", "l1_logprob"))
def test_symmetric_kinds_are_symmetric(kind, logits):
    z, z_adv = logits
    torch.testing.assert_close(sync_loss(z, z_adv, kind, "none"), sync_loss(z_adv, z, kind, "none"),
                               rtol=1e-5, atol=1e-6)


def test_kl_is_not_symmetric(logits):
    z, z_adv = logits
    forward, backward = sync_loss(z, z_adv, "kl", "none"), sync_loss(z_adv, z, "kl", "none")
    assert (forward - backward).abs().max() > 1e-2
    np.testing.assert_allclose(_np(backward), kl(softmax(_np(z_adv)), softmax(_np(z))), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_sync_loss_gradients_flow_into_both_inputs(kind, logits):
    z, z_adv = (t.clone().requires_grad_(True) for t in logits)
    sync_loss(z, z_adv, kind).backward()
    for g in (z.grad, z_adv.grad):
        assert g is not None and torch.isfinite(g).all()
        assert g.abs().max() > 1e-4


@pytest.mark.parametrize("kind", ("sym_kl", "kl"))
def test_sync_loss_gradient_matches_finite_differences(kind, logits):
    z, z_adv = (t[:2].clone().requires_grad_(True) for t in logits)
    sync_loss(z, z_adv, kind).backward()
    # Central differences of the float64 reference.
    zn, zan, h = _np(z), _np(z_adv), 1e-5
    for which, base, grad in ((0, zn, z.grad), (1, zan, z_adv.grad)):
        numeric = np.zeros_like(base)
        for i in range(base.shape[0]):
            for k in range(base.shape[1]):
                plus, minus = base.copy(), base.copy()
                plus[i, k] += h
                minus[i, k] -= h
                args_p = (plus, zan) if which == 0 else (zn, plus)
                args_m = (minus, zan) if which == 0 else (zn, minus)
                numeric[i, k] = (_reference(kind, *args_p).mean() - _reference(kind, *args_m).mean()) / (2 * h)
        np.testing.assert_allclose(_np(grad), numeric, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_sync_loss_bf16_logits_give_float32_close_to_float32(kind, logits):
    z, z_adv = logits
    zb, zab = z.bfloat16(), z_adv.bfloat16()
    out = sync_loss(zb, zab, kind, reduction="none")
    assert out.dtype == torch.float32
    # Exact for the bf16 values themselves (computed in float32, not bf16) ...
    np.testing.assert_allclose(_np(out), _reference(kind, _np(zb), _np(zab)), rtol=1e-5, atol=1e-6)
    # ... and close to the float32 result (bf16 keeps ~3 significant digits of the logits).
    np.testing.assert_allclose(_np(out), _np(sync_loss(z, z_adv, kind, reduction="none")), rtol=5e-2, atol=1e-2)


def test_sync_loss_rejects_unknown_kind_and_reduction(logits):
    z, z_adv = logits
    with pytest.raises(ValueError, match="sync loss"):
        sync_loss(z, z_adv, "wasserstein")
    with pytest.raises(ValueError, match="reduction"):
        sync_loss(z, z_adv, "sym_kl", reduction="sum")


# --- delta_loss -------------------------------------------------------------------------------

def test_delta_loss_is_detached_per_sample_ce_difference(logits):
    z, z_adv = (t.clone().requires_grad_(True) for t in logits)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    dl = delta_loss(z, z_adv, y)
    expected = F.cross_entropy(z_adv.detach().double(), y, reduction="none") - F.cross_entropy(
        z.detach().double(), y, reduction="none")
    assert dl.shape == (B,) and dl.dtype == torch.float32
    assert not dl.requires_grad and dl.grad_fn is None
    np.testing.assert_allclose(_np(dl), expected.numpy(), rtol=1e-5, atol=1e-6)
    assert (dl > 0).any() and (dl < 0).any(), "ΔL has both signs on random logits"


def test_delta_loss_bf16_logits_float32():
    g = torch.Generator().manual_seed(1)
    z, z_adv = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    y = torch.tensor([0, 1, 2, 0])
    dl = delta_loss(z.bfloat16(), z_adv.bfloat16(), y)
    assert dl.dtype == torch.float32
    ref = F.cross_entropy(z_adv.bfloat16().double(), y, reduction="none") - F.cross_entropy(
        z.bfloat16().double(), y, reduction="none")
    np.testing.assert_allclose(_np(dl), ref.numpy(), rtol=1e-5, atol=1e-6)


# --- Threshold --------------------------------------------------------------------------------

def _batches(n_batches=3, sizes=(7, 8, 5)):
    rng = np.random.default_rng(0)
    return [rng.normal(loc=0.3 * i, scale=1.0, size=sizes[i % len(sizes)]).astype(np.float32)
            for i in range(n_batches)]


def test_threshold_default_is_batch_mean():
    (dl,) = _batches(1)
    t = Threshold()
    assert t.rule == "batch_mean"
    np.testing.assert_allclose(t(torch.from_numpy(dl)).item(), dl.astype(np.float64).mean(), rtol=1e-6)


def test_threshold_batch_mean_has_no_memory():
    t = Threshold("batch_mean")
    for dl in _batches():
        value = t(torch.from_numpy(dl))
        np.testing.assert_allclose(value.item(), dl.astype(np.float64).mean(), rtol=1e-6, atol=1e-7)
        assert value.shape == () and not value.requires_grad


@pytest.mark.parametrize("n", (7, 8))  # odd and even counts: np.median interpolates the even one
def test_threshold_median(n):
    dl = np.random.default_rng(n).normal(size=n).astype(np.float32)
    value = Threshold("median")(torch.from_numpy(dl)).item()
    np.testing.assert_allclose(value, np.median(dl.astype(np.float64)), rtol=1e-6, atol=1e-7)
    if n % 2 == 0:
        assert value not in dl, "an even count gives the mean of the two middle values"


@pytest.mark.parametrize("q", (0.8, 0.25, 0.5))
def test_threshold_quantile(q):
    dl = np.random.default_rng(3).normal(size=10).astype(np.float32)
    value = Threshold(f"quantile:{q}")(torch.from_numpy(dl)).item()
    np.testing.assert_allclose(value, np.quantile(dl.astype(np.float64), q), rtol=1e-6, atol=1e-7)


def test_threshold_is_detached():
    dl = torch.randn(6, requires_grad=True)
    for rule in ("batch_mean", "ema", "median", "quantile:0.8"):
        assert not Threshold(rule)(dl).requires_grad


@pytest.mark.parametrize("momentum", (None, 0.6))
def test_threshold_ema_over_three_batches(momentum):
    t = Threshold("ema") if momentum is None else Threshold("ema", momentum=momentum)
    m = 0.9 if momentum is None else momentum   # METHOD.md: momentum 0.9 by default
    expected, values = None, []
    for dl in _batches():
        mean = dl.astype(np.float64).mean()
        expected = mean if expected is None else m * expected + (1 - m) * mean
        values.append(t(torch.from_numpy(dl)).item())
        np.testing.assert_allclose(values[-1], expected, rtol=1e-5, atol=1e-6)
    # the EMA lags the batch means (a test that the state is used at all)
    assert abs(values[-1] - _batches()[-1].mean()) > 0.05


def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_threshold_state_round_trip_continues_the_ema():
    b1, b2, b3 = (torch.from_numpy(b) for b in _batches())
    original = Threshold("ema")
    original(b1)
    original(b2)
    restored = Threshold("ema")
    restored.load_state_dict(_roundtrip(original.state_dict()))
    fresh = Threshold("ema")
    a, b, c = original(b3), restored(b3), fresh(b3)
    assert a.item() == b.item()
    assert abs(a.item() - c.item()) > 1e-3, "without the state the EMA restarts at the batch mean"


def test_threshold_state_of_fresh_ema_round_trips():
    t = Threshold("ema")
    restored = Threshold("ema")
    restored.load_state_dict(_roundtrip(t.state_dict()))
    (dl,) = _batches(1)
    np.testing.assert_allclose(restored(torch.from_numpy(dl)).item(), dl.astype(np.float64).mean(), rtol=1e-6)


def test_threshold_refuses_state_of_another_rule():
    ema = Threshold("ema")
    ema(torch.randn(4))
    for other in ("batch_mean", "median", "quantile:0.8"):
        with pytest.raises(ValueError, match="rule"):
            Threshold(other).load_state_dict(ema.state_dict())
    with pytest.raises(ValueError):
        Threshold("quantile:0.7").load_state_dict(Threshold("quantile:0.8").state_dict())


@pytest.mark.parametrize("rule", ("quantile:1.5", "quantile:0", "quantile:1", "quantile:abc", "quantile:",
                                  "foo", "median:3", "ema:0.5", "", "Batch_Mean"))
def test_threshold_invalid_rules_raise_config_error(rule):
    assert issubclass(ConfigError, ValueError)
    with pytest.raises(ConfigError, match="threshold"):
        Threshold(rule)


# --- EpsMemory --------------------------------------------------------------------------------

def _memory(size=10, eps0=0.3, gamma=0.1, lo=0.25, hi=2.0):
    return EpsMemory(size, eps0, gamma, lo * eps0, hi * eps0)


def test_eps_memory_starts_at_eps0():
    mem = _memory()
    assert len(mem) == 10
    assert mem.eps.dtype == torch.float32
    torch.testing.assert_close(mem[torch.arange(10)], torch.full((10,), 0.3), rtol=0, atol=0)


def test_eps_memory_one_update():
    mem = _memory()
    index = torch.tensor([7, 2, 5, 0])
    fragile = torch.tensor([True, False, True, False])
    mem.update(index, fragile)
    expected = np.full(10, 0.3)
    expected[[7, 5]] = 0.3 * (1 - 0.1)   # fragile: smaller ball
    expected[[2, 0]] = 0.3 * (1 + 0.1)   # stable: larger ball
    np.testing.assert_allclose(_np(mem.eps), expected, rtol=1e-6)
    untouched = torch.tensor([1, 3, 4, 6, 8, 9])
    assert (mem[untouched] == torch.tensor(0.3)).all(), "samples not in the batch keep their eps"
    np.testing.assert_allclose(_np(mem[index]), expected[[7, 2, 5, 0]], rtol=1e-6)


def test_eps_memory_updates_compound_multiplicatively():
    mem = _memory(size=3, gamma=0.2, lo=0.01, hi=100.0)
    idx = torch.tensor([0, 1, 2])
    pattern = [torch.tensor([True, False, True]), torch.tensor([True, False, False])]
    for f in pattern:
        mem.update(idx, f)
    expected = 0.3 * np.array([0.8 * 0.8, 1.2 * 1.2, 0.8 * 1.2])
    np.testing.assert_allclose(_np(mem.eps), expected, rtol=1e-6)


def test_eps_memory_reaches_and_stays_at_the_bounds_exactly():
    eps0, lo, hi = 0.3, 0.075, 0.6
    mem = EpsMemory(3, eps0, 0.3, lo, hi)
    idx = torch.tensor([0, 1])
    for _ in range(20):
        mem.update(idx, torch.tensor([True, False]))
        assert mem.eps.min() >= torch.tensor(lo) and mem.eps.max() <= torch.tensor(hi)
    assert mem.eps[0].item() == torch.tensor(lo).item(), "always fragile: clamped to eps_min exactly"
    assert mem.eps[1].item() == torch.tensor(hi).item(), "always stable: clamped to eps_max exactly"
    assert mem.eps[2].item() == torch.tensor(eps0).item()


def test_eps_memory_random_updates_match_float64_simulation():
    rng = np.random.default_rng(0)
    size, eps0, gamma, lo, hi = 12, 0.3, 0.25, 0.1, 0.7
    mem = EpsMemory(size, eps0, gamma, lo, hi)
    ref = np.full(size, eps0)
    for _ in range(60):
        index = rng.choice(size, size=5, replace=False)
        fragile = rng.random(5) < 0.5
        mem.update(torch.from_numpy(index), torch.from_numpy(fragile))
        cur = ref[index]
        ref[index] = np.where(fragile, np.maximum(lo, cur * (1 - gamma)), np.minimum(hi, cur * (1 + gamma)))
        assert float(mem.eps.min()) >= np.float32(lo) and float(mem.eps.max()) <= np.float32(hi)
    np.testing.assert_allclose(_np(mem.eps), ref, rtol=1e-5)
    assert len(np.unique(np.round(ref, 6))) > 3, "the simulation visited several eps levels"


def test_eps_memory_gamma_zero_keeps_eps0():
    mem = EpsMemory(6, 0.3, 0.0, 0.075, 0.6)
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        mem.update(torch.randperm(6, generator=g)[:4], torch.rand(4, generator=g) < 0.5)
    assert (mem.eps == torch.tensor(0.3)).all()


def test_eps_memory_state_round_trip():
    mem = _memory(gamma=0.3)
    mem.update(torch.tensor([1, 2, 3]), torch.tensor([True, False, True]))
    mem.update(torch.tensor([3, 4]), torch.tensor([True, False]))
    state = _roundtrip(mem.state_dict())
    restored = _memory(gamma=0.3)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored.eps, mem.eps, rtol=0, atol=0)
    # the state is a copy, not a view of the live memory
    mem.update(torch.tensor([0]), torch.tensor([True]))
    assert restored.eps[0].item() == pytest.approx(0.3)
    # and both continue identically
    restored.update(torch.tensor([0]), torch.tensor([True]))
    torch.testing.assert_close(restored.eps, mem.eps, rtol=0, atol=0)


def test_eps_memory_state_dict_is_detached_copy():
    mem = _memory()
    state = mem.state_dict()
    state["eps"][0] = 123.0
    assert mem.eps[0].item() == pytest.approx(0.3)


def test_eps_memory_load_refuses_wrong_size_and_out_of_range_values():
    mem = _memory()
    with pytest.raises(ValueError, match="samples"):
        mem.load_state_dict({"eps": torch.full((11,), 0.3)})
    for bad in (0.3 * 0.25 * 0.5, 0.3 * 2.0 * 1.5, float("nan"), float("inf")):
        eps = torch.full((10,), 0.3)
        eps[4] = bad
        with pytest.raises(ValueError, match="lie in"):
            mem.load_state_dict({"eps": eps})
    assert (mem.eps == torch.tensor(0.3)).all(), "a refused state leaves the memory untouched"
    # the bounds themselves are fine
    eps = torch.full((10,), 0.3)
    eps[0], eps[1] = 0.3 * 0.25, 0.3 * 2.0
    mem.load_state_dict({"eps": eps})
    torch.testing.assert_close(mem.eps, eps)


@pytest.mark.parametrize("size,eps0,gamma,lo,hi", [
    (0, 0.3, 0.1, 0.1, 0.6),       # no samples
    (4, 0.3, 1.0, 0.1, 0.6),       # gamma 1 would send fragile eps to 0
    (4, 0.3, -0.1, 0.1, 0.6),      # negative gamma swaps the roles
    (4, 0.3, 0.1, 0.0, 0.6),       # eps_min 0
    (4, 0.3, 0.1, -0.1, 0.6),      # eps_min < 0
    (4, 0.3, 0.1, 0.4, 0.6),       # eps_min > eps0
    (4, 0.3, 0.1, 0.1, 0.2),       # eps_max < eps0
    (4, 0.3, 0.1, 0.7, 0.6),       # eps_min > eps_max
])
def test_eps_memory_constructor_refuses_bad_settings(size, eps0, gamma, lo, hi):
    with pytest.raises(ValueError):
        EpsMemory(size, eps0, gamma, lo, hi)


# --- memoryless_eps ---------------------------------------------------------------------------

@pytest.mark.parametrize("eps0,gamma", [(0.3, 0.1), (1.5, 0.4), (0.3, 0.0)])
def test_memoryless_eps_values(eps0, gamma):
    fragile = torch.tensor([True, False, False, True, True])
    eps = memoryless_eps(fragile, eps0, gamma)
    assert eps.shape == (5,) and eps.dtype == torch.float32
    expected = np.where(fragile.numpy(), eps0 * (1 - gamma), eps0 * (1 + gamma))
    np.testing.assert_allclose(_np(eps), expected, rtol=1e-6)


def test_eps_memory_moves_a_repeated_sample_once_by_its_last_split():
    mem = EpsMemory(4, eps0=0.3, gamma=0.1, eps_min=0.075, eps_max=0.6)
    mem.update(torch.tensor([1, 2, 1, 2, 2]), torch.tensor([True, False, False, False, True]))
    np.testing.assert_allclose(mem.eps.numpy(), [0.3, 0.33, 0.27, 0.3], rtol=1e-6)
