"""Validation during training: clean and robust accuracy (the training attack at eps0) on the
validation split, plus the class-balanced metrics HAM10000's imbalance calls for."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn

from dpaat_core.train import distributed
from dpaat_core.attack.attacks import pgd
from dpaat_core.config import AttackConfig
from dpaat_core.data import ImageDataset


def per_class_accuracy(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Recall of each class, float64 ``[num_classes]`` (NaN for a class with no samples)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    counts = np.bincount(y_true, minlength=num_classes)
    hits = np.bincount(y_true[y_true == y_pred], minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, hits / np.maximum(counts, 1), np.nan)


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of one class against the rest (the Mann-Whitney U, ties counted half), NaN
    unless both sides have samples."""
    from scipy.stats import rankdata
    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def macro_auc(probs: np.ndarray, y_true: np.ndarray) -> float:
    """Each class's one-vs-rest ROC AUC averaged over the classes where it is defined (NaN if none is)."""
    aucs = [roc_auc(probs[:, k], np.asarray(y_true) == k) for k in range(probs.shape[1])]
    return math.nan if np.isnan(aucs).all() else float(np.nanmean(aucs))


# the validation figure each ``train.early_stop`` choice keeps the best checkpoint by ("none": every epoch)
EARLY_STOP_METRIC = {"balanced_accuracy": "val_balanced_accuracy", "robust_accuracy": "val_robust_accuracy",
                     "auc": "val_auc", "none": "val_balanced_accuracy"}


def mean_recall(per_class: np.ndarray) -> float:
    """The mean of :func:`per_class_accuracy` over the classes with samples (NaN if none has any)."""
    return float(np.nanmean(per_class)) if np.isfinite(per_class).any() else float("nan")


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    """Mean recall over the classes present in ``y_true``."""
    return mean_recall(per_class_accuracy(y_true, y_pred, num_classes))


@torch.no_grad()
def _predict(model, x):
    return model(x).argmax(1)


def validate(model: nn.Module, dataset: ImageDataset, attack: AttackConfig, device: torch.device,
             batch_size: int = 64, world: distributed.World = distributed.World(), seed: int = 0) -> dict:
    """Clean and robust (PGD with the training attack's settings at eps0) metrics on ``dataset``.

    Each process takes every ``world.size``-th sample; the predictions are gathered, so every
    process returns the same numbers. The model is left in eval mode.
    """
    model.eval()
    cuda = device.type == "cuda"
    gen = torch.Generator(device=device).manual_seed(seed + 7919)
    mine = torch.arange(world.rank, len(dataset), world.size)
    out = {"index": [], "clean": [], "adv": [], "loss": [], "prob": []}
    for idx in mine.split(batch_size):
        x, y = dataset.batch(idx, device)
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            with torch.no_grad():
                logits = model(x)
            x_adv = pgd(model, x, y, attack.eps, attack.alpha_ratio * attack.eps, attack.steps, attack.norm,
                        generator=gen, validate=False)
            out["adv"].append(_predict(model, x_adv))
        out["clean"].append(logits.argmax(1))
        out["prob"].append(torch.softmax(logits.float(), 1))
        out["loss"].append(torch.nn.functional.cross_entropy(logits.float(), y, reduction="none"))
        out["index"].append(idx.to(device))
    got = {k: distributed.all_gather_cat(torch.cat(v)).cpu().numpy() for k, v in out.items()}
    y_true = dataset.labels.numpy()[got["index"]]
    k = dataset.num_classes
    clean, robust = (per_class_accuracy(y_true, got[kind], k) for kind in ("clean", "adv"))
    return {
        "val_loss": float(got["loss"].mean()),
        "val_accuracy": float((got["clean"] == y_true).mean()),
        "val_balanced_accuracy": mean_recall(clean),
        "val_robust_accuracy": float((got["adv"] == y_true).mean()),
        "val_robust_balanced_accuracy": mean_recall(robust),
        "val_auc": macro_auc(got["prob"], y_true),
        "val_per_class_accuracy": {c: float(a) for c, a in zip(dataset.classes, clean)},
        "val_per_class_robust_accuracy": {c: float(a) for c, a in zip(dataset.classes, robust)},
    }
