"""A stronger check than PGD-20: APGD (Croce & Hein, 2020) with the cross-entropy and the DLR loss.

The attacks are torchattacks' (installed apart, ``pip install --no-deps torchattacks==3.5.1``).
Results are counted the AutoAttack way: a sample is robust only if it is correct on the clean
image and survives every attack in the list (and, if given, an earlier attack such as PGD-20);
each attack runs only on the samples still robust, so the strong check costs little more than
the attacks that can still change the answer.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from dpaat_core.attack.attacks import attack_mode
from dpaat_core.data import ImageDataset
from dpaat_core.evaluate.robustness import clean_logits
from dpaat_core.train.validation import balanced_accuracy

#: the losses APGD runs with, in order (DLR needs at least three classes).
LOSSES = ("ce", "dlr")
_TA_NORMS = {"l2": "L2", "linf": "Linf"}


def _torchattacks():
    try:
        import torchattacks
    except ImportError as err:   # pragma: no cover - depends on the environment
        raise ImportError("the strong attack (APGD) needs torchattacks: "
                          "pip install --no-deps torchattacks==3.5.1") from err
    return torchattacks


def apgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: str, eps: float, loss: str = "ce",
         steps: int = 50, restarts: int = 1, seed: int = 0) -> torch.Tensor:
    """``x`` attacked by APGD with ``loss`` ('ce' or 'dlr') in the ``norm`` ball of radius ``eps``.

    The global random state is left as it was (torchattacks seeds it)."""
    if norm not in _TA_NORMS:
        raise ValueError(f"norm must be one of {', '.join(_TA_NORMS)}, got {norm!r}")
    if not (isinstance(eps, (int, float)) and eps > 0 and np.isfinite(eps)):
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    attack = _torchattacks().APGD(model, norm=_TA_NORMS[norm], eps=float(eps), steps=int(steps),
                                  n_restarts=int(restarts), loss=loss, seed=int(seed))
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), attack_mode(model):
        return attack(x, y).detach()


def strong_robustness(model: nn.Module, dataset: ImageDataset, norm: str, eps: float, steps: int = 50,
                      restarts: int = 1, losses: Optional[Sequence[str]] = None, survivors: Optional[np.ndarray] = None,
                      batch_size: int = 128, device=None, seed: int = 0, progress: bool = False) -> dict:
    """Robust accuracy under APGD-CE then APGD-DLR (worst case per sample), on every image of ``dataset``.

    ``survivors``: a boolean mask of samples still robust after an earlier attack (e.g. PGD-20's
    ``Evaluation.samples.robust``); only those are attacked, and the result is the worst case over
    all attacks. Returns robust_accuracy, robust_balanced_accuracy, n, the attacks run and the
    robust mask as ``robust`` (a numpy array).
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    losses = tuple(losses) if losses is not None else (LOSSES if dataset.num_classes >= 3 else ("ce",))
    y_all = dataset.labels.numpy()
    robust = clean_logits(model, dataset, batch_size, device).argmax(1).numpy() == y_all
    if survivors is not None:
        survivors = np.asarray(survivors, dtype=bool)
        if survivors.shape != robust.shape:
            raise ValueError(f"survivors must have one entry per sample ({len(robust)}), got {survivors.shape}")
        robust &= survivors
    for loss in losses:
        index = np.flatnonzero(robust)
        for start in tqdm(range(0, len(index), batch_size), disable=not progress,
                          desc=f"APGD-{loss.upper()} {norm} eps {eps:g}", unit="batch"):
            chunk = index[start:start + batch_size]
            i = torch.from_numpy(chunk)
            x, y = dataset.batch(i, device)
            x_adv = apgd(model, x, y, norm, eps, loss, steps, restarts, seed)
            with torch.no_grad(), attack_mode(model):
                robust[chunk] = (model(x_adv).argmax(1) == y).cpu().numpy()
    robust_pred = np.where(robust, y_all, -1)
    return {"robust_accuracy": float(robust.mean()),
            "robust_balanced_accuracy": balanced_accuracy(y_all, robust_pred, dataset.num_classes),
            "n": len(robust), "attacks": "+".join(f"apgd-{loss}" for loss in losses), "steps": steps,
            "restarts": restarts, "robust": robust}
