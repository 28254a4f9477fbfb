"""Gallery (for clinicians): a test set's attribution maps at once, worst cases first; click one to explain it."""
import numpy as np
import streamlit as st

from dashboard import charts
from dashboard.state import comparable_runs, model, run_data
from dashboard.tables import certified
from dashboard.compute import EXPLORER_STEPS, GALLERY_PAGE, gallery_eps, gallery_maps, gallery_numbers
from dashboard.widgets import data_spec_input, run_picker, training_split_filter, trust_notice
from dpaat_core.evaluate import gallery
from dpaat_core.evaluate.class_robustness import balanced, weakest_sentence
from dpaat_core.evaluate.attribution import colour_bar, enlarged, method_label, overlay, prediction_words

st.title("Gallery")
data_spec_input()
picked = [r for r in run_picker("Model (run)", multi=False) if r.has_weights]
if not picked or model(picked[0]) is None:
    st.info("Pick a run with trained weights in the sidebar.")
    st.stop()
run = picked[0]
classes = run.record.classes
st.caption("Every image of a split with its map on the clean image and on the attacked one (PGD-"
           f"{EXPLORER_STEPS}, l2, the run's training eps: the explorer's setting), sorted so that the images that "
           "need a look come first. Uploaded images are explained one at a time in the Attribution explorer; the "
           "gallery is for a run's own splits.")

c1, c2, c3 = st.columns(3)
split = "test" if c1.radio("Images", ["Test split", "Training split"], horizontal=True) == "Test split" else "train"
method = c2.selectbox("Map", ["gradcam", "saliency"], format_func=method_label,
                      help="Grad-CAM: fast and coarse; saliency: pixel gradients")
others = comparable_runs(run)
compare_id = c3.selectbox("Compare with (same images, same order)", ["none", *others])
data = run_data(run, split)
if data is None:
    st.stop()


# --- the grid: the first page while the numbers are computed, then the sorted pages -------------------------------
def certificate_caption(row) -> str:
    """`` · r 0.31 (mel)``: the certified l2 radius and the class it guarantees (the smoothed model's, which may
    differ from the clean prediction); `` · abstains``; nothing for an image that was not certified."""
    if getattr(row, "certified_prediction", None) is None or row.certified_prediction != row.certified_prediction:
        return ""
    if row.certified_prediction < 0:
        return " · abstains"
    return f" · r {row.radius:.2f} ({classes[int(row.certified_prediction)]})"


def tile_caption(row) -> str:
    """``#12 · Predicted nv 81% ✓ → ... · lesion 64% · ρ 0.71``: the prediction in words and the map's numbers."""
    lesion = f" · lesion {row.energy_clean:.0%}" if hasattr(row, "energy_clean") and row.energy_clean == row.energy_clean else ""
    said = prediction_words(classes, row.pred_clean, row.confidence_clean, row.label, row.pred_adv,
                            row.confidence_adv, "attack")
    return f"#{row.index} · {said}{lesion} · ρ {row.spearman:.2f}{certificate_caption(row)}"


def pair(maps: dict, k: int, index: int, alpha: float, outlined: bool) -> np.ndarray:
    gap = np.full((maps["x"].shape[-2], 2, 3), 255, np.uint8)
    edge = data.mask(index) if outlined else None
    return np.concatenate([overlay(maps["x"][k], maps["map_clean"][k], alpha, mask=edge), gap,
                           overlay(maps["x_adv"][k], maps["map_adv"][k], alpha, mask=edge)], axis=1)


@st.dialog("One image, large", width="large")
def show_large(tile: np.ndarray, caption: str):
    st.image(enlarged(tile), caption=caption, width="stretch")
    st.image(colour_bar(), caption=f"{method_label(method)}: low → high", width="stretch")


def draw_grid(shown, alpha: float, outlined: bool, other=None, numbers_b=None, buttons: bool = True) -> None:
    """Four tiles a row: each image's clean and attacked maps (above those of ``other``, when compared), its caption
    and, with ``buttons``, Enlarge and Explore."""
    maps = gallery_maps(run, data, split, shown["index"].tolist(), method)
    maps_b = gallery_maps(other, data, split, shown["index"].tolist(), method) if other is not None else None
    by_index_b = numbers_b.set_index("index") if numbers_b is not None else None
    cols = st.columns(4)
    for k, row in enumerate(shown.itertuples(index=False)):
        tile = pair(maps, k, int(row.index), alpha, outlined)
        if maps_b is not None:
            tile = np.concatenate([tile, np.full((2, tile.shape[1], 3), 255, np.uint8),
                                   pair(maps_b, k, int(row.index), alpha, outlined)], axis=0)
        caption = tile_caption(row)
        if by_index_b is not None and row.index in by_index_b.index:
            b = by_index_b.loc[row.index]
            caption += f" | {classes[int(b.pred_clean)]} ({b.confidence_clean:.0%})" + (
                f" · lesion {b.energy_clean:.0%}" if "energy_clean" in b and b.energy_clean == b.energy_clean else "")
        with cols[k % 4]:
            st.image(tile, caption=caption, width="stretch")
            if not buttons:
                continue
            large, explore = st.columns(2)
            if large.button("Enlarge", key=f"large-{row.index}", icon=":material/zoom_in:", width="stretch",
                            help="this image and its maps, large"):
                show_large(tile, caption)
            if explore.button("Explore", key=f"open-{row.index}", icon=":material/open_in_new:", width="stretch",
                              help="open this image in the Attribution explorer"):
                st.session_state["explorer_pick"] = {"run": run.run_id, "split": split, "index": int(row.index)}
                st.switch_page("views/attribution.py")


early = []


def first_page(rows) -> None:
    """The first page, in the split's order, while the other images are explained (cleared once they are)."""
    early.append(st.empty())
    with early[-1].container():
        st.caption(f"The first {len(rows)} of {len(data)} images, in the split's order, while the others are "
                   "explained; the sorted pages follow.")
        draw_grid(rows, 0.5, data.masks is not None, buttons=False)


numbers, source = gallery_numbers(run, data, split, method, first_page)
for slot in early:
    slot.empty()
if numbers is None:
    st.stop()
st.caption(f"Numbers {source}.")
trust_notice(run, method, numbers)
other = others.get(compare_id)
numbers_b = gallery_numbers(other, data, split, method)[0] if other is not None else None

# --- the summary ---------------------------------------------------------------------------------------------
summary = gallery.off_lesion_summary(numbers, classes)
if len(summary):
    total = summary.set_index("class").loc["all"]
    m1, m2, m3 = st.columns(3)
    m1.metric("maps mostly off the lesion", f"{int(total.off_lesion)} of {int(total.images)}",
              help=f"less than {gallery.OFF_LESION:.0%} of the map's positive mass on the lesion mask")
    m2.metric("at chance", f"{total.chance_share:.0%}", help="the same maps scored on another image's mask: what a "
                                                            "map that ignores the lesion gets, lesions sitting "
                                                            "near the centre")
    m3.metric("wrong predictions", f"{int((numbers.pred_clean != numbers.label).sum())}")
    st.plotly_chart(charts.off_lesion_chart(summary[summary["class"] != "all"]), key="off-lesion")
else:
    st.info("These images have no lesion masks: the lesion-share sort and summary are not available.")
by_class = gallery.class_outcomes(numbers, classes)
if len(summary):
    by_class = by_class.merge(summary[["class", "off_lesion_share"]], on="class", how="left")
labels = {"accuracy": "clean accuracy", "robust_accuracy": "robust accuracy", "off_lesion_share": "maps off the lesion"}
percent = {c: st.column_config.NumberColumn(label, format="percent") for c, label in labels.items()}
st.dataframe(by_class, hide_index=True, width="stretch", key="per-class", column_config={"n": "images", **percent})
st.caption(f"Robust: right on the clean image and on the attacked one (PGD-{EXPLORER_STEPS}, l2, eps "
           f"{gallery_eps(run):g}); robust balanced accuracy {balanced(by_class):.2f}. **Weakest class** · "
           f"{weakest_sentence(run.run_id, by_class)}.")
only = "all"
if numbers_b is not None and "energy_clean" in numbers and "energy_clean" in numbers_b:
    diff = gallery.compare(numbers, numbers_b)
    st.markdown(f"**{run.run_id}** looks at the lesion where **{compare_id}** does not on **{len(diff['only_a'])}** "
                f"images, the other way round on **{len(diff['only_b'])}**; both on {diff['both']}, neither on "
                f"{diff['neither']} (of {diff['images']}).")
    only = st.radio("Show", ["all", f"only {run.run_id} on the lesion", f"only {compare_id} on the lesion"],
                    horizontal=True)

# --- sorting, filters, paging ---------------------------------------------------------------------------------
if split == "test":
    numbers = gallery.with_certificates(numbers, certified(run, "test", data.source.spec))
sorts = [s for s in gallery.SORTS if (s != "looks away from the lesion" or "energy_clean" in numbers)
         and (s != "smallest certified radius" or "radius" in numbers)]
f1, f2, f3, f4 = st.columns([2, 2, 2, 2])
sort = f1.selectbox("Sort", sorts, format_func=lambda s: f"{s}: {gallery.SORTS[s]}")
wanted = f2.multiselect("Classes", classes, default=classes)
outcome = f3.radio("Prediction", ["all", "correct", "wrong"], horizontal=True)
in_training, training_split = training_split_filter(run, data, split, f4)
rows = gallery.select(gallery.order(numbers, sort), [classes.index(c) for c in wanted], outcome, in_training,
                      training_split)
if only != "all":
    rows = rows[rows["index"].isin(diff["only_a"] if only.startswith(f"only {run.run_id}") else diff["only_b"])]
if rows.empty:
    st.info("No image matches these filters.")
    st.stop()
p1, p2, p3, p4 = st.columns([1, 1, 1, 2])
per_page = GALLERY_PAGE
pages = (len(rows) + per_page - 1) // per_page
page = p1.number_input(f"Page (of {pages})", 1, pages, 1)
alpha = p2.slider("Map opacity", 0.0, 1.0, 0.5, 0.05, key="gallery-opacity")
outlined = p3.toggle("Lesion outline", value=data.masks is not None, disabled=data.masks is None,
                     key="gallery-outline")
p4.image(colour_bar(), caption=f"{method_label(method)}: low → high", width="stretch")
st.caption(f"{len(rows)} images · {per_page} per page · left: clean, right: attacked"
           + (f" · top: {run.run_id}, bottom: {compare_id}" if other is not None else "")
           + (" · cyan: the lesion's outline" if outlined else ""))
shown = rows.iloc[(page - 1) * per_page: page * per_page]

# --- the sorted page -----------------------------------------------------------------------------------------------
draw_grid(shown, alpha, outlined, other, numbers_b)
