"""Robustness class by class: each class's clean and robust accuracy as one small table (class, n, accuracy,
robust_accuracy), from whichever result holds it, and the sentence that says where a model's robustness stops.

In HAM10000 most images are nevi: a model can keep a fair robust accuracy while the attack takes every rare class
(akiec, bcc, df, vasc). Robust balanced accuracy (the mean of the classes' robust accuracies) and the weakest class
show it at once. The tables come from an evaluation's per-image outcomes (:func:`from_outcomes`), the audit's
``per_class.csv`` or a saved robustness curve's ``accuracy:<class>`` columns (:func:`saved`).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from dpaat_core.data.dataset import sample_indices
from dpaat_core.evaluate.robustness import PRESETS
from dpaat_core.train.validation import per_class_accuracy

COLUMNS = ["class", "n", "accuracy", "robust_accuracy"]
#: how close a saved eps must be to the one asked for: grids are saved to 6 digits (linf 1/255 as 0.003922)
EPS_RTOL = 1e-3


def from_outcomes(labels, correct, robust, classes: Sequence[str]) -> pd.DataFrame:
    """Per class from each image's outcome: ``labels`` (class indices), ``correct`` (right on the clean image) and
    ``robust`` (right on the attacked one; it counts only where the clean one is right too, as in ``evaluate``)."""
    y = np.asarray(labels, dtype=np.int64)
    k = len(classes)
    right = np.asarray(correct, dtype=bool)
    held = right & np.asarray(robust, dtype=bool)
    return pd.DataFrame({"class": [str(c) for c in classes], "n": np.bincount(y, minlength=k)[:k],
                         "accuracy": per_class_accuracy(y, np.where(right, y, -1), k),
                         "robust_accuracy": per_class_accuracy(y, np.where(held, y, -1), k)})


def balanced(table: pd.DataFrame, column: str = "robust_accuracy") -> float:
    """The mean of ``column`` over the classes with images: robust balanced accuracy by default (NaN if none)."""
    values = pd.to_numeric(table[column], errors="coerce")[pd.to_numeric(table["n"], errors="coerce").fillna(1) > 0]
    return float(values.mean()) if values.notna().any() else math.nan


def drawn_counts(labels, num_classes: int, n: int, seed: int = 0) -> np.ndarray:
    """Images per class in the seeded draw of ``n`` of ``labels`` that ``--max-samples n`` measures (all of them when
    ``n`` is not smaller): the counts behind a curve saved before curves kept their own."""
    y = np.asarray(labels, dtype=np.int64)[sample_indices(len(labels), int(n), seed).numpy()]
    return np.bincount(y, minlength=num_classes)[:num_classes]


def _fits(counts: np.ndarray, accuracies: np.ndarray, n: float) -> bool:
    """Whether ``counts`` can be what ``accuracies`` (rows x classes) were measured on: they add up to ``n`` and
    every accuracy is a whole number of images of its class."""
    hits = np.nan_to_num(accuracies) * counts
    return int(counts.sum()) == int(n) and bool(np.all(np.abs(hits - np.round(hits)) < 1e-6))


def from_curve(curve: pd.DataFrame, eps: float, classes: Sequence[str], labels=None, seed: int = 0) -> pd.DataFrame:
    """Per class from one saved robustness curve (its rows of one attack, norm, steps, split and data): the
    ``accuracy:<class>`` columns at eps 0 (clean) and at ``eps`` (robust). ``n`` from the curve's ``n:<class>``
    columns, else the seeded draw from ``labels`` (the split the curve was drawn from) when the curve's numbers fit
    it, else NaN. Empty when the curve has no row at ``eps`` or at 0."""
    at = pd.to_numeric(curve["eps"], errors="coerce")
    wanted = [f"accuracy:{c}" for c in classes]
    robust, clean = curve[np.isclose(at, eps, rtol=EPS_RTOL, atol=1e-12)], curve[at == 0]
    if not len(robust) or not len(clean) or set(wanted) - set(curve.columns):
        return pd.DataFrame(columns=COLUMNS)
    robust, clean = robust.iloc[0], clean.iloc[0]
    counts = [f"n:{c}" for c in classes]
    n = np.full(len(classes), np.nan)
    if not set(counts) - set(curve.columns):
        n = pd.to_numeric(robust[counts], errors="coerce").to_numpy(dtype=float)
    elif labels is not None:
        drawn = drawn_counts(labels, len(classes), robust["n"], seed)
        n = drawn.astype(float) if _fits(drawn, curve[wanted].to_numpy(dtype=float), robust["n"]) else n
    return pd.DataFrame({"class": [str(c) for c in classes], "n": n,
                         "accuracy": pd.to_numeric(clean[wanted], errors="coerce").to_numpy(dtype=float),
                         "robust_accuracy": pd.to_numeric(robust[wanted], errors="coerce").to_numpy(dtype=float)})


def preset(attack: str, norm: str, steps: int) -> Optional[str]:
    """The protocol preset (:data:`~dpaat_core.evaluate.robustness.PRESETS`) of this attack, or None (FGSM, other steps)."""
    return next((name for name, p in PRESETS.items() if (p["attack"], p["norm"], p["steps"]) == (attack, norm, steps)),
                None)


def saved(protocol: pd.DataFrame, per_class: pd.DataFrame, curves: pd.DataFrame, attack: str, norm: str, steps: int,
          eps: float, classes: Sequence[str], labels=None, seed: int = 0) -> tuple[pd.DataFrame, str]:
    """A run's per-class figures under ``attack`` (``steps``) in ``norm`` at ``eps`` from its saved tables (each
    already narrowed to one split and data), and where they come from: the audit's ``per_class.csv`` (the whole
    split) when its protocol ran at this eps, else the robustness curve (monotone preferred) with a row at this eps
    (``labels``, ``seed``: see :func:`from_curve`); ``(empty, "")`` when neither has it."""
    name = preset(attack, norm, steps)
    rows = protocol[protocol["preset"] == name] if name and len(protocol) else protocol.iloc[:0]
    if len(rows) and np.isclose(float(rows["eps"].iloc[0]), eps, rtol=EPS_RTOL) and len(per_class):
        table = per_class[per_class["preset"] == name].sort_values("class_index")[COLUMNS].reset_index(drop=True)
        if len(table):
            return table, f"the audit (per_class.csv, {int(table['n'].sum())} images)"
    if len(curves):
        mine = curves[(curves["attack"] == attack) & (curves["norm"] == norm)
                      & (pd.to_numeric(curves["steps"], errors="coerce") == steps)]
        for monotone in (True, False):
            curve = mine[mine["monotone"].astype(str).str.lower() == str(monotone).lower()]
            table = from_curve(curve, eps, classes, labels, seed) if len(curve) else pd.DataFrame(columns=COLUMNS)
            if len(table):
                return table, f"the saved curve (robustness.csv, {int(curve['n'].max())} images)"
    return pd.DataFrame(columns=COLUMNS), ""


def weakest(table: pd.DataFrame) -> Optional[dict]:
    """Where the robustness stops: ``class`` and ``robust`` (the lowest robust accuracy among the classes with
    images; a tie goes to the rarer class), ``ties`` (other classes as low), and what it is set against: ``against``
    and ``against_robust``, the most common class, or the most robust one when the most common is as low (None when
    every class is). None without a class to judge."""
    frame = table.assign(n=pd.to_numeric(table["n"], errors="coerce"),
                         robust_accuracy=pd.to_numeric(table["robust_accuracy"], errors="coerce"))
    frame = frame[frame["robust_accuracy"].notna() & ~(frame["n"] <= 0)]
    if not len(frame):
        return None
    low = frame["robust_accuracy"].min()
    tied = frame[np.isclose(frame["robust_accuracy"], low)]
    first = tied.sort_values("n", kind="stable").iloc[0] if tied["n"].notna().all() else tied.iloc[0]
    rest = frame[~frame.index.isin(tied.index)]
    common = frame.sort_values("n", ascending=False, kind="stable").iloc[0] if frame["n"].notna().any() else None
    other = (common if common is not None and common.name in rest.index
             else rest.sort_values("robust_accuracy", ascending=False, kind="stable").iloc[0] if len(rest) else None)
    return {"class": str(first["class"]), "robust": float(low), "ties": len(tied) - 1,
            "against": None if other is None else str(other["class"]),
            "against_robust": None if other is None else float(other["robust_accuracy"])}


def weakest_sentence(run: str, table: pd.DataFrame) -> str:
    """One line: ``run X: robust accuracy 0.12 on akiec against 0.71 on nv`` (the weakest class against the most
    common one, see :func:`weakest`); plain text (a page escapes it)."""
    w = weakest(table)
    if w is None:
        return f"{run}: no class to judge"
    if w["against"] is None:
        return f"{run}: robust accuracy {w['robust']:.2f} on every class"
    ties = f" (and {w['ties']} more {'class' if w['ties'] == 1 else 'classes'} as low)" if w["ties"] else ""
    return (f"{run}: robust accuracy {w['robust']:.2f} on {w['class']}{ties} "
            f"against {w['against_robust']:.2f} on {w['against']}")
