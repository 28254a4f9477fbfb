"""Class-aware DPAAT (docs/CLASS_AWARE.md): the ``class_mean`` threshold and the class-renormalised eps memory."""
import io

import numpy as np
import pytest
import torch

from dpaat_core.store import runs
from dpaat_core.data import load_dataset
from dpaat_core.config import ConfigError, RunConfig, method_config
from dpaat_core.train.dpaat import EpsMemory, Threshold
from dpaat_core.train.objectives import MethodState
from dpaat_core.train.loop import train


def _reference_class_means(batches, k, momentum):
    """Float64 simulation of the per-class EMA: NaN until a class appears, its first batch sets it."""
    value = np.full(k, np.nan)
    out = []
    for dl, y in batches:
        for c in range(k):
            sel = y == c
            if sel.any():
                m = dl[sel].astype(np.float64).mean()
                value[c] = m if np.isnan(value[c]) else momentum * value[c] + (1 - momentum) * m
        out.append(value[y].copy())
    return out


def _class_batches():
    rng = np.random.default_rng(1)
    ys = [np.array([0, 0, 1, 1, 1]), np.array([1, 1, 2, 1]), np.array([0, 2, 2, 2, 0, 1])]   # class 2 absent at first
    return [(rng.normal(loc=y.astype(np.float32), size=len(y)).astype(np.float32), y) for y in ys]


@pytest.mark.parametrize("momentum", (0.9, 0.5))
def test_class_mean_threshold_follows_each_class_on_its_own(momentum):
    batches = _class_batches()
    t = Threshold("class_mean", momentum=momentum, num_classes=3)
    expected = _reference_class_means(batches, 3, momentum)
    for (dl, y), want in zip(batches, expected):
        got = t(torch.from_numpy(dl), torch.from_numpy(y))
        assert got.shape == (len(y),) and not got.requires_grad
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
    # a class absent from a batch keeps its value; a class never seen stays NaN and is not used
    t2 = Threshold("class_mean", num_classes=4)
    t2(torch.tensor([1.0, 3.0]), torch.tensor([0, 1]))
    t2(torch.tensor([5.0]), torch.tensor([1]))
    np.testing.assert_allclose(t2.value[:2].numpy(), [1.0, 0.9 * 3 + 0.1 * 5])
    assert torch.isnan(t2.value[2:]).all()


def test_class_mean_splits_within_each_class_not_across_the_batch():
    """The rare class with a high ΔL is not all 'fragile' against the batch: half of it is above its own mean."""
    dl = torch.tensor([0.1, 0.2, 0.3, 0.4, 2.0, 3.0])
    y = torch.tensor([0, 0, 0, 0, 1, 1])
    batch = dl > Threshold("batch_mean")(dl)
    own = dl > Threshold("class_mean", num_classes=2)(dl, y)
    assert batch.tolist() == [False, False, False, False, True, True]
    assert own.tolist() == [False, False, True, True, False, True]


def test_class_mean_needs_labels_and_the_class_count():
    with pytest.raises(ValueError, match="number of classes"):
        Threshold("class_mean")
    with pytest.raises(ValueError, match="label"):
        Threshold("class_mean", num_classes=2)(torch.ones(3))


def test_class_mean_state_round_trips():
    (b1, y1), (b2, y2), (b3, y3) = ((torch.from_numpy(d), torch.from_numpy(y)) for d, y in _class_batches())
    original = Threshold("class_mean", num_classes=3)
    original(b1, y1)
    original(b2, y2)
    buf = io.BytesIO()
    torch.save(original.state_dict(), buf)
    buf.seek(0)
    restored = Threshold("class_mean", num_classes=3)
    restored.load_state_dict(torch.load(buf, weights_only=True))
    torch.testing.assert_close(original(b3, y3), restored(b3, y3), equal_nan=True)


def test_renormalised_memory_keeps_each_class_mean_at_eps0_and_the_spread_within_it():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
    mem = EpsMemory(10, eps0=1.0, gamma=0.1, eps_min=0.25, eps_max=2.0, labels=labels)
    plain = EpsMemory(10, eps0=1.0, gamma=0.1, eps_min=0.25, eps_max=2.0)
    # class 1 always fragile (its eps would fall to eps_min), class 0 split, class 2 always stable
    fragile = torch.tensor([True, True, False, False, True, True, True, True, False, False])
    for _ in range(5):
        mem.update(torch.arange(10), fragile)
        plain.update(torch.arange(10), fragile)
    np.testing.assert_allclose(mem.class_means().numpy(), [1.0, 1.0, 1.0], rtol=1e-5)
    assert plain.eps[4:8].mean() < 0.6 and plain.eps[8:].mean() > 1.5          # what the renormalisation undoes
    # within class 0 the fragile samples still sit below the stable ones, in the plain memory's ratio
    ratio = (mem.eps[2] / mem.eps[0]).item()
    np.testing.assert_allclose(ratio, (plain.eps[2] / plain.eps[0]).item(), rtol=1e-5)
    assert (mem.eps >= 0.25).all() and (mem.eps <= 2.0).all()


def test_renormalised_memory_clips_to_its_bounds():
    labels = torch.tensor([0, 0, 0, 0])
    mem = EpsMemory(4, eps0=1.0, gamma=0.5, eps_min=0.25, eps_max=1.5, labels=labels)
    for _ in range(6):   # one sample far up, three far down: the rescaled top would exceed eps_max
        mem.update(torch.arange(4), torch.tensor([False, True, True, True]))
    assert mem.eps.max().item() <= 1.5 and mem.eps.min().item() >= 0.25


def test_renormalised_memory_refuses_labels_of_another_size():
    with pytest.raises(ValueError, match="one label per sample"):
        EpsMemory(4, 1.0, 0.1, 0.5, 2.0, labels=torch.tensor([0, 1, 0]))


def test_class_aware_presets_and_their_checks():
    cthr, cnorm = method_config("dpaat_cthr"), method_config("dpaat_cnorm")
    assert cthr.threshold == "class_mean" and not cthr.class_renorm and cthr.adaptive
    assert cnorm.class_renorm and cnorm.threshold == "batch_mean"
    assert method_config("dpaat").threshold == "batch_mean" and not method_config("dpaat").class_renorm
    assert method_config("dpaat", class_renorm=True, threshold="class_mean").class_renorm
    with pytest.raises(ConfigError, match="class_renorm"):
        method_config("pgd_at", class_renorm=True)
    with pytest.raises(ConfigError, match="class_renorm"):
        method_config("dpaat", class_renorm=True, memoryless=True)
    with pytest.raises(ConfigError, match="class_renorm"):
        method_config("dpaat", class_renorm="yes")
    with pytest.raises(ValueError, match="training labels"):
        MethodState.create(method_config("dpaat_cnorm"), RunConfig().attack, 4, "cpu")


@pytest.mark.parametrize("method", ("dpaat_cthr", "dpaat_cnorm"))
def test_class_aware_methods_train_end_to_end(tmp_path, method):
    cfg = RunConfig().replace(data={"spec": "synthetic:n=48,classes=3", "image_size": 16}, attack={"steps": 2},
                              method=method_config(method), train={"epochs": 2, "batch_size": 16, "device": "cpu"})
    run = train(cfg, store=tmp_path, run_id=method)
    assert runs.read_status(run)["state"] == "done"
    state = runs.load_checkpoint(run / "last.pt")["method_state"]
    if method == "dpaat_cnorm":
        eps = state["memory"]["eps"].numpy()
        labels = load_dataset(cfg.data.spec, "train", 16).labels.numpy()
        for c in range(3):
            np.testing.assert_allclose(eps[labels == c].mean(), cfg.attack.eps, rtol=1e-4)
        assert eps.std() > 0, "the memory still moves within a class"
    else:
        value = state["threshold"]["value"]
        assert value.shape == (3,) and torch.isfinite(value).all()
