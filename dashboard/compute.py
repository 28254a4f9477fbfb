"""What the pages compute on a run's model, cached and shared by the sessions: predictions, the explorer's maps,
the live attack or corruption of a batch, and the gallery's numbers and maps. The store is only read."""
from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass

import pandas as pd
import streamlit as st

from dashboard.state import cached_model, keep, model, stamp, unreadable, weights_key
from dpaat_core.store import runs


@dataclass(frozen=True)
class Perturbation:
    """What an image is changed by: an attack (``name``, ``norm``, ``eps``) or a natural corruption (``name``,
    ``severity``); ``index``: the image's index in its split, which seeds its random start or its corruption (None:
    seed 0, or each image of a batch by its position)."""
    name: str
    norm: str | None = None
    eps: float | None = None
    severity: int | None = None
    index: int | None = None

    @property
    def corruption(self) -> bool:
        return self.severity is not None

    @classmethod
    def attack(cls, name: str, norm: str, eps: float, index: int | None = None) -> "Perturbation":
        return cls(name, norm=norm, eps=float(eps), index=None if index is None else int(index))

    @classmethod
    def corrupt(cls, name: str, severity: int, index: int | None = None) -> "Perturbation":
        return cls(name, severity=int(severity), index=None if index is None else int(index))


@st.cache_resource
def model_lock(run_dir: str) -> threading.Lock:
    """One lock per cached model: the model is shared by every session, and an attack (train/eval flags) or
    Captum (hooks) changes it while it runs, so two sessions take turns."""
    return threading.Lock()


def image_key(x) -> str:
    """A short fingerprint of an image tensor, for caching results on it."""
    return hashlib.sha256(x.detach().cpu().numpy().tobytes()).hexdigest()[:16]


#: the explorer's attack steps: PGD-10, the setting ``python -m dpaat_core attribute`` writes into attribution.csv
EXPLORER_STEPS = 10


@st.cache_data(show_spinner="Classifying the images…", max_entries=16)
def _predictions(run_dir: str, mtime: int, spec: str, split: str, _data) -> pd.DataFrame:
    from dpaat_core.evaluate.robustness import clean_logits
    with model_lock(run_dir):     # clean_logits switches the shared model to eval mode and back
        pred = clean_logits(cached_model(run_dir, mtime), _data, batch_size=256).argmax(1)
    return pd.DataFrame({"index": range(len(_data)), "label": _data.labels.numpy(), "pred": pred.numpy(),
                         "class": [_data.classes[int(c)] for c in _data.labels]})


def predictions(run: runs.Run, data, split: str) -> pd.DataFrame:
    """Each image's class and the run's clean prediction on ``data`` (cached per run, data and split)."""
    return _predictions(*weights_key(run), data.source.spec, split, data)


@st.cache_data(show_spinner="Perturbing and explaining…", max_entries=64)
def _explanation(run_dir: str, mtime: int, key: str, _x, label, perturbation: Perturbation, methods: tuple) -> dict:
    import torch

    from dpaat_core.evaluate.attribution import clean_and_adversarial, clean_and_corrupted
    net = cached_model(run_dir, mtime)
    with model_lock(run_dir):
        p = perturbation
        if p.corruption:
            out = clean_and_corrupted(net, _x, p.name, p.severity, index=[p.index], methods=methods)
        else:
            with torch.no_grad():
                clean = net(_x).argmax(1)
            y = torch.tensor([label]) if label is not None else clean     # the attack fights the truth when known
            # an image of a split starts from its own point, as in attribute's numbers and the gallery
            out = clean_and_adversarial(net, _x, y, p.eps, attack=p.name, norm=p.norm, steps=EXPLORER_STEPS,
                                        methods=methods, index=None if p.index is None else [p.index])
    return {"x_adv": out["x_adv"].numpy(), "prob_clean": out["prob_clean"][0].numpy(),
            "prob_adv": out["prob_adv"][0].numpy(),
            "maps": {m: (a[0, 0].numpy(), b[0, 0].numpy()) for m, (a, b) in out["maps"].items()}}


def explanation(run: runs.Run, x, label, attack: str, norm: str, eps: float, methods,
                index: int | None = None) -> dict | None:
    """The explorer's numbers for one image: the attacked image, both probability sets and each method's clean and
    perturbed maps (numpy), computed once per (run, image, attack, norm, eps, methods) and cached; None, with a
    warning, when the run's weights cannot be loaded. ``index``: the image's index in its split, whose seeded start
    the attack then uses (the gallery's and ``attribute``'s maps); None (an upload): seed 0."""
    if model(run) is None:
        return None
    return _explanation(*weights_key(run), image_key(x), x, label,
                        Perturbation.attack(attack, norm, eps, index), tuple(methods))


def corrupted_explanation(run: runs.Run, x, index: int, corruption: str, severity: int, methods) -> dict | None:
    """:func:`explanation` with a natural corruption in place of the attack (seeded by the image's ``index``)."""
    if model(run) is None:
        return None
    return _explanation(*weights_key(run), image_key(x), x, None,
                        Perturbation.corrupt(corruption, severity, index), tuple(methods))


@st.cache_data(show_spinner="Perturbing the batch…", max_entries=64)
def _live(run_dir: str, mtime: int, key: str, _x, _y, perturbation: Perturbation) -> dict:
    import torch

    from dpaat_core.attack.attacks import ATTACKS, attack_mode, perturb
    from dpaat_core.evaluate.corruptions import corrupt
    net = cached_model(run_dir, mtime)
    with model_lock(run_dir):
        p = perturbation
        if p.corruption:
            x_adv = corrupt(_x, p.name, p.severity, index=range(len(_x)))
        else:
            x_adv = perturb(net, _x, _y, p.name, p.norm, p.eps, ATTACKS[p.name].default_steps)    # one attack, seeded
        with torch.no_grad(), attack_mode(net):
            logits = net(_x)
            p_clean, p_adv = logits.softmax(1), net(x_adv).softmax(1)
            (conf, clean), (conf_adv, adv) = p_clean.max(1), p_adv.max(1)
    correct, robust = clean == _y, (clean == _y) & (adv == _y)
    from dpaat_core.train.validation import balanced_accuracy
    y = _y.numpy()
    return {"accuracy": float(correct.float().mean()), "robust_accuracy": float(robust.float().mean()),
            "robust_balanced_accuracy": balanced_accuracy(y, torch.where(robust, _y, -1).numpy(), logits.shape[1]),
            "flipped": int((correct & ~robust).sum()), "x": _x.numpy(), "x_adv": x_adv.numpy(),
            "y": y, "pred": clean.numpy(), "pred_adv": adv.numpy(), "confidence": conf.numpy(),
            "confidence_adv": conf_adv.numpy(), "labels": y, "correct": correct.numpy(), "robust": robust.numpy()}


def _live_batch(run: runs.Run, data, n: int, perturbation: Perturbation) -> dict | None:
    if model(run) is None:
        return None
    x, y = data.batch(range(min(int(n), len(data))))
    return _live(*weights_key(run), f"{data.source.spec}:{image_key(x)}", x, y,
                 perturbation)


def live_attack(run: runs.Run, data, n: int, attack: str, norm: str, eps: float) -> dict | None:
    """Attack the first ``n`` images of ``data`` once at ``eps`` (the protocol's steps) and return clean, robust and
    robust balanced accuracy, how many flipped, each image's label and outcome (``labels``, ``correct``, ``robust``),
    and the first four clean and attacked images with labels and predictions; cached."""
    return _live_batch(run, data, n, Perturbation.attack(attack, norm, eps))


def live_corruption(run: runs.Run, data, n: int, corruption: str, severity: int) -> dict | None:
    """:func:`live_attack` with a natural corruption (each image seeded by its index) in place of the attack."""
    return _live_batch(run, data, n, Perturbation.corrupt(corruption, severity))


#: the gallery's attack: the explorer's (PGD-10, l2, the run's training eps), each image from its own start, seed 0
GALLERY_NORM = "l2"
#: images on a gallery page, and in each batch of the numbers computed for it (so the first page comes first)
GALLERY_PAGE = 24


@st.cache_resource(show_spinner=False, max_entries=1)
def _numbers_store() -> dict:
    """The gallery's computed numbers, shared by the sessions (key: run, weights, data, split, method, eps)."""
    return {}


def _image_numbers(run_dir: str, mtime: int, spec: str, split: str, method: str, eps: float, data,
                   first_page=None) -> pd.DataFrame:
    """Every image's numbers, computed once per key with a progress bar that counts the images (24 at a time);
    ``first_page(rows)`` gets the first 24 rows as soon as they exist (the page shows them while the rest come)."""
    from dpaat_core.evaluate.gallery import image_numbers
    store_, key = _numbers_store(), (run_dir, mtime, spec, split, method, eps)
    if key not in store_:
        bar = st.progress(0.0, text=f"Explaining every image of the split: 0 of {len(data)} (once per run, data and "
                                    "method)")
        table = image_numbers(cached_model(run_dir, mtime), data, eps, method, norm=GALLERY_NORM, steps=EXPLORER_STEPS,
                              batch_size=GALLERY_PAGE, around=lambda: model_lock(run_dir), first_batch=first_page,
                              callback=lambda done, total: bar.progress(
                                  done / total, text=f"Explaining every image of the split: {done} of {total}"))
        bar.empty()
        keep(store_, key, table, most=16)
    return store_[key]


@st.cache_data(show_spinner=False, max_entries=32)
def _saved_numbers(run_dir: str, mtime: int, method: str, split: str, spec: str, eps: float) -> pd.DataFrame:
    """The rows of the run's ``attribution_images.csv`` made with the gallery's setting, by index (read once per
    version of the file)."""
    mine = runs.select(runs.read_attribution_images(run_dir), method=method, split=split, data=spec,
                       norm=GALLERY_NORM, steps=EXPLORER_STEPS, seed=0)
    mine = mine[(pd.to_numeric(mine["eps"]) - eps).abs() < 1e-9]
    return mine.sort_values("index").reset_index(drop=True)


def gallery_eps(run: runs.Run) -> float:
    """The eps the gallery attacks at: the run's reference eps in :data:`GALLERY_NORM`."""
    from dpaat_core.evaluate.robustness import reference_eps
    return float(reference_eps(run.record, GALLERY_NORM))


def gallery_numbers(run: runs.Run, data, split: str, method: str,
                    first_page=None) -> tuple[pd.DataFrame | None, str]:
    """Every image's attribution numbers for the gallery, and where they came from: the run's saved
    ``attribution_images.csv`` when it covers the split with the gallery's setting, else computed here (in memory,
    cached; the store is only read), calling ``first_page(rows)`` with the first page's rows as soon as they
    exist."""
    if model(run) is None:
        return None, ""
    eps = gallery_eps(run)
    try:
        mine = _saved_numbers(str(run.path), stamp(run.path / runs.ATTRIBUTION_IMAGES_FILE), method, split,
                              data.source.spec, eps)
    except runs.RunError as exc:
        unreadable(f"{run.run_id}: attribution_images.csv", exc)
        mine = pd.DataFrame()
    if len(mine) == len(data) and set(mine["index"]) == set(range(len(data))):
        return mine, "saved with the run (attribution_images.csv)"
    table = _image_numbers(*weights_key(run), data.source.spec, split, method, eps, data, first_page)
    return table, "computed for this view (`python -m dpaat_core attribute RUN --n all` saves them with the run)"


@st.cache_data(show_spinner="Drawing the maps of this page…", max_entries=64)
def _page_maps(run_dir: str, mtime: int, spec: str, split: str, index: tuple, method: str, eps: float,
               _data) -> dict:
    from dpaat_core.evaluate.gallery import page_maps
    net = cached_model(run_dir, mtime)
    with model_lock(run_dir):
        return page_maps(net, _data, index, eps, method, GALLERY_NORM, EXPLORER_STEPS)


def gallery_maps(run: runs.Run, data, split: str, index, method: str) -> dict | None:
    """The clean and attacked images and maps of the images ``index`` (one page), cached per page."""
    if model(run) is None or not len(index):
        return None
    return _page_maps(*weights_key(run), data.source.spec, split,
                      tuple(int(i) for i in index), method, gallery_eps(run), data)
