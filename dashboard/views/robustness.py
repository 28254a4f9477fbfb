"""Robustness: accuracy against epsilon for the selected runs, the certified accuracy of their smoothed models
against l2 radius beside it, a live attack on a small batch and each class's clean and robust accuracy at its eps;
accuracy under natural corruptions in a second view (``dashboard.corruption_panel``)."""
import pandas as pd
import streamlit as st
from scipy.stats import binomtest

from dashboard import charts, corruption_panel
from dashboard.grid import batch_grid
from dashboard.charts import short_labels
from dashboard.state import model, run_data
from dashboard.tables import certified, class_robustness, robustness
from dashboard.compute import live_attack
from dashboard.widgets import compute_buttons, data_spec_input, eps_slider, run_picker
from dpaat_core import plots
from dpaat_core.evaluate.class_robustness import weakest_sentence
from dpaat_core.evaluate.certify import summary
from dpaat_core.evaluate.robustness import eps_rms, reference_eps
from dpaat_core.attack.attacks import ATTACKS


def certified_section(selected: list, curves: pd.DataFrame) -> None:
    """Certified accuracy against radius beside the attacked accuracy (l2), with each run's certificates in numbers."""
    st.subheader("Certified robustness (randomized smoothing)")
    found = pd.concat([certified(r) for r in selected], ignore_index=True)
    compute_buttons(selected, found, lambda rid: f"Certify {rid} at σ 0.25 (128 test images, n 500)", "certify",
                    starter="start_certify", max_samples=128)
    if not len(found):
        st.caption("No run picked has certified radii yet: `python -m dpaat_core certify RUN --sigma 0.25`.")
        return
    st.plotly_chart(plots.certified_chart(found, curves), key="certified")
    st.caption("Solid: accuracy under a PGD attack, which only shows that one attack failed (an upper bound on the "
               "accuracy any attack leaves). Dashed: the accuracy that is **guaranteed** within each l2 radius for "
               "the smoothed model (the class that Gaussian noise of std σ leaves on top; each guarantee holds with "
               "probability 1 − alpha). The gap between the two is what an attack cannot tell you.")
    rows = [{"run": rid, "sigma": sigma, **summary(part)} for (rid, sigma), part in found.groupby(["run", "sigma"])]
    radii = {key: st.column_config.NumberColumn(f"certified at r {key.split('@')[1]}", format="%.3f")
             for key in rows[0] if key.startswith("certified_accuracy@")}
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch",
                 column_config={"abstain_rate": st.column_config.NumberColumn("abstains", format="percent"),
                                "median_radius_correct": st.column_config.NumberColumn("median radius (right)",
                                                                                       format="%.3f"), **radii})


def per_class_section(selected: list, curves: pd.DataFrame, live_run, live: dict | None, data, attack: str,
                      norm: str, eps: float) -> None:
    """Each selected run's clean and robust accuracy per class at this attack and eps (saved figures where the run has
    them, else the live batch of the run attacked here; ``data``: the images on show), and the class where each
    one's robustness stops."""
    st.markdown(f"**Per class at eps {eps:g}** ({ATTACKS[attack].title()}, {norm})")
    tables, sources, missing = [], [], []
    for r in selected:
        table, source = class_robustness(r, curves, attack, norm, eps, live if r is live_run else None, data)
        if len(table):
            tables.append(table.assign(run=r.run_id))
            sources.append(f"{r.run_id}: {source}")
        else:
            missing.append(r.run_id)
    if tables:
        st.plotly_chart(charts.per_class_chart(pd.concat(tables, ignore_index=True)), key="per-class")
        st.caption("**Weakest class** · " + " · ".join(weakest_sentence(t.run.iloc[0], t) for t in tables))
        st.caption("Figures from " + "; ".join(sources) + ".")
    if missing:
        st.caption(f"No per-class figures at this eps for {', '.join(missing)}: pick an eps of a saved curve, audit "
                   "the run (`python -m dpaat_core audit RUN`), or pick it under Run above to attack a batch of it.")


st.title("Robustness")
data_spec_input()
selected = [r for r in run_picker("Runs", compare=True) if r.has_weights]
if not selected:
    st.info("Pick a run with trained weights in the sidebar.")
    st.stop()


# only the view on show runs (the other's live attack or corruption waits until it is picked)
VIEWS = ("Adversarial attacks", "Natural corruptions")
view = st.radio("View", VIEWS, horizontal=True, key="robustness-view", label_visibility="collapsed")
if view == VIEWS[0]:
    curves = pd.concat([robustness(r) for r in selected], ignore_index=True)
    compute_buttons(selected, curves, lambda rid: f"Compute the PGD-20 l2 curve of {rid} (256 test images)", "compute",
                    max_samples=256)
    if len(curves):
        x = "eps_rms" if st.toggle("Per-pixel RMS on the x axis", value=False) else "eps"
        labels = short_labels(selected)
        st.plotly_chart(charts.robustness_chart(curves.assign(run=curves["run"].map(labels)), x=x), key="curves")
    certified_section(selected, curves)

    st.subheader("Attack a batch live")
    by_id = {r.run_id: r for r in selected}
    run = by_id[st.selectbox("Run", list(by_id))]
    c1, c2, c3 = st.columns(3)
    attack = c1.selectbox("Attack", list(ATTACKS), index=0, format_func=lambda a: ATTACKS[a].label)
    norm = c2.selectbox("Norm", ["l2", "linf"], index=0)
    n = c3.number_input("Images", min_value=4, max_value=64, value=16, step=4)
    eps0 = reference_eps(run.record, norm)
    eps = eps_slider(st, eps0)
    data = run_data(run, "test") if model(run) is not None else None
    live = live_attack(run, data, int(n), attack, norm, eps) if data is not None else None   # seeded, cached
    if live is not None:
        shape = tuple(data.images.shape[1:])
        m1, m2, m3, m4 = st.columns(4)
        m1.metric("clean accuracy", f"{live['accuracy']:.2f}")
        m2.metric("robust accuracy", f"{live['robust_accuracy']:.2f}", delta=f"{live['robust_accuracy'] - live['accuracy']:+.2f}")
        m3.metric("robust balanced accuracy", f"{live['robust_balanced_accuracy']:.2f}",
                  help="the mean of the classes' robust accuracies (the classes in this batch): a rare class counts "
                       "as much as the common one")
        m4.metric("per-pixel RMS", f"{eps_rms(eps, norm, shape):.2e}",
                  help=f"eps {eps:.4g} ({norm}) at {shape[1]}x{shape[2]} pixels")
        shown_n = len(live["labels"])
        low, high = binomtest(int(live["robust"].sum()), shown_n).proportion_ci(method="wilson")
        st.caption(f"{live['flipped']} of {shown_n} images went from right to wrong under the attack "
                   f"({ATTACKS[attack].title()}, the evaluation protocol's steps). On {shown_n} images "
                   f"each one moves accuracy by {1 / shown_n:.2f}: robust accuracy {live['robust_accuracy']:.2f} "
                   f"has a 95% interval of {low:.2f}–{high:.2f}. Saved curves on the whole split are firmer.")
    per_class_section(selected, curves, run, live, data, attack, norm, eps)
    if live is not None:
        st.caption("Every image of the batch: clean (left) and attacked (right), with the prediction in words.")
        batch_grid(live, run.record.classes, f"{attack.upper()} eps {eps:.3g}")
else:
    corruption_panel.show(selected)
