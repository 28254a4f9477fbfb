"""Training objectives: ``erm``, ``pgd_at``, ``trades``, ``dpaat``, ``dpaat_nosync``,
``dpaat_fixed``, ``gaussian`` and the class-aware ``dpaat_cthr`` and ``dpaat_cnorm``, as settings of one function (the family table of METHOD.md).

``L = adv_weight * CE(z_adv) + beta_clean * CE(z) + lam * L_syn(z, z_adv)``: ERM has no attack;
TRADES attacks the KL to the clean prediction and has no CE(z_adv) term; the DPAAT family takes
each sample's eps from the memory; ``gaussian`` (randomized smoothing's base classifier, Cohen et al. 2019) replaces
the attack by Gaussian noise of std ``sigma``, so ``z_adv`` is the logits of ``x + N(0, sigma^2 I)`` (not clipped, as
the smoothed classifier sees it). Class weights apply to the CE terms only, never to ΔL.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from dpaat_core.attack.attacks import attack_mode, pgd
from dpaat_core.config import AttackConfig, MethodConfig
from dpaat_core.train.dpaat import EpsMemory, Threshold, delta_loss, memoryless_eps, per_sample_ce, sync_loss


@dataclass
class MethodState:
    """What a method carries from batch to batch: the threshold and (adaptive eps) the memory."""

    threshold: Threshold
    memory: Optional[EpsMemory] = None
    probe_threshold: Optional[Threshold] = None   # memoryless: the probe's split keeps its own (EMA) state

    @classmethod
    def create(cls, method: MethodConfig, attack: AttackConfig, train_size: int, device,
               labels: Optional[torch.Tensor] = None, num_classes: Optional[int] = None) -> "MethodState":
        """``labels`` (each training sample's class, ``[train_size]``) and ``num_classes`` are needed by the
        class-aware settings only (``class_renorm``, the ``class_mean`` threshold)."""
        if method.class_renorm and labels is None:
            raise ValueError("class_renorm needs the training labels")
        memory = None
        if method.adaptive and not method.memoryless:
            memory = EpsMemory(train_size, attack.eps, method.gamma, method.eps_min_ratio * attack.eps,
                               method.eps_max_ratio * attack.eps, device=device,
                               labels=labels if method.class_renorm else None)

        def threshold():
            return Threshold(method.threshold, method.ema_momentum, num_classes)
        return cls(threshold(), memory, threshold() if method.memoryless else None)

    def state_dict(self) -> dict:
        return {"threshold": self.threshold.state_dict(),
                "probe_threshold": None if self.probe_threshold is None else self.probe_threshold.state_dict(),
                "memory": None if self.memory is None else self.memory.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.threshold.load_state_dict(state["threshold"])
        if self.probe_threshold is not None:
            self.probe_threshold.load_state_dict(state["probe_threshold"])
        if (state.get("memory") is None) != (self.memory is None):
            raise ValueError("saved method state and this method disagree on having an eps memory")
        if self.memory is not None:
            self.memory.load_state_dict(state["memory"])


@dataclass
class StepResult:
    """One batch: the loss to minimise and detached statistics (device tensors; no host sync).

    Per sample ``[B]``: ``delta_loss``, ``eps`` (used for this batch), ``fragile``,
    ``correct_clean``, ``correct_adv``. Scalars: ``threshold``, ``ce_clean``, ``ce_adv``, ``sync``.
    """

    loss: torch.Tensor
    delta_loss: torch.Tensor
    eps: torch.Tensor
    fragile: torch.Tensor
    correct_clean: torch.Tensor
    correct_adv: torch.Tensor
    threshold: torch.Tensor
    ce_clean: torch.Tensor
    ce_adv: torch.Tensor
    sync: torch.Tensor


def _weighted_mean(per_sample: torch.Tensor, y: torch.Tensor, class_weights: Optional[torch.Tensor]) -> torch.Tensor:
    if class_weights is None:
        return per_sample.mean()
    w = class_weights[y]
    return (w * per_sample).sum() / w.sum()


def _kl_to(clean_logits: torch.Tensor):
    """Attack loss for TRADES: per-sample ``KL(p_clean || softmax(logits))``."""
    def loss_fn(logits, _y):
        return sync_loss(clean_logits, logits, "kl", reduction="none")
    return loss_fn


def _budget(model, x, y, idx, method: MethodConfig, attack: AttackConfig, state: MethodState, generator):
    """Each sample's eps for this batch, float32 ``[B]`` on ``x``'s device."""
    if state.memory is not None:
        return state.memory[idx].to(x.device)
    if method.attack == "noise":   # the "budget" of a noise-trained sample is the noise's std
        return torch.full((x.shape[0],), float(method.sigma), device=x.device)
    eps0 = torch.full((x.shape[0],), float(attack.eps), device=x.device)
    if not method.memoryless:
        return eps0
    # Memoryless: a probe attack at eps0 splits this batch, measured in eval mode (no BatchNorm update).
    probe = pgd(model, x, y, eps0, attack.alpha_ratio * eps0, attack.steps, attack.norm,
                generator=generator, eval_mode=True, validate=False)
    with torch.no_grad(), attack_mode(model):
        dl = delta_loss(model(x), model(probe), y)
    return memoryless_eps(dl > state.probe_threshold(dl, y), attack.eps, method.gamma)


def training_step(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    idx: torch.Tensor,
    method: MethodConfig,
    attack: AttackConfig,
    state: MethodState,
    *,
    class_weights: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    attack_model: Optional[nn.Module] = None,
) -> StepResult:
    """Loss and statistics of one batch for any member of the family.

    ``model``: the network being trained, in train mode (it may be a DDP wrapper);
    ``attack_model``: the same network unwrapped, for the attack (default ``model``).
    ``x``: float ``[B, C, H, W]`` in [0, 1]; ``y``: int64 ``[B]``; ``idx``: dataset indices ``[B]``.
    Updates ``state`` (threshold, eps memory) as a side effect.
    """
    attack_model = model if attack_model is None else attack_model
    zero = torch.zeros((), device=x.device)
    if method.attack == "none":
        z = model(x)
        ce = per_sample_ce(z, y)
        loss = method.beta_clean * _weighted_mean(ce, y, class_weights)
        correct = (z.detach().argmax(1) == y)
        return StepResult(loss, torch.zeros_like(ce), torch.zeros_like(ce), torch.zeros_like(correct), correct,
                          correct, zero, ce.detach().mean(), ce.detach().mean(), zero)

    eps = _budget(attack_model, x, y, idx, method, attack, state, generator)
    loss_fn = None
    if method.attack == "kl":
        with torch.no_grad(), attack_mode(attack_model):
            clean_target = attack_model(x).detach()
        loss_fn = _kl_to(clean_target)
    if method.attack == "noise":
        where = generator.device if generator is not None else x.device   # a CPU generator may seed a CUDA run
        x_adv = x + method.sigma * torch.randn(x.shape, generator=generator, device=where, dtype=x.dtype).to(x.device)
    else:
        x_adv = pgd(attack_model, x, y, eps, attack.alpha_ratio * eps, attack.steps, attack.norm,
                    generator=generator, loss_fn=loss_fn, eval_mode=attack.eval_mode, validate=False)

    if method.attack == "noise":   # clean logits for the statistics only: BatchNorm keeps the noisy inputs' statistics
        with torch.no_grad(), attack_mode(attack_model):
            z = attack_model(x)
    else:
        with torch.set_grad_enabled(method.beta_clean > 0 or method.lam > 0):
            z = model(x)
    with torch.set_grad_enabled(method.adv_weight > 0 or method.lam > 0):
        z_adv = model(x_adv)
    ce_clean, ce_adv = per_sample_ce(z, y), per_sample_ce(z_adv, y)
    dl = (ce_adv - ce_clean).detach()
    threshold = state.threshold(dl, y)
    fragile = dl > threshold
    if state.memory is not None:
        state.memory.update(idx, fragile)

    sync = sync_loss(z, z_adv, method.sync) if method.lam > 0 else zero
    loss = zero
    if method.adv_weight > 0:
        loss = loss + method.adv_weight * _weighted_mean(ce_adv, y, class_weights)
    if method.beta_clean > 0:
        loss = loss + method.beta_clean * _weighted_mean(ce_clean, y, class_weights)
    if method.lam > 0:
        loss = loss + method.lam * sync
    return StepResult(loss, dl, eps.detach(), fragile, z.detach().argmax(1) == y, z_adv.detach().argmax(1) == y,
                      threshold.detach(), ce_clean.detach().mean(), ce_adv.detach().mean(), sync.detach())
