"""How far to trust a run's attribution maps, in one line a clinician can read beside every map.

Two figures decide it, both from what the run has saved (nothing is computed here):

* **accuracy**: the run's balanced accuracy on the test split: the audit's (``protocol.csv``), else the clean point
  of a saved robustness curve, else the best epoch's validation figure (said so);
* **localisation**: how much more of a map's positive mass lies on the lesion than chance gives. Chance is the same
  map scored against another image's lesion mask (``energy_other_mask``), which allows for lesions sitting near the
  centre. The difference is taken per image and given with a 95% t interval over the images.

A model whose balanced accuracy is under :data:`WEAK_ACCURACY`, or whose maps are not measurably better than chance
(the interval's lower end under :data:`LOCALISATION_MARGIN`), gets a plain warning.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pandas as pd

from dpaat_core.store import runs
from dpaat_core.store.record import RunRecord

#: below this balanced accuracy a model's maps explain mostly wrong answers
WEAK_ACCURACY = 0.6
#: maps whose lesion share exceeds chance by less than this (lower end of the 95% interval) look no better than chance
LOCALISATION_MARGIN = 0.02


@dataclass(frozen=True)
class Localisation:
    """Per image, the map's share of positive mass on its lesion against the share on another image's lesion."""

    method: str
    on_lesion: float
    chance: float
    low: float          # 95% t interval of the per-image difference
    high: float
    images: int

    @property
    def above_chance(self) -> float:
        return self.on_lesion - self.chance


def localisation(numbers: pd.DataFrame, method: str) -> Optional[Localisation]:
    """The localisation of ``method``'s maps from per-image numbers (``attribution_images.csv`` rows, or the
    gallery's), or None without lesion masks or with fewer than 2 images."""
    from scipy import stats
    if not {"energy_clean", "energy_other_mask"} <= set(numbers.columns):
        return None
    rows = numbers if "method" not in numbers else numbers[numbers["method"] == method]
    pair = rows[["energy_clean", "energy_other_mask"]].apply(pd.to_numeric, errors="coerce").dropna()
    if len(pair) < 2:
        return None
    d = (pair["energy_clean"] - pair["energy_other_mask"]).to_numpy(dtype=float)
    half = float(stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d)))
    return Localisation(method, float(pair["energy_clean"].mean()), float(pair["energy_other_mask"].mean()),
                        float(d.mean()) - half, float(d.mean()) + half, len(d))


def accuracy(run_dir, record: Optional[RunRecord], best: dict) -> tuple[Optional[float], str]:
    """The run's balanced accuracy and where it comes from (test audit, test curve, else validation)."""
    from dpaat_core.evaluate.audit import read_protocol   # here: audit pulls in the attacks and Captum, ~2 s of a runs listing's start-up
    spec = None if record is None else record.spec
    try:
        protocol = runs.select(read_protocol(run_dir), split="test", data=spec)
        if len(protocol) and "balanced_accuracy" in protocol and protocol["balanced_accuracy"].notna().any():
            return float(protocol["balanced_accuracy"].dropna().iloc[0]), "test split, audit"
        curves = runs.select(runs.read_robustness(run_dir), split="test", data=spec)
        if "balanced_accuracy" in curves:
            clean = curves[pd.to_numeric(curves["eps"], errors="coerce") == 0]["balanced_accuracy"].dropna()
            if len(clean):
                return float(clean.iloc[0]), "test split"
    except runs.RunError:
        pass
    value = best.get("val_balanced_accuracy")
    if value is not None and np.isfinite(value):
        return float(value), "validation split, best epoch"
    return None, "not measured yet"


def saved_localisation(run_dir, record: Optional[RunRecord], method: str) -> Optional[Localisation]:
    """The localisation of the run's saved test-split maps (``attribution_images.csv``), or None."""
    try:
        saved = runs.read_attribution_images(run_dir)
    except runs.RunError:
        return None
    spec = None if record is None else record.spec
    return localisation(runs.select(saved, split="test", data=spec), method)


def verdict(balanced: Optional[float], where: Optional[Localisation]) -> tuple[str, list[str]]:
    """``("trust", [])`` or ``("doubt", reasons)`` or ``("unknown", reasons)``: the reasons in plain words."""
    reasons, unknown = [], []
    if balanced is None:
        unknown.append("its accuracy has not been measured")
    elif balanced < WEAK_ACCURACY:
        reasons.append(f"averaged over the classes it is right on only {balanced:.0%} of the images, so its maps "
                       "explain many wrong answers")
    if where is None:
        unknown.append("its maps have not been checked against lesion masks")
    elif where.low < LOCALISATION_MARGIN:
        reasons.append("its maps fall on the lesion no more often than chance, so they do not show what in the "
                       "lesion drove the answer")
    if reasons:
        return "doubt", reasons + unknown
    return ("unknown", unknown) if unknown else ("trust", [])


def trust_line(balanced: Optional[float], source: str, where: Optional[Localisation]) -> tuple[str, str]:
    """The level ("trust", "doubt" or "unknown") and the sentence shown beside a map."""
    from dpaat_core.evaluate.attribution import method_label   # here, as read_protocol above: Captum is not needed to list runs
    parts = [f"Balanced accuracy {balanced:.2f} ({source})" if balanced is not None else "Accuracy not measured"]
    if where is not None:
        parts.append(f"{method_label(where.method)} maps put {where.on_lesion:.0%} of their mass on "
                     f"the lesion against {where.chance:.0%} by chance ({where.above_chance * 100:+.0f} points, 95% "
                     f"CI {where.low * 100:+.0f} to {where.high * 100:+.0f}; {where.images} images)")
    level, reasons = verdict(balanced, where)
    text = "; ".join(parts) + "."
    if level == "doubt":
        text += " **Do not read these maps as the model's reasons:** " + "; ".join(reasons) + "."
    elif level == "unknown":
        text += " How far to trust the maps is not known yet: " + " and ".join(reasons) + "."
    return level, text
