"""The DPAAT method (``paper/METHOD.md``): loss change ΔL, its threshold, the fragile/stable
split, the per-sample epsilon memory and the synchronisation loss.

Everything here works on device tensors and never reads a value back to the host, so a
training step has no host-device synchronisation. Under DDP the threshold is global and the
epsilon memory is the same on every process (see :mod:`dpaat_core.train.distributed`).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from dpaat_core.train import distributed
from dpaat_core.config import SYNC_LOSSES, parse_threshold


def per_sample_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per sample, float32 ``[B]`` (logits may be bf16 under autocast)."""
    return F.cross_entropy(logits.float(), y, reduction="none")


def delta_loss(z: torch.Tensor, z_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``ΔL_i = CE_i(z_adv) - CE_i(z)``, detached float32 ``[B]``."""
    return (per_sample_ce(z_adv, y) - per_sample_ce(z, y)).detach()


def sync_loss(z: torch.Tensor, z_adv: torch.Tensor, kind: str = "sym_kl", reduction: str = "mean") -> torch.Tensor:
    """Disagreement between the clean and adversarial predictions, from ``log_softmax`` in float32.

    ``z``, ``z_adv``: logits ``[B, K]``. ``kind``:
      - ``sym_kl``: ``0.5 * (KL(p || p_adv) + KL(p_adv || p))`` (the default, symmetric);
      - ``js``: Jensen-Shannon divergence, ``0.5 * (KL(p || m) + KL(p_adv || m))``, ``m`` the average;
      - ``l1_logprob``: ``sum_k |log p_k - log p_adv_k|``;
      - ``kl``: ``KL(p || p_adv)``, TRADES' one-sided term.
    Gradients flow into both ``z`` and ``z_adv``. ``reduction``: ``"mean"`` over the batch or
    ``"none"`` for ``[B]``.
    """
    if kind not in SYNC_LOSSES:
        raise ValueError(f"sync loss must be one of {', '.join(SYNC_LOSSES)}, got {kind!r}")
    logp, logq = F.log_softmax(z.float(), dim=1), F.log_softmax(z_adv.float(), dim=1)
    p, q = logp.exp(), logq.exp()
    if kind == "sym_kl":
        per_sample = 0.5 * ((p - q) * (logp - logq)).sum(1)
    elif kind == "kl":
        per_sample = (p * (logp - logq)).sum(1)
    elif kind == "js":
        logm = torch.logaddexp(logp, logq) - torch.log(torch.tensor(2.0, device=z.device))
        per_sample = 0.5 * ((p * (logp - logm)).sum(1) + (q * (logq - logm)).sum(1))
    else:
        per_sample = (logp - logq).abs().sum(1)
    if reduction == "none":
        return per_sample
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    return per_sample.mean()


class Threshold:
    """The ΔL threshold ``T`` that splits a batch into fragile (``ΔL > T``) and stable samples.

    Rules: ``batch_mean`` (ΔLavg, the default), ``ema`` (running mean of the batch means,
    ``momentum`` 0.9), ``median``, ``quantile:<q>``, and ``class_mean`` (class-aware DPAAT, not the
    paper's: each sample against its own class's running mean ΔL, docs/CLASS_AWARE.md). Under DDP the
    statistic is taken over the global batch. The value stays a device tensor.
    """

    def __init__(self, rule: str = "batch_mean", momentum: float = 0.9, num_classes: Optional[int] = None):
        self.rule = rule
        self.kind, self.q = parse_threshold(rule)
        self.momentum = float(momentum)
        if self.kind == "class_mean" and not (isinstance(num_classes, int) and num_classes >= 1):
            raise ValueError(f"the class_mean threshold needs the number of classes, got {num_classes!r}")
        self.num_classes = num_classes
        # last threshold (the EMA state for "ema"); for "class_mean" the running mean of each class ``[K]``, NaN for a
        # class not seen yet
        self.value: Optional[torch.Tensor] = None

    def __call__(self, delta_loss: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The threshold: a scalar tensor, or for ``class_mean`` one per sample ``[B]`` (its class's running mean
        ΔL, this batch included), which needs the labels ``y``."""
        dl = delta_loss.detach().float()
        if self.kind == "class_mean":
            return self._class_mean(dl, y)
        if self.kind in ("batch_mean", "ema"):
            total = distributed.all_reduce_sum(torch.stack([dl.sum(), torch.tensor(float(dl.numel()), device=dl.device)]))
            t = total[0] / total[1]
            if self.kind == "ema" and self.value is not None:
                t = self.momentum * self.value.to(t.device) + (1 - self.momentum) * t
        else:
            everyone = distributed.all_gather_cat(dl)
            t = torch.quantile(everyone, 0.5 if self.kind == "median" else self.q)
        self.value = t
        return t

    def _class_mean(self, dl: torch.Tensor, y: Optional[torch.Tensor]) -> torch.Tensor:
        """Each class's running mean ΔL (EMA with ``momentum`` over the batches where the class appears; its
        first batch sets it), taken over the global batch under DDP; returns it for each sample ``[B]``."""
        if y is None or y.shape != dl.shape:
            raise ValueError("the class_mean threshold needs each sample's label")
        k = self.num_classes
        y = y.to(dl.device)
        parts = torch.zeros(2, k, device=dl.device)
        parts[0].index_add_(0, y, dl)
        parts[1].index_add_(0, y, torch.ones_like(dl))
        parts = distributed.all_reduce_sum(parts)
        present = parts[1] > 0
        batch = parts[0] / parts[1].clamp(min=1)
        old = torch.full((k,), float("nan"), device=dl.device) if self.value is None else self.value.to(dl.device)
        blended = torch.where(torch.isnan(old), batch, self.momentum * old + (1 - self.momentum) * batch)
        self.value = torch.where(present, blended, old)
        return self.value[y]

    def state_dict(self) -> dict:
        return {"rule": self.rule, "value": None if self.value is None else self.value.detach().cpu()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("rule") != self.rule:
            raise ValueError(f"threshold state is for rule {state.get('rule')!r}, this threshold uses {self.rule!r}")
        value = state.get("value")
        self.value = None if value is None else torch.as_tensor(value, dtype=torch.float32)


class EpsMemory:
    """Per-sample epsilon ``E``, one float per training sample, keyed by dataset index.

    Starts at ``eps0``. :meth:`update` moves fragile samples down and stable ones up,
    multiplicatively: ``max(eps_min, e * (1 - gamma))`` and ``min(eps_max, e * (1 + gamma))``.
    The new value is used the next time the sample is seen.
    """

    def __init__(self, size: int, eps0: float, gamma: float, eps_min: float, eps_max: float,
                 device: torch.device | str = "cpu", labels: Optional[torch.Tensor] = None):
        if size < 1:
            raise ValueError(f"an eps memory needs at least one sample, got size {size}")
        if labels is not None and labels.shape != (size,):
            raise ValueError(f"class renormalisation needs one label per sample ({size}), got shape "
                             f"{tuple(labels.shape)}")
        if not 0 <= gamma < 1:
            raise ValueError(f"gamma must be in [0, 1), got {gamma}")
        if not 0 < eps_min <= eps0 <= eps_max:
            raise ValueError(f"need 0 < eps_min <= eps0 <= eps_max, got {eps_min}, {eps0}, {eps_max}")
        self.eps0, self.gamma, self.eps_min, self.eps_max = float(eps0), float(gamma), float(eps_min), float(eps_max)
        self.eps = torch.full((size,), self.eps0, dtype=torch.float32, device=device)
        # class_renorm: each sample's class; after every update each class's mean eps is scaled back to eps0
        self.labels = None if labels is None else labels.to(device=device, dtype=torch.int64)
        if self.labels is not None:
            k = int(self.labels.max()) + 1
            self._class_size = torch.zeros(k, device=device).index_add_(0, self.labels, torch.ones(size, device=device))

    def __len__(self) -> int:
        return self.eps.numel()

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        return self.eps[index.to(self.eps.device)]

    def update(self, index: torch.Tensor, fragile: torch.Tensor) -> None:
        """Apply the split of the samples ``index`` (int64 ``[B]``) given ``fragile`` (bool ``[B]``).

        Under DDP every process passes its own batch; the updates of all processes are gathered
        and applied everywhere, so the memory stays identical on every process. A sample that
        appears more than once moves once, by the split of its last appearance.
        """
        index = distributed.all_gather_cat(index.to(self.eps.device))
        fragile = distributed.all_gather_cat(fragile.to(self.eps.device))
        # A sample drawn twice (balanced sampling, DDP padding) moves once, by its last split:
        # writing duplicates is order-undefined on CUDA and could let processes drift apart.
        position = torch.arange(len(index), device=index.device)
        last = torch.full((len(self.eps),), -1, dtype=torch.int64, device=index.device)
        last.scatter_reduce_(0, index, position, reduce="amax")
        keep = last[index] == position
        index, fragile = index[keep], fragile[keep]
        current = self.eps[index]
        self.eps[index] = torch.where(
            fragile,
            (current * (1 - self.gamma)).clamp_(min=self.eps_min),
            (current * (1 + self.gamma)).clamp_(max=self.eps_max),
        )
        if self.labels is not None:
            self.renormalise()

    def renormalise(self) -> None:
        """Scale each class's eps so that its mean is ``eps0`` again, then clip to ``[eps_min, eps_max]``: the
        spread within a class is kept, the drift between classes removed (class-aware DPAAT, ``dpaat_cnorm``)."""
        sums = torch.zeros_like(self._class_size).index_add_(0, self.labels, self.eps)
        scale = self.eps0 * self._class_size / sums.clamp(min=1e-12)
        self.eps.mul_(scale[self.labels]).clamp_(self.eps_min, self.eps_max)

    def class_means(self) -> torch.Tensor:
        """Mean eps of each class ``[K]`` (needs the labels)."""
        sums = torch.zeros_like(self._class_size).index_add_(0, self.labels, self.eps)
        return sums / self._class_size.clamp(min=1)

    def state_dict(self) -> dict:
        return {"eps": self.eps.detach().cpu().clone(), "eps0": self.eps0, "gamma": self.gamma,
                "eps_min": self.eps_min, "eps_max": self.eps_max}

    def load_state_dict(self, state: dict) -> None:
        eps = torch.as_tensor(state["eps"], dtype=torch.float32)
        if eps.shape != self.eps.shape:
            raise ValueError(f"eps memory holds {eps.numel()} samples, this training set has {self.eps.numel()}")
        if not torch.isfinite(eps).all() or (eps < self.eps_min - 1e-6).any() or (eps > self.eps_max + 1e-6).any():
            raise ValueError(f"eps memory values must lie in [{self.eps_min}, {self.eps_max}]")
        self.eps.copy_(eps.to(self.eps.device))


def memoryless_eps(fragile: torch.Tensor, eps0: float, gamma: float) -> torch.Tensor:
    """The ``memoryless`` option: ``eps0 * (1 - gamma)`` for fragile samples, ``eps0 * (1 + gamma)`` else."""
    return torch.where(fragile, eps0 * (1 - gamma), eps0 * (1 + gamma)).float()
