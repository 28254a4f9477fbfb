"""Robustness evaluation: clean and robust accuracy, balanced and per class, mAP, margins, and
accuracy-vs-epsilon curves, as plain data (dataclasses and pandas).

A sample counts as *robust* at eps when it is classified correctly on the clean image and on the
attacked one (robust accuracy never exceeds clean accuracy). Random starts are drawn per sample
from a seed and the sample's index, so a sample starts from the same point of its unit ball in
every batch and at every eps: results do not depend on batching.

``amp=True`` runs the model's forward passes (in the attack and for the final logits) under bf16
autocast; losses, gradient norms and projections stay float32. It is faster on a GPU and moves
accuracies by a sample or two; the default is float32 throughout.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from dpaat_core.attack.attacks import ATTACKS, _autocast, attack_mode, check_attack, perturb
from dpaat_core.data import ImageDataset
from dpaat_core.store.record import RunRecord
from dpaat_core.train.validation import balanced_accuracy, per_class_accuracy, roc_auc

#: the paper's protocol as named presets, each run at the eps of its norm (see :func:`protocol`).
PRESETS = {
    "pgd20_l2": dict(attack="pgd", norm="l2", steps=20),
    "ifgsm_l2": dict(attack="ifgsm", norm="l2", steps=10),
    "pgd20_linf": dict(attack="pgd", norm="linf", steps=20),
    "ifgsm_linf": dict(attack="ifgsm", norm="linf", steps=10),
}
#: eps of the protocol: l2 0.3 is the paper's; linf 1/255 is about as large per pixel at 64 px.
PROTOCOL_EPS = {"l2": 0.3, "linf": 1 / 255}


def reference_eps(record: Optional[RunRecord], norm: str) -> float:
    """The eps a run is judged at in ``norm``: its training eps0 if it trained in that norm, else :data:`PROTOCOL_EPS`
    (an imported model, or no run)."""
    attack = None if record is None else record.attack
    return float(attack.eps) if attack is not None and attack.norm == norm and attack.eps else PROTOCOL_EPS[norm]


#: the default eps grid, as multiples of :func:`reference_eps`.
GRID_MULTIPLES = (0, 0.25, 0.5, 0.75, 1, 1.5, 2, 3)


def default_grid(record: Optional[RunRecord], norm: str) -> list[float]:
    """The eps values a run's curves are drawn at by default (8 values from 0 to 3 x its reference eps)."""
    eps0 = reference_eps(record, norm)
    return [round(m * eps0, 6) for m in GRID_MULTIPLES]


@dataclass
class Evaluation:
    """Clean and robust metrics of one model on one dataset under one attack."""

    accuracy: float
    balanced_accuracy: float
    robust_accuracy: float
    robust_balanced_accuracy: float
    mean_average_precision: float
    per_class: pd.DataFrame      # class, n, accuracy, robust_accuracy, average_precision, auc
    samples: pd.DataFrame        # index, label, pred_clean, pred_adv, correct_clean, robust, margin_clean, margin_adv
    settings: dict = field(default_factory=dict)
    auc: float = math.nan        # clean ROC AUC, one class against the rest, mean over the classes (macro)

    def summary(self) -> dict:
        return {"accuracy": self.accuracy, "balanced_accuracy": self.balanced_accuracy,
                "robust_accuracy": self.robust_accuracy, "robust_balanced_accuracy": self.robust_balanced_accuracy,
                "mean_average_precision": self.mean_average_precision, "auc": self.auc, **self.settings}


def _shape(dataset) -> tuple[int, int, int]:
    return dataset.in_channels, dataset.image_size, dataset.image_size


def eps_rms(eps: float, norm: str, shape: Sequence[int]) -> float:
    """The per-pixel RMS change an eps allows at an input of ``shape`` ``(C, H, W)``: l2 ``eps / sqrt(CHW)``, linf ``eps``."""
    return float(eps) / math.sqrt(float(np.prod(shape))) if norm == "l2" else float(eps)


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the precision-recall curve (mean precision at each positive), NaN without positives."""
    if not positive.any():
        return math.nan
    order = np.argsort(-scores, kind="stable")
    hits = positive[order].astype(np.float64)
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((precision * hits).sum() / hits.sum())


def _margins(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """True-class logit minus the best other logit: > 0 means correct."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.scatter(1, y[:, None], -math.inf).amax(1)
    return true - other


class _Attacker:
    """One attack configuration applied to batches of (sample index, eps) pairs."""

    def __init__(self, model, dataset, attack, norm, steps, alpha_ratio, device, seed, amp=False):
        self.model, self.dataset, self.attack, self.norm, self.steps = model, dataset, attack, norm, steps
        self.alpha_ratio = ATTACKS[attack].alpha(steps) if alpha_ratio is None else float(alpha_ratio)
        self.device, self.seed, self.amp = device, seed, amp
        self.callback, self.done, self.total = None, 0, 0   # progress over the images attacked

    def images(self, index: torch.Tensor):
        return self.dataset.batch(index, self.device)

    def still_correct(self, index: np.ndarray, eps: np.ndarray, batch_size: int, bar=None) -> np.ndarray:
        """Whether each sample ``index[j]`` is still classified correctly when attacked at ``eps[j]``."""
        out = np.zeros(len(index), dtype=bool)
        self.total += len(index)
        if bar is not None and bar.n + len(index) > bar.total:   # the total is planned up front; grow it only past that
            bar.total = bar.n + len(index)
            bar.refresh()
        for start in range(0, len(index), batch_size):
            i = torch.from_numpy(np.asarray(index[start:start + batch_size], dtype=np.int64))
            e = torch.from_numpy(np.asarray(eps[start:start + batch_size], dtype=np.float32))
            out[start:start + len(i)] = (self.logits(i, e).argmax(1).cpu() == self.dataset.labels[i]).numpy()
            self.done += len(i)
            if bar is not None:
                bar.update(len(i))
            if self.callback is not None:
                self.callback(self.done, self.total)
        return out

    def logits(self, index: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Logits of the attacked images ``index`` at per-sample ``eps`` (the clean ones where eps is 0)."""
        x, y = self.images(index)
        x_adv = perturb(self.model, x, y, self.attack, self.norm, eps.to(self.device, torch.float32), self.steps,
                        self.alpha_ratio, index=index, seed=self.seed, validate=False, amp=self.amp)
        with torch.no_grad(), attack_mode(self.model), _autocast(self.device, self.amp):
            return self.model(x_adv).float()


def clean_logits(model: nn.Module, dataset: ImageDataset, batch_size: int = 128, device=None,
                 amp: bool = False) -> torch.Tensor:
    """The model's float32 logits ``[N, K]`` (on the CPU) for every clean image of ``dataset``, in eval mode
    (the forward passes under bf16 autocast when ``amp``)."""
    device = _model_device(model, device)
    with torch.no_grad(), attack_mode(model), _autocast(device, amp):
        return torch.cat([model(dataset.batch(i, device)[0]).float().cpu()
                          for i in torch.arange(len(dataset)).split(batch_size)])


def _model_device(model: nn.Module, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def evaluate(model: nn.Module, dataset: ImageDataset, attack: str = "pgd", norm: str = "l2", eps: float = 0.3,
             steps: Optional[int] = None, alpha_ratio: Optional[float] = None, batch_size: int = 128,
             device=None, seed: int = 0, progress: bool = False, amp: bool = False) -> Evaluation:
    """Clean and robust metrics of ``model`` on ``dataset`` under one attack at one ``eps``.

    ``steps`` default per attack (PGD 20, I-FGSM 10, FGSM 1); ``alpha_ratio`` step as a fraction
    of eps (PGD 1/4, I-FGSM 1/steps). Every sample is attacked; the model is left as it was.
    ``amp``: forward passes under bf16 autocast (see the module docstring).
    """
    steps = ATTACKS[attack].default_steps if steps is None and attack in ATTACKS else steps
    check_attack(attack, norm, [eps], steps, _shape(dataset))
    device = _model_device(model, device)
    atk = _Attacker(model, dataset, attack, norm, steps, alpha_ratio, device, seed, amp)
    clean = clean_logits(model, dataset, batch_size, device, amp)
    adv = []
    for index in tqdm(torch.arange(len(dataset)).split(batch_size), desc=f"{attack} {norm} eps {eps:g}",
                      disable=not progress, unit="batch"):
        adv.append(atk.logits(index, torch.full((len(index),), float(eps))).cpu())
    adv = torch.cat(adv)
    y = dataset.labels
    pred_clean, pred_adv = clean.argmax(1).numpy(), adv.argmax(1).numpy()
    yn = y.numpy()
    correct, robust = pred_clean == yn, (pred_clean == yn) & (pred_adv == yn)
    robust_pred = np.where(robust, yn, -1)   # a sample wrong on either image counts as wrong
    probs = clean.softmax(1).numpy()
    ap = [average_precision(probs[:, k], yn == k) for k in range(dataset.num_classes)]
    auc = [roc_auc(probs[:, k], yn == k) for k in range(dataset.num_classes)]
    k = dataset.num_classes
    per_class = pd.DataFrame({"class": dataset.classes, "n": dataset.class_counts,
                              "accuracy": per_class_accuracy(yn, pred_clean, k),
                              "robust_accuracy": per_class_accuracy(yn, robust_pred, k), "average_precision": ap,
                              "auc": auc})
    samples = pd.DataFrame({"index": np.arange(len(dataset)), "label": yn, "pred_clean": pred_clean, "pred_adv": pred_adv,
                            "correct_clean": correct, "robust": robust, "margin_clean": _margins(clean, y).numpy(),
                            "margin_adv": _margins(adv, y).numpy()})
    return Evaluation(
        accuracy=float(correct.mean()), balanced_accuracy=balanced_accuracy(yn, pred_clean, k),
        robust_accuracy=float(robust.mean()), robust_balanced_accuracy=balanced_accuracy(yn, robust_pred, k),
        mean_average_precision=float(np.nanmean(ap)), per_class=per_class, samples=samples,
        auc=float(np.nanmean(auc)) if not np.isnan(auc).all() else math.nan,
        settings={"attack": attack, "norm": norm, "eps": float(eps), "steps": steps, "alpha_ratio": atk.alpha_ratio,
                  "eps_rms": eps_rms(eps, norm, dataset.images.shape[1:]), "n": len(dataset)})


def robustness_curve(model: nn.Module, dataset: ImageDataset, eps_grid: Sequence[float], attack: str = "pgd",
                     norm: str = "l2", steps: Optional[int] = None, alpha_ratio: Optional[float] = None,
                     monotone: bool = True, fast: bool = True, batch_size: int = 128, device=None, seed: int = 0,
                     progress: bool = False, callback: Optional[Callable[[int, int], None]] = None,
                     amp: bool = False) -> pd.DataFrame:
    """Accuracy against eps: a tidy frame, one row per eps (ascending).

    Columns: eps, eps_rms (per-pixel RMS change at the input size), attack, norm, steps,
    monotone, n, accuracy, balanced_accuracy, then ``accuracy:<class>`` and ``n:<class>`` per class.

    ``monotone=True`` (default) counts a sample as robust at eps only if it also is at every
    smaller eps of the grid: an adversarial image found at a smaller eps lies inside the larger
    ball, so this is the attack's best estimate of robust accuracy and never increases with eps.
    ``monotone=False`` gives each eps's own attack result, which PGD does not guarantee to be
    monotone (step size and start scale with eps).

    ``fast=True`` attacks only what can change the result: samples still robust at the previous
    eps (monotone) or correct on the clean image, packed into full batches with a per-sample eps
    tensor; ``fast=False`` attacks every sample at every eps, one eps at a time. Both give the
    same curve (each sample's start depends on its index only). ``callback(done, total)`` is
    called after every batch (images attacked so far, and so far known to need attacking).
    ``amp``: forward passes under bf16 autocast (see the module docstring).
    """
    eps_grid = sorted(float(e) for e in eps_grid)
    steps = ATTACKS[attack].default_steps if steps is None and attack in ATTACKS else steps
    check_attack(attack, norm, eps_grid, steps, _shape(dataset))
    device = _model_device(model, device)
    atk = _Attacker(model, dataset, attack, norm, steps, alpha_ratio, device, seed, amp)
    y = dataset.labels.numpy()
    correct0 = clean_logits(model, dataset, batch_size, device, amp).argmax(1).numpy() == y
    hit = np.zeros((len(eps_grid), len(dataset)), dtype=bool)      # still correct after the attack at that eps
    # a total fixed up front (every image at every eps, or every clean-correct one with ``fast``): the bar's total does
    # not jump as each eps shows how many survive; the images a monotone curve need not attack again count as done
    attacked = [e for e in eps_grid if e > 0 or not fast]
    planned = len(attacked) * (int(correct0.sum()) if fast else len(dataset))
    with tqdm(total=planned, desc=f"{attack} {norm} curve", unit="img", disable=not progress) as bar:
        atk.callback = callback
        if fast and not monotone:
            # Every (sample, eps) pair is independent: stream them all, with a per-sample eps tensor.
            grid = np.array(eps_grid)
            hit[grid == 0] = correct0
            ks, idx = np.nonzero((grid > 0)[:, None] & correct0[None, :])
            hit[ks, idx] = atk.still_correct(idx, grid[ks], batch_size, bar)
        else:
            alive = correct0.copy()
            for k, e in enumerate(eps_grid):
                if not fast:
                    targets = np.arange(len(dataset))
                elif e == 0:    # nothing to attack: the clean result
                    hit[k] = correct0
                    continue
                else:
                    targets = np.flatnonzero(alive if monotone else correct0)
                hit[k, targets] = atk.still_correct(targets, np.full(len(targets), e), batch_size, bar)
                if fast and monotone:
                    bar.update(int(correct0.sum()) - len(targets))   # fallen at a smaller eps: settled, not attacked
                alive &= hit[k]
    robust = hit & correct0[None, :]
    if monotone:
        robust = np.logical_and.accumulate(robust, axis=0)
    return _curve_frame(robust, y, dataset, eps_grid, attack, norm, steps, monotone)


def accuracy_row(y: np.ndarray, pred: np.ndarray, dataset: ImageDataset) -> dict:
    """n, accuracy, balanced accuracy, ``accuracy:<class>`` and ``n:<class>`` (the images of each class) of
    predictions ``pred`` (-1: counted wrong)."""
    k = dataset.num_classes
    row = {"n": len(y), "accuracy": float((pred == y).mean()), "balanced_accuracy": balanced_accuracy(y, pred, k)}
    row |= {f"accuracy:{c}": a for c, a in zip(dataset.classes, per_class_accuracy(y, pred, k))}
    return row | {f"n:{c}": int(m) for c, m in zip(dataset.classes, np.bincount(y, minlength=k))}


def _curve_frame(robust, y, dataset, eps_grid, attack, norm, steps, monotone) -> pd.DataFrame:
    shape = dataset.images.shape[1:]
    return pd.DataFrame([{"eps": e, "eps_rms": eps_rms(e, norm, shape), "attack": attack, "norm": norm,
                          "steps": steps, "monotone": monotone} | accuracy_row(y, np.where(robust[k], y, -1), dataset)
                         for k, e in enumerate(eps_grid)])


def protocol_evaluations(model: nn.Module, dataset: ImageDataset, eps: Optional[dict] = None,
                         presets: Sequence[str] = tuple(PRESETS), batch_size: int = 128, device=None, seed: int = 0,
                         progress: bool = False, amp: bool = False):
    """The paper's evaluation one preset at a time: yields ``(preset, Evaluation)`` (per-class figures and each
    image's outcome included) for PGD-20 and I-FGSM in l2 and linf, each at ``eps`` of its norm (default
    :data:`PROTOCOL_EPS`)."""
    eps = {**PROTOCOL_EPS, **(eps or {})}
    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        raise ValueError(f"unknown preset(s) {unknown}; choose from {', '.join(PRESETS)}")
    for name in presets:
        p = PRESETS[name]
        yield name, evaluate(model, dataset, p["attack"], p["norm"], eps[p["norm"]], p["steps"], batch_size=batch_size,
                             device=device, seed=seed, progress=progress, amp=amp)


def protocol(model: nn.Module, dataset: ImageDataset, eps: Optional[dict] = None, presets: Sequence[str] = tuple(PRESETS),
             batch_size: int = 128, device=None, seed: int = 0, progress: bool = False,
             amp: bool = False) -> pd.DataFrame:
    """The paper's evaluation: one row per preset (PGD-20 and I-FGSM, l2 and linf) with clean,
    robust and balanced accuracy and mAP. ``eps``: per norm, default :data:`PROTOCOL_EPS`;
    ``amp``: forward passes under bf16 autocast (see the module docstring)."""
    return pd.DataFrame([{"preset": name, **ev.summary()} for name, ev in
                         protocol_evaluations(model, dataset, eps, presets, batch_size, device, seed, progress, amp)])
