"""The gallery's numbers: every image's row, the same maps redrawn for any page, and the sorts, filters and
summaries the page shows."""
import numpy as np
import pandas as pd
import pytest

from dpaat_core.evaluate import gallery
from dpaat_core.evaluate.attribution import energy_in_mask, spearman
from dpaat_core.data import load_dataset
from dpaat_core.models import build_model


@pytest.fixture(scope="module")
def setting():
    import torch
    torch.manual_seed(0)
    data = load_dataset("synthetic:n=60,classes=3", "test", 16)
    model = build_model("resnet8", num_classes=3).eval()
    return model, data, gallery.image_numbers(model, data, 0.3, "gradcam", steps=2, batch_size=5)


def test_every_image_has_its_row_and_a_page_redraws_its_maps(setting):
    model, data, table = setting
    assert list(table["index"]) == list(range(len(data)))
    page = [7, 2, 11, 4]                                     # any images, any order: the same maps as in the table
    maps = gallery.page_maps(model, data, page, 0.3, "gradcam", steps=2)
    rows = table.set_index("index").loc[page]
    np.testing.assert_allclose(spearman(maps["map_clean"], maps["map_adv"]), rows["spearman"], atol=1e-5)
    np.testing.assert_allclose(energy_in_mask(maps["map_clean"], data.masks[page]), rows["energy_clean"], atol=1e-5)
    np.testing.assert_allclose(energy_in_mask(maps["map_adv"], data.masks[page]), rows["energy_adv"], atol=1e-5)
    seen, first = [], []
    whole = gallery.image_numbers(model, data, 0.3, "gradcam", steps=2, batch_size=7,   # other batches, same rows
                                  callback=lambda done, total: seen.append((done, total)),
                                  first_batch=lambda rows: first.append((rows.copy(), len(seen))))
    assert seen[-1] == (len(data), len(data)) and {t for _, t in seen} == {len(data)}       # one total, counted up
    assert len(first) == 1 and first[0][1] == 1                  # once, counted, before the second batch starts
    assert first[0][0]["index"].tolist() == list(range(7))                # the first batch's rows, as computed
    pd.testing.assert_frame_equal(first[0][0], whole.iloc[:7])
    single = []                                 # a split in one batch: nothing to show early
    gallery.image_numbers(model, data, 0.3, "gradcam", steps=2, batch_size=len(data), first_batch=single.append)
    assert single == []
    assert [d for d, _ in seen] == sorted(d for d, _ in seen) and seen[0][0] > 0
    np.testing.assert_allclose(whole["energy_other_mask"], table["energy_other_mask"], atol=1e-6)
    assert maps["x"].shape == (4, 3, 16, 16) and maps["map_clean"].shape == (4, 16, 16)


def _table():
    return pd.DataFrame({"index": [0, 1, 2, 3, 4], "label": [0, 1, 1, 2, 0], "pred_clean": [0, 2, 1, 0, 1],
                         "confidence_clean": [0.9, 0.6, 0.7, 0.95, 0.5], "spearman": [0.9, 0.2, np.nan, 0.5, 0.1],
                         "energy_clean": [0.7, 0.1, 0.3, np.nan, 0.6], "energy_other_mask": [0.2, 0.6, 0.4, 0.3, 0.1]})


def test_each_sort_puts_the_images_that_need_a_look_first():
    t = _table()
    assert gallery.order(t, "looks away from the lesion")["index"].tolist() == [1, 2, 4, 0, 3]   # no mask: last
    assert gallery.order(t, "attention moves under attack")["index"].tolist() == [4, 1, 3, 0, 2]
    assert gallery.order(t, "confidently wrong")["index"].tolist() == [3, 1, 4]                   # wrong ones only
    assert gallery.order(t.iloc[::-1], "index")["index"].tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="unknown sort 'x'"):
        gallery.order(t, "x")
    with pytest.raises(ValueError, match="no lesion masks"):
        gallery.order(t.drop(columns="energy_clean"), "looks away from the lesion")


def test_filters_by_class_outcome_and_training_split():
    t = _table()
    assert gallery.select(t, [1])["index"].tolist() == [1, 2]
    assert gallery.select(t, None, "wrong")["index"].tolist() == [1, 3, 4]
    assert gallery.select(t, [0, 1], "correct")["index"].tolist() == [0, 2]
    fragile = pd.Series(["fragile", "stable", "fragile", "stable", "stable"], index=range(5))
    assert gallery.select(t, None, "all", fragile, "fragile")["index"].tolist() == [0, 2]


def test_the_summary_counts_maps_off_the_lesion_per_class_against_chance():
    s = gallery.off_lesion_summary(_table(), ["a", "b", "c"]).set_index("class")
    assert s.loc["a", "images"] == 2 and s.loc["a", "off_lesion"] == 0 and s.loc["a", "chance_share"] == 1.0
    assert s.loc["b", "off_lesion"] == 2 and s.loc["b", "off_lesion_share"] == 1.0
    assert "c" not in s.index                                                # its one image has no mask
    assert s.loc["all", "images"] == 4 and s.loc["all", "off_lesion"] == 2 and s.loc["all", "chance_share"] == 0.75
    assert gallery.off_lesion_summary(_table().drop(columns="energy_clean"), ["a", "b", "c"]).empty


def test_two_runs_are_compared_on_the_images_both_have():
    a = _table()
    b = a.assign(energy_clean=[0.2, 0.8, 0.3, 0.9, 0.7])
    diff = gallery.compare(a, b)
    assert diff["only_a"] == [0] and diff["only_b"] == [1] and diff["both"] == 1 and diff["neither"] == 1
    assert diff["images"] == 4                                               # image 3 has no mask in a
