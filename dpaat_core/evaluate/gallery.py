"""A test set's attribution maps at once, worst first: the numbers the dashboard's gallery sorts, filters and
summarises by, and the maps of the images on one page.

The per-image numbers are :func:`dpaat_core.evaluate.attribution.attribution_report` rows over every image of a split
(saved by ``python -m dpaat_core attribute RUN --n all`` as ``attribution_images.csv``, or computed here). Each
image's attack starts from its own seeded point, so :func:`page_maps` redraws exactly the maps a row's numbers
came from, for any page of images in any order.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import torch

from dpaat_core.evaluate.attribution import attribution_report, clean_and_adversarial
from dpaat_core.evaluate.class_robustness import from_outcomes

#: the share of a map's positive mass on the lesion below which the map "looks away from the lesion"
OFF_LESION = 0.5
#: sort name -> what it puts first
SORTS = {
    "looks away from the lesion": "lowest share of the map on the lesion first",
    "attention moves under attack": "lowest clean-vs-attacked rank agreement first",
    "confidently wrong": "wrong predictions, most confident first",
    "smallest certified radius": "abstentions, then the smallest certified l2 radius (randomized smoothing) first",
    "index": "the split's order",
}


def image_numbers(model, dataset, eps: float, method: str = "gradcam", norm: str = "l2", steps: int = 10,
                  batch_size: int = 64, seed: int = 0, device="cpu", around=None, callback=None,
                  first_batch=None) -> pd.DataFrame:
    """Every image's row of :func:`attribution_report`, in index order (as ``attribute --n all`` saves them).
    ``around``: a context manager factory entered for each batch (the dashboard's lock on its shared model, so
    other sessions take turns between batches rather than wait for the whole split); ``callback(done, total)``
    after each batch; ``first_batch(rows)`` once, with the first batch's rows, while the others are still to come
    (the dashboard shows them as a first page)."""
    n = len(dataset)
    frames = []
    for chunk in torch.arange(n).split(batch_size):
        with (around() if around is not None else contextlib.nullcontext()):
            frames.append(attribution_report(model, dataset, eps, method, norm=norm, steps=steps,
                                             batch_size=batch_size, seed=seed, device=device, index=chunk.tolist(),
                                             other_index=((chunk + 1) % n).tolist()))
        if callback is not None:
            callback(int(chunk[-1]) + 1, n)
        if first_batch is not None and len(frames) == 1 and len(chunk) < n:
            first_batch(frames[0])
    return pd.concat(frames, ignore_index=True)


def order(table: pd.DataFrame, sort: str) -> pd.DataFrame:
    """``table`` in the order of ``sort`` (a key of :data:`SORTS`); NaN values (no mask, a constant map) last, ties
    by index. "confidently wrong" keeps the wrong predictions only."""
    if sort not in SORTS:
        raise ValueError(f"unknown sort {sort!r}; choose from {', '.join(SORTS)}")
    if sort == "index":
        return table.sort_values("index")
    if sort == "confidently wrong":
        wrong = table[table["pred_clean"] != table["label"]]
        return wrong.sort_values(["confidence_clean", "index"], ascending=[False, True])
    if sort == "smallest certified radius":
        if "radius" not in table:
            raise ValueError("sorting by 'smallest certified radius' needs certified radii (python -m dpaat_core "
                             "certify RUN --sigma 0.25)")
        abstains = table["certified_prediction"] < 0       # no guarantee at all: first; images not certified: last
        key = table["radius"].mask(abstains, -1.0)
        return table.assign(_key=key).sort_values(["_key", "index"], na_position="last").drop(columns="_key")
    column = "energy_clean" if sort == "looks away from the lesion" else "spearman"
    if column not in table:
        raise ValueError(f"sorting by '{sort}' needs {column}, which these numbers lack (no lesion masks?)")
    return table.sort_values([column, "index"], na_position="last")


def select(table: pd.DataFrame, classes: Optional[Sequence[int]] = None, outcome: str = "all",
           in_training: Optional[pd.Series] = None, split: str = "all") -> pd.DataFrame:
    """The rows of the true ``classes`` (indices; None: all), with ``outcome`` "correct", "wrong" or "all", and,
    given ``in_training`` (the last epoch's fragile/stable split by image index), of that ``split``."""
    rows = table if classes is None else table[table["label"].isin(list(classes))]
    if outcome != "all":
        rows = rows[(rows["pred_clean"] == rows["label"]) == (outcome == "correct")]
    if in_training is not None and split != "all":
        rows = rows[rows["index"].map(in_training) == split]
    return rows


def off_lesion_summary(table: pd.DataFrame, classes: Sequence[str], threshold: float = OFF_LESION) -> pd.DataFrame:
    """Per true class and in all: images, how many have their map mostly off the lesion (less than ``threshold``
    of its mass on it) and that share, against chance: the share when each map is scored on another image's mask
    (``energy_other_mask``), which allows for lesions sitting near the centre."""
    if "energy_clean" not in table:
        return pd.DataFrame()
    rows = []
    for name, part in [*((c, table[table["label"] == k]) for k, c in enumerate(classes)), ("all", table)]:
        part = part[part["energy_clean"].notna()]
        if not len(part):
            continue
        off = part["energy_clean"] < threshold
        chance = part["energy_other_mask"] < threshold
        rows.append({"class": name, "images": len(part), "off_lesion": int(off.sum()),
                     "off_lesion_share": float(off.mean()), "chance_share": float(chance.mean())})
    return pd.DataFrame(rows)


def class_outcomes(table: pd.DataFrame, classes: Sequence[str]) -> pd.DataFrame:
    """Per true class: images (``n``), clean accuracy and robust accuracy under the gallery's attack (right on the
    clean image and on the attacked one), from the rows' label and both predictions
    (:func:`dpaat_core.evaluate.class_robustness.from_outcomes`)."""
    label = table["label"].to_numpy()
    right, held = table["pred_clean"].to_numpy() == label, table["pred_adv"].to_numpy() == label
    return from_outcomes(label, right, held, classes)


def compare(a: pd.DataFrame, b: pd.DataFrame, threshold: float = OFF_LESION) -> dict:
    """Which images run ``a`` looks at on the lesion (``energy_clean`` >= ``threshold``) and run ``b`` does not,
    and the other way round, over the images both have numbers for: index lists and the counts of both/neither."""
    both = pd.merge(a[["index", "energy_clean"]], b[["index", "energy_clean"]], on="index", how="inner",
                    suffixes=("_a", "_b")).set_index("index").dropna()
    on_a, on_b = both["energy_clean_a"] >= threshold, both["energy_clean_b"] >= threshold
    return {"only_a": both.index[on_a & ~on_b].tolist(), "only_b": both.index[~on_a & on_b].tolist(),
            "both": int((on_a & on_b).sum()), "neither": int((~on_a & ~on_b).sum()), "images": len(both)}


def page_maps(model, dataset, index: Sequence[int], eps: float, method: str = "gradcam", norm: str = "l2",
              steps: int = 10, seed: int = 0, device="cpu") -> dict:
    """The clean and attacked images and both maps (numpy, ``[n, ...]``) of the images ``index``: the same maps
    their rows of :func:`image_numbers` were measured on (each image's own attack start)."""
    idx = torch.as_tensor(list(index), dtype=torch.int64)
    x, y = dataset.batch(idx, device)
    out = clean_and_adversarial(model, x, y, eps, method, "pgd", norm, steps, index=idx, seed=seed)
    return {"x": x.cpu().numpy(), "x_adv": out["x_adv"].cpu().numpy(),
            "map_clean": out["map_clean"][:, 0].detach().cpu().numpy().astype(np.float32),
            "map_adv": out["map_adv"][:, 0].detach().cpu().numpy().astype(np.float32)}


def with_certificates(table: pd.DataFrame, certified: pd.DataFrame) -> pd.DataFrame:
    """``table`` with each image's certificate (one sigma's rows of ``certified.csv``): ``radius`` (NaN when the
    smoothed model abstains or the image was not certified) and ``certified_prediction`` (-1: abstains; NaN: not
    certified)."""
    if not len(certified):
        return table
    sigma = certified["sigma"].min()
    rows = certified[certified["sigma"] == sigma][["index", "radius", "prediction"]]
    return table.merge(rows.rename(columns={"prediction": "certified_prediction"}), on="index", how="left")
