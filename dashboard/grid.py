"""Every image of a live batch, clean beside perturbed, with the prediction in words under each pair."""
from __future__ import annotations

import numpy as np
import streamlit as st

from dpaat_core.evaluate.attribution import prediction_words


def batch_grid(live: dict, classes: list, after: str, columns: int = 4) -> None:
    """``live``: a live attack's or corruption's result (``x``, ``x_adv``, ``y``, ``pred``, ``pred_adv``,
    ``confidence``, ``confidence_adv``); ``after`` names the perturbation in the captions."""
    cols = st.columns(columns)
    for k in range(len(live["x"])):
        clean, moved = live["x"][k], live["x_adv"][k]
        pair = np.concatenate([clean, np.ones_like(clean[:, :, :2]), moved], axis=2)
        cols[k % columns].image(np.moveaxis(pair, 0, -1), width="stretch", clamp=True,
                                caption=f"#{k} · " + prediction_words(classes, live["pred"][k], live["confidence"][k],
                                                                     live["y"][k], live["pred_adv"][k],
                                                                     live["confidence_adv"][k], after))
