"""Seeded train/val/test splits that keep groups (lesions) whole and classes balanced across splits."""
from __future__ import annotations

from typing import Sequence

import numpy as np

DEFAULT_FRACTIONS = {"test": 0.2, "val": 0.1}  # the rest is train, as in the shipped HAM10000 arrays


def stratified_group_split(
    labels: Sequence, groups: Sequence, seed: int = 0, fractions: dict[str, float] = DEFAULT_FRACTIONS
) -> np.ndarray:
    """Assign each item to "train", "val" or "test"; returns a str array aligned with ``labels``.

    Within each class, whole groups are shuffled (seeded) and given to test until the class
    holds at least ``fractions["test"]`` of its items there, then to val likewise; the rest
    go to train. The last group of a class always goes to train, so a class with one or two
    groups is still trained on. A group takes the class of its first item. No group lands
    in two splits.
    """
    labels = np.asarray(labels)
    groups = np.asarray(groups)
    out = np.full(len(labels), "train", dtype=object)
    rng = np.random.default_rng(seed)
    first = {}
    for i, g in enumerate(groups):
        first.setdefault(g, i)
    group_class = {g: labels[i] for g, i in first.items()}
    group_members: dict = {}
    for i, g in enumerate(groups):
        group_members.setdefault(g, []).append(i)
    for cls in sorted(set(group_class.values()), key=str):
        cls_groups = sorted((g for g, c in group_class.items() if c == cls), key=str)
        rng.shuffle(cls_groups)
        total = sum(len(group_members[g]) for g in cls_groups)
        queue = list(cls_groups)
        for split, frac in fractions.items():
            taken = 0
            while taken < frac * total and len(queue) > 1:
                g = queue.pop(0)
                out[group_members[g]] = split
                taken += len(group_members[g])
    return out.astype(str)
