"""Chart builders for the dashboard: pure functions from run-store tables (pandas) to plotly figures.

No Streamlit here, so each chart is tested on its own; colours are Okabe-Ito (colour-blind safe)."""
from __future__ import annotations

import html
import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from dpaat_core.plots import (NO_DATA, PALETTE, _finite, empty_figure,  # noqa: F401 (robustness_chart: charts.*)
                               per_class_chart, robustness_chart)

FRAGILE, STABLE = "#D55E00", "#0072B2"  # vermillion, blue
SPLIT_COLOURS = {"fragile": FRAGILE, "stable": STABLE}
SPLITS = ("fragile", "stable")
PER_CLASS_PREFIX = "fragile_fraction_per_class."
TRANSITIONS = {  # metrics column -> (legend name, colour): ends fragile = warm, ends stable = cool
    "transitions.fragile_to_stable": ("fragile → stable", "#56B4E9"),
    "transitions.stable_to_fragile": ("stable → fragile", "#E69F00"),
    "transitions.fragile_to_fragile": ("fragile → fragile", FRAGILE),
    "transitions.stable_to_stable": ("stable → stable", STABLE),
}
DELTA_LOSS_TITLE = "ΔL = CE(x_adv) − CE(x) (nats)"


def _by_epoch(metrics: pd.DataFrame | None) -> pd.DataFrame:
    """Rows with a finite epoch, sorted by it; an empty frame if there is no ``epoch`` column."""
    if metrics is None or "epoch" not in metrics or not len(metrics):
        return pd.DataFrame({"epoch": pd.Series(dtype="float64")})
    epoch = pd.to_numeric(metrics["epoch"], errors="coerce")
    return metrics[epoch.notna()].assign(epoch=epoch[epoch.notna()]).sort_values("epoch")


def _split(frame: pd.DataFrame) -> pd.Series:
    """The ``split`` column, or one derived from ``fragile`` (missing/NaN counts as stable)."""
    if "split" in frame:
        return frame["split"]
    fragile = frame["fragile"].eq(True) if "fragile" in frame else pd.Series(False, index=frame.index)
    return pd.Series(np.where(fragile, "fragile", "stable"), index=frame.index)


def dynamics_frame(dyn: dict, classes: list[str]) -> pd.DataFrame:
    """One epoch's dynamics (``runs.load_dynamics``: 1-D arrays index, label, delta_loss, eps, fragile,
    correct_clean, correct_adv) as a frame, plus ``class`` (the label's name, or the label number as text when
    ``classes`` does not name it) and ``split`` ("fragile"/"stable")."""
    frame = pd.DataFrame({k: np.asarray(v).ravel() for k, v in (dyn or {}).items()})
    labels = frame["label"] if "label" in frame else pd.Series(dtype="int64")
    names = list(classes or ())
    frame["class"] = [names[int(lab)] if _finite(lab) and 0 <= int(lab) < len(names) else str(lab) for lab in labels]
    frame["split"] = _split(frame.drop(columns="split", errors="ignore"))
    return frame


def delta_loss_histogram(dyn: pd.DataFrame, threshold: float | None, epoch: int, bins: int = 50) -> go.Figure:
    """Stacked histogram of the per-sample ΔL coloured by split, the ΔL threshold as a dashed vertical line.

    ``dyn`` needs ``delta_loss`` and ``split`` (or ``fragile``), as made by :func:`dynamics_frame`; samples with a
    NaN ΔL are left out. ``threshold`` None/NaN draws no line."""
    title = f"ΔL per training sample, epoch {epoch}"
    if dyn is None or "delta_loss" not in dyn or not len(dyn):
        return empty_figure(title)
    delta_loss = pd.to_numeric(dyn["delta_loss"], errors="coerce")
    keep = np.isfinite(delta_loss.to_numpy(dtype=float))
    if not keep.any():
        return empty_figure(title)
    frame = pd.DataFrame({"delta_loss": delta_loss[keep], "split": _split(dyn)[keep]})
    lo, hi = float(frame["delta_loss"].min()), float(frame["delta_loss"].max())
    # shared bins, so the stacked bars line up; a single value (ERM: all ΔL = 0) gets plotly's automatic bin
    xbins = {"start": lo, "end": hi + (hi - lo) / max(bins, 1), "size": (hi - lo) / max(bins, 1)} if hi > lo else None
    fig = go.Figure()
    for split in ("stable", "fragile"):
        values = frame.loc[frame["split"] == split, "delta_loss"]
        fig.add_trace(go.Histogram(x=values.to_numpy(), name=split, marker_color=SPLIT_COLOURS[split], xbins=xbins,
                                   bingroup=1, hovertemplate=f"{split}<br>ΔL %{{x}}<br>%{{y}} samples<extra></extra>"))
    fig.update_layout(title=title, barmode="stack", template="plotly_white", legend_title_text="split",
                      xaxis_title=DELTA_LOSS_TITLE, yaxis_title="training samples")
    if _finite(threshold):
        fig.add_vline(x=float(threshold), line_dash="dash", line_color="black",
                      annotation_text=f"threshold ΔL = {float(threshold):.3g}", annotation_position="top right")
    return fig


def fragile_fraction_chart(metrics: pd.DataFrame, classes: list[str] | None = None) -> go.Figure:
    """Fragile fraction over epochs: one line per class and a thick black "all" line.

    ``metrics`` (``runs.read_metrics``) needs ``epoch`` and ``fragile_fraction`` and/or
    ``fragile_fraction_per_class.<class>``; ``classes`` picks and orders the classes (default: every such column)."""
    title = "Fragile fraction per epoch"
    frame = _by_epoch(metrics)
    if classes is None:
        classes = [c[len(PER_CLASS_PREFIX):] for c in frame.columns if str(c).startswith(PER_CLASS_PREFIX)]
    fig = go.Figure()
    for i, name in enumerate(c for c in classes if PER_CLASS_PREFIX + c in frame):
        fig.add_trace(go.Scatter(x=frame["epoch"], y=pd.to_numeric(frame[PER_CLASS_PREFIX + name], errors="coerce"),
                                 name=name, mode="lines+markers", line={"color": PALETTE[i % len(PALETTE)]}))
    if "fragile_fraction" in frame:
        fig.add_trace(go.Scatter(x=frame["epoch"], y=pd.to_numeric(frame["fragile_fraction"], errors="coerce"),
                                 name="all", mode="lines+markers", line={"color": "black", "width": 4}))
    if not len(frame) or not fig.data:
        return empty_figure(title)
    fig.update_layout(title=title, template="plotly_white", legend_title_text="class",
                      xaxis_title="epoch", yaxis_title="fragile fraction", yaxis_range=[0, 1.02])
    fig.update_xaxes(dtick=1 if len(frame) <= 20 else None)
    return fig


def eps_distribution_chart(dynamics_by_epoch: dict[int, pd.DataFrame], eps0: float, *, norm: str = "l2") -> go.Figure:
    """Box per epoch of the per-sample epsilon, the base epsilon ``eps0`` as a dashed horizontal line.

    Each frame needs ``eps`` (NaNs left out); epochs without values are skipped. ``norm`` only labels the axis."""
    title = "Per-sample epsilon per epoch"
    epochs, values = [], []
    for epoch, dyn in sorted((dynamics_by_epoch or {}).items()):
        if dyn is None or "eps" not in dyn:
            continue
        eps = pd.to_numeric(dyn["eps"], errors="coerce").to_numpy(dtype=float)
        eps = eps[np.isfinite(eps)]
        epochs.append(np.full(len(eps), epoch))
        values.append(eps)
    if not values or not sum(map(len, values)):
        return empty_figure(title)
    x = np.concatenate(epochs)
    y = np.round(np.concatenate(values).astype(np.float32).astype(np.float64), 6)   # 0.300000012 (float32) -> 0.3
    if np.ptp(y) == 0:   # a fixed-eps run: one value for every sample and epoch, drawn as what it is
        seen = np.unique(x)
        fig = go.Figure(go.Scatter(x=seen, y=np.full(len(seen), y[0]), mode="lines+markers", name="eps (fixed)",
                                   line={"color": STABLE}))
        title += f": fixed at {y[0]:.4g} for every sample"
    else:
        fig = go.Figure(go.Box(x=x, y=y, name="eps per sample", marker_color=STABLE, boxpoints=False))
    fig.update_layout(title=title, template="plotly_white", xaxis_title="epoch",
                      yaxis_title=f"eps ({norm}, [0,1] pixels)", showlegend=False)
    fig.update_yaxes(tickformat=".3~g")
    if _finite(eps0):
        fig.add_hline(y=float(eps0), line_dash="dash", line_color="black", annotation_text=f"eps0 = {float(eps0):.3g}",
                      annotation_position="top left")
    return fig


def transitions_chart(metrics: pd.DataFrame) -> go.Figure:
    """Stacked bars per epoch (from epoch 2: epoch 1 has no previous split) of how many samples moved
    fragile→stable, stable→fragile, or stayed. ``metrics`` needs ``epoch`` and ``transitions.<a>_to_<b>``."""
    title = "Fragile/stable transitions from the previous epoch"
    frame = _by_epoch(metrics)
    frame = frame[frame["epoch"] >= 2]
    present = [c for c in TRANSITIONS if c in frame]
    if not len(frame) or not present:
        return empty_figure(title)
    fig = go.Figure()
    for column in present:
        name, colour = TRANSITIONS[column]
        fig.add_trace(go.Bar(x=frame["epoch"], y=pd.to_numeric(frame[column], errors="coerce"), name=name,
                             marker_color=colour))
    fig.update_layout(title=title, barmode="stack", template="plotly_white", legend_title_text="move",
                      xaxis_title="epoch", yaxis_title="training samples")
    return fig


def transition_matrix(prev: pd.DataFrame, cur: pd.DataFrame) -> pd.DataFrame:
    """2x2 counts of samples by split at the previous epoch (rows) and the current one (columns), over the samples
    (joined on ``index``) present in both. Each frame needs ``index`` and ``split`` (or ``fragile``)."""
    def splits(frame):
        if frame is None or "index" not in frame or not len(frame):
            return pd.DataFrame({"index": pd.Series(dtype="int64"), "split": pd.Series(dtype="object")})
        return pd.DataFrame({"index": frame["index"].to_numpy(), "split": _split(frame).to_numpy()})

    both = splits(prev).merge(splits(cur), on="index", suffixes=("_prev", "_cur"))
    counts = pd.crosstab(both["split_prev"], both["split_cur"]) if len(both) else pd.DataFrame()
    counts = counts.reindex(index=list(SPLITS), columns=list(SPLITS), fill_value=0).fillna(0).astype("int64")
    counts.index.name, counts.columns.name = "previous", "current"
    return counts


def transition_heatmap(prev: pd.DataFrame, cur: pd.DataFrame, epoch: int) -> go.Figure:
    """Heat map of :func:`transition_matrix` (epoch-1 -> ``epoch``) with the counts written in the cells."""
    title = f"Fragile/stable moves, epoch {epoch - 1} → {epoch}"
    counts = transition_matrix(prev, cur)
    if not counts.to_numpy().sum():
        return empty_figure(title)
    fig = go.Figure(go.Heatmap(z=counts.to_numpy(), x=list(counts.columns), y=list(counts.index),
                               text=counts.to_numpy(), texttemplate="%{text}", colorscale="Blues",
                               colorbar_title="samples",
                               hovertemplate="%{y} → %{x}: %{z} samples<extra></extra>"))
    fig.update_layout(title=title, template="plotly_white", xaxis_title=f"split at epoch {epoch}",
                      yaxis_title=f"split at epoch {epoch - 1}", yaxis_autorange="reversed")
    return fig


def sample_trajectory_chart(history: pd.DataFrame) -> go.Figure:
    """One sample over epochs: ΔL (top) and epsilon (bottom), the epochs where it was fragile marked.

    ``history`` needs ``epoch``, ``delta_loss``, ``eps`` and ``fragile`` (one row per epoch; NaN fragile = stable)."""
    title = "One sample over epochs"
    frame = _by_epoch(history)
    if not len(frame) or not {"delta_loss", "eps"} & set(frame.columns):
        return empty_figure(title)
    frame = frame.assign(**{c: pd.to_numeric(frame[c], errors="coerce") if c in frame else np.nan
                            for c in ("delta_loss", "eps")})
    fragile = frame["fragile"].eq(True) if "fragile" in frame else pd.Series(False, index=frame.index)
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08)
    fig.add_trace(go.Scatter(x=frame["epoch"], y=frame["delta_loss"], name="ΔL", mode="lines",
                             line={"color": "black"}), row=1, col=1)
    fig.add_trace(go.Scatter(x=frame["epoch"], y=frame["eps"], name="eps", mode="lines+markers",
                             line={"color": "#009E73"}), row=2, col=1)
    for split, mask, symbol in (("fragile", fragile, "x"), ("stable", ~fragile, "circle")):
        fig.add_trace(go.Scatter(x=frame.loc[mask, "epoch"], y=frame.loc[mask, "delta_loss"], name=split,
                                 mode="markers", marker={"color": SPLIT_COLOURS[split], "size": 10, "symbol": symbol}),
                      row=1, col=1)
    fig.update_layout(title=title, template="plotly_white")
    fig.update_yaxes(title_text=DELTA_LOSS_TITLE, row=1, col=1)
    fig.update_yaxes(title_text="eps ([0,1] pixels)", row=2, col=1)
    fig.update_xaxes(title_text="epoch", row=2, col=1)
    return fig


def probability_chart(classes: list[str], prob_clean, prob_adv, after: str = "perturbed") -> go.Figure:
    """Grouped horizontal bars of the predicted class probabilities, clean against perturbed (``after``: the second
    bars' name, "corrupted" for a natural corruption).

    ``prob_clean``/``prob_adv``: sequences (or arrays/CPU tensors) of ``len(classes)`` numbers in [0,1];
    ``prob_adv`` None shows the clean bars only. A length that differs from ``classes`` is a ValueError."""
    title = "Predicted class probabilities"
    classes = [str(c) for c in (classes or ())]
    if not classes or prob_clean is None:
        return empty_figure(title)
    fig = go.Figure()
    for name, probs, colour in (("clean", prob_clean, STABLE), (after, prob_adv, FRAGILE)):
        if probs is None:
            continue
        probs = np.asarray(probs, dtype=float).ravel()
        if len(probs) != len(classes):
            raise ValueError(f"{len(probs)} {name} probabilities for {len(classes)} classes")
        fig.add_trace(go.Bar(x=probs, y=classes, name=name, orientation="h", marker_color=colour,
                             text=[f"{p:.0%}" if math.isfinite(p) else "" for p in probs], textposition="outside",
                             textfont={"size": 13}, cliponaxis=False))
    fig.update_layout(title=title, barmode="group", template="plotly_white", xaxis_title="probability",
                      xaxis_range=[0, 1], yaxis_title="class", yaxis_autorange="reversed")
    return fig


def metrics_chart(metrics: pd.DataFrame) -> go.Figure:
    """Validation accuracy, balanced accuracy and robust accuracy over epochs, the best epoch (the latest row with
    ``is_best`` true) marked by a dotted line. ``metrics`` needs ``epoch`` and any of ``val_accuracy``,
    ``val_balanced_accuracy``, ``val_robust_accuracy``; ``is_best`` is optional."""
    title = "Validation metrics per epoch"
    frame = _by_epoch(metrics)
    series = {"val_accuracy": ("accuracy", STABLE), "val_balanced_accuracy": ("balanced accuracy", "#009E73"),
              "val_robust_accuracy": ("robust accuracy", FRAGILE)}
    fig = go.Figure()
    for column, (name, colour) in series.items():
        if column in frame:
            fig.add_trace(go.Scatter(x=frame["epoch"], y=pd.to_numeric(frame[column], errors="coerce"), name=name,
                                     mode="lines+markers", line={"color": colour}))
    if not len(frame) or not fig.data:
        return empty_figure(title)
    fig.update_layout(title=title, template="plotly_white", xaxis_title="epoch",
                      yaxis_title="accuracy (validation)", yaxis_range=[0, 1.02])
    best = frame.loc[frame["is_best"].eq(True), "epoch"] if "is_best" in frame else pd.Series(dtype="float64")
    if len(best):
        fig.add_vline(x=float(best.iloc[-1]), line_dash="dot", line_color="black",
                      annotation_text=f"best epoch {int(best.iloc[-1])}", annotation_position="top left")
    return fig


def loss_trace_chart(trace, epochs: int) -> go.Figure:
    """The training loss as it goes (``trace``: [epochs done as a fraction, the epoch's running mean loss] pairs from
    the run's status), over the whole run's length so the x axis does not move."""
    title = "Training loss, live"
    points = [(float(t), float(v)) for t, v in trace or () if math.isfinite(float(v))]
    if not points:
        return empty_figure(title, "no batch finished yet")
    x, y = zip(*points)
    fig = go.Figure(go.Scatter(x=x, y=y, mode="lines", line={"color": FRAGILE},
                               hovertemplate="epoch %{x:.2f}<br>loss %{y:.4f}<extra></extra>"))
    fig.update_layout(title=title, template="plotly_white", xaxis_title="epoch", yaxis_title="mean loss in the epoch",
                      xaxis_range=[0, max(epochs, max(x))], height=320, margin={"t": 50, "b": 40})
    return fig


#: the validation series a comparison of runs can show, by column
VAL_SERIES = {"val_balanced_accuracy": "balanced accuracy", "val_accuracy": "accuracy",
              "val_robust_balanced_accuracy": "robust balanced accuracy", "val_robust_accuracy": "robust accuracy"}


def short_label(run) -> str:
    """A run's legend label: method · model · seed (a run id can be 60 characters)."""
    seed = ((run.config or {}).get("train") or {}).get("seed")
    return " · ".join(str(p) for p in (run.method, run.model, f"seed {seed}" if seed is not None else None) if p)


def short_labels(selected) -> dict:
    """Run id -> :func:`short_label`, the run id added where two runs would read the same."""
    labels = {r.run_id: short_label(r) for r in selected}
    repeated = {lab for lab in labels.values() if list(labels.values()).count(lab) > 1}
    return {rid: f"{lab} · {rid}" if lab in repeated else lab for rid, lab in labels.items()}


def compare_metrics_chart(runs_metrics: dict, column: str = "val_balanced_accuracy") -> go.Figure:
    """One line per run of a validation ``column`` over epochs, in one chart (``runs_metrics``: legend label ->
    the run's metrics), each run's best epoch marked; the legend under the plot, so long names take no width."""
    name = VAL_SERIES.get(column, column)
    title = f"Validation {name} per epoch"
    fig = go.Figure()
    for k, (label, metrics) in enumerate(runs_metrics.items()):
        frame = _by_epoch(metrics)
        if column not in frame or not len(frame):
            continue
        colour, label = PALETTE[k % len(PALETTE)], html.escape(str(label))
        y = pd.to_numeric(frame[column], errors="coerce")
        fig.add_trace(go.Scatter(x=frame["epoch"], y=y, name=label, mode="lines+markers", line={"color": colour},
                                 hovertemplate=f"{label}<br>epoch %{{x}}<br>{name} %{{y:.3f}}<extra></extra>"))
        best = frame["is_best"].eq(True) if "is_best" in frame else pd.Series(False, index=frame.index)
        if best.any():
            at = best[best].index[-1]
            fig.add_trace(go.Scatter(x=[frame.loc[at, "epoch"]], y=[y.loc[at]], mode="markers", showlegend=False,
                                     marker={"color": colour, "size": 13, "symbol": "star"},
                                     hovertemplate=f"{label}: best epoch %{{x}}<extra></extra>"))
    if not fig.data:
        return empty_figure(title)
    fig.update_layout(title=title, template="plotly_white", xaxis_title="epoch", yaxis_title=name,
                      yaxis_range=[0, 1.02], legend={"orientation": "h", "y": -0.2})
    return fig


def study_chart(summary: pd.DataFrame, metrics, x: str = "variant", title: str = "Reproduction study") -> go.Figure:
    """Grouped bars of mean ± std (percent) per ``x`` group, one bar colour per metric; ``summary`` is
    :func:`dpaat_core.evaluate.reproduction.summarize` output and ``metrics`` its ``(column, label)`` pairs."""
    metrics = [(m, label) for m, label in metrics if f"{m}_mean" in (summary.columns if summary is not None else ())]
    if summary is None or not len(summary) or x not in summary or not metrics:
        return empty_figure(title)
    fig = go.Figure()
    for i, (m, label) in enumerate(metrics):
        std = pd.to_numeric(summary[f"{m}_std"], errors="coerce")
        fig.add_trace(go.Bar(x=summary[x].astype(str), y=summary[f"{m}_mean"], name=label,
                             marker_color=PALETTE[i % len(PALETTE)],
                             error_y={"type": "data", "array": std.fillna(0), "visible": bool(std.notna().any())},
                             hovertemplate=f"{label}<br>%{{x}}<br>%{{y:.1f}}%<extra></extra>"))
    fig.update_layout(title=title, template="plotly_white", barmode="group", yaxis_title="percent",
                      legend_title_text="metric (mean ± std over seeds)")
    fig.update_yaxes(range=[0, 100])
    return fig


def eps_spread_chart(by_epoch: pd.DataFrame, eps_min: float | None = None, eps_max: float | None = None,
                     title: str = "Per-sample eps over epochs (median, 25–75% and 5–95% of samples)") -> go.Figure:
    """One colour per ``run``: the median eps as a line, the 25–75% and 5–95% quantiles as bands, the memory's
    bounds as dashed lines. ``by_epoch`` needs ``run``, ``epoch`` and ``q05``, ``q25``, ``q50``, ``q75``, ``q95``
    (``dpaat_core.evaluate.eps_dynamics.run_memory``'s ``by_epoch``, one per run, concatenated)."""
    need = {"run", "epoch", "q05", "q25", "q50", "q75", "q95"}
    if by_epoch is None or not len(by_epoch) or not need <= set(by_epoch.columns):
        return empty_figure(title)
    fig = go.Figure()
    for i, (run, part) in enumerate(by_epoch.sort_values("epoch").groupby("run", sort=False)):
        colour = PALETTE[i % len(PALETTE)]
        for lo, hi, alpha in (("q05", "q95", 0.12), ("q25", "q75", 0.25)):
            fig.add_trace(go.Scatter(x=np.r_[part["epoch"], part["epoch"][::-1]], y=np.r_[part[hi], part[lo][::-1]],
                                     fill="toself", mode="none", fillcolor=_rgba(colour, alpha), showlegend=False,
                                     hoverinfo="skip", legendgroup=str(run)))
        fig.add_trace(go.Scatter(x=part["epoch"], y=part["q50"], name=str(run), mode="lines", legendgroup=str(run),
                                 line={"color": colour, "width": 2}))
    for value, label in ((eps_min, "eps_min"), (eps_max, "eps_max")):
        if _finite(value):
            fig.add_hline(y=float(value), line_dash="dash", line_color="black", annotation_text=f"{label} {value:.3g}",
                          annotation_position="top left")
    fig.update_layout(title=title, template="plotly_white", xaxis_title="epoch", yaxis_title="eps (l2, [0,1] pixels)",
                      legend_title_text="run (median)")
    return fig


def _rgba(hex_colour: str, alpha: float) -> str:
    r, g, b = (int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def transition_rate_chart(rates: pd.DataFrame,
                          title: str = "Does a fragile sample stay fragile? P(fragile | the previous epoch's split)") -> go.Figure:
    """Per ``run`` (one colour): P(fragile | fragile before) as a solid line and P(fragile | stable before) as a
    dashed one, over epochs. ``rates`` needs ``run``, ``epoch``, ``stay_fragile`` and ``become_fragile``
    (``dpaat_core.evaluate.eps_dynamics.transition_rates``). Lines far apart: fragility lasts; together: redrawn."""
    need = {"run", "epoch", "stay_fragile", "become_fragile"}
    if rates is None or not len(rates) or not need <= set(rates.columns):
        return empty_figure(title)
    fig = go.Figure()
    for i, (run, part) in enumerate(rates.sort_values("epoch").groupby("run", sort=False)):
        colour = PALETTE[i % len(PALETTE)]
        fig.add_trace(go.Scatter(x=part["epoch"], y=part["stay_fragile"], name=f"{run}: fragile → fragile",
                                 mode="lines", line={"color": colour}))
        fig.add_trace(go.Scatter(x=part["epoch"], y=part["become_fragile"], name=f"{run}: stable → fragile",
                                 mode="lines", line={"color": colour, "dash": "dash"}))
    fig.update_layout(title=title, template="plotly_white", xaxis_title="epoch", yaxis_title="probability",
                      yaxis_range=[0, 1])
    return fig


def class_eps_chart(frame: pd.DataFrame, y: str = "pgd20", y_title: str = "PGD-20 accuracy on the test split",
                    title: str = "Each class's mean training eps beside its robust accuracy") -> go.Figure:
    """One marker per class and ``run``: x the class's mean training eps (at the best epoch), y its ``y`` column
    (a fraction, shown in %), size by the class's training count; one colour per class. ``frame`` needs
    ``class``, ``run``, ``eps_mean``, ``n`` and ``y``."""
    need = {"class", "run", "eps_mean", "n", y}
    if frame is None or not len(frame) or not need <= set(frame.columns):
        return empty_figure(title)
    fig = go.Figure()
    biggest = max(float(frame["n"].max()), 1.0)
    for i, (name, part) in enumerate(frame.groupby("class", sort=False)):
        fig.add_trace(go.Scatter(x=part["eps_mean"], y=100 * part[y], name=f"{name} (n={int(part['n'].iloc[0])})",
                                 mode="markers", text=part["run"],
                                 marker={"color": PALETTE[i % len(PALETTE)], "size": 8 + 22 * np.sqrt(part["n"] / biggest),
                                         "line": {"width": 1, "color": "white"}},
                                 hovertemplate="%{text}<br>eps %{x:.3f}<br>%{y:.1f}%<extra>" + str(name) + "</extra>"))
    fig.update_layout(title=title, template="plotly_white", xaxis_title="mean training eps at the best epoch",
                      yaxis_title=f"{y_title} (%)", legend_title_text="class (training images)")
    fig.update_yaxes(range=[0, 100])
    return fig


def _corrupted(frame: pd.DataFrame | None, metric: str) -> pd.DataFrame:
    """The corrupted cells (not the clean row) of ``corruptions.csv`` rows with a numeric ``metric``."""
    if frame is None or not len(frame) or {"corruption", "severity", metric} - set(frame.columns):
        return pd.DataFrame()
    frame = frame.assign(**{metric: pd.to_numeric(frame[metric], errors="coerce")})
    return frame[(frame["corruption"] != "clean") & frame[metric].notna()]


def corruption_heatmap(frame: pd.DataFrame, title: str = "Accuracy under natural corruptions",
                       metric: str = "accuracy") -> go.Figure:
    """One run's corruption grid: corruption (rows, in the order given) by severity (columns), coloured by
    ``metric``, with the value written in each cell; the clean accuracy in the title."""
    cells = _corrupted(frame, metric)
    if not len(cells):
        return empty_figure(title)
    table = cells.pivot_table(index="corruption", columns="severity", values=metric, sort=False)
    clean = frame.loc[frame["corruption"] == "clean", metric]
    if len(clean):
        title += f" (clean {float(pd.to_numeric(clean, errors='coerce').iloc[0]):.2f})"
    fig = go.Figure(go.Heatmap(z=table.values, x=[f"severity {int(s)}" for s in table.columns],
                               y=[c.replace("_", " ") for c in table.index], zmin=0, zmax=1, colorscale="Viridis",
                               text=np.round(table.values, 2), texttemplate="%{text:.2f}",
                               colorbar={"title": metric.replace("_", " ")},
                               hovertemplate="%{y}, %{x}<br>" + metric.replace("_", " ") + " %{z:.3f}<extra></extra>"))
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(title=title, template="plotly_white", height=max(320, 28 * len(table) + 120))
    return fig


def corruption_comparison_chart(frame: pd.DataFrame, metric: str = "accuracy") -> go.Figure:
    """Several runs (``run`` column) side by side: mean ``metric`` over the severities of each corruption as
    grouped bars, and each run's clean value as a dashed line of its colour."""
    title = "Mean accuracy over severities, per corruption"
    cells = _corrupted(frame, metric)
    if not len(cells) or "run" not in cells:
        return empty_figure(title)
    means = cells.groupby(["run", "corruption"], sort=False)[metric].mean().reset_index()
    order = list(dict.fromkeys(cells["corruption"]))
    fig = go.Figure()
    for k, (run, part) in enumerate(means.groupby("run", sort=False)):
        colour = PALETTE[k % len(PALETTE)]
        part = part.set_index("corruption").reindex(order)
        fig.add_trace(go.Bar(x=[c.replace("_", " ") for c in order], y=part[metric], name=run, marker_color=colour,
                             hovertemplate=f"{run}<br>%{{x}}: %{{y:.3f}}<extra></extra>"))
        clean = pd.to_numeric(frame.loc[(frame["run"] == run) & (frame["corruption"] == "clean"), metric],
                              errors="coerce")
        if len(clean) and _finite(clean.iloc[0]):
            fig.add_hline(y=float(clean.iloc[0]), line={"color": colour, "dash": "dash", "width": 1})
    fig.update_yaxes(range=[0, 1.02], title_text=f"{metric.replace('_', ' ')} (dashed: clean)")
    fig.update_layout(title=title, template="plotly_white", barmode="group", legend_title_text="run")
    return fig


def off_lesion_chart(summary: pd.DataFrame) -> go.Figure:
    """Per class: the share of images whose map is mostly off the lesion, beside the share at chance (each map
    scored on another image's mask); ``summary`` is :func:`dpaat_core.evaluate.gallery.off_lesion_summary`."""
    title = "Maps mostly off the lesion, per class"
    if summary is None or not len(summary):
        return empty_figure(title, "no lesion masks for these images")
    labels = [f"{c} ({n})" for c, n in zip(summary["class"], summary["images"])]
    fig = go.Figure([go.Bar(x=labels, y=summary["off_lesion_share"], name="this run", marker_color=FRAGILE,
                            hovertemplate="%{x}: %{y:.0%} of the maps mostly off the lesion<extra></extra>"),
                     go.Bar(x=labels, y=summary["chance_share"], name="chance (another image's mask)",
                            marker_color="#999999",
                            hovertemplate="%{x}: %{y:.0%} at chance<extra></extra>")])
    fig.update_yaxes(range=[0, 1], tickformat=".0%", title_text="share of images")
    fig.update_layout(title=title, template="plotly_white", barmode="group", height=330,
                      legend={"orientation": "h", "y": -0.25})
    return fig


def radius_strip(eps: float, radius: float | None, top: float, norm: str = "l2") -> go.Figure:
    """A thin strip under the explorer's eps slider: the certified l2 ``radius`` shaded from 0 (none when the
    smoothed model abstains) and the slider's ``eps`` as a line, on the slider's 0..``top`` scale."""
    fig = go.Figure()
    if radius is not None and _finite(radius) and radius > 0:
        fig.add_shape(type="rect", x0=0, x1=min(radius, top), y0=0, y1=1, fillcolor="#009E73", opacity=0.35,
                      line={"width": 0})
        fig.add_annotation(x=min(radius, top), y=1, text=f"certified {radius:.3g}", showarrow=False, yanchor="bottom",
                           xanchor="right" if radius > top / 2 else "left", font={"size": 11, "color": "#009E73"})
    colour = "#D55E00" if norm == "l2" and radius is not None and _finite(radius) and eps > radius else "#0072B2"
    fig.add_shape(type="line", x0=eps, x1=eps, y0=0, y1=1, line={"color": colour, "width": 3})
    fig.update_xaxes(range=[0, top], showgrid=False, title_text=None)
    fig.update_yaxes(visible=False, range=[0, 1.6])
    fig.update_layout(height=70, margin={"l": 4, "r": 4, "t": 0, "b": 20}, template="plotly_white", showlegend=False)
    return fig


def eps_band_chart(band: pd.DataFrame, eps0: float) -> go.Figure:
    """The eps a sample can hold after each epoch (``preview.eps_band``): the band between always-fragile and
    always-stable, eps0 marked."""
    fig = go.Figure([
        go.Scatter(x=band["epoch"], y=band["high"], mode="lines", name="stable every epoch", line=dict(color="#2a9d8f")),
        go.Scatter(x=band["epoch"], y=band["low"], mode="lines", name="fragile every epoch", fill="tonexty",
                   fillcolor="rgba(42,157,143,0.15)", line=dict(color="#e76f51")),
    ])
    fig.add_hline(y=eps0, line_dash="dot", annotation_text="eps0")
    fig.update_layout(height=260, margin=dict(l=10, r=10, t=30, b=10), xaxis_title="epoch", yaxis_title="eps",
                      title="Where a sample's eps can be", legend=dict(orientation="h", y=-0.3))
    return fig
