"""Runs: every run in the store with its status and headline metrics; compare the selected ones."""
import streamlit as st

from dashboard import charts
from dashboard.state import list_runs, run_picker, store
from dpaat_core import runs

st.title("Runs")
path = store()
found = list_runs()
st.caption(f"Run store: `{path}` · {len(found)} run(s)")
if not found:
    st.info(f"No runs in `{path}` yet. Train one with `python -m dpaat_core train ...` "
            "(or set `DPAAT_STORE` to another store).")
    st.stop()

table = runs.runs_table(found)   # from the listing above: the store is read once per run
st.dataframe(table, hide_index=True, width="stretch",
             column_config={c: st.column_config.NumberColumn(format="%.3f")
                            for c in ("eps", "val_accuracy", "val_balanced_accuracy", "val_robust_accuracy")})
for run in found:
    if run.state in ("corrupt", "incomplete", "interrupted", "failed"):
        st.warning(f"**{run.run_id}** is {run.state}: {run.problem}")

selected = run_picker("Compare runs")
for run in selected:
    with st.expander(f"{run.run_id} · {run.method} · {run.model} · {run.state}", expanded=len(selected) == 1):
        st.plotly_chart(charts.metrics_chart(run.metrics), key=f"metrics-{run.run_id}")
        st.json(run.config, expanded=False)
