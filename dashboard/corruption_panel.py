"""The Robustness page's natural-corruption view: the saved grids of the selected runs (a heat map, a comparison
and the corruption error), a button that computes a missing grid in a process of its own, and a live view of one
corruption on a few test images."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard import charts
from dashboard.grid import batch_grid
from dashboard.state import model, run_data
from dashboard.tables import corruptions
from dashboard.compute import live_corruption
from dashboard.widgets import compute_buttons
from dpaat_core.store import runs
from dpaat_core.evaluate.corruption_eval import corruption_error
from dpaat_core.evaluate.corruptions import NAMES, SEVERITIES, describe


def _saved_grids(selected: list[runs.Run]) -> pd.DataFrame:
    frame = runs.select(pd.concat([corruptions(r) for r in selected], ignore_index=True), split="test")
    compute_buttons(selected, frame, lambda rid: f"Compute the corruption grid of {rid} (15 corruptions x 5 severities on its "
                    "test split: minutes on a CPU)", "corrupt", max_samples=None, corruptions=True)
    if not len(frame):
        st.info("No run picked has a corruption grid yet (`python -m dpaat_core evaluate RUN --corruptions all`).")
        return frame
    data = frame.groupby("run")["data"].agg(lambda d: d.mode().iloc[0])   # each run's most common data: one grid each
    frame = frame[frame["data"] == frame["run"].map(data)]
    rank = {name: k for k, name in enumerate(("clean", *NAMES))}                # MedMNIST-C's order, family by family
    return frame.sort_values(["corruption", "severity"], key=lambda c: c.map(rank) if c.name == "corruption" else c,
                             kind="stable")


def show(selected: list[runs.Run]) -> None:
    st.caption("MedMNIST-C's dermoscopy corruptions (Di Salvo et al., 2024) at severities 1 to 5: what a clinic's "
               "camera, lighting and dermatoscope do to an image, beside what an attacker does.")
    frame = _saved_grids(selected)
    if len(frame):
        names = list(dict.fromkeys(frame["run"]))
        shown = st.selectbox("Heat map of", names, key="heat-run") if len(names) > 1 else names[0]
        st.plotly_chart(charts.corruption_heatmap(frame[frame["run"] == shown], f"{shown}: accuracy under "
                                                  "natural corruptions"), key="corruption-heat")
        if len(names) > 1:
            st.plotly_chart(charts.corruption_comparison_chart(frame), key="corruption-compare")
            reference = st.selectbox("Corruption error relative to", names, key="mce-ref",
                                     help="mCE (Hendrycks & Dietterich): the run's errors summed over severities, "
                                          "divided by the reference's, averaged over corruptions; 100 = as the "
                                          "reference, lower is better. Relative mCE does the same with the drop from "
                                          "the clean error.")
            table = corruption_error({r: frame[frame["run"] == r] for r in names}, reference)
            st.dataframe(table.set_index("run").round(3), width="stretch", column_config={
                "clean": st.column_config.NumberColumn("clean accuracy", format="%.3f"),
                "mean_corrupted": st.column_config.NumberColumn("mean corrupted accuracy", format="%.3f"),
                "mce": st.column_config.NumberColumn("mCE", format="%.1f", help="100 = as the reference; lower is "
                                                     "better"),
                "relative_mce": st.column_config.NumberColumn(
                    "relative mCE", format="%.1f", help="the drop from the run's own clean error, against the "
                    "reference's drop; below 0 when corruption costs this run less than nothing on average (it "
                    "gains accuracy on some) while it costs the reference"),
                "cells": st.column_config.NumberColumn("corruption × severity cells"),
                "relative_corruptions": st.column_config.NumberColumn("corruptions that cost the reference")})
            st.caption("mCE: each corruption's errors summed over severities, divided by the reference's, averaged "
                       "over corruptions (100 = as the reference). Relative mCE does the same with how much each "
                       "corruption adds to the clean error; a negative value means the corruptions, on average, "
                       "cost this run nothing while they cost the reference.")
    _live(selected)


def _live(selected: list[runs.Run]) -> None:
    st.markdown("**One corruption, live**")
    by_id = {r.run_id: r for r in selected}
    c1, c2, c3, c4 = st.columns([2, 2, 2, 1])
    run = by_id[c1.selectbox("Run", list(by_id), key="live-c-run")]
    name = c2.selectbox("Corruption", NAMES, index=NAMES.index("defocus_blur"), key="live-c-name",
                        format_func=lambda n: n.replace("_", " "))
    severity = c3.select_slider("Severity", SEVERITIES, value=3, key="live-c-sev")
    n = c4.number_input("Images", min_value=4, max_value=64, value=16, step=4, key="live-c-n")
    data = run_data(run, "test") if model(run) is not None else None
    if data is None:
        return
    live = live_corruption(run, data, int(n), name, int(severity))
    if live is None:
        return
    classes = run.record.classes
    m1, m2 = st.columns(2)
    m1.metric("clean accuracy", f"{live['accuracy']:.2f}")
    m2.metric("accuracy under the corruption", f"{live['robust_accuracy']:.2f}",
              delta=f"{live['robust_accuracy'] - live['accuracy']:+.2f}")
    st.caption(f"{describe(name, int(severity), data.image_size)} · {live['flipped']} of {len(live['labels'])} "
               "images went from right to wrong under it. Clean (left) and corrupted (right):")
    batch_grid(live, classes, f"{name.replace('_', ' ')} {int(severity)}")
