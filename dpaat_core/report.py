"""The shareable audit report (``python -m dpaat_core report RUN [RUN ...] -o FILE.html``): one self-contained HTML
file, plotly's script and every image inside it, that opens offline and sends no request.

For each run: where the model comes from, clean / balanced / robust accuracy and mAP with per-class figures (the
audit's ``protocol.csv`` and ``per_class.csv``, else the saved curve at the run's eps) and the class where its
robustness stops, the robustness curves, the APGD check, the attribution numbers and
a grid of example test images (clean and attacked, the map of each, the prediction of each); for several runs, the
comparison first. Randomized smoothing's certified radii (``certified.csv``) sit beside the attack curves. A part the run
has not computed yet says which command computes it. Everything taken from a run
folder (names, classes, paths) is escaped: a report of a hostile run folder runs no script of its own.
"""
from __future__ import annotations

import base64
import contextvars
import hashlib
import html
import io
import re
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from dpaat_core.store import loading, runs
from dpaat_core.store.record import RunRecord
from dpaat_core.evaluate.attribution import clean_and_adversarial, overlay
from dpaat_core.evaluate.audit import has_gradcam, read_apgd, read_per_class, read_protocol
from dpaat_core.evaluate.certify import fullest, per_class as certified_per_class, summary as certified_summary
from dpaat_core.evaluate.class_robustness import saved as saved_by_class, weakest_sentence
from dpaat_core.data import display_name
from dpaat_core.evaluate.robustness import reference_eps
from dpaat_core.plots import PALETTE, certified_chart, per_class_chart, robustness_chart

HOW_TO_READ = """
<p><b>Clean accuracy</b> is the share of the split's images the model gets right; <b>balanced accuracy</b> averages the
per-class accuracies, so that a rare class (melanoma is about one image in nine in HAM10000) counts as much as the
common one. <b>Robust accuracy</b> is the share it still gets right when an attacker may change every image a little:
by at most <i>eps</i> in l2 (the length of the whole change, in [0, 1] pixel units) or in linf (the most any one pixel
may move). PGD-20 and I-FGSM are the attacks of the DPAAT paper; the <b>APGD check</b> attacks the images PGD-20 left
standing again with a stronger attack: a large gap between the two means PGD-20 overstated the robustness.
<b>mAP</b> is the mean over classes of the average precision of the clean scores (ranking quality, 1 is perfect).
The <b>per-class</b> figure draws each class's robust accuracy (solid) inside its clean accuracy (outlined), with the
class's image count; the <b>weakest class</b> line names the class where the robustness stops, against the most
common class: a model whose robustness holds only for the common class fails the patients with the rare ones.</p>
<p>The <b>curves</b> show robust accuracy as the attacker's budget grows; a curve that stays high for longer is the
more robust model. The <b>attribution numbers</b> ask whether the model looks at the same place before and after the
attack: <i>spearman</i> is the rank agreement of the two maps (1: the same ranking of pixels), <i>topk_iou</i> the
overlap of their top 10% pixels, and where the data has lesion masks, <i>energy_clean</i> is the share of the map on
the lesion, against <i>energy_other_mask</i>, the share on another image's lesion (what a map that ignores the image
would score). In the <b>examples</b>, each row is an image of the split: the image, the attacked image (the change is too
small to see), and the map of each, with the prediction and its confidence; a red prediction is wrong.</p>
<p>These numbers are measured on the named split only, at the image size the model takes: they say how the
model behaves on images like these, not on a clinic's own images.</p>
"""

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2em auto;max-width:1200px;color:#222;
padding:0 1em}
h1{font-size:1.6em} h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em} h3{margin-top:1.4em}
table{border-collapse:collapse;margin:.6em 0} td,th{border:1px solid #ddd;padding:.25em .6em;text-align:right}
th{background:#f4f6f8} td:first-child,th:first-child{text-align:left}
.note{color:#666;font-size:.92em} .wrong{color:#c0392b;font-weight:600} .right{color:#1e7e34}
.examples td{text-align:center;vertical-align:top;font-size:.85em} .examples img{width:112px;height:112px;
image-rendering:auto;display:block;margin:auto}
.meta td{text-align:left}
.side{display:flex;flex-wrap:wrap;gap:1.5em;align-items:flex-start} .side>div{flex:1 1 420px;min-width:0}
"""

#: the attribution metrics the report shows, in order (those the data has)
ATTRIBUTION_METRICS = ("spearman", "topk_iou", "ssim", "energy_clean", "energy_adv", "energy_other_mask",
                       "pointing_clean", "pointing_adv")
NO_SCRIPT = "'none'"
MAP_NAMES = {"gradcam": "Grad-CAM", "saliency": "saliency"}
PRESET_LABELS = {"pgd20_l2": "PGD-20 l2", "ifgsm_l2": "I-FGSM l2", "pgd20_linf": "PGD-20 linf",
                 "ifgsm_linf": "I-FGSM linf"}


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def _table(frame: pd.DataFrame, digits: int = 3, cls: str = "") -> str:
    return frame.to_html(index=False, escape=True, border=0, classes=cls or None, na_rep="–",
                         float_format=lambda v: f"{v:.{digits}f}")


def _png(array: np.ndarray) -> str:
    """A uint8 ``[H, W, 3]`` (or float ``[C, H, W]`` in [0, 1]) image as an embedded PNG ``<img>``."""
    from PIL import Image
    a = np.asarray(array)
    if a.dtype != np.uint8:
        a = np.clip(np.round(np.moveaxis(a, 0, -1) * 255), 0, 255).astype(np.uint8)
        a = a[..., 0] if a.shape[-1] == 1 else a
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return f'<img alt="" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


#: the scripts this report writes (each figure's): only these are allowed to run, by their hashes
_OWN_SCRIPTS: contextvars.ContextVar[list] = contextvars.ContextVar("own_scripts")


def _script_hash(code: str) -> str:
    return f"'sha256-{base64.b64encode(hashlib.sha256(code.encode()).digest()).decode()}'"


def _figure(fig: go.Figure) -> str:
    fig.update_layout(height=420, margin={"t": 60, "b": 40})
    text = fig.to_html(full_html=False, include_plotlyjs=False, config={"displaylogo": False, "responsive": True})
    own = _OWN_SCRIPTS.get(None)
    if own is not None:   # plotly writes the figure's data escaped (no "</script>" in it): one script, ours
        own.extend(re.findall(r"<script[^>]*>(.*?)</script>", text, flags=re.S))
    return text


def describe_origin(record: RunRecord) -> str:
    """Where a run's model comes from, in one sentence (plain text)."""
    model = record.model
    if record.imported:
        source = record.config.source
        return (f"imported {model.name} weights from {Path(str(source.get('file', '?'))).name} "
                f"(SHA-256 {str(source.get('sha256', '?'))[:16]}…), trained outside DPAAT Lab")
    config = record.config
    init = record.init or {}
    start = init.get("run_id") or Path(str(init.get("run") or model.init_from or "")).name
    text = f"{record.method} training of {model.name} for {config.train.epochs} epochs in DPAAT Lab"
    if record.method != "erm" and config.attack.eps:
        text += f" (training eps {config.attack.eps:g} {config.attack.norm})"
    if not start:
        return text + ", from scratch"
    return text + (f", starting from the weights of {start}"
                   + (" (an imported model)" if init.get("origin") == "imported" else ""))


class RunTables:
    """One run's tables for the report, read once (only the rows of ``split`` and ``data``)."""

    def __init__(self, run_dir, split: str, data: Optional[str], viewer: bool = False):
        self.path, self.split, self.viewer = Path(run_dir), split, viewer
        self.id = self.path.name
        self.record = runs.read_record(self.path)
        self.data = data or self.record.spec
        self.norm = self.record.judged_norm
        self.eps = {n: reference_eps(self.record, n) for n in ("l2", "linf")}
        self.classes = self.record.classes

        where = dict(split=split, data=self.data)
        self.protocol = runs.select(read_protocol(self.path), **where)
        self.per_class = runs.select(read_per_class(self.path), **where)
        self.apgd = runs.select(read_apgd(self.path), norm=self.norm, **where)
        self.curves = runs.select(runs.read_robustness(self.path), **where)
        self.attribution = runs.select(runs.read_attribution(self.path), norm=self.norm, **where)
        self.certified = fullest(runs.read_certified(self.path, **where))
        #: each class's clean and robust accuracy (PGD-20 in the run's norm at its eps) and where they come from
        self.by_class, self.by_class_source = self._by_class()
        if len(self.by_class) and self.by_class["n"].isna().all():   # a curve saved before curves kept their counts
            try:
                labels = loading.load_run_data(self.path, split, self.data).labels.numpy()
            except Exception:  # noqa: BLE001 - the data is not on this machine: the classes go without counts
                labels = None
            if labels is not None:
                self.by_class, self.by_class_source = self._by_class(labels)
        #: attribution means, metric x method
        self.means = (self.attribution.pivot_table(index="metric", columns="method", values="mean")
                      if len(self.attribution) else pd.DataFrame())

    def _by_class(self, labels=None) -> tuple[pd.DataFrame, str]:
        return saved_by_class(self.protocol, self.per_class, self.curves, "pgd", self.norm, 20, self.eps[self.norm],
                              self.classes, labels, self.record.seed)

    def headline(self) -> dict:
        """Clean, balanced, PGD-20 (both norms; l2 also balanced), APGD and mAP, and the map's agreement and share on
        the lesion (of Grad-CAM, else saliency); NaN where not computed."""
        p = self.protocol.set_index("preset")
        first = p.index[0] if len(p) else None

        def get(preset, column):
            return float(p.at[preset, column]) if preset in p.index and column in p.columns else np.nan
        method = "gradcam" if "gradcam" in self.means.columns else "saliency"

        def mean(metric):
            return float(self.means.at[metric, method]) if metric in self.means.index and method in self.means else np.nan
        clean = get(first, "accuracy")
        if first is None and len(self.curves):     # not audited: the clean accuracy is the curves' eps 0
            zero = self.curves[pd.to_numeric(self.curves["eps"], errors="coerce") == 0]["accuracy"]
            clean = float(zero.iloc[0]) if len(zero) else np.nan
        return {"run": self.id, "clean": clean, "balanced": get(first, "balanced_accuracy"),
                "PGD-20 l2": get("pgd20_l2", "robust_accuracy"),
                "PGD-20 l2 balanced": get("pgd20_l2", "robust_balanced_accuracy"),
                "PGD-20 linf": get("pgd20_linf", "robust_accuracy"),
                "APGD": float(self.apgd["robust_accuracy"].iloc[0]) if len(self.apgd) else np.nan,
                "mAP": get(first, "mean_average_precision"), "AUC": get(first, "auc"), f"{MAP_NAMES[method]} agreement": mean("spearman"),
                "map on lesion": mean("energy_clean")}


def _command(run: "RunTables", command: str, extra: str = "") -> str:
    """The command that fills a missing table, as ``<code>``: in a viewer's report, with the run named in the store
    and without the data's path (who reads it cannot run it there)."""
    if run.viewer:
        return f"<code>python -m dpaat_core {command} &lt;store&gt;/{_esc(run.id)}{_esc(extra)}</code>"
    flags = (f" --split {run.split}" if run.split != "test" else "") + (
        f" --data {run.data}" if run.data != run.record.spec else "")
    return f"<code>python -m dpaat_core {command} {_esc(run.path)}{_esc(extra + flags)}</code>"


def _missing(what: str, run: "RunTables") -> str:
    return (f'<p class="note">No {what} for the {_esc(run.split)} split of this data yet: '
            f'{"whoever keeps the runs can fill it with" if run.viewer else "run"} {_command(run, "audit")}.</p>')


def _weakest(run: RunTables) -> str:
    return f"<p><b>Weakest class</b>: {_esc(weakest_sentence(run.id, run.by_class))}.</p>"


def _per_class_section(run: RunTables, figure: bool) -> str:
    """Each class's clean and robust accuracy: the table, the bar figure beside it (``figure``; a comparison draws
    every run in one) and the weakest class."""
    audited = run.per_class[run.per_class.preset == f"pgd20_{run.norm}"] if len(run.per_class) else run.per_class
    if not len(audited) and not len(run.by_class):
        return ""
    table = (audited.sort_values("class_index")[["class", "n", "accuracy", "robust_accuracy", "average_precision"]]
             if len(audited) else run.by_class.assign(n=pd.to_numeric(run.by_class["n"]).astype("Int64")))
    drawn = figure and len(run.by_class)
    side = [_table(table)] + ([_figure(per_class_chart(run.by_class.assign(run=run.id)))] if drawn else [])
    source = run.by_class_source or "the audit (per_class.csv)"
    return (f"<h3>Per class (robust: PGD-20 {_esc(run.norm)} at eps {run.eps[run.norm]:g}; from {_esc(source)})</h3>"
            + '<div class="side">' + "".join(f"<div>{p}</div>" for p in side) + "</div>"
            + (_weakest(run) if len(run.by_class) else ""))


def _run_section(run: RunTables, examples: str, figure: bool = True) -> str:
    parts = [f'<h2 id="{_esc(run.id)}">{_esc(run.id)}</h2>',
             '<table class="meta">'
             f"<tr><td>origin</td><td>{_esc(describe_origin(run.record))}</td></tr>"
             f"<tr><td>architecture</td><td>{_esc(run.record.model.name)}</td></tr>"
             f"<tr><td>data</td><td>{_esc(display_name(run.data) if run.viewer else run.data)}</td></tr>"
             f"<tr><td>classes</td><td>{_esc(', '.join(map(str, run.classes)))}</td></tr>"
             f"<tr><td>eps judged at</td><td>l2 {run.eps['l2']:g}, linf {run.eps['linf'] * 255:.3g}/255</td></tr>"
             "</table>"]
    parts.append("<h3>Accuracy, clean and under attack</h3>")
    if len(run.protocol):
        table = run.protocol.assign(attack=run.protocol.preset.map(PRESET_LABELS).fillna(run.protocol.preset))
        shown = ["attack", "eps", "accuracy", "balanced_accuracy", "robust_accuracy", "robust_balanced_accuracy",
                 "mean_average_precision", "auc"]
        parts.append(_table(table[[c for c in shown if c in table.columns]], 4))   # auc: files written before it lack it
    else:
        parts.append(_missing("protocol", run))
    parts.append(_per_class_section(run, figure))
    parts.append("<h3>APGD check</h3>")
    if len(run.apgd):
        a = run.apgd.iloc[0]
        gap = (a["pgd20"] - a["robust_accuracy"]) * 100
        parts.append(f"<p>{_esc(run.norm)} eps {a['eps']:g}: PGD-20 leaves {a['pgd20']:.3f} of the images standing; "
                     f"{_esc(a.get('attacks', 'APGD'))} brings that to <b>{a['robust_accuracy']:.3f}</b> "
                     f"({gap:.1f} points lower: "
                     f"{'PGD-20 overstated the robustness' if gap > 2 else 'PGD-20 was a fair measure here'}).</p>")
    else:
        parts.append(_missing("APGD check", run))
    parts.append("<h3>Robustness curves</h3>")
    curves = run.curves[(run.curves.attack == "pgd")] if len(run.curves) else run.curves
    parts.append(_figure(robustness_chart(curves)) if len(curves) else _missing("curves", run))
    parts.append(_certified_section(run))
    parts.append("<h3>Attribution: clean against attacked</h3>")
    if len(run.attribution):
        wide = run.means.reindex([m for m in ATTRIBUTION_METRICS if m in run.means.index])
        wide = wide.rename_axis(columns=None).reset_index()
        first = run.attribution.iloc[0]
        steps, norm, eps = (first.get(c) for c in ("steps", "norm", "eps"))
        setting = (f"PGD-{float(steps):.0f} {norm} at eps {float(eps):g}"
                   if all(v is not None and pd.notna(v) for v in (steps, norm, eps)) else "the attacked image")
        parts.append(f"<p class='note'>Means over {run.attribution['n'].max():.0f} {_esc(run.split)} images, "
                     f"clean against {_esc(setting)}.</p>")
        parts.append(_table(wide))
    else:
        parts.append(_missing("attribution numbers", run))
    parts.append(examples)
    return "\n".join(parts)


def _certified_section(run: RunTables) -> str:
    """Randomized smoothing's guarantee beside the attacks: each sigma's certified accuracy at the summary radii, per
    class, and the certified curve on the PGD curve's axis."""
    parts = ["<h3>Certified robustness (randomized smoothing)</h3>"]
    if not len(run.certified):
        return parts[0] + (f'<p class="note">No certified radii for the {_esc(run.split)} split of this data yet: '
                           f'{"whoever keeps the runs can fill it with" if run.viewer else "run"} '
                           f'{_command(run, "certify", " --sigma 0.25")}.</p>')
    parts.append("<p class='note'>An attack only shows that one attack failed. A certified radius is a guarantee: no "
                 "change of the image with an l2 norm below it can alter the smoothed model's answer (the class that "
                 "Gaussian noise of std σ leaves on top), each with probability 1 − alpha.</p>")
    rows = [{"sigma": sigma, "n": int(part["n"].max()), "alpha": float(part["alpha"].max()), **certified_summary(part)}
            for sigma, part in run.certified.groupby("sigma")]
    parts.append(_table(pd.DataFrame(rows)))
    sigma, part = next(iter(run.certified.groupby("sigma")))
    if run.classes:
        parts.append(f"<p class='note'>Per class at σ {sigma:g} (certified accuracy at radius 0: right and not "
                     "abstaining).</p>")
        parts.append(_table(certified_per_class(part, run.classes)))
    curves = run.curves[(run.curves.attack == "pgd")] if len(run.curves) else run.curves
    parts.append(_figure(certified_chart(run.certified.assign(run=run.id), curves.assign(run=run.id))))
    return "\n".join(parts)


def example_index(dataset, n: int, seed: int = 0) -> list[int]:
    """``n`` test images, one of each class in turn (a seeded pick within each), so a rare class is shown too."""
    rng = np.random.default_rng(seed)
    labels = dataset.labels.numpy()
    pools = [list(rng.permutation(np.flatnonzero(labels == k))) for k in range(dataset.num_classes)]
    out = []
    while len(out) < min(n, len(labels)):
        for pool in pools:
            if pool and len(out) < n:
                out.append(int(pool.pop()))
    return out


def _examples(run: RunTables, dataset, index: Sequence[int], device, seed: int) -> str:
    """The example grid: for each image, clean and attacked, the map of each, and each prediction."""
    model = loading.load_model(run.path, device=device)
    method = "gradcam" if has_gradcam(model) else "saliency"
    x, y = dataset.batch(index, device)
    out = clean_and_adversarial(model, x, y, run.eps[run.norm], attack="pgd", norm=run.norm, steps=10,
                                methods=(method,), index=list(index), seed=seed)
    clean_map, adv_map = out["maps"][method]
    name = MAP_NAMES[method] + ("" if method == "gradcam" else " (the model has no Grad-CAM layer)")
    rows = [f"<h3>Examples: PGD-10 {_esc(run.norm)} at eps {run.eps[run.norm]:g}, {name}</h3>",
            '<table class="examples"><tr><th>image</th><th>attacked</th><th>map, clean</th><th>map, attacked</th>'
            "<th>truth</th><th>prediction, clean</th><th>prediction, attacked</th></tr>"]
    classes = [str(c) for c in dataset.classes]
    for k, i in enumerate(index):
        def pred(p):
            c = int(p[k].argmax())
            ok = "right" if c == int(y[k]) else "wrong"
            return f'<td class="{ok}">{_esc(classes[c])} ({float(p[k].max()):.2f})</td>'
        xk, ak = x[k].cpu().numpy(), out["x_adv"][k].detach().cpu().numpy()
        rows.append(f"<tr><td>{_png(xk)}#{i}</td><td>{_png(ak)}</td>"
                    f"<td>{_png(overlay(xk, clean_map[k, 0].cpu().numpy()))}</td>"
                    f"<td>{_png(overlay(ak, adv_map[k, 0].cpu().numpy()))}</td>"
                    f"<td>{_esc(classes[int(y[k])])}</td>{pred(out['prob_clean'])}{pred(out['prob_adv'])}</tr>")
    return "\n".join(rows) + "</table>"


def _comparison(items: list[RunTables]) -> str:
    head = pd.DataFrame([r.headline() for r in items])
    parts = ["<h2>Comparison</h2>", _table(head)]
    unaudited = [r for r in items if not len(r.protocol)]
    if unaudited:   # their rows are mostly "–": say why, and what fills them
        parts.append(f'<p class="note">Not audited yet, so most of their figures are "–": '
                     f'{", ".join(_esc(r.id) for r in unaudited)}. '
                     + " ".join(_command(r, "audit") for r in unaudited) + "</p>")
    bars = go.Figure()
    metrics = [c for c in head.columns if c != "run" and head[c].notna().any()]
    for k, row in head.iterrows():
        bars.add_trace(go.Bar(x=metrics, y=[row[m] for m in metrics], name=str(row["run"]),
                              marker_color=PALETTE[k % len(PALETTE)]))
    bars.update_layout(title="Headline figures", barmode="group", template="plotly_white", yaxis_range=[0, 1])
    parts.append(_figure(bars))
    curves = pd.concat([r.curves[r.curves.attack == "pgd"].assign(run=r.id) for r in items if len(r.curves)],
                       ignore_index=True) if any(len(r.curves) for r in items) else pd.DataFrame()
    if len(curves):
        parts.append(_figure(robustness_chart(curves)))
    by_class = [r for r in items if len(r.by_class)]
    if by_class:
        parts.append("<h3>Per class (robust: PGD-20 in each run's norm at its eps)</h3>")
        parts.append(_figure(per_class_chart(pd.concat([r.by_class.assign(run=r.id) for r in by_class],
                                                       ignore_index=True))))
        parts.extend(_weakest(r) for r in by_class)
    return "\n".join(parts)


def report_html(run_dirs: Sequence, data: Optional[str] = None, split: str = "test", n_examples: int = 6,
                device="cpu", seed: int = 0, viewer: bool = False) -> str:
    """The report of ``run_dirs`` (one page; several runs are compared first) as an HTML string; ``viewer``: for
    people who only look (no path of the server in it: data by its name, commands without the store's path)."""
    import plotly.offline
    if not run_dirs:
        raise ValueError("a report needs at least one run")
    own = _OWN_SCRIPTS.set([])
    try:
        return _report_html(run_dirs, data, split, n_examples, device, seed, viewer, plotly.offline.get_plotlyjs())
    finally:
        _OWN_SCRIPTS.reset(own)


def _report_html(run_dirs, data, split, n_examples, device, seed, viewer: bool, plotly_js: str) -> str:
    items = [RunTables(r, split, data, viewer) for r in run_dirs]
    sections = []
    picks: dict = {}      # the same images for every run of the same data, size and split seed
    for run in items:
        try:
            if n_examples > 0:
                key = (run.data, run.record.image_size, run.record.seed)
                if key not in picks:
                    dataset = loading.load_run_data(run.path, split, run.data)
                    picks[key] = dataset, example_index(dataset, n_examples, seed)
            examples = _examples(run, *picks[key], device, seed) if n_examples > 0 else ""
        except Exception as exc:  # noqa: BLE001 - the data is not on this machine, ...: the examples are optional
            why = "the data could not be read here" if viewer else (str(exc).splitlines()[0] if str(exc) else exc)
            examples = f'<p class="note">No example images: {_esc(why)}</p>'
        sections.append(_run_section(run, examples, figure=len(items) == 1))
    title = "DPAAT Lab audit: " + ", ".join(r.id for r in items)
    body = [f"<h1>{_esc(title)}</h1>",
            f"<p class='note'>{_esc(split)} split; made by <code>python -m dpaat_core report</code>. Every number below "
            "comes from the run folders' saved tables; the examples are computed for this report.</p>",
            "<details open><summary><b>How to read this</b></summary>" + HOW_TO_READ + "</details>"]
    if len(items) > 1:
        body.append(_comparison(items))
    else:
        body.append("<h2>Headline</h2>" + _table(pd.DataFrame([items[0].headline()])))
    body.extend(sections)
    body = "".join(body)
    figures = _OWN_SCRIPTS.get()
    script = f"<script>{plotly_js}</script>" if figures else ""
    # Only the scripts written here may run (by hash: one that slipped into the body would not), nothing is fetched.
    hashes = " ".join(_script_hash(code) for code in dict.fromkeys(([plotly_js] if figures else []) + figures))
    policy = (f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src {hashes or NO_SCRIPT}; "
              "base-uri 'none'; form-action 'none'")
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{_esc(title)}</title>"
            f"<meta http-equiv='Content-Security-Policy' content=\"{policy}\">"
            f"<style>{CSS}</style>{script}</head><body>{body}</body></html>")


def write_report(run_dirs: Sequence, out, **options) -> Path:
    """:func:`report_html` written atomically to ``out``."""
    out = Path(out)
    check_output(out)
    text = report_html(run_dirs, **options)
    try:
        runs.atomic_write_text(out, text)
    except OSError as exc:
        raise runs.RunError(f"{out}: cannot write the report there ({exc.strerror or exc})") from None
    return out


def check_output(out: Path) -> None:
    """Refuse, before any work, a report path whose folder is missing or is a file, or that is a folder."""
    folder = out.parent
    if not folder.exists():
        raise runs.RunError(f"{out}: its folder {folder} does not exist")
    if not folder.is_dir():
        raise runs.RunError(f"{out}: {folder} is a file, not a folder")
    if out.is_dir():
        raise runs.RunError(f"{out}: a folder; name the report's file, e.g. {out / 'report.html'}")
