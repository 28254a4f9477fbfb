"""DPAAT Lab dashboard: ``streamlit run dashboard/app.py``. Pages live in ``dashboard/pages/``."""
from pathlib import Path
import sys

import streamlit as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dpaat_core import __version__  # noqa: E402

HERE = Path(__file__).resolve().parent


def home() -> None:
    st.title("DPAAT Lab")
    st.caption(f"dpaat_core {__version__}")
    st.write(
        "Robust medical image classification with Dynamic Perturbation-Adaptive Adversarial "
        "Training. **Runs** lists the trained models in the run store with their headline "
        "metrics; **Training dynamics** shows each sample's loss change and the fragile/stable "
        "split epoch by epoch; **Robustness** compares accuracy against epsilon across runs and "
        "attacks a batch live; the **Attribution explorer** shows what a model looks at on a "
        "lesion image, clean and perturbed; **Train** launches and watches a training run."
    )


st.set_page_config(page_title="DPAAT Lab", layout="wide")
st.navigation([
    st.Page(home, title="Home", icon=":material/home:"),
    st.Page(str(HERE / "pages" / "runs.py"), title="Runs", icon=":material/table:"),
    st.Page(str(HERE / "pages" / "dynamics.py"), title="Training dynamics", icon=":material/timeline:"),
    st.Page(str(HERE / "pages" / "robustness.py"), title="Robustness", icon=":material/shield:"),
    st.Page(str(HERE / "pages" / "attribution.py"), title="Attribution explorer", icon=":material/visibility:"),
    st.Page(str(HERE / "pages" / "train.py"), title="Train", icon=":material/play_arrow:"),
]).run()
