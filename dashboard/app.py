"""DPAAT Lab dashboard: ``streamlit run dashboard/app.py``. One file per page in ``dashboard/views/``.

The folder is not called ``pages/``: Streamlit would also serve files there as pages of its own
(without this navigation) to anyone who opens a page's address directly.
"""
from pathlib import Path

import streamlit as st

from dashboard.state import viewer_mode
from dpaat_core import __version__

HERE = Path(__file__).resolve().parent


def home() -> None:
    from dashboard.state import default_runs, list_runs
    from dashboard.widgets import trust_notice
    st.title("DPAAT Lab")
    st.caption(f"dpaat_core {__version__} · robust medical image classification with Dynamic Perturbation-Adaptive "
               "Adversarial Training: train, measure robustness, and see what a model looks at.")
    found = list_runs()
    done = [r for r in found if r.state == "done" and r.sweep is None]
    m1, m2, m3, m4 = st.columns(4)
    m1.metric("runs in the store", len([r for r in found if r.sweep is None]))
    m2.metric("finished models", len(done))
    m3.metric("methods", len({r.method for r in done}) or "–")
    m4.metric("sweep trials", len([r for r in found if r.sweep is not None]))
    first = default_runs(found)
    by_id = {r.run_id: r for r in found}
    if first and first[0] in by_id:
        run = by_id[first[0]]
        st.markdown(f"**Pages open on {run.run_id}** ({run.method} · {run.model}): the store's best finished model "
                    + ("unless its keeper chose another." if viewer_mode() else
                       "unless its keeper chose another (`python -m dpaat_core runs --set-default RUN`)."))
        trust_notice(run)
    else:
        st.info("No finished model in the store yet.")
    clinic, research = st.columns(2)
    with clinic:
        st.subheader("Clinicians: start here")
        st.write("See what a model looks at on a lesion, and whether an attack or a blurry photo changes its answer. "
                 "Each map says how far to trust it.")
        st.page_link(str(HERE / "views" / "gallery.py"), label="Gallery: a whole test set, the images that need a "
                                                               "look first", icon=":material/grid_view:")
        st.page_link(str(HERE / "views" / "attribution.py"), label="Attribution explorer: one image, clean and "
                                                                   "perturbed, or your own", icon=":material/visibility:")
    with research:
        st.subheader("Researchers: start here")
        st.write("Compare methods on robustness per class, follow DPAAT's per-sample eps, and tune it.")
        for page, label, icon in (("runs.py", "Runs: every run, its headline figures and its report", "table"),
                                  ("robustness.py", "Robustness: the methods compared under attack and corruption",
                                   "shield"),
                                  ("dynamics.py", "Training dynamics: the fragile/stable split, epoch by epoch",
                                   "timeline"),
                                  ("tuning.py", "Tuning: eps sweeps and their trade-off", "tune"),
                                  *(() if viewer_mode() else (("train.py", "Train: launch and watch a run",
                                                               "play_arrow"),))):
            st.page_link(str(HERE / "views" / page), label=label, icon=f":material/{icon}:")
    if viewer_mode():
        st.caption("Viewer: the runs can be looked at, not changed. Uploaded images stay in memory.")


@st.cache_resource(show_spinner=False)
def _warm_imports() -> None:
    """Import the model and attack code (torchvision takes about a second) in the background once per server, while
    a visitor reads the first page, so the first page that loads a model does not wait for it."""
    import importlib
    import threading
    threading.Thread(target=lambda: [importlib.import_module(m) for m in ("dpaat_core.models", "dpaat_core.attack.attacks",
                                                                          "dpaat_core.store.loading")],
                     daemon=True, name="dpaat-warm-imports").start()


st.set_page_config(page_title="DPAAT Lab", layout="wide")
if viewer_mode():   # no Deploy button, and no "Clear cache" that would make every visitor wait for the recomputes
    st.set_option("client.toolbarMode", "minimal")
_warm_imports()
pages = [
    st.Page(home, title="Home", icon=":material/home:"),
    st.Page(str(HERE / "views" / "runs.py"), title="Runs", icon=":material/table:"),
    st.Page(str(HERE / "views" / "dynamics.py"), title="Training dynamics", icon=":material/timeline:"),
    st.Page(str(HERE / "views" / "robustness.py"), title="Robustness", icon=":material/shield:"),
    st.Page(str(HERE / "views" / "attribution.py"), title="Attribution explorer", icon=":material/visibility:"),
    st.Page(str(HERE / "views" / "gallery.py"), title="Gallery", icon=":material/grid_view:"),
    st.Page(str(HERE / "views" / "tuning.py"), title="Tuning", icon=":material/tune:"),
]
if not viewer_mode():   # in viewer mode (DPAAT_VIEWER=1) nothing that starts a process or writes is offered
    pages.append(st.Page(str(HERE / "views" / "train.py"), title="Train", icon=":material/play_arrow:"))
st.navigation(pages).run()
