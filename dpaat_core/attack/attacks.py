"""Batched gradient attacks with a per-sample perturbation budget.

``eps`` and ``alpha`` may be floats or tensors of shape ``[B]``: sample ``i`` is attacked in
its own l2 or linf ball of radius ``eps[i]`` (the heart of DPAAT). Images are float
``[B, C, H, W]`` in [0, 1] and stay there; results never leave their ball.

The attacks are plain functions. They run the model in eval mode by default (BatchNorm
statistics frozen, dropout off) and restore every module's own train/eval flag afterwards;
gradients are taken for the input only, so model parameters never receive a ``.grad``.
With the model in eval mode, BatchNorm layers are folded into the convolutions before them
(:mod:`dpaat_core.attack.folding`): the same function, computed with fewer kernels.

``ifgsm`` is ``pgd`` without the random start; ``fgsm`` is one step of size ``eps``. All three
match torchattacks (``PGD``/``PGDL2``, ``BIM``, ``FGSM``) when started from the clean image.
:func:`perturb` runs any of them with the evaluation protocol's defaults (PGD-20 with step eps/4, I-FGSM
10 steps of eps/10, FGSM) and bounds (:func:`check_attack`).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import numpy as np

import torch
import torch.nn as nn
import torch.nn.functional as F

from dpaat_core.attack.folding import folded_eval_view

Budget = Union[float, int, torch.Tensor]
NORMS = ("l2", "linf")
_GRAD_NORM_FLOOR = 1e-10  # added to l2 gradient norms, as torchattacks does


@contextmanager
def attack_mode(model: nn.Module, eval_mode: bool = True):
    """Run the block with ``model`` in eval mode (if asked), then restore each module's flag."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        if eval_mode:
            model.eval()
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _as_budget(value: Budget, name: str, x: torch.Tensor) -> torch.Tensor:
    """A float or ``[B]`` tensor as a float32 ``[B, 1, 1, 1]`` tensor on ``x``'s device, checked."""
    batch = x.shape[0]
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        raise ValueError(f"{name} must be a number or a tensor of shape [{batch}], got {type(value).__name__}")
    if isinstance(value, torch.Tensor):
        if value.ndim > 1 or (value.ndim == 1 and value.shape[0] != batch):
            raise ValueError(f"{name} must be a scalar or have shape [{batch}] (one per sample), got {tuple(value.shape)}")
        t = value.detach().to(device=x.device, dtype=torch.float32)
    else:
        t = torch.tensor(float(value), device=x.device, dtype=torch.float32)
    return t.expand(batch).reshape(batch, 1, 1, 1)


def _check_images(x) -> None:
    """Type and shape of ``x`` (no host sync, so it always runs)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim != 4 or x.shape[0] == 0:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a float tensor [B, C, H, W] with B >= 1, got {shape}")


def _check(x: torch.Tensor, y: Optional[torch.Tensor], eps: torch.Tensor, alpha: torch.Tensor, steps: int,
           norm: str, default_loss: bool) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if default_loss:
        if not isinstance(y, torch.Tensor) or y.shape != (x.shape[0],) or y.is_floating_point():
            got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"y must be an integer tensor of shape [{x.shape[0]}] (class indices), got {got}")
    # One reduction for all value checks keeps this to a single host sync.
    lo, hi = torch.aminmax(x.detach().flatten().float())
    stats = torch.stack([lo, hi, eps.min(), eps.max(), alpha.min(), alpha.max()]).tolist()
    if not all(math.isfinite(v) for v in stats[:2]):
        raise ValueError("x contains NaN or infinite values")
    if stats[0] < 0 or stats[1] > 1:
        raise ValueError(f"x must be images in [0, 1], found values in [{stats[0]:.4g}, {stats[1]:.4g}]")
    for name, low, high in (("eps", stats[2], stats[3]), ("alpha", stats[4], stats[5])):
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError(f"{name} must be finite, found NaN or infinity")
        if low < 0:
            raise ValueError(f"{name} must be >= 0, found {low:.4g}")


def _per_sample_flat_norm(t: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(t.flatten(1).float(), dim=1).view(-1, 1, 1, 1)


def _project(x: torch.Tensor, x_adv: torch.Tensor, eps: torch.Tensor, norm: str) -> torch.Tensor:
    """Clip ``x_adv`` into each sample's eps ball around ``x``, then into [0, 1]."""
    delta = x_adv - x
    if norm == "linf":
        delta = torch.maximum(torch.minimum(delta, eps), -eps)
    else:
        d_norm = _per_sample_flat_norm(delta)
        delta = delta * torch.where(d_norm > eps, eps / d_norm, torch.ones_like(d_norm))
    return (x + delta).clamp_(0, 1)


def start_noise(x: torch.Tensor, norm: str, generator=None) -> torch.Tensor:
    """A random point of the unit ball per sample, ``x``'s shape: ``x + noise * eps`` is a random start.

    linf: uniform in [-1, 1] per pixel; l2: a Gaussian direction scaled to a uniform fraction of
    the radius (torchattacks' convention). Drawn where the generator lives (a CPU generator may
    seed a CUDA attack), then moved to ``x``'s device.
    """
    draw = dict(generator=generator, device=generator.device if generator is not None else x.device, dtype=x.dtype)
    if norm == "linf":
        return (2 * torch.rand(x.shape, **draw) - 1).to(x.device)
    direction = torch.randn(x.shape, **draw).to(x.device)
    radius = torch.rand((x.shape[0], 1, 1, 1), **draw).to(x.device)
    return direction / _per_sample_flat_norm(direction) * radius


def index_noise(shape, index, norm: str, seed: int = 0) -> torch.Tensor:
    """Each sample's random start in its unit ball (``shape`` of one sample, [C, H, W]), from a generator seeded
    by (seed, the sample's index in its dataset): a sample starts from the same point in any batch and order."""
    one = torch.zeros((1, *shape))
    return torch.cat([start_noise(one, norm, torch.Generator().manual_seed(seed * 1_000_003 + int(i))) for i in index])


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: Budget,
    alpha: Budget,
    steps: int,
    norm: str = "l2",
    random_start: bool = True,
    generator: Optional[torch.Generator] = None,
    *,
    loss_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
    eval_mode: bool = True,
    fold_bn: bool = True,
    validate: bool = True,
    noise: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Projected gradient ascent on the loss, within each sample's eps ball.

    Args:
        model: maps ``[B, C, H, W]`` images in [0, 1] to ``[B, K]`` logits.
        x: float ``[B, C, H, W]`` in [0, 1]. y: int64 ``[B]`` class indices (or whatever ``loss_fn`` takes).
        eps: radius, a float or ``[B]`` tensor, >= 0 (same units as the norm: l2 over all pixels, or per pixel).
        alpha: step size, a float or ``[B]`` tensor, >= 0. steps: number of steps, >= 1.
        norm: ``"l2"`` (normalised-gradient steps) or ``"linf"`` (sign steps).
        random_start: start from a random point in the ball; generator: its random source.
        loss_fn: ``(logits, y) -> [B]`` per-sample loss to maximise; default cross-entropy.
        eval_mode: run the model in eval mode (restored afterwards); False uses its modes as they are.
        fold_bn: in eval mode, fold BatchNorm into convolutions for speed (equal up to float rounding).
        validate: check inputs (one host sync); a hot loop that already did may skip it.
        noise: the random start as a point of the unit ball per sample (see :func:`start_noise`),
            instead of drawing one: the same noise gives the same start at every eps.

    Returns: detached ``x_adv`` of ``x``'s shape, dtype and device, in [0, 1], with
    ``||x_adv - x|| <= eps`` per sample (a sample with eps 0 comes back unchanged).
    """
    _check_images(x)
    eps_t, alpha_t = _as_budget(eps, "eps", x), _as_budget(alpha, "alpha", x)
    if validate:
        _check(x, y, eps_t, alpha_t, steps, norm, loss_fn is None)
    x = x.detach()
    with attack_mode(model, eval_mode):
        view = folded_eval_view(model, x) if (eval_mode and fold_bn) else None
        net = view if view is not None else model
        if random_start:
            noise = start_noise(x, norm, generator) if noise is None else noise.to(x.device, x.dtype)
            x_adv = (x + noise * eps_t).clamp_(0, 1)
        else:
            x_adv = x.clone()
        for _ in range(steps):
            x_adv.requires_grad_(True)
            with torch.enable_grad():
                logits = net(x_adv).float()   # the loss in float32 under bf16 autocast
                losses = F.cross_entropy(logits, y, reduction="none") if loss_fn is None else loss_fn(logits, y)
                (grad,) = torch.autograd.grad(losses.sum(), x_adv)
            with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
                if norm == "linf":
                    step = grad.sign()
                else:
                    step = grad / (_per_sample_flat_norm(grad) + _GRAD_NORM_FLOOR)
                x_adv = _project(x, x_adv.detach() + alpha_t * step, eps_t, norm)
    return x_adv.detach().to(x.dtype)


def ifgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: Budget, alpha: Budget, steps: int,
          norm: str = "linf", **kwargs) -> torch.Tensor:
    """Iterative FGSM (BIM): :func:`pgd` started from the clean image."""
    return pgd(model, x, y, eps, alpha, steps, norm=norm, random_start=False, **kwargs)


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: Budget, norm: str = "linf", **kwargs) -> torch.Tensor:
    """Fast gradient (sign) method: one step of size ``eps`` from the clean image."""
    return pgd(model, x, y, eps, eps, 1, norm=norm, random_start=False, **kwargs)


def _one_step(model, x, y, eps, alpha, steps, norm: str = "linf", **kwargs) -> torch.Tensor:
    """:func:`fgsm` in the records' signature: one step of eps, whatever ``alpha`` and ``steps`` say."""
    return fgsm(model, x, y, eps, norm=norm, **kwargs)


@dataclass(frozen=True)
class Attack:
    """One attack as the evaluation protocol runs it. ``run(model, x, y, eps, alpha, steps, norm=, generator=,
    noise=, validate=)`` gives ``x_adv``; ``alpha(steps)`` is its default step as a fraction of eps; ``label`` names
    it on pages and in figures; ``random_start``: whether it draws a start (and so takes ``noise``)."""
    name: str
    label: str
    run: Callable[..., torch.Tensor]
    default_steps: int
    alpha: Callable[[int], float]
    random_start: bool = False
    norms: tuple[str, ...] = NORMS

    def title(self, steps: Optional[int] = None) -> str:
        """``PGD-20``, ``I-FGSM-10``, ``FGSM``: the label with its steps (the default steps when not given)."""
        return self.label if self.default_steps == 1 else f"{self.label}-{self.default_steps if steps is None else steps}"


#: the attacks, one record each (the paper's protocol: PGD-20 with step eps/4, I-FGSM 10 steps of eps/10, FGSM).
#: A new attack is one record here.
ATTACKS: dict[str, Attack] = {a.name: a for a in (
    Attack("pgd", "PGD", pgd, 20, lambda steps: 0.25, random_start=True),
    Attack("ifgsm", "I-FGSM", ifgsm, 10, lambda steps: 1.0 / steps),
    Attack("fgsm", "FGSM", _one_step, 1, lambda steps: 1.0),
)}


# --- the evaluation protocol's attack: defaults, bounds and one entry point ------------------------------------

#: the most attack steps an evaluation takes (PGD-20 is the protocol; 1000 is already a very strong attack)
MAX_STEPS = 1000


def max_eps(norm: str, shape: Optional[Sequence[int]] = None) -> float:
    """The largest eps that means something for images in [0, 1] of ``shape`` ``(C, H, W)``: linf 1 (a change of 1
    per pixel can turn any image into any other), l2 the diagonal of the pixel cube, ``sqrt(C*H*W)``; without a
    shape, l2 is bounded by 1000."""
    if norm == "linf":
        return 1.0
    return math.sqrt(float(np.prod(shape))) if shape is not None else 1000.0


def check_attack(attack: str, norm: str, eps_values: Sequence[float], steps: int,
                 shape: Optional[Sequence[int]] = None) -> None:
    if attack not in ATTACKS:
        raise ValueError(f"attack must be one of {', '.join(ATTACKS)}, got {attack!r}")
    if norm not in ATTACKS[attack].norms:
        raise ValueError(f"norm must be one of {', '.join(ATTACKS[attack].norms)}, got {norm!r}")
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"steps must be an integer from 1 to {MAX_STEPS}, got {steps!r}")
    top = max_eps(norm, shape)
    bad = [e for e in eps_values if not (isinstance(e, (int, float)) and math.isfinite(e) and 0 <= e <= top)]
    if bad or not len(eps_values):
        where = f" at {'x'.join(map(str, shape))}" if shape is not None and norm == "l2" else ""
        raise ValueError(f"{norm} eps values must be finite numbers from 0 to {top:.4g}{where}, got {list(eps_values)!r}")


def _autocast(device, amp: bool):
    """bf16 autocast on ``device`` when ``amp``, else a context that changes nothing."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bool(amp))


def perturb(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: str = "pgd", norm: str = "l2",
            eps: Union[float, torch.Tensor] = 0.3, steps: Optional[int] = None, alpha_ratio: Optional[float] = None,
            *, generator: Optional[torch.Generator] = None, seed: int = 0, noise: Optional[torch.Tensor] = None,
            index=None, validate: bool = True, amp: bool = False) -> torch.Tensor:
    """``x`` attacked with the evaluation protocol's settings: ``x_adv``.

    ``steps`` default per attack (PGD 20, I-FGSM 10, FGSM 1); step ``alpha_ratio * eps`` (default
    PGD 1/4, I-FGSM 1/steps; FGSM takes one step of eps). ``eps``: a float or ``[B]``. PGD's random
    start comes from ``noise`` (see :func:`attacks.start_noise`), else each image's own seeded point when
    ``index`` (the images' indices in their dataset) is given (:func:`index_noise` with ``seed``: the same in any
    batch), else ``generator``, else ``seed``.
    ``amp``: the model's forward passes under bf16 autocast (the attack's arithmetic stays float32).
    """
    record = ATTACKS.get(attack)
    steps = record.default_steps if steps is None and record is not None else steps
    if noise is None and index is not None and record is not None and record.random_start:
        noise = index_noise(x.shape[1:], index, norm, seed)
    if validate:
        check_attack(attack, norm, [float(e) for e in torch.as_tensor(eps).flatten()], steps)
    with _autocast(x.device, amp):
        ratio = record.alpha(steps) if alpha_ratio is None else float(alpha_ratio)
        if record.random_start and generator is None and noise is None:
            generator = torch.Generator().manual_seed(seed)
        return record.run(model, x, y, eps, ratio * eps, steps, norm=norm, generator=generator, noise=noise,
                          validate=validate)
