"""Plotly figures shared by the dashboard and the shareable report (``report.py``): pure functions from run-store
tables to figures, no Streamlit. Colours are Okabe-Ito (colour-blind safe)."""
from __future__ import annotations

import html
import math

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

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
    steps = f"-{int(steps)}" if _finite(steps) else ""
    return {"pgd": f"PGD{steps}", "ifgsm": f"I-FGSM{steps}", "fgsm": "FGSM"}.get(attack, f"{attack}{steps}")


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
    frame = frame.assign(norm=frame["norm"].fillna("?").astype(str), attack=frame["attack"].fillna("?").astype(str))
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
    fig.update_layout(title=title, template="plotly_white", legend_title_text="run · attack" if has_run else "attack")
    return fig
