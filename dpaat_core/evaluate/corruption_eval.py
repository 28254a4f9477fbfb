"""Accuracy under natural corruptions (:mod:`dpaat_core.evaluate.corruptions`), and the corruption error of Hendrycks &
Dietterich ("Benchmarking Neural Network Robustness to Common Corruptions and Perturbations", ICLR 2019).

``corruption_grid`` corrupts each test image once per (corruption, severity), seeded by its index, and counts
correct predictions: a tidy frame, one row per cell, with a ``clean`` row (severity 0) for reference.
``corruption_error`` compares runs with a reference run: for corruption c, CE_c = sum_s E(s, c) / sum_s E_ref(s, c)
with E = 1 - accuracy; mCE is the mean over corruptions (100 = as the reference; lower is better). The relative
mCE uses the drop from the clean error instead of the error (how much worse the corruption makes a model).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from dpaat_core.attack.attacks import _autocast, attack_mode
from dpaat_core.evaluate.corruptions import NAMES, SEVERITIES, check, corrupt
from dpaat_core.data import ImageDataset
from dpaat_core.evaluate.robustness import _model_device, accuracy_row

CLEAN = "clean"


def corruption_grid(model: nn.Module, dataset: ImageDataset, names: Sequence[str] = NAMES,
                    severities: Sequence[int] = SEVERITIES, batch_size: int = 128, device=None, seed: int = 0,
                    progress: bool = False, amp: bool = False) -> pd.DataFrame:
    """Accuracy of ``model`` on ``dataset`` under each corruption at each severity, and clean.

    Columns: corruption, severity (0 for the clean row), n, accuracy, balanced_accuracy, ``accuracy:<class>``,
    ``n:<class>``.
    """
    cells = [(n, s) for n in names for s in severities]
    for n, s in cells:
        check(n, s)
    device = _model_device(model, device)
    y = dataset.labels.numpy()
    pred = {cell: np.empty(len(dataset), dtype=np.int64) for cell in [(CLEAN, 0), *cells]}

    def predict(x):   # only the model under amp: the corruptions stay in float32
        with _autocast(device, amp):
            return model(x).argmax(1).cpu().numpy()

    with torch.no_grad(), attack_mode(model), \
            tqdm(total=len(dataset) * (len(cells) + 1), desc="corruptions", unit="img", disable=not progress) as bar:
        for index in torch.arange(len(dataset)).split(batch_size):
            x, _ = dataset.batch(index, device)
            pred[(CLEAN, 0)][index.numpy()] = predict(x)
            bar.update(len(index))
            for n, s in cells:
                pred[(n, s)][index.numpy()] = predict(corrupt(x, n, s, seed, index))
                bar.update(len(index))
    return pd.DataFrame([{"corruption": n, "severity": s} | accuracy_row(y, p, dataset) for (n, s), p in pred.items()])


def corruption_error(grids: dict[str, pd.DataFrame], reference: Optional[str] = None,
                     metric: str = "accuracy") -> pd.DataFrame:
    """One row per run: clean accuracy, mean accuracy over the corrupted cells, and mCE and relative mCE (in %)
    against ``reference`` (a key of ``grids``; default the first). Only the corruptions and severities every run
    has are compared. mCE is NaN if the reference makes no error at all on a corruption (no ratio to take). The
    relative mCE averages over the corruptions that lower the reference's accuracy (``relative_corruptions`` of
    them): where the reference loses nothing, "relative to its loss" has no meaning."""
    if not grids:
        return pd.DataFrame(columns=["run", "clean", "mean_corrupted", "mce", "relative_mce", "cells",
                                     "relative_corruptions"])
    reference = reference if reference is not None else next(iter(grids))
    if reference not in grids:
        raise ValueError(f"reference run {reference!r} is not among {', '.join(grids)}")
    tables = {r: g[g.corruption != CLEAN].pivot_table(index="corruption", columns="severity", values=metric)
              for r, g in grids.items()}
    common_c = sorted(set.intersection(*(set(t.index) for t in tables.values())))
    common_s = sorted(set.intersection(*(set(t.columns) for t in tables.values())))
    clean = {r: float(g.loc[g.corruption == CLEAN, metric].mean()) for r, g in grids.items()}
    ref_err = 1 - tables[reference].loc[common_c, common_s]
    ref_total = ref_err.sum(axis=1)
    ref_drop = (ref_err - (1 - clean[reference])).sum(axis=1)
    dropping = ref_drop > 0      # relative CE is defined where the corruption costs the reference something
    rows = []
    for r, t in tables.items():
        err = 1 - t.loc[common_c, common_s]
        ce = err.sum(axis=1) / ref_total.where(ref_total > 0)
        rel = (err - (1 - clean[r])).sum(axis=1)[dropping] / ref_drop[dropping]
        rows.append({"run": r, "clean": clean[r], "mean_corrupted": float(t.loc[common_c, common_s].values.mean()),
                     "mce": float(100 * ce.mean(skipna=False)), "relative_mce": float(100 * rel.mean()) if
                     dropping.any() else float("nan"), "cells": len(common_c) * len(common_s),
                     "relative_corruptions": int(dropping.sum())})
    return pd.DataFrame(rows)
