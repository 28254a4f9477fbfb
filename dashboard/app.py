"""DPAAT Lab dashboard (placeholder until the run store and evaluation land).

Run with: streamlit run dashboard/app.py
"""
from pathlib import Path
import sys

import streamlit as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dpaat_core import __version__  # noqa: E402


def home() -> None:
    st.title("DPAAT Lab")
    st.caption(f"dpaat_core {__version__}")
    st.write(
        "Robust medical image classification with Dynamic Perturbation-Adaptive Adversarial "
        "Training. The library (data sources, models, attacks with per-sample epsilon) is in "
        "place; these pages are coming next:"
    )
    st.markdown(
        "- **Runs**: trained models in `checkpoints/`, their configs and headline metrics\n"
        "- **Training dynamics**: per-sample loss change, the fragile/stable split over epochs\n"
        "- **Robustness**: accuracy against epsilon for several runs and attacks\n"
        "- **Attribution explorer**: clean and perturbed lesion images with their attribution maps\n"
        "- **Train**: launch and watch a training run"
    )


st.set_page_config(page_title="DPAAT Lab", layout="wide")
st.navigation([st.Page(home, title="Home", icon=":material/home:")]).run()
