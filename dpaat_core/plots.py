"""Plotly figures shared by the dashboard and the shareable report (``report.py``): pure functions from run-store
tables to figures, no Streamlit. Colours are Okabe-Ito (colour-blind safe)."""
from __future__ import annotations

import html
import math

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from dpaat_core.attack.attacks import ATTACKS

#: Okabe-Ito without black (black is kept for "all"/reference lines) and without yellow (unreadable on white).
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#999999")
NO_DATA = "no data yet"
ATTACK_DASH = {"pgd": "solid", "ifgsm": "dash", "fgsm": "dot"}


def _finite(value) -> bool:
    try:
        return value is not None and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def empty_figure(title: str, message: str = NO_DATA) -> go.Figure:
    """A figure with ``title``, hidden axes and ``message`` in the middle: what every builder returns without data."""
    fig = go.Figure()
    fig.add_annotation(text=message, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False, font={"size": 16})
    fig.update_layout(title=title, template="plotly_white")
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return fig


def _attack_label(attack, steps) -> str:
    """``PGD-20``: the attack's label with the steps a curve used (an unknown attack by its name)."""
    record = ATTACKS.get(attack)
    if record is None:
        return f"{attack}-{int(steps)}" if _finite(steps) else str(attack)
    return record.title(int(steps)) if _finite(steps) else record.label


def robustness_chart(curves: pd.DataFrame, x: str = "eps") -> go.Figure:
    """Accuracy against epsilon (``x="eps"``) or per-pixel RMS change (``x="eps_rms"``), one facet per norm with its
    own x axis; colour = run, dash = attack. ``curves`` (``runs.read_robustness``, several runs concatenated with a
    ``run`` column) needs ``x``, ``accuracy``, ``attack`` and ``norm``; ``steps``, ``split``, ``data`` and
    ``monotone`` tell curves apart when present."""
    title = "Accuracy under attack"
    needed = {x, "accuracy", "attack", "norm"}
    if curves is None or not len(curves) or needed - set(curves.columns):
        return empty_figure(title)
    frame = curves.assign(**{c: pd.to_numeric(curves[c], errors="coerce") for c in (x, "accuracy")})
    frame = frame[frame[x].notna() & frame["accuracy"].notna()]
    if not len(frame):
        return empty_figure(title)
    frame = frame.assign(norm=frame["norm"].fillna("?").astype(str).map(html.escape),   # a CSV's text: titles,
                         attack=frame["attack"].fillna("?").astype(str))                # axes and hover show it
    has_run = "run" in frame
    if has_run:
        frame = frame.assign(run=frame["run"].fillna("?").astype(str))
    extra = [c for c in ("split", "data", "monotone") if c in frame and frame[c].nunique(dropna=False) > 1]
    keys = [k for k in ("run", "attack", "steps", *extra) if k in frame]
    norms = sorted(frame["norm"].unique())
    runs = list(dict.fromkeys(frame["run"])) if has_run else []
    fig = make_subplots(rows=1, cols=len(norms), shared_yaxes=True, subplot_titles=[f"{n} norm" for n in norms],
                        horizontal_spacing=0.06)
    shown = set()
    for col, norm in enumerate(norms, start=1):
        for key, curve in frame[frame["norm"] == norm].groupby(keys, sort=True, dropna=False):
            part = dict(zip(keys, key))
            label = _attack_label(part["attack"], part.get("steps"))
            name = html.escape(" · ".join([*([part["run"]] if has_run else []), label,   # a CSV's text, shown as text
                                           *(f"{c}={part[c]}" for c in extra)]))
            colour = PALETTE[runs.index(part["run"]) % len(PALETTE)] if has_run else "black"
            curve = curve.sort_values(x)
            fig.add_trace(go.Scatter(x=curve[x], y=curve["accuracy"], name=name, legendgroup=name,
                                     showlegend=name not in shown, mode="lines+markers",
                                     line={"color": colour, "dash": ATTACK_DASH.get(part["attack"], "dashdot")},
                                     hovertemplate=f"{name}<br>{x} %{{x:.3g}}<br>accuracy %{{y:.3f}}<extra>{norm}</extra>"),
                          row=1, col=col)
            shown.add(name)
        fig.update_xaxes(title_text=(f"eps ({norm}, [0,1] pixels)" if x == "eps"
                                     else f"{x} (per-pixel RMS change, [0,1] pixels)"), row=1, col=col)
    fig.update_yaxes(range=[0, 1.02])
    fig.update_yaxes(title_text="accuracy", row=1, col=1)
    fig.update_layout(title=title, template="plotly_white", legend_title_text="run · attack" if has_run else "attack",
                      legend={"orientation": "h", "y": -0.22})       # below: long run names take no plot width
    return fig


CERTIFIED_DASH = ("dash", "dot", "dashdot", "longdash")


def certified_chart(certified: pd.DataFrame, curves: pd.DataFrame | None = None) -> go.Figure:
    """Certified accuracy against l2 radius (randomized smoothing, dashed: a guarantee) on the same axis as the
    run's attacked accuracy against l2 eps (PGD, solid: what one attack left standing, an upper bound on the true
    robust accuracy); colour = run. ``certified``: per-image certificates with ``run``, ``sigma``, ``n``, ``radius``
    and ``correct`` (``runs.read_certified`` rows, one setting per sigma); ``curves``: robustness rows with ``run``
    (only PGD in l2 is drawn)."""
    from dpaat_core.evaluate.certify import certified_curve   # scipy: only where a certified chart is drawn

    title = "Certified against attacked accuracy (l2)"
    needed = {"run", "sigma", "radius", "correct", "n"}
    if certified is None or not len(certified) or needed - set(certified.columns):
        return empty_figure(title, "no certified radii yet")
    frame = certified.assign(radius=pd.to_numeric(certified["radius"], errors="coerce"),
                             sigma=pd.to_numeric(certified["sigma"], errors="coerce"),
                             n=pd.to_numeric(certified["n"], errors="coerce"),
                             correct=certified["correct"].astype(str).str.lower().isin(["true", "1", "1.0"]),
                             run=certified["run"].astype(str))
    frame = frame[frame["sigma"].notna() & frame["n"].notna()]
    attacked = pd.DataFrame()
    if curves is not None and len(curves) and {"run", "eps", "accuracy", "attack", "norm"} <= set(curves.columns):
        attacked = curves[(curves["norm"] == "l2") & (curves["attack"] == "pgd")]
        attacked = attacked.assign(eps=pd.to_numeric(attacked["eps"], errors="coerce"),
                                   accuracy=pd.to_numeric(attacked["accuracy"], errors="coerce")).dropna(
            subset=["eps", "accuracy"])
    runs = list(dict.fromkeys([*frame["run"], *attacked.get("run", pd.Series(dtype=str)).astype(str)]))
    top = max([float(attacked["eps"].max()) if len(attacked) else 0.0,
               float(frame["radius"].max()) if frame["radius"].notna().any() else 0.0, 1e-3]) * 1.05
    fig = go.Figure()
    for k, run in enumerate(runs):
        colour, name = PALETTE[k % len(PALETTE)], html.escape(run)   # a folder's name, shown as text
        mine = attacked[attacked["run"].astype(str) == run] if len(attacked) else attacked
        keys = [c for c in ("steps", "monotone", "split", "data") if c in mine]
        for key, curve in (mine.groupby(keys, dropna=False) if len(mine) else ()):
            curve, part = curve.sort_values("eps"), dict(zip(keys, key))
            images = f", {int(curve['n'].max())} images" if "n" in curve and _finite(curve["n"].max()) else ""
            label = f"{name} · attacked ({_attack_label('pgd', part.get('steps'))}{images})"
            fig.add_trace(go.Scatter(x=curve["eps"], y=curve["accuracy"], name=label, mode="lines+markers",
                                     line={"color": colour}, legendgroup=name,
                                     hovertemplate=f"{label}<br>eps %{{x:.3g}}<br>accuracy %{{y:.3f}}<extra></extra>"))
        for j, (sigma, part) in enumerate(frame[frame["run"] == run].groupby("sigma", sort=True)):
            curve = certified_curve(part, top=top)
            label = f"{name} · certified (σ {sigma:g}, n {int(part['n'].max())}, {len(part)} images)"
            fig.add_trace(go.Scatter(x=curve["radius"], y=curve["certified_accuracy"], name=label, mode="lines",
                                     line={"color": colour, "dash": CERTIFIED_DASH[j % len(CERTIFIED_DASH)],
                                           "shape": "hv"}, legendgroup=name,
                                     hovertemplate=f"{label}<br>radius %{{x:.3g}}<br>certified accuracy %{{y:.3f}}"
                                                   "<extra></extra>"))
    fig.update_xaxes(title_text="l2 radius = eps ([0,1] pixels)", range=[0, top])
    fig.update_yaxes(title_text="accuracy", range=[0, 1.02])
    fig.update_layout(title=title, template="plotly_white", legend={"orientation": "h", "y": -0.25})
    return fig


def _tint(hex_colour: str, alpha: float) -> str:
    r, g, b = (int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def _class_labels(frame: pd.DataFrame, classes: list) -> dict:
    """Each class's axis label with its image count, ``akiec (n=55)``; where runs were measured on other images,
    each count (``akiec (n=55/10)``); the bare name when no count is known."""
    labels = {}
    for c in classes:
        counts = pd.to_numeric(frame.loc[frame["class"] == c, "n"], errors="coerce").dropna()
        counts = list(dict.fromkeys(int(v) for v in counts))
        labels[c] = html.escape(c) + (f" (n={'/'.join(map(str, counts))})" if counts else "")
    return labels


def per_class_chart(table: pd.DataFrame, title: str = "Accuracy per class, clean and under attack") -> go.Figure:
    """Each class's robust accuracy (solid bar) inside its clean accuracy (outlined bar), one colour per run, so a
    rare class the attack takes stands out beside the common one. ``table``: class, n, accuracy, robust_accuracy and
    ``run`` (several runs concatenated; without it one unnamed run), classes in their order of first appearance; the
    x axis names each class with its image count."""
    needed = {"class", "n", "accuracy", "robust_accuracy"}
    if table is None or not len(table) or needed - set(table.columns):
        return empty_figure(title)
    numbers = {c: pd.to_numeric(table[c], errors="coerce") for c in ("accuracy", "robust_accuracy")}
    frame = table.assign(**{"class": table["class"].astype(str),
                            "run": table["run"].astype(str) if "run" in table else "", **numbers})
    classes = list(dict.fromkeys(frame["class"]))
    labels = _class_labels(frame, classes)
    fig = go.Figure()
    for k, run in enumerate(dict.fromkeys(frame["run"])):
        mine = frame[frame["run"] == run].set_index("class").reindex(classes)
        colour, name = PALETTE[k % len(PALETTE)], html.escape(run)          # a folder's name, shown as text
        x = [labels[c] for c in classes]
        for what, column, marker in (("clean", "accuracy", {"color": _tint(colour, 0.12),
                                                            "line": {"color": colour, "width": 2}}),
                                     ("robust", "robust_accuracy", {"color": colour})):
            fig.add_trace(go.Bar(x=x, y=mine[column], name=" · ".join(filter(None, (name, what))), marker=marker,
                                 offsetgroup=run, legendgroup=run,
                                 hovertemplate=f"{name + ' · ' if name else ''}%{{x}}<br>{what} accuracy "
                                               "%{y:.3f}<extra></extra>"))
    fig.update_yaxes(range=[0, 1.02], title_text="accuracy (solid: robust, outline: clean)")
    fig.update_layout(title=title, template="plotly_white", barmode="group", bargroupgap=0.05,
                      legend={"orientation": "h", "y": -0.25})
    return fig
