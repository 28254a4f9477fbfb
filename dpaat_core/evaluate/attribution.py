"""Attribution maps (via Captum) of clean and adversarial images, and how far they agree and localise.

:func:`attribute` gives one map per image; :func:`clean_and_adversarial` pairs the map of an image with
the map of its adversarial version; the metrics compare two maps (spearman, topk_iou, ssim) or a map with
a lesion mask (energy_in_mask, pointing_game); :func:`attribution_report` runs it all over a test split.
"""
from __future__ import annotations

import math
import warnings

import matplotlib
import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from captum.attr import GuidedGradCam, IntegratedGradients, LayerAttribution, LayerGradCam, Occlusion, Saliency
from scipy.stats import rankdata
from skimage.metrics import structural_similarity
from tqdm.auto import tqdm

from dpaat_core.store import loading, runs
from dpaat_core.attack.attacks import attack_mode, perturb
from dpaat_core.evaluate.corruptions import corrupt
from dpaat_core.evaluate.robustness import reference_eps
from dpaat_core.models import gradcam_layer

METHODS = ("gradcam", "integrated_gradients", "saliency", "occlusion", "guided_gradcam")


# Adapters: (model, x float [B,C,H,W] requiring grad, target int64 [B], **options) -> [B,1,H,W].
def _gradcam(model, x, target, layer=None):
    cam = LayerGradCam(model, layer or gradcam_layer(model)).attribute(x, target, relu_attributions=True)
    return LayerAttribution.interpolate(cam, tuple(x.shape[-2:]), "bilinear")


def _integrated_gradients(model, x, target, n_steps=32, internal_batch_size=None):
    # Black-image baseline: "no evidence" in pixel space. The internal batch bounds memory (B * n_steps
    # images in all); Captum needs it to hold at least the B images of one step.
    attr = IntegratedGradients(model).attribute(x, torch.zeros_like(x), target=target, n_steps=n_steps,
                                                internal_batch_size=internal_batch_size or max(64, len(x)))
    return attr.abs().sum(1, keepdim=True)


def _saliency(model, x, target):
    return Saliency(model).attribute(x, target=target, abs=True).sum(1, keepdim=True)


def _occlusion(model, x, target, window=None, stride=None, perturbations_per_eval=16):
    c, side = x.shape[1], min(x.shape[-2:])
    window = window or max(2, round(side / 8))
    stride = stride or max(1, window // 2)
    with torch.no_grad():  # forward passes only: no graph needed
        attr = Occlusion(model).attribute(x.detach(), sliding_window_shapes=(c, window, window), strides=(c, stride, stride),
                                          baselines=0.0, target=target, perturbations_per_eval=perturbations_per_eval)
    return attr.mean(1, keepdim=True)


def _guided_gradcam(model, x, target, layer=None):
    with warnings.catch_warnings():  # Captum announces its (temporary) ReLU hooks on every call
        warnings.filterwarnings("ignore", message="Setting backward hooks on ReLU")
        attr = GuidedGradCam(model, layer or gradcam_layer(model)).attribute(x, target)
    return attr.abs().sum(1, keepdim=True)


_ADAPTERS = dict(zip(METHODS, (_gradcam, _integrated_gradients, _saliency, _occlusion, _guided_gradcam)))


def _check_images(x) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim != 4 or x.shape[0] == 0:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a float tensor [B, C, H, W], got {got}")
    lo, hi = torch.stack(torch.aminmax(x.detach().float())).tolist()
    if not 0 <= lo <= hi <= 1:  # also refuses NaN
        raise ValueError(f"x must be images in [0, 1], found values in [{lo:.4g}, {hi:.4g}]")


def _as_target(target, x: torch.Tensor) -> torch.Tensor:
    if isinstance(target, (int, np.integer)) and not isinstance(target, bool):
        return torch.full((x.shape[0],), int(target), dtype=torch.int64, device=x.device)
    if isinstance(target, torch.Tensor) and not target.is_floating_point() and target.shape == (x.shape[0],):
        return target.to(device=x.device, dtype=torch.int64)
    raise ValueError(f"target must be an int or an integer tensor of shape [{x.shape[0]}], got {target!r}")


def attribute(model: nn.Module, x: torch.Tensor, target, method: str = "gradcam", **options) -> torch.Tensor:
    """One attribution map per image: float32 ``[B, 1, H, W]``, detached, on ``x``'s device.

    ``x``: float ``[B, C, H, W]`` in [0, 1]; ``target``: the class explained, an int or int64 ``[B]``.
    ``method``: one of :data:`METHODS`; ``options`` go to its adapter (``layer`` for the Grad-CAMs,
    ``n_steps``/``internal_batch_size`` for integrated gradients, ``window``/``stride`` in pixels for
    occlusion). Maps are >= 0 except occlusion's (a negative pixel raised the target's score when hidden).
    The model runs in eval mode; its modules' flags are restored and its parameters get no ``.grad``.
    """
    if method not in _ADAPTERS:
        raise ValueError(f"unknown attribution method {method!r}; choose one of: {', '.join(METHODS)}")
    _check_images(x)
    target = _as_target(target, x)
    with attack_mode(model), torch.enable_grad():
        attr = _ADAPTERS[method](model, x.detach().clone().requires_grad_(True), target, **options)
    return attr.detach().to(torch.float32)


def clean_and_adversarial(model, x, y, eps, method="gradcam", attack="pgd", norm="l2", steps=10, alpha_ratio=None,
                          generator=None, target=None, methods=None, noise=None, index=None, seed=0,
                          **options) -> dict:
    """Attack ``x`` once and explain both versions for the same class.

    ``x``: float ``[B, C, H, W]`` in [0, 1]; ``y``: int64 ``[B]`` true labels (what the attack fights);
    ``eps``: the attack's radius (float or ``[B]``); the attack is :func:`dpaat_core.evaluate.robustness.perturb`
    (step ``alpha_ratio * eps``, default eps/4 for pgd, eps/steps for ifgsm).
    ``target``: the class both maps explain, default the clean prediction, so that a changed map means
    changed evidence, not a different question. Returns ``x_adv``, ``map_clean``/``map_adv`` ``[B,1,H,W]``
    (of ``method``), ``pred_clean``/``pred_adv`` int64 ``[B]``, ``prob_clean``/``prob_adv`` softmax ``[B, K]``
    and ``maps``: ``{name: (map_clean, map_adv)}`` for each of ``methods`` (default ``(method,)``), all on the
    same attacked images. ``noise``, or ``index`` and ``seed``: the random start as :func:`~dpaat_core.attack.attacks.perturb`
    takes it (``index``: each image's own seeded point) instead of a draw from ``generator``.
    """
    _check_images(x)
    x_adv = perturb(model, x, y, attack, norm, eps, steps, alpha_ratio, generator=generator, noise=noise,
                    index=index, seed=seed)
    return explain_pair(model, x, x_adv, method, target, methods, **options)


def clean_and_corrupted(model, x, corruption: str, severity: int, seed: int = 0, index=None, method="gradcam",
                        target=None, methods=None, **options) -> dict:
    """:func:`clean_and_adversarial` with a natural corruption (:func:`dpaat_core.evaluate.corruptions.corrupt`, seeded by
    ``seed`` and each image's ``index``) in place of the attack: the same keys, ``x_adv`` the corrupted images."""
    _check_images(x)
    return explain_pair(model, x, corrupt(x, corruption, severity, seed, index), method, target, methods, **options)


def explain_pair(model, x, x_pert, method="gradcam", target=None, methods=None, **options) -> dict:
    """Explain ``x`` and its perturbed version ``x_pert`` for the same class (default the clean prediction, so that
    a changed map means changed evidence, not a different question); the dict of :func:`clean_and_adversarial`."""
    methods = tuple(methods) if methods is not None else (method,)
    with attack_mode(model), torch.no_grad():
        prob_clean, prob_adv = model(x).softmax(1), model(x_pert).softmax(1)
    target = prob_clean.argmax(1) if target is None else _as_target(target, x)
    maps = {}
    for name in methods:
        # One batched call for both versions: half the Captum overhead, and the same target for each pair.
        both = attribute(model, torch.cat([x, x_pert]), torch.cat([target, target]), name, **options)
        maps[name] = (both[: len(x)], both[len(x):])
    first = maps[methods[0]] if methods else (None, None)
    return {"x_adv": x_pert, "map_clean": first[0], "map_adv": first[1], "maps": maps,
            "pred_clean": prob_clean.argmax(1), "pred_adv": prob_adv.argmax(1), "prob_clean": prob_clean,
            "prob_adv": prob_adv}


def _as_maps(a, name: str) -> tuple[np.ndarray, bool]:
    """``[H,W]`` (one map) or ``[B,H,W]``/``[B,1,H,W]`` (a batch) as float64 ``[B,H,W]``, and whether batched."""
    a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    if a.ndim == 4 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim not in (2, 3):
        raise ValueError(f"{name} must be [H, W], [B, H, W] or [B, 1, H, W], got shape {a.shape}")
    return (a[None] if a.ndim == 2 else a).astype(np.float64), a.ndim == 3


def _pair(a, b, names=("a", "b")):
    (a, batched_a), (b, batched_b) = _as_maps(a, names[0]), _as_maps(b, names[1])
    if a.shape[1:] != b.shape[1:] or (len(a) != len(b) and 1 not in (len(a), len(b))):
        raise ValueError(f"{names[0]} {a.shape} and {names[1]} {b.shape} do not match")
    a, b = np.broadcast_arrays(a, b)
    return a, b, batched_a or batched_b


def _result(values: np.ndarray, batched: bool):
    return values if batched else float(values[0])


def spearman(a, b):
    """Rank correlation over pixels (average ranks for ties), in [-1, 1]; nan when a map is constant."""
    a, b, batched = _pair(a, b)
    ra, rb = (rankdata(v.reshape(len(v), -1), axis=1) for v in (a, b))
    ra, rb = ra - ra.mean(1, keepdims=True), rb - rb.mean(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):  # a constant map has no ranking: 0/0 = nan
        r = (ra * rb).sum(1) / np.sqrt((ra**2).sum(1) * (rb**2).sum(1))
    return _result(np.clip(r, -1, 1), batched)


def topk_iou(a, b, k: float = 0.1):
    """IoU of the ``k`` fraction of highest pixels of each map (ties broken by pixel order); chance ~ k/(2-k)."""
    if not 0 < k <= 1:
        raise ValueError(f"k must be a fraction in (0, 1], got {k!r}")
    a, b, batched = _pair(a, b)
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    count = max(1, round(k * a.shape[1]))
    top = []
    for v in (a, b):
        chosen = np.zeros(v.shape, dtype=bool)
        np.put_along_axis(chosen, np.argsort(-v, axis=1, kind="stable")[:, :count], True, axis=1)
        top.append(chosen)
    inter = (top[0] & top[1]).sum(1)
    return _result(inter / (2 * count - inter), batched)


def ssim(a, b):
    """SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5) of the maps min-max scaled to [0, 1].

    Scaling first compares the maps' shapes, not their units. A constant map scales to zeros. Maps under 11 px on a
    side (8 px images) use the largest odd uniform window that fits (3 px at least); smaller maps give NaN.
    """
    a, b, batched = _pair(a, b)
    unit = lambda v: (v - v.min()) / (v.max() - v.min()) if v.max() > v.min() else np.zeros_like(v)  # noqa: E731
    side = min(a.shape[-2:])
    if side >= 11:
        window = {"gaussian_weights": True, "sigma": 1.5}
    elif side >= 3:
        window = {"win_size": side if side % 2 else side - 1}
    else:
        return _result(np.full(len(a), np.nan), batched)
    values = [structural_similarity(unit(p), unit(q), data_range=1.0, use_sample_covariance=False, **window)
              for p, q in zip(a, b)]
    return _result(np.array(values, dtype=np.float64), batched)


def energy_in_mask(a, m):
    """Share of the map's positive part inside the mask ``m`` (bool/uint8, 1 = lesion), in [0, 1]; nan if none is positive.

    A map spread evenly scores the mask's area fraction (the chance level of a uniform map). Lesions sit
    near the image centre, so a centre-heavy map beats that without looking at the image: compare with the
    same maps scored against other images' masks to tell localisation from centre bias.
    """
    a, m, batched = _pair(a, m, ("map", "mask"))
    pos = np.clip(a, 0, None).reshape(len(a), -1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return _result((pos * (m.reshape(len(m), -1) > 0)).sum(1) / pos.sum(1), batched)


def pointing_game(a, m):
    """1.0 if the map's maximum (the first, in row-major order, when tied) lies in the mask, else 0.0; nan for a constant map."""
    a, m, batched = _pair(a, m, ("map", "mask"))
    a, m = a.reshape(len(a), -1), m.reshape(len(m), -1) > 0
    hit = m[np.arange(len(a)), a.argmax(1)].astype(np.float64)
    hit[a.max(1) == a.min(1)] = math.nan
    return _result(hit, batched)


def attribution_report(model, dataset, eps, method="gradcam", attack="pgd", norm="l2", steps=10, n=64, batch_size=16,
                       seed=0, device="cpu", progress=False, index=None, other_index=None, **options) -> pd.DataFrame:
    """Clean-vs-adversarial attribution metrics, one row per image: a seeded random draw of ``n`` items, or the
    items ``index`` (in that order) when given.

    ``dataset``: an :class:`~dpaat_core.data.ImageDataset` (a test split); ``model`` must already be on ``device``.
    Columns: index (into ``dataset``), label, pred_clean, pred_adv, confidence_clean, confidence_adv (the softmax
    of the predicted class), correct_clean, correct_adv, spearman, topk_iou, ssim (clean map vs adversarial map),
    and with masks: mask_fraction (a uniform map's energy), energy_clean, energy_adv, pointing_clean,
    pointing_adv, and energy_other_mask: the clean map's energy in another image's mask. Lesions sit near the
    image centre, so a map that ignores the image already beats mask_fraction; energy_clean above
    energy_other_mask is what shows the map follows *this* lesion. Each image's attack starts from its own
    seeded point (:func:`~dpaat_core.attack.attacks.index_noise`), so its row is the same in any draw or batch.
    ``df.attrs`` records the settings.
    """
    device = torch.device(device)
    param = next(model.parameters(), None)
    if param is not None and param.device.type != device.type:
        raise ValueError(f"the model is on {param.device}, not {device}; move it there first")
    if index is None:
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n]
    else:
        order = torch.as_tensor(list(index), dtype=torch.int64)
    # Chance that allows for lesions sitting near the centre: each map scored on another image's mask (the next in
    # the order, or ``other_index``'s: a caller working through a long order piece by piece keeps the same pairs).
    others = (order.roll(-1) if other_index is None else torch.as_tensor(list(other_index))).split(batch_size)
    frames = []
    for idx, other in zip(tqdm(order.split(batch_size), disable=not progress, desc=f"{method} clean vs {attack}"),
                          others):
        x, y = dataset.batch(idx, device)
        out = clean_and_adversarial(model, x, y, eps, method, attack, norm, steps, index=idx, seed=seed, **options)
        clean, adv = out["map_clean"], out["map_adv"]
        cols = {"index": idx.numpy(), "label": y.cpu().numpy(), "pred_clean": out["pred_clean"].cpu().numpy(),
                "pred_adv": out["pred_adv"].cpu().numpy(),
                "confidence_clean": out["prob_clean"].max(1).values.cpu().numpy().astype(np.float64),
                "confidence_adv": out["prob_adv"].max(1).values.cpu().numpy().astype(np.float64),
                "correct_clean": (out["pred_clean"] == y).cpu().numpy(),
                "correct_adv": (out["pred_adv"] == y).cpu().numpy(), "spearman": spearman(clean, adv),
                "topk_iou": topk_iou(clean, adv), "ssim": ssim(clean, adv)}
        if dataset.masks is not None:
            m = dataset.masks[idx]
            cols.update(mask_fraction=m.float().mean((1, 2)).numpy().astype(np.float64),
                        energy_clean=energy_in_mask(clean, m), energy_adv=energy_in_mask(adv, m),
                        energy_other_mask=energy_in_mask(clean, dataset.masks[other]),
                        pointing_clean=pointing_game(clean, m), pointing_adv=pointing_game(adv, m))
        frames.append(pd.DataFrame(cols))
    df = pd.concat(frames, ignore_index=True)
    df.attrs = {"method": method, "eps": eps, "attack": attack, "norm": norm, "steps": steps, "seed": seed}
    return df


def summarize_report(df: pd.DataFrame) -> pd.DataFrame:
    """Mean, std, median and n (non-NaN rows) of each metric column of an :func:`attribution_report` frame."""
    values = df.drop(columns=[c for c in ("index", "label", "pred_clean", "pred_adv", "confidence_clean",
                                          "confidence_adv") if c in df]).astype(np.float64)
    out = pd.DataFrame({"mean": values.mean(), "std": values.std(), "median": values.median(), "n": values.count()})
    out.attrs = dict(df.attrs)
    return out


def perturbation_image(x: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
    """``x_adv - x`` made visible: scaled so its largest change spans [0, 1] around grey 0.5."""
    delta = x_adv - x
    return (0.5 + delta / (2 * delta.abs().max().clamp(min=1e-12))).clamp(0, 1)


#: the maps' colour scale: perceptually uniform (equal steps look equal, and it reads in grey), dark = low
CMAP = "inferno"
#: the lesion outline's colour (cyan: apart from every colour of CMAP and of skin)
OUTLINE = (0.0, 1.0, 1.0)
#: names for people, by method
METHOD_LABELS = {"gradcam": "Grad-CAM", "saliency": "Saliency", "integrated_gradients": "Integrated Gradients",
                 "occlusion": "Occlusion"}


def method_label(method: str) -> str:
    return METHOD_LABELS.get(method, method.replace("_", " "))


def outline(mask) -> np.ndarray:
    """The one-pixel boundary of a lesion mask (``[H, W]``, nonzero = lesion) as a bool ``[H, W]``."""
    m = (mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)) > 0
    padded = np.pad(m, 1, mode="edge")
    inner = padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return m & ~inner


def overlay(image, attribution, alpha: float = 0.5, cmap: str = CMAP, mask=None) -> np.ndarray:
    """The map as a heatmap blended over the image: uint8 ``[H, W, 3]``; with ``mask`` (``[H, W]``, 1 = lesion) the
    lesion's outline drawn on top in :data:`OUTLINE`.

    ``image``: float ``[C, H, W]`` in [0, 1] (C = 1 or 3, tensor or array) or uint8 ``[H, W, 3]``/``[H, W]``.
    ``attribution``: ``[H, W]`` or ``[1, H, W]``. The map is scaled from its minimum (0) to its 99th
    percentile (1) and clipped, so a few extreme pixels do not wash the rest out; a constant map leaves
    the image as it is. ``alpha``: the map's opacity, 0 (the image alone) to 1 (the map alone).
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha is the map's opacity, from 0 to 1, got {alpha}")
    img = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if img.dtype == np.uint8:
        rgb = (img[..., None] if img.ndim == 2 else img).astype(np.float64) / 255
    elif img.ndim == 3 and np.issubdtype(img.dtype, np.floating) and img.shape[0] in (1, 3):
        if img.min() < 0 or img.max() > 1:
            raise ValueError("a float image must have values in [0, 1]")
        rgb = np.moveaxis(img.astype(np.float64), 0, -1)
    else:
        raise ValueError(f"image must be float [C, H, W] in [0, 1] or uint8 [H, W, 3], got {img.dtype} {img.shape}")
    rgb = np.repeat(rgb, 3, axis=-1) if rgb.shape[-1] == 1 else rgb
    a = attribution.detach().cpu().numpy() if isinstance(attribution, torch.Tensor) else np.asarray(attribution)
    a = a[0] if a.ndim == 3 and a.shape[0] == 1 else a
    if rgb.shape[-1] != 3 or a.shape != rgb.shape[:2] or not np.isfinite(a).all():
        raise ValueError(f"need a finite [H, W] attribution for a [H, W] RGB or grey image, got {a.shape} for {rgb.shape}")
    lo, hi = a.min(), np.percentile(a, 99)
    hi = hi if hi > lo else a.max()  # a map flat below its top percent still shows its peak
    if hi > lo:
        heat = matplotlib.colormaps[cmap](np.clip((a - lo) / (hi - lo), 0, 1))[..., :3]
        rgb = (1 - alpha) * rgb + alpha * heat
    if mask is not None:
        edge = outline(mask)
        if edge.shape != rgb.shape[:2]:
            raise ValueError(f"the mask {edge.shape} does not match the image {rgb.shape[:2]}")
        rgb[edge] = OUTLINE
    return np.clip(np.round(rgb * 255), 0, 255).astype(np.uint8)


def enlarged(image: np.ndarray, width: int = 768) -> np.ndarray:
    """``image`` (``[H, W, C]``) repeated pixel by pixel by the largest whole factor that keeps it within ``width``
    (at least 1): shown large, a 64 px map keeps its sharp pixels instead of the browser's blur."""
    factor = max(1, width // image.shape[1])
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def colour_bar(width: int = 256, height: int = 12, cmap: str = CMAP) -> np.ndarray:
    """The maps' colour scale as a uint8 ``[height, width, 3]`` strip, low (left) to high (right)."""
    ramp = matplotlib.colormaps[cmap](np.linspace(0, 1, width))[None, :, :3]
    return np.round(np.repeat(ramp, height, axis=0) * 255).astype(np.uint8)


def prediction_words(classes, pred: int, confidence: float, label=None, pred_after=None, confidence_after=None,
                     after: str = "") -> str:
    """The prediction in words: "Predicted akiec 42% ✗ (true df) → bkl 28% under PGD eps 0.3 ✗, changed": the clean
    top class and its probability, right (✓) or wrong (✗) when the truth is known, and with ``pred_after`` the answer
    on the perturbed image (``after`` names the perturbation) and whether the perturbation changed it."""
    def mark(k):
        return "" if label is None else (" ✓" if int(k) == int(label) else " ✗")
    out = f"Predicted {classes[int(pred)]} {confidence:.0%}{mark(pred)}" + (
        f" (true {classes[int(label)]})" if label is not None and int(pred) != int(label) else "")
    if pred_after is not None:
        out += (f" → {classes[int(pred_after)]} {confidence_after:.0%}{(' under ' + after) if after else ''}"
                f"{mark(pred_after)}, {'changed' if int(pred_after) != int(pred) else 'unchanged'}")
    return out


def prediction_sentence(classes, prob_clean, label=None, prob_after=None, after: str = "") -> str:
    """:func:`prediction_words` from the class probabilities, clean and (``prob_after``) perturbed."""
    def top(p):
        p = np.asarray(p.detach().cpu() if isinstance(p, torch.Tensor) else p, dtype=float).reshape(-1)
        return int(p.argmax()), float(p.max())
    pred, conf = top(prob_clean)
    pred_after, conf_after = top(prob_after) if prob_after is not None else (None, None)
    return prediction_words(classes, pred, conf, label, pred_after, conf_after, after)


# --- a run's attribution table: what ``attribute`` and ``audit`` save -----------------------------------------

def attribution_table(run_dir, methods, n=256, split="test", data=None, eps=None, norm="l2", steps=10, seed=0,
                      device="cpu", progress=True, model=None, dataset=None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The means (one row per attribution method and metric: mean, std, median, n) and the per-image rows of
    :func:`attribution_report` (a ``method`` column added), with the settings as columns. ``n``:
    a seeded draw of that many images, or None for every image in index order. ``model`` and ``dataset``: the
    run's, already loaded (on ``device``; the ``split`` of ``data``), instead of reading them again."""
    record = runs.read_record(run_dir)
    eps = reference_eps(record, norm) if eps is None else eps
    model = loading.load_model(run_dir, device=device) if model is None else model
    dataset = loading.load_run_data(run_dir, split, data) if dataset is None else dataset
    settings = dict(eps=eps, norm=norm, steps=steps, split=split, data=data or record.spec)
    means, images = [], []
    for method in methods:
        report = attribution_report(model, dataset, eps, method=method, norm=norm, steps=steps,
                                    n=n, seed=seed, device=device, progress=progress,
                                    index=range(len(dataset)) if n is None else None)   # all, in index order
        summary = summarize_report(report).rename_axis("metric").reset_index()
        means.append(summary.assign(method=method, **settings))
        images.append(report.assign(method=method, seed=seed, **settings))
    summary = pd.concat(means, ignore_index=True)[["method", "metric", "mean", "std", "median", "n", "eps", "norm",
                                                   "steps", "split", "data"]]
    return summary, pd.concat(images, ignore_index=True)
