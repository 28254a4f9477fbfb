"""The audit of a run (``python -m dpaat_core audit RUN``): everything the shareable report shows, computed in one go
and merged into the run folder as each part finishes.

1. the paper's protocol at the run's reference eps (PGD-20 and I-FGSM, l2 and linf): ``protocol.csv``, and each
   preset's per-class accuracy, robust accuracy and average precision: ``per_class.csv``;
2. PGD robustness curves in both norms over the default eps grid: ``robustness.csv``;
3. the APGD check (APGD-CE then APGD-DLR on PGD-20's survivors, in the run's training norm, l2 for an imported
   model): ``apgd.csv``;
4. clean-vs-attacked attribution numbers (Grad-CAM where the model has a Grad-CAM layer, and saliency):
   ``attribution.csv`` and ``attribution_images.csv``.

Every table is merged under the run's lock with rows of other splits or data specs kept (as ``evaluate`` does), so
an audit on another dataset adds to the first one. A part that cannot run (APGD without torchattacks) is skipped with
its reason, not fatal.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from dpaat_core.data.dataset import cap_samples, sample_indices
from dpaat_core.store import loading, runs
from dpaat_core.evaluate.attribution import attribution_table
from dpaat_core.evaluate.robustness import PRESETS, default_grid, protocol_evaluations, reference_eps, robustness_curve
from dpaat_core.models import NoGradCamLayer, gradcam_layer
from dpaat_core.evaluate.strong import strong_robustness

PROTOCOL_FILE, PER_CLASS_FILE = runs.TABLES["protocol"].file, runs.TABLES["per_class"].file
read_protocol, read_per_class, read_apgd = (runs.TABLES[t].read for t in ("protocol", "per_class", "apgd"))
save_apgd = runs.TABLES["apgd"].save
#: the attribution maps an audit measures: Grad-CAM where the model has a layer for it, and saliency
AUDIT_METHODS = ("gradcam", "saliency")


def save_protocol(run_dir, table: pd.DataFrame, per_class: Optional[pd.DataFrame] = None) -> Path:
    """Merge protocol rows (one per preset) into ``protocol.csv`` and their per-class rows into ``per_class.csv``:
    rows of the same preset, split and data are replaced, others kept."""
    path = runs.TABLES["protocol"].save(run_dir, table)
    if per_class is not None:
        runs.TABLES["per_class"].save(run_dir, per_class)
    return path


def protocol_rows(preset: str, evaluation, **where) -> tuple[dict, pd.DataFrame]:
    """One preset's row of ``protocol.csv`` and its rows of ``per_class.csv`` (``where``: split and data)."""
    per_class = evaluation.per_class.assign(preset=preset, class_index=np.arange(len(evaluation.per_class)), **where)
    return {"preset": preset, **evaluation.summary(), **where}, per_class


def has_gradcam(model) -> bool:
    """Whether Grad-CAM can explain ``model`` (a ViT has no 4-D feature map to weigh)."""
    try:
        gradcam_layer(model)
    except NoGradCamLayer:
        return False
    return True


def audit(run_dir, data: Optional[str] = None, split: str = "test", max_samples: Optional[int] = None,
          n_attribution: Optional[int] = None, apgd_steps: int = 50, batch_size: int = 128, device="cpu",
          seed: int = 0, progress: bool = True, log=print, curve_samples: Optional[int] = None) -> dict:
    """Run the four parts of the audit on ``run_dir`` (see the module docstring), one progress bar over all of them,
    each part's tables merged into the run as soon as it is done. ``data``: a data spec (default the run's own);
    ``n_attribution``: images explained (a seeded draw; None: all, which the dashboard's gallery sorts);
    ``curve_samples``: the curves and the APGD check on a seeded draw of that many of the audited images (the same
    draw as ``evaluate --max-samples``; None: all); ``log``: where each part's one-line result goes.
    Returns ``{"protocol", "per_class", "curves", "apgd", "attribution", "skipped"}``."""
    record = runs.read_record(run_dir)
    spec = data or record.spec
    dataset = loading.load_run_data(run_dir, split, spec, max_samples, progress=progress)   # no spec: says --data
    model = loading.load_model(run_dir, device=device)
    eps = {norm: reference_eps(record, norm) for norm in ("l2", "linf")}
    norm = record.judged_norm   # the APGD check: the training norm, l2 for an imported model
    methods = [m for m in AUDIT_METHODS if m != "gradcam" or has_gradcam(model)]
    where = dict(split=split, data=spec)
    bar = tqdm(total=len(PRESETS) + 2 + 1 + len(methods), desc="audit", unit="part", disable=not progress)
    out = {"skipped": {}}
    if "gradcam" not in methods:
        out["skipped"]["gradcam"] = "the model has no 4-D feature map before its pooling (a ViT): no Grad-CAM"

    def say(line):
        with tqdm.external_write_mode(file=sys.stderr):   # a line above the bar, not through it
            log(line)

    rows, per_class, pgd20 = [], [], None
    bar.set_postfix_str("protocol")
    for preset, ev in protocol_evaluations(model, dataset, eps, batch_size=batch_size, device=device, seed=seed):
        row, classes = protocol_rows(preset, ev, **where)
        rows.append(row)
        per_class.append(classes)
        if preset == f"pgd20_{norm}":
            pgd20 = ev.samples["robust"].to_numpy()
        bar.update()
    out["protocol"], out["per_class"] = pd.DataFrame(rows), pd.concat(per_class, ignore_index=True)
    save_protocol(run_dir, out["protocol"], out["per_class"])
    say("protocol: " + ", ".join(f"{r.preset} {r.robust_accuracy:.3f}" for r in out["protocol"].itertuples())
        + f" (clean {out['protocol'].accuracy.iloc[0]:.3f}, balanced {out['protocol'].balanced_accuracy.iloc[0]:.3f})")

    few = cap_samples(dataset, curve_samples, seed)                    # PGD-20's survivors among them, for APGD
    pgd20 = pgd20[sample_indices(len(dataset), curve_samples, seed).numpy()]
    curves = []
    for curve_norm in ("l2", "linf"):
        bar.set_postfix_str(f"curves {curve_norm}")
        curves.append(robustness_curve(model, few, default_grid(record, curve_norm), "pgd", curve_norm,
                                       batch_size=batch_size, device=device, seed=seed).assign(**where))
        bar.update()
    out["curves"] = pd.concat(curves, ignore_index=True)
    runs.save_robustness(run_dir, out["curves"])
    say(f"curves: PGD-20 l2 and linf over {len(out['curves']) // 2} eps each, {len(few)} images")

    bar.set_postfix_str(f"APGD {norm}")
    try:
        strong = strong_robustness(model, few, norm, eps[norm], steps=apgd_steps, survivors=pgd20,
                                   batch_size=batch_size, device=device, seed=seed)
    except ImportError as exc:
        out["apgd"] = None
        out["skipped"]["apgd"] = str(exc)
        say(f"APGD check skipped: {exc}")
    else:
        out["apgd"] = pd.DataFrame([{"norm": norm, "eps": eps[norm], **where, "n": strong["n"],
                                     "pgd20": float(pgd20.mean()), "robust_accuracy": strong["robust_accuracy"],
                                     "robust_balanced_accuracy": strong["robust_balanced_accuracy"],
                                     "attacks": f"pgd20+{strong['attacks']}", "steps": apgd_steps}])
        save_apgd(run_dir, out["apgd"])
        say(f"APGD check ({norm} eps {eps[norm]:g}): PGD-20 {pgd20.mean():.3f}, worst case with APGD "
            f"{strong['robust_accuracy']:.3f}")
    bar.update()

    summaries, images = [], []
    n = None if n_attribution is None or n_attribution >= len(dataset) else n_attribution
    for method in methods:
        bar.set_postfix_str(f"attribution {method}")
        summary, per_image = attribution_table(run_dir, [method], n, split, spec, norm=norm, seed=seed,
                                               device=device, progress=False, model=model, dataset=dataset)
        summaries.append(summary)
        images.append(per_image)
        bar.update()
    out["attribution"] = pd.concat(summaries, ignore_index=True)
    runs.save_attribution(run_dir, out["attribution"], pd.concat(images, ignore_index=True))
    means = out["attribution"].pivot_table(index="metric", columns="method", values="mean")
    say("attribution (clean vs PGD-10 map agreement, Spearman): "
        + ", ".join(f"{m} {means.loc['spearman', m]:.3f}" for m in methods))
    bar.close()
    return out
