"""Training dynamics: ΔL per epoch with its threshold, the fragile/stable split and how samples move."""
from pathlib import Path

import pandas as pd
import streamlit as st

from dashboard import charts
from dashboard.state import dynamics, run_data
from dashboard.widgets import data_spec_input, run_picker
from dpaat_core.store import runs

st.title("Training dynamics")
data_spec_input()
picked = run_picker("Run", multi=False, prefer=lambda r: bool(runs.dynamics_epochs(r.path)))
if not picked:
    st.info("No readable run in the store yet.")
    st.stop()
run = picked[0]
if run.origin == "imported":
    source = run.record.config.source.get("file", "a weights file")
    st.info(f"{run.run_id} was imported from {Path(source).name}: it has no training history here. Its robustness, "
            "corruptions and attribution maps are on the other pages.")
    st.stop()
epochs = runs.dynamics_epochs(run.path)
if not epochs:
    st.info(f"{run.run_id} has no completed epoch yet." if run.state != "done" else
            f"{run.run_id} was saved without its per-sample dynamics (a shipped run without an eps memory keeps "
            "none); pick a DPAAT run in the sidebar.")
    st.stop()
attack = run.record.attack
st.caption(f"{run.run_id} · {run.method} · {run.model} · {attack.norm} eps0 {attack.eps:g} · "
           f"{len(epochs)} epoch(s) · {run.state}")

by_epoch = {e: d for e in epochs if (d := dynamics(run, e)) is not None}   # an unreadable epoch is warned about
if not by_epoch:
    st.stop()
readable = list(by_epoch)
epoch = st.select_slider("Epoch", options=readable, value=readable[-1]) if len(readable) > 1 else readable[0]
frame = by_epoch[epoch]
row = run.metrics[run.metrics["epoch"] == epoch]
threshold = float(row["threshold_mean"].iloc[0]) if len(row) and "threshold_mean" in row else None

left, right = st.columns(2)
left.plotly_chart(charts.delta_loss_histogram(frame, threshold, epoch), key="hist")
right.plotly_chart(charts.fragile_fraction_chart(run.metrics, run.record.classes), key="fragile")
left.plotly_chart(charts.eps_distribution_chart(by_epoch, attack.eps, norm=attack.norm), key="eps")
if epoch - 1 in by_epoch:
    right.plotly_chart(charts.transition_heatmap(by_epoch[epoch - 1], frame, epoch), key="heat")
else:
    right.plotly_chart(charts.transitions_chart(run.metrics), key="transitions")

st.subheader("Follow one sample")
index = st.number_input("Training sample index", min_value=0, max_value=int(frame["index"].max()), value=0, step=1)
history = pd.concat(by_epoch.values())
history = history[history["index"] == index]
cols = st.columns([1, 3])
data = run_data(run, "train")
if data is not None and index < len(data):
    cols[0].image(data.images[index].permute(1, 2, 0).numpy(), caption=f"{data.classes[int(data.labels[index])]}",
                  width="stretch", clamp=True)
cols[1].plotly_chart(charts.sample_trajectory_chart(history), key="trajectory")
