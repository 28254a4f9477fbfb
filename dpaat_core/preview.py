"""What a training setting implies before it runs: the eps memory's reachable band and the time per epoch.

Used by the Train page's live preview; plain numbers and frames, no dashboard code.
"""
from __future__ import annotations

import math
import time

import pandas as pd
import torch

from dpaat_core.config import RunConfig
from dpaat_core.models import build_model
from dpaat_core.train.objectives import MethodState, training_step


def eps_band(eps0: float, gamma: float, floor_ratio: float, cap_ratio: float, epochs: int) -> pd.DataFrame:
    """The eps a sample can hold after each epoch ``0..epochs``: it moves once per epoch (once per visit), by
    ``(1 + gamma)`` when stable and ``(1 - gamma)`` when fragile, within ``[floor, cap]``. Columns ``epoch``,
    ``low`` (fragile every epoch) and ``high`` (stable every epoch)."""
    e = pd.Series(range(epochs + 1), name="epoch")
    high = (eps0 * (1 + gamma) ** e).clip(upper=cap_ratio * eps0)
    low = (eps0 * (1 - gamma) ** e).clip(lower=floor_ratio * eps0)
    return pd.DataFrame({"epoch": e, "low": low, "high": high})


def epochs_to_bound(gamma: float, ratio: float) -> float:
    """Epochs in a row on one side of the split that take eps0 to ``ratio * eps0`` (the floor when ``ratio < 1``,
    the cap when ``> 1``): 0 for a bound at eps0, inf when gamma is 0."""
    if ratio == 1:
        return 0
    if gamma <= 0:
        return math.inf
    step = math.log(1 + gamma) if ratio > 1 else math.log(1 - gamma)
    return math.ceil(math.log(ratio) / step - 1e-9)


def step_seconds(config: RunConfig, num_classes: int = 7, repeats: int = 3) -> float:
    """Seconds of one training step (attack, forward, backward, update) of ``config``'s model, method and batch at
    its image size, measured here on the CPU with random images: the median of ``repeats`` after one warm-up."""
    torch.manual_seed(0)
    size, b = config.data.image_size, config.train.batch_size
    model = build_model(config.model.name, num_classes).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.train.lr)
    x, y = torch.rand(b, 3, size, size), torch.arange(b) % num_classes
    idx = torch.arange(b)
    state = MethodState.create(config.method, config.attack, b, "cpu", labels=y, num_classes=num_classes)
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        step = training_step(model, x, y, idx, config.method, config.attack, state)
        optimizer.zero_grad(set_to_none=True)
        step.loss.backward()
        optimizer.step()
        if i:
            times.append(time.perf_counter() - t0)
    return float(sorted(times)[len(times) // 2])
