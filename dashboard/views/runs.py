"""Runs: every run in the store with its status and headline metrics; compare the selected ones."""
import streamlit as st

from dashboard import charts
from dashboard.state import hide_paths, list_runs, store, unreadable, viewer_mode
from dashboard.tables import test_balanced_accuracy
from dashboard.widgets import report_download, run_picker
from dpaat_core.evaluate import reproduction
from dpaat_core.store import runs
from dpaat_core.data import display_name

st.title("Runs")
path = store()
found = list_runs()
st.caption(f"{len(found)} run(s)" if viewer_mode() else f"Run store: `{path}` · {len(found)} run(s)")
if not found:
    st.info(f"No runs in `{path}` yet. Train one with `python -m dpaat_core train ...` "
            "(or set `DPAAT_STORE` to another store).")
    st.stop()

table = runs.runs_table(found)   # from the listing above: the store is read once per run
table.insert(4, "test_balanced_accuracy", [test_balanced_accuracy(r) for r in found])   # imported runs too
if viewer_mode():                # data by its name, never the server's path
    table["data"] = table["data"].map(lambda spec: display_name(spec) if spec else spec)
    table["problem"] = table["problem"].map(hide_paths)
st.dataframe(table, hide_index=True, width="stretch",
             column_config={c: st.column_config.NumberColumn(format="%.3f")
                            for c in ("eps", "test_balanced_accuracy", "val_accuracy", "val_balanced_accuracy",
                                      "val_robust_accuracy",
                                      "val_robust_balanced_accuracy", "val_auc")})
for run in found:
    if run.state in ("corrupt", "incomplete", "interrupted", "failed"):
        st.warning(f"**{run.run_id}** is {run.state}: {hide_paths(run.problem)}")

study_file = path / reproduction.REPRODUCTION_FILE
if study_file.is_file():
    st.subheader("Reproduction study")
    try:
        results = reproduction.read_results(study_file)
    except runs.RunError as exc:
        unreadable("The study table", exc)
    else:
        study = st.selectbox("Study", list(dict.fromkeys(results["study"])))
        summary = reproduction.summarize(results[results["study"] == study])
        st.dataframe(reproduction.format_table(summary), hide_index=True, width="stretch")
        st.plotly_chart(charts.study_chart(summary, reproduction.METRICS, title=f"{study}: test split"),
                        key="study-chart")
        st.caption("Percent on the test split, mean ± std over seeds (a single value: one seed). Robust accuracy at "
                   "the training eps: PGD-20, I-FGSM, and the worst case of PGD-20, APGD-CE and APGD-DLR. The "
                   "paper's figures are ResNet34 at 224 px; see REPRODUCTION.md for the setting and the commands.")

selected = run_picker("Compare runs")
if len(selected) == 1:
    st.plotly_chart(charts.metrics_chart(selected[0].metrics), key=f"metrics-{selected[0].run_id}")
elif selected:
    column = st.selectbox("Compare on", list(charts.VAL_SERIES), format_func=charts.VAL_SERIES.get,
                          key="compare-metric")
    labels = charts.short_labels(selected)
    st.plotly_chart(charts.compare_metrics_chart({labels[r.run_id]: r.metrics for r in selected}, column),
                    key="compare-runs")
for run in selected:
    with st.expander(f"Settings of {run.run_id} · {run.method} · {run.model} · {run.state}", expanded=False):
        st.json(runs.public_config(run.config) if viewer_mode() else run.config, expanded=False)
if selected:
    names = selected[0].run_id if len(selected) == 1 else f"{len(selected)} runs"
    st.download_button(f"Download the audit report of {names} (HTML)", report_download(selected),
                       file_name=f"dpaat-audit-{'-vs-'.join(r.run_id for r in selected)[:120]}.html",
                       mime="text/html", on_click="ignore", icon=":material/download:")
    st.caption("One self-contained file to send to a colleague: origin, accuracy clean and under attack per class, "
               "curves, the APGD check, attribution numbers and example images, compared when several runs are "
               "selected. It shows what `python -m dpaat_core audit RUN` saved; parts not computed yet say so.")
