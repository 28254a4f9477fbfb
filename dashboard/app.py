"""DPAAT Lab dashboard: ``streamlit run dashboard/app.py``. One file per page in ``dashboard/views/``.

The folder is not called ``pages/``: Streamlit would also serve files there as pages of its own
(without this navigation) to anyone who opens a page's address directly.
"""
from pathlib import Path
import sys

import streamlit as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dashboard.state import viewer_mode  # noqa: E402
from dpaat_core import __version__  # noqa: E402

HERE = Path(__file__).resolve().parent


def home() -> None:
    st.title("DPAAT Lab")
    st.caption(f"dpaat_core {__version__}")
    st.write(
        "Robust medical image classification with Dynamic Perturbation-Adaptive Adversarial "
        "Training. **Runs** lists the trained models in the run store with their headline "
        "metrics; **Training dynamics** shows each sample's loss change and the fragile/stable "
        "split epoch by epoch; **Robustness** compares accuracy against epsilon across runs, "
        "attacks a batch live and shows accuracy under natural corruptions (blur, noise, lighting, "
        "the dermatoscope's black corner); the **Attribution explorer** shows what a model looks at "
        "on a lesion image, clean and perturbed; the **Gallery** shows a whole test split's maps at "
        "once, the images that need a look first; **Tuning** shows the eps sweeps and their robustness trade-off" + ("." if viewer_mode() else
                                                  "; **Train** launches and watches a training run.")
    )
    if viewer_mode():
        st.caption("Viewer: the runs can be looked at, not changed. Uploaded images stay in memory.")


@st.cache_resource(show_spinner=False)
def _warm_imports() -> None:
    """Import the model and attack code (torchvision takes about a second) in the background once per server, while
    a visitor reads the first page, so the first page that loads a model does not wait for it."""
    import importlib
    import threading
    threading.Thread(target=lambda: [importlib.import_module(m) for m in ("dpaat_core.models", "dpaat_core.attacks",
                                                                          "dpaat_core.loading")],
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
