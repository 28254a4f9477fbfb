"""Attribution explorer (for clinicians): what a model looks at on a lesion image, clean and perturbed."""
import streamlit as st
import torch

from dashboard import charts
from dashboard.state import comparable_runs, model, run_data, unreadable
from dashboard.tables import certificate_text, image_certificate
from dashboard.compute import EXPLORER_STEPS, corrupted_explanation, explanation, predictions
from dashboard.widgets import (choose_runs, data_spec_input, eps_slider, run_picker, thumbnail_picker,
                               training_split_filter, trust_notice)
from dpaat_core.store import runs
from dpaat_core.attack.attacks import ATTACKS
from dpaat_core.evaluate.corruptions import NAMES, SEVERITIES, describe
from dpaat_core.evaluate.attribution import (METHODS, colour_bar, method_label, overlay, perturbation_image,
                                    prediction_sentence, spearman, ssim, topk_iou)
from dpaat_core.data import DataError
from dpaat_core.data.images import decode_upload
from dpaat_core.evaluate.robustness import reference_eps

st.title("Attribution explorer")
data_spec_input()
pick = st.session_state.pop("explorer_pick", None)   # an image clicked in the gallery: open on it
if pick is not None:
    choose_runs([pick["run"]])
    st.session_state.pop("run_picker_one", None)
    st.session_state["explorer_picked"] = pick | {"n": st.session_state.get("explorer_picked", {}).get("n", 0) + 1}
picked_image = st.session_state.get("explorer_picked", {"n": 0})
fresh = f"-{picked_image['n']}"    # widgets made anew, with the picked image's settings, after each gallery click
picked = run_picker("Model (run)", multi=False)
usable = [r for r in picked if r.has_weights]
if not usable:
    st.info("Pick a run with trained weights in the sidebar.")
    st.stop()
run = usable[0]
if model(run) is None:   # unreadable weights: the warning says which run, the rest of the app works
    st.stop()
classes = run.record.classes
trust_notice(run)
size, channels = run.record.dataset.image_size, run.record.dataset.in_channels

SOURCES = ["Test split", "Training split (fragile or stable in training)", "Upload a JPEG or PNG"]
source = st.radio("Image", SOURCES, horizontal=True, key=f"source{fresh}",
                  index=1 if picked_image.get("split") == "train" else 0)
x, label, image_index, data = None, None, 0, None   # an upload is corrupted with index 0's draw
if source == SOURCES[2]:
    upload = st.file_uploader("Lesion image (read in memory only: never saved or sent anywhere)", type=["jpg", "jpeg", "png"])
    if upload is not None:
        try:
            x = torch.from_numpy(decode_upload(upload.getvalue(), size, channels)).float()[None] / 255
        except DataError as exc:
            st.error(f"This file cannot be used: {exc}")
else:
    split = "test" if source == SOURCES[0] else "train"
    data = run_data(run, split)
    if data is not None:
        table = predictions(run, data, split)
        c1, c2, c3 = st.columns(3)
        wanted = c1.multiselect("Classes", classes, default=classes, key=f"classes{fresh}")
        outcome = c2.radio("Prediction", ["all", "correct", "wrong"], horizontal=True, key=f"outcome{fresh}")
        rows = table[table["class"].isin(wanted)]
        if outcome != "all":
            rows = rows[(rows.pred == rows.label) == (outcome == "correct")]
        last, wanted_split = training_split_filter(run, data, split, c3, key=f"in-training{fresh}")
        if wanted_split != "all":
            rows = rows[rows["index"].map(last) == wanted_split]
        if rows.empty:
            st.info("No image matches these filters.")
        else:
            options = rows["index"].tolist()
            wanted_image = picked_image.get("index") if picked_image.get("split") == split else None
            index = st.selectbox("Image", options, key=f"image{fresh}",
                                 index=options.index(wanted_image) if wanted_image in options else 0,
                                 format_func=lambda i: f"#{i} · {table['class'][i]} · predicted {classes[table['pred'][i]]}")
            thumbnail_picker(data, options, table, classes, f"image{fresh}")
            x, y = data.batch([index])
            label, image_index = int(y[0]), int(index)
if x is None:
    st.stop()
certificate = image_certificate(run, image_index) if source == SOURCES[0] else None

c1, c2, c3 = st.columns(3)
kind = c1.selectbox("Perturbation", [*ATTACKS, "natural corruption"],
                    format_func=lambda k: k if k == "natural corruption" else f"attack: {ATTACKS[k].label}")
if kind == "natural corruption":
    corruption = c2.selectbox("Corruption", NAMES, index=NAMES.index("defocus_blur"),
                              format_func=lambda n: n.replace("_", " "))
    severity = c3.select_slider("Severity", SEVERITIES, value=3)
    st.caption(f"{describe(corruption, int(severity), size)} (MedMNIST-C's dermoscopy set; the image's own seeded draw)")
else:
    attack = kind
    norm = c2.selectbox("Norm", ["l2", "linf"])
    eps0 = reference_eps(run.record, norm)
    eps = eps_slider(c3, eps0)
    if certificate is not None and norm == "l2":   # the slider's scale with the image's guarantee on it
        c3.plotly_chart(charts.radius_strip(eps, certificate["radius"], 4 * eps0), key="radius-strip",
                        config={"displayModeBar": False})
        c3.caption("green: the image's certified l2 radius; line: the eps above (orange when outside it)")
    st.caption(f"{ATTACKS[attack].label} at eps {eps:.4f} ({norm}) with {EXPLORER_STEPS if attack != 'fgsm' else 1} step(s), "
               "as `python -m dpaat_core attribute` uses for the run's attribution.csv.")
methods = st.multiselect("Attribution maps", list(METHODS), default=["gradcam", "saliency"], format_func=method_label)
candidates = comparable_runs(run)
v1, v2, v3 = st.columns([2, 1, 1])
compare = v1.selectbox("Compare with another run (same classes), side by side", ["none", *candidates])
alpha = v2.slider("Map opacity", 0.0, 1.0, 0.5, 0.05, key="map-opacity",
                  help="0: the image alone; 1: the map alone")
mask = data.mask(image_index) if source != SOURCES[2] and data is not None else None
outlined = v3.toggle("Lesion outline", value=mask is not None, disabled=mask is None, key="map-outline",
                     help="the lesion mask's edge in cyan" if mask is not None else "this image has no lesion mask")
v3.image(colour_bar(), caption="map: low → high", width="stretch")
after = (f"{corruption.replace('_', ' ')} at severity {severity}" if kind == "natural corruption"
         else f"{attack.upper()} eps {eps:.3g}")


def explain(r, where) -> None:
    """Clean, perturbed and perturbation images, the prediction in words and as bars, and the maps with their
    agreement, for run ``r`` in the container ``where`` (a column when two runs are compared)."""
    out = (corrupted_explanation(r, x, image_index, corruption, severity, methods) if kind == "natural corruption"
           else explanation(r, x, label, attack, norm, eps, methods, image_index if source != SOURCES[2] else None))
    if out is None:
        return
    where.markdown(f"**{prediction_sentence(classes, out['prob_clean'], label, out['prob_adv'], after)}**")
    x_adv = torch.from_numpy(out["x_adv"])
    for col, img, cap in zip(where.columns(3), (x, x_adv, perturbation_image(x, x_adv)),
                             ("clean", after if kind == "natural corruption" else f"perturbed at eps {eps:.4f}",
                              "change (amplified)")):
        col.image(img[0].permute(1, 2, 0).numpy(), caption=cap, width="stretch", clamp=True)
    where.plotly_chart(charts.probability_chart(classes, out["prob_clean"], out["prob_adv"],
                                                "corrupted" if kind == "natural corruption" else "perturbed"),
                       key=f"p-{r.run_id}")
    edge = mask if outlined else None
    for method, (a, b) in out["maps"].items():                      # both maps explain the clean prediction
        cols = where.columns([1, 1, 1])
        cols[0].image(overlay(x[0], a, alpha, mask=edge), caption=f"{method_label(method)}: clean", width="stretch")
        cols[1].image(overlay(x_adv[0], b, alpha, mask=edge), width="stretch",
                      caption=f"{method_label(method)}: {'corrupted' if kind == 'natural corruption' else 'perturbed'}")
        cols[2].metric("rank agreement (Spearman)", f"{spearman(a, b):.2f}")
        cols[2].caption(f"top-10% overlap {topk_iou(a, b):.2f} · SSIM {ssim(a, b):.2f}"
                        if min(a.shape) >= 11 else f"top-10% overlap {topk_iou(a, b):.2f}")


if certificate is not None:
    st.markdown(certificate_text(certificate, classes))
panes = st.columns(2) if compare != "none" else [st.container()]
for pane, shown in zip(panes, [run, *([candidates[compare]] if compare != "none" else [])]):
    pane.subheader(f"{shown.run_id} · {shown.method}")
    explain(shown, pane)

try:
    summary = runs.read_attribution(run.path)
except runs.RunError as exc:
    unreadable("The run's attribution numbers", exc)
else:
    if len(summary):
        with st.expander(f"{run.run_id} across the test split (`attribution.csv`)", expanded=False):
            st.dataframe(summary.pivot_table(index="metric", columns="method", values="mean", sort=False),
                         width="stretch", column_config=None)
            st.caption(f"Means over {int(summary['n'].max())} test images, clean vs {summary['norm'].iloc[0] if 'norm' in summary else 'l2'} "
                       "PGD at the training eps. `energy_*`: share of the map on the lesion mask; `energy_other_mask`: "
                       "the same map on another image's mask (the centre-bias baseline); `pointing_*`: the map's peak "
                       "lies on the lesion.")
