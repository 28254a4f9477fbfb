"""The controls several pages share: the sidebar's run picker and data spec, buttons that open a run on another
page or start a computation, the eps slider, the training-split filter, the trust line and the report download."""
from __future__ import annotations

from typing import Callable

import pandas as pd
import streamlit as st

from dashboard.state import default_runs, dynamics, first_line, list_runs, stamp, viewer_mode
from dashboard.tables import accuracy_of, localisation
from dpaat_core.store import runs


def run_picker(label: str = "Runs", multi: bool = True, compare: bool = False, prefer=None) -> list[runs.Run]:
    """The sidebar's run selection, shared by the pages through ``st.session_state["runs"]``; ``compare``: with
    nothing picked yet, open on the comparison of the methods (:func:`default_runs`); ``prefer(run)``: with nothing
    picked yet, open on the first run of that comparison it accepts (a page that shows what only some runs have)."""
    found = list_runs()
    by_id = {r.run_id: r for r in found}
    usable = [r.run_id for r in found if r.record is not None]
    picked = [] if st.session_state.get("runs_by_default") else [r for r in st.session_state.get("runs", [])
                                                                 if r in usable]
    default = default_runs(found, (compare and multi) or prefer is not None)   # the comparison starts at the default
    if prefer is not None:
        default = [r for r in default if r in by_id and prefer(by_id[r])][:1] or default[:1]
    chosen = picked or default
    with st.sidebar:
        if multi:
            chosen = st.multiselect(label, usable, default=chosen, key="run_picker_multi")
        elif usable:
            chosen = [st.selectbox(label, usable, index=usable.index(chosen[0]), key="run_picker_one")]
    st.session_state["runs"] = chosen
    st.session_state["runs_by_default"] = not picked and chosen == default   # the next page opens on its own default
    return [by_id[r] for r in chosen]


def choose_runs(run_ids: list[str]) -> None:
    """Make ``run_ids`` the user's pick, which every page then opens on."""
    st.session_state["runs"] = list(run_ids)
    st.session_state["runs_by_default"] = False


#: the pages a run can be opened in, from another page (the run becomes the picked one there)
RUN_PAGES = (("views/runs.py", "Runs"), ("views/robustness.py", "Robustness"),
             ("views/dynamics.py", "Training dynamics"))


def open_run_buttons(run_id: str, key: str, where=None) -> None:
    """One button per page in RUN_PAGES that opens it on ``run_id``."""
    for column, (page, label) in zip((where or st).columns(len(RUN_PAGES)), RUN_PAGES):
        if column.button(f"Open in {label}", key=f"{key}-{label}"):
            choose_runs([run_id])
            st.switch_page(page)


def data_spec_input() -> None:
    """A sidebar box for a data spec that overrides the run's own (same specs as the CLI); none in viewer mode,
    where a visitor may not name a path on the server."""
    if viewer_mode():
        st.session_state.pop("data_spec", None)
        return
    st.sidebar.text_input("Data spec (optional)", key="data_spec",
                          help="npz:<file>, medmnist:<flag>[@size], ham10000:<dir>, folder:<dir> or synthetic; "
                               "empty: the run's own data, then $DPAAT_DATA_ROOT, then the synthetic set")


@st.fragment(run_every=2.0)
def evaluation_progress(waiting: dict) -> None:
    """Progress of the ``evaluate`` processes started from a page (``{run_id: run_dir}``); the page re-runs, and
    reads what was written, when one ends."""
    from dpaat_core.cli import launch
    jobs = {rid: job for rid, path in waiting.items() if (job := launch.evaluating(path)) is not None}
    for rid, job in jobs.items():
        argv = job.get("argv", [])
        what = ("certified radii" if "certify" in argv else "the corruption grid" if "--corruptions" in argv
                else "the PGD-20 l2 curve")
        st.progress(job["progress"] or 0.0, text=f"{rid}: computing {what} · {job['line'][:90]}")
    if len(jobs) < len(waiting):
        st.rerun()


def compute_buttons(selected: list, saved: pd.DataFrame, label, key: str, starter: str = "start_evaluate",
                    **start) -> None:
    """A button per run of ``selected`` with no rows in ``saved`` (a table with a ``run`` column; ``label(run_id)``
    on the button) that starts ``launch.<starter>(run, **start)`` (``start_evaluate`` or ``start_certify``) as a
    process of its own, and the progress of those started; nothing in viewer mode (it writes the store)."""
    from dpaat_core.cli import launch
    if viewer_mode():
        return
    done = set(saved.get("run", []))
    missing = [r for r in selected if r.run_id not in done]
    waiting = {r.run_id: r.path for r in missing if launch.evaluating(r.path) is not None}
    for run in missing:
        if run.run_id not in waiting and st.button(label(run.run_id), key=f"{key}-{run.run_id}"):
            try:
                getattr(launch, starter)(run.path, **start)
                waiting[run.run_id] = run.path
            except runs.RunError as exc:
                st.error(str(exc))
    if waiting:
        evaluation_progress(waiting)


def eps_slider(where, eps0: float) -> float:
    """An eps slider from 0 to 4x the run's reference ``eps0`` in steps of ``eps0 / 20``; the value snapped to that
    grid: the browser computes arrow-key steps in floating point (0.3 - 4 * 0.015 arrives as 0.24000000000000002),
    and an attack, whose maps may move with the last bits of eps, then runs at the eps on show."""
    step = float(eps0) / 20
    value = where.slider("eps", 0.0, float(4 * eps0), float(eps0), step, format="%.4f")
    return round(round(value / step) * step, 10)


def training_split_filter(run: runs.Run, data, split: str, column, key: str | None = None):
    """For images of the run's whole training split with saved dynamics: each image's fragile/stable split at the
    last epoch (by index) and the split picked in a radio in ``column``; else (None, "all")."""
    epochs = runs.dynamics_epochs(run.path) if split == "train" else []
    last = dynamics(run, epochs[-1]) if epochs else None
    if last is None or len(data) != run.record.dataset.train_size:
        return None, "all"
    return last.set_index("index")["split"], column.radio(f"In training (epoch {epochs[-1]})",
                                                          ["all", "fragile", "stable"], horizontal=True, key=key)


def trust_notice(run: runs.Run, method: str = "gradcam", numbers: pd.DataFrame | None = None) -> None:
    """How far to trust this run's maps, beside them: its balanced accuracy and its maps' localisation against
    chance (from ``numbers``, the per-image rows on show, else the saved test-split rows), with a plain warning when
    either is weak."""
    from dpaat_core.evaluate import trust
    balanced, source = accuracy_of(run)
    found = trust.localisation(numbers, method) if numbers is not None else None
    if found is None:
        found = localisation(str(run.path), stamp(run.path / runs.ATTRIBUTION_IMAGES_FILE), method, run.record)
    level, text = trust.trust_line(balanced, source, found)
    {"trust": st.info, "doubt": st.warning, "unknown": st.info}[level](text, icon=":material/verified:" if
                                                                      level == "trust" else None)


def report_download(selected) -> Callable[[], str]:
    """The audit report of the ``selected`` runs, built when the download is clicked (on Streamlit's download
    thread, not in the page script) and cached until a run folder changes; nothing is written on the server."""
    dirs, stamps = tuple(str(r.path) for r in selected), tuple(r.modified for r in selected)
    return lambda: _report_or_problem(dirs, stamps)


@st.cache_data(show_spinner=False, max_entries=8)
def _report(run_dirs: tuple, stamps: tuple) -> str:
    from dpaat_core.report import report_html
    return report_html(list(run_dirs), viewer=viewer_mode())   # a viewer's download shows no server path


def _report_or_problem(run_dirs: tuple, stamps: tuple) -> str:
    """The report, or (a table that cannot be read, ...) a page that says what stopped it: a download has no
    page to show a warning on."""
    import html
    try:
        return _report(run_dirs, stamps)
    except Exception as exc:  # noqa: BLE001 - any failure becomes the downloaded page's one line
        why = "one of the runs' saved tables could not be read" if viewer_mode() else first_line(exc)
        return (f"<!DOCTYPE html><meta charset='utf-8'><title>No report</title><p>The report could not be made: "
                f"{html.escape(why)}</p>")


THUMBNAILS_PER_PAGE = 12


def thumbnail_picker(data, options: list[int], table: pd.DataFrame, classes: list[str], key: str) -> None:
    """The images of ``options`` as thumbnails, a page of :data:`THUMBNAILS_PER_PAGE` at a time, each with a button
    that picks it in the selectbox of ``key`` (set in the click's callback, before that widget is drawn again)."""
    with st.expander("Pick by thumbnail", expanded=False):
        pages = max(1, -(-len(options) // THUMBNAILS_PER_PAGE))
        page = st.number_input(f"Page (of {pages})", 1, pages, 1, key=f"{key}-thumbs-page") if pages > 1 else 1
        shown = options[(page - 1) * THUMBNAILS_PER_PAGE: page * THUMBNAILS_PER_PAGE]
        images = data.images[shown].permute(0, 2, 3, 1).numpy()    # uint8 [n, H, W, C] as stored
        cols = st.columns(6)
        for k, i in enumerate(shown):
            with cols[k % 6]:
                st.image(images[k, ..., 0] if images.shape[-1] == 1 else images[k], width="stretch",
                         caption=f"#{i} · {table['class'][i]} → {classes[table['pred'][i]]}")
                st.button("Pick", key=f"{key}-thumb-{i}", on_click=st.session_state.__setitem__, args=(key, i))
