"""Tuning: the sweeps in the store's Optuna storage: trials, the robustness trade-off, history, parameters."""
import math

import streamlit as st

from dashboard.state import list_runs, store, viewer_mode
from dashboard.widgets import open_run_buttons
from dpaat_core import sweep
from dpaat_core.cli import launch

st.title("Tuning")
path = store()
st.caption("Sweeps over training settings (`python -m dpaat_core sweep`), each trial a run in the store, scored on "
           "its validation split with PGD-20 at one eps for all trials.")

url = None
if not viewer_mode():   # a visitor of the viewer may not name a server or a path
    url = st.sidebar.text_input("Sweep storage (optional)", key="sweep_storage",
                                help="empty: the store's sweeps.db; or postgresql://user:pw@host/db").strip() or None
try:
    names = sweep.list_sweeps(path, url)
except sweep.SweepError as exc:
    st.error(str(exc))
    st.stop()


@st.cache_resource(show_spinner=False, ttl=5)
def _study(name: str, storage: str | None, store_dir: str):
    import optuna
    return optuna.load_study(study_name=name, storage=sweep.open_storage(storage, store_dir))


if names:
    name = st.selectbox("Sweep", names, index=len(names) - 1)
    study = _study(name, url, str(path))
    spec = sweep.spec_from_study(study)
    base = spec.get("base", {})
    data_spec = base.get("data", {}).get("spec", "?")
    if viewer_mode():   # a visitor sees the data's name, not where it lies on the server
        kind, _, where = data_spec.partition(":")
        data_spec = f"{kind}:{where.replace(chr(92), '/').rsplit('/', 1)[-1]}" if where else data_spec
    st.caption(f"Method **{base.get('method', {}).get('name', '?')}** · space `{spec.get('space', '?')}` · "
               f"objectives {', '.join(spec.get('objectives', []))} · scored at eps {spec.get('eval_eps', '?')} "
               f"({base.get('attack', {}).get('norm', '?')}) · {base.get('train', {}).get('epochs', '?')} epochs · "
               f"data `{data_spec}` at {base.get('data', {}).get('image_size', '?')} px")
    trials = sweep.trials_frame(study)
    c = sweep.counts(study)
    st.caption(f"{c['complete']} complete, {c['pruned']} pruned, {c['running']} running, {c['fail']} failed")
    if trials.empty:
        st.info("No trials yet.")
        st.stop()

    # sliders narrow each numeric parameter's range; every plot and the table follow
    keep = trials["state"] == "complete"
    params = [col for col in trials if col.startswith("param ") and trials[col].dtype.kind == "f"]
    if params:
        st.sidebar.subheader("Narrow the parameters")
    for col in params:
        lo, hi = float(trials[col].min()), float(trials[col].max())
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo == hi:
            continue
        low, high = st.sidebar.slider(col.removeprefix("param "), lo, hi, (lo, hi), key=f"range-{name}-{col}",
                                      format="%.3f")
        keep &= trials[col].between(low - 1e-12, high + 1e-12)
    shown = trials[keep]
    st.caption(f"{len(shown)} of {c['complete']} complete trials within the ranges")

    view = sweep.subset(study, shown["trial"].tolist())
    figs = sweep.figures(view)
    if "pareto" in figs:
        st.subheader("The trade-off: Pareto front")
        st.plotly_chart(figs["pareto"], key="pareto")
        st.caption("Each point a trial (hover for its parameters, its run and its number in the sweep); red: no "
                   "other trial is better on every objective. Up and right is better. The colour scales count the "
                   "trials shown.")
    cols = st.columns(2)
    for col, key, title in ((cols[0], "history", "History"), (cols[1], "importance", "Parameter importance")):
        if key in figs:
            with col:
                st.subheader(title)
                st.plotly_chart(figs[key], key=key)
    if "parallel" in figs:
        st.subheader("Parallel coordinates")
        st.plotly_chart(figs["parallel"], key="parallel")

    st.subheader("Trials")
    table = trials[keep | (trials["state"] != "complete")].reset_index(drop=True)   # unfinished trials stay listed
    st.dataframe(table, hide_index=True, width="stretch", key=f"trials-{name}")
    known = {r.run_id for r in list_runs() if r.record is not None}
    openable = [r for r in table["run"] if r in known]
    if openable:
        c1, c2 = st.columns([2, 3])
        run_id = c1.selectbox("Open a trial's run in the other pages", openable, key=f"open-trial-{name}")
        open_run_buttons(run_id, "open", c2)
    elif len(table):
        st.caption("The trials' runs are not in this run store (trials of another machine, or still starting).")
else:
    st.info("No sweeps in this store yet." + ("" if viewer_mode() else " Start one below or with "
                                               "`python -m dpaat_core sweep NAME --space ...`."))

if not viewer_mode():
    with st.expander("Start a sweep", expanded=not names):
        with st.form("sweep"):
            c1, c2, c3 = st.columns(3)
            new = c1.text_input("Name", "eps-sweep", key="sweep-name")
            method = c2.selectbox("Method", ["dpaat", "dpaat_cthr", "dpaat_cnorm", "pgd_at", "trades", "dpaat_fixed"])
            data = c3.text_input("Data spec", "npz:../shared/data/ham10000_28.npz", key="sweep-data")
            c1, c2, c3, c4 = st.columns(4)
            size = c1.number_input("Image size (px)", 8, 1024, 28, key="sweep-size")
            epochs = c2.number_input("Epochs per trial", 1, 500, 3, key="sweep-epochs")
            n = c3.number_input("Trials", 1, 1000, 12, key="sweep-trials")
            workers = c4.number_input("Workers", 1, 64, 1, key="sweep-workers")
            space = st.text_input("Space", "eps=0.1:0.6,gamma=0.05:0.3,lam=0.1:2:log", key="sweep-space",
                                  help="name=low:high[:log], comma-separated; TRADES and PGD-AT: eps, lam (beta)")
            objectives = st.text_input("Objectives", "pgd20_balanced,balanced_accuracy", key="sweep-objectives")
            go = st.form_submit_button("Start the sweep", type="primary")
        if go:
            argv = ["--data", data, "--method", method, "--image-size", str(int(size)), "--epochs", str(int(epochs)),
                    "--space", space, "--objectives", objectives, "--trials", str(int(n)),
                    "--workers", str(int(workers))] + (["--storage", url] if url else [])
            try:
                sweep.check_name(new)
                sweep.parse_space(space)
                sweep.parse_objectives(objectives)
            except sweep.SweepError as exc:
                st.error(str(exc))
            else:
                pid = launch.launch_sweep(argv, path, new)
                st.success(f"Sweep {new} started (process {pid}); its log is `.logs/sweep-{new}.log` in the store. "
                           "Trials appear here as they finish.")
