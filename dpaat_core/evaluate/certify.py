"""Certified l2 robustness by randomized smoothing (Cohen, Rosenfeld and Kolter, ICML 2019).

The smoothed classifier ``g(x) = argmax_c P(f(x + N(0, sigma^2 I)) = c)`` of a base classifier ``f`` is constant
within an l2 ball of radius ``sigma * Phi^-1(pA)`` around ``x`` whenever the top class has probability at least ``pA``
under the noise. ``certify`` is the paper's CERTIFY: the top class is chosen on a separate selection sample of ``n0``
draws, its probability is bounded from below by a one-sided Clopper-Pearson interval over ``n`` fresh draws at level
``1 - alpha``, and the classifier abstains when that bound is at most 1/2. ``predict`` is PREDICT: the top class if a
two-sided binomial test against the runner-up rejects a tie at level ``alpha``, else abstain.

Radii are l2 distances in the model's input units: images in [0, 1] (the normalisation sits inside the model), the
same units as the l2 eps of ``evaluate``. Noise is drawn on the model's device from a generator per image, seeded by
``seed`` and the image's index, so an image's certificate does not depend on which other images were certified with
it or on the batch size. Forward passes use the inference fast path: channels_last inputs (1.7 times the images per
second of contiguous ones for resnet8 on a CPU core), bf16 autocast on CUDA and float32 on the CPU, and batches of
1,000 noisy images on CUDA and 100 on the CPU (where smaller batches stay in cache).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from scipy.stats import beta as beta_dist, binomtest, norm as normal
from tqdm.auto import tqdm

from dpaat_core.attack.attacks import _autocast, attack_mode

ABSTAIN = -1
#: the radii a summary reports certified accuracy at (Cohen et al.'s table uses 0.25 steps)
SUMMARY_RADII = (0.0, 0.25, 0.5, 1.0)
#: noise samples drawn per image at a time: fixed, so an image's draws are the same at any batch size
CHUNK = 100
_STAGES = {"selection": 1, "estimation": 2}


def lower_confidence_bound(successes, trials, alpha: float):
    """One-sided ``1 - alpha`` Clopper-Pearson lower bound on a binomial proportion (``beta.ppf(alpha, k, n-k+1)``;
    0 when there are no successes). Works elementwise on arrays."""
    k, n = np.asarray(successes, dtype=float), np.asarray(trials, dtype=float)
    with np.errstate(invalid="ignore"):
        bound = beta_dist.ppf(alpha, k, n - k + 1)
    return np.where(k > 0, bound, 0.0)


def certified_radius(p_lower, sigma: float):
    """``sigma * Phi^-1(p_lower)``: the l2 radius certified by a lower bound ``p_lower`` on the top class's
    probability (NaN where ``p_lower <= 1/2``: the classifier abstains)."""
    p = np.asarray(p_lower, dtype=float)
    with np.errstate(invalid="ignore"):
        return np.where(p > 0.5, sigma * normal.ppf(p), math.nan)


def check_settings(sigma: float, n0: int, n: int, alpha: float, batch_size: Optional[int] = None) -> None:
    """A ValueError naming the first setting out of range."""
    if not (isinstance(sigma, (int, float)) and not isinstance(sigma, bool) and math.isfinite(sigma)
            and 0 < sigma <= 10):
        raise ValueError(f"sigma must be a number > 0 and <= 10 (pixels in [0, 1]), got {sigma!r}")
    for name, value, low in (("n0", n0, 1), ("n", n, 1), ("batch_size", 1 if batch_size is None else batch_size, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low or value > 10**8:
            raise ValueError(f"{name} must be an integer from {low} to 1e8, got {value!r}")
    if not (isinstance(alpha, float) and math.isfinite(alpha) and 0 < alpha < 0.5):
        raise ValueError(f"alpha must be a number > 0 and < 0.5, got {alpha!r}")


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def default_batch_size(device) -> int:
    """Noisy images per forward pass: 1,000 on CUDA, 100 on the CPU (measured fastest for resnet8 at 64 px)."""
    return 1000 if torch.device(device).type == "cuda" else 100


def _key(seed: int, index: int, stage: str) -> int:
    return ((int(seed) * 1_000_003 + int(index)) * 3 + _STAGES[stage]) % (2**63 - 1)


def noise_counts(model: nn.Module, x: torch.Tensor, num: int, sigma: float, num_classes: int, *,
                 index: Sequence[int], seed: int = 0, stage: str = "estimation", batch_size: Optional[int] = None,
                 amp: Optional[bool] = None, progress=None) -> np.ndarray:
    """How often the base classifier predicts each class on ``num`` noisy copies of each image: int64
    ``[N, num_classes]``.

    ``x``: float ``[N, ...]`` (images in [0, 1]); each image ``j`` gets ``num`` draws of ``N(0, sigma^2 I)`` from its
    own generator on the model's device, seeded by ``seed``, ``index[j]`` and ``stage``. Model calls hold up to
    ``batch_size`` noisy inputs (default :func:`default_batch_size`), from several images where they fit; counts stay
    on the device until the end.
    ``amp``: bf16 autocast (default: on CUDA only). ``progress``: a callable given the images' share done.
    """
    device = _model_device(model)
    amp = device.type == "cuda" if amp is None else amp
    batch_size = default_batch_size(device) if batch_size is None else batch_size
    x = x.to(device, torch.float32)
    counts = torch.zeros(len(x), num_classes, dtype=torch.int64, device=device)
    finite = torch.ones((), dtype=torch.bool, device=device)     # checked once at the end: no host sync per batch
    gens = [torch.Generator(device=device).manual_seed(_key(seed, i, stage)) for i in index]
    pieces = [(j, min(CHUNK, num - start)) for j in range(len(x)) for start in range(0, num, CHUNK)]
    limit = max(batch_size, CHUNK)
    fast = dict(memory_format=torch.channels_last) if x.dim() == 4 else {}
    with torch.inference_mode(), attack_mode(model), _autocast(device, amp):
        start = 0
        while start < len(pieces):
            stop, total = start + 1, pieces[start][1]        # pieces are at most CHUNK <= limit: one always fits
            while stop < len(pieces) and total + pieces[stop][1] <= limit:
                total += pieces[stop][1]
                stop += 1
            batch = pieces[start:stop]
            noisy = torch.cat([x[j] + sigma * torch.randn((c, *x.shape[1:]), generator=gens[j], device=device)
                               for j, c in batch])
            owner = torch.cat([torch.full((c,), j, device=device) for j, c in batch])
            logits = model(noisy.contiguous(**fast))
            finite &= torch.isfinite(logits).all()
            predicted = logits.argmax(1)
            counts.index_put_((owner, predicted), torch.ones_like(predicted), accumulate=True)
            if progress is not None:
                progress(total / num)
            start = stop
    if not finite:
        raise ValueError("the model gives non-finite logits (NaN or inf) on noisy images: its certificates would "
                         "mean nothing (are its weights finite?)")
    return counts.cpu().numpy()


def certify(model: nn.Module, x: torch.Tensor, sigma: float, num_classes: int, *, n0: int = 100, n: int = 10_000,
            alpha: float = 0.001, index: Optional[Sequence[int]] = None, seed: int = 0,
            batch_size: Optional[int] = None, amp: Optional[bool] = None, progress=None) -> pd.DataFrame:
    """CERTIFY for each image of ``x`` (float ``[N, ...]`` in [0, 1]): one row per image with ``prediction`` (the
    smoothed class, or :data:`ABSTAIN`), ``top_class`` (the selection sample's top class, abstaining or not),
    ``count`` (its hits among the ``n`` estimation draws), ``pa_lower`` (the Clopper-Pearson lower bound on its
    probability) and ``radius`` (``sigma * Phi^-1(pa_lower)``, NaN when abstaining). ``index``: the images' indices,
    which seed their noise (default ``0..N-1``)."""
    check_settings(sigma, n0, n, alpha, batch_size)
    index = list(range(len(x))) if index is None else [int(i) for i in index]
    shared = dict(index=index, seed=seed, batch_size=batch_size, amp=amp, progress=progress)
    selection = noise_counts(model, x, n0, sigma, num_classes, stage="selection", **shared)
    top = selection.argmax(1)
    estimation = noise_counts(model, x, n, sigma, num_classes, stage="estimation", **shared)
    count = estimation[np.arange(len(x)), top]
    p_lower = lower_confidence_bound(count, n, alpha)
    abstain = p_lower <= 0.5
    return pd.DataFrame({"index": index, "top_class": top, "prediction": np.where(abstain, ABSTAIN, top),
                         "count": count, "pa_lower": p_lower, "radius": certified_radius(p_lower, sigma)})


def predict(model: nn.Module, x: torch.Tensor, sigma: float, num_classes: int, *, n: int = 10_000,
            alpha: float = 0.001, index: Optional[Sequence[int]] = None, seed: int = 0,
            batch_size: Optional[int] = None, amp: Optional[bool] = None) -> np.ndarray:
    """PREDICT for each image: the top class of ``n`` noisy draws when a two-sided binomial test of its count
    against the runner-up's rejects a tie at level ``alpha`` (then it is the smoothed classifier's class with
    probability at least ``1 - alpha``), else :data:`ABSTAIN`. int64 ``[N]``."""
    check_settings(sigma, 1, n, alpha, batch_size)
    index = list(range(len(x))) if index is None else [int(i) for i in index]
    counts = noise_counts(model, x, n, sigma, num_classes, index=index, seed=seed, stage="estimation",
                          batch_size=batch_size, amp=amp)
    order = np.argsort(-counts, axis=1, kind="stable")
    out = np.full(len(x), ABSTAIN, dtype=np.int64)
    for j, (a, b) in enumerate(order[:, :2] if num_classes > 1 else np.c_[order[:, 0], order[:, 0]]):
        n_a, n_b = int(counts[j, a]), int(counts[j, b]) if b != a else 0
        if binomtest(n_a, n_a + n_b, 0.5).pvalue <= alpha:
            out[j] = a
    return out


def certify_dataset(model: nn.Module, dataset, sigma: float, *, n0: int = 100, n: int = 10_000,
                    alpha: float = 0.001, indices: Optional[Sequence[int]] = None, seed: int = 0,
                    batch_size: Optional[int] = None, amp: Optional[bool] = None, progress: bool = False,
                    block: int = 64) -> pd.DataFrame:
    """:func:`certify` over images of an :class:`~dpaat_core.data.ImageDataset` (``indices``, default all), a
    block of images at a time, with a progress bar over images. Adds ``label``, ``class`` (the prediction's name or
    "abstain"), ``correct`` (predicted and right) and the settings (sigma, n0, n, alpha, seed)."""
    indices = np.arange(len(dataset)) if indices is None else np.asarray(indices, dtype=np.int64)
    device = _model_device(model)
    bar = tqdm(total=len(indices), desc=f"certify sigma {sigma:g}", unit="image", disable=not progress,
               bar_format="{l_bar}{bar}| {n:.0f}/{total} images [{elapsed}<{remaining}]")
    step = lambda share: bar.update(min(share / 2, bar.total - bar.n))   # noqa: E731 - half selection, half estimation
    frames = []
    try:
        for start in range(0, len(indices), block):
            part = torch.from_numpy(indices[start:start + block])
            x, _ = dataset.batch(part, device)
            frames.append(certify(model, x, sigma, dataset.num_classes, n0=n0, n=n, alpha=alpha, index=part.tolist(),
                                  seed=seed, batch_size=batch_size, amp=amp, progress=step))
            bar.n = start + len(part)   # exact at each block's end (the shares are floats)
            bar.refresh()
    finally:
        bar.close()
    frame = pd.concat(frames, ignore_index=True)
    labels = dataset.labels[torch.from_numpy(indices)].numpy()
    names = np.array([*map(str, dataset.classes), "abstain"], dtype=object)
    frame.insert(1, "label", labels)
    frame.insert(3, "class", names[frame["prediction"].to_numpy()])   # ABSTAIN = -1 picks "abstain"
    frame.insert(4, "correct", frame["prediction"].to_numpy() == labels)
    return frame.assign(sigma=float(sigma), n0=n0, n=n, alpha=alpha, seed=seed)


def certified_accuracy(frame: pd.DataFrame, radii: Sequence[float]) -> np.ndarray:
    """The share of images whose smoothed prediction is right with a certified radius of at least ``r``, for each
    ``r`` of ``radii`` (at 0: right and not abstaining)."""
    radius = frame["radius"].to_numpy(dtype=float)
    correct = frame["correct"].to_numpy(dtype=bool) & np.isfinite(radius)
    return np.array([(correct & (radius >= r)).mean() if len(frame) else math.nan for r in radii])


def certified_curve(frame: pd.DataFrame, points: int = 101, top: Optional[float] = None) -> pd.DataFrame:
    """Certified accuracy against radius on an even grid from 0 to ``top`` (default: just past the largest
    radius), one row per (sigma, radius): what the Robustness page draws beside the PGD curve."""
    rows = []
    for sigma, part in frame.groupby("sigma", sort=True):
        end = top if top is not None else float(np.nanmax(part["radius"].to_numpy(dtype=float), initial=0)) * 1.05
        grid = np.linspace(0, max(end, 1e-6), points)
        rows.append(pd.DataFrame({"sigma": sigma, "radius": grid, "certified_accuracy": certified_accuracy(part, grid),
                                  "n_images": len(part), "n": int(part["n"].max())}))
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(
        columns=["sigma", "radius", "certified_accuracy", "n_images", "n"])


def summary(frame: pd.DataFrame, radii: Sequence[float] = SUMMARY_RADII) -> dict:
    """One sigma's certificates in numbers: images, abstentions, certified accuracy at each of ``radii``
    (``certified_accuracy@r``) and the median radius of the correctly classified images."""
    right = frame[frame["correct"].astype(bool)]
    out = {"images": len(frame), "abstain_rate": float((frame["prediction"] == ABSTAIN).mean()) if len(frame) else
           math.nan}
    out.update({f"certified_accuracy@{r:g}": float(a) for r, a in zip(radii, certified_accuracy(frame, radii))})
    out["median_radius_correct"] = float(right["radius"].median()) if len(right) else math.nan
    return out


def per_class(frame: pd.DataFrame, classes: Sequence[str], radius: float = 0.0) -> pd.DataFrame:
    """Per true class: images, certified accuracy at ``radius`` and the median radius of its right images; a
    clinician sees whether the guarantee stops at the common class."""
    rows = []
    for k, name in enumerate(classes):
        part = frame[frame["label"] == k]
        right = part[part["correct"].astype(bool)]
        rows.append({"class": str(name), "images": len(part),
                     "certified_accuracy": float(certified_accuracy(part, [radius])[0]) if len(part) else math.nan,
                     "median_radius_correct": float(right["radius"].median()) if len(right) else math.nan})
    return pd.DataFrame(rows)


SETTING = ("sigma", "n0", "n", "alpha")


def fullest(frame: pd.DataFrame) -> pd.DataFrame:
    """Per sigma, the rows of one setting: the one that certified the most images, then the largest ``n`` (a
    store may hold a quick look beside a full run; they are never mixed in one curve)."""
    if not len(frame):
        return frame
    sizes = frame.groupby(list(SETTING), sort=False).size().rename("images").reset_index()
    best = sizes.sort_values(["sigma", "images", "n", "n0"], ascending=[True, False, False, False]) \
        .drop_duplicates("sigma")
    keep = frame.set_index(list(SETTING)).index.isin(best.set_index(list(SETTING)).index)
    return frame[keep]
