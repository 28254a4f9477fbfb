"""The dashboard starts, and its pages render against a real run store (made by the fixtures)."""
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from dpaat_core.config import RunConfig, method_config
from dpaat_core.train.loop import train

APP = Path(__file__).resolve().parents[1] / "dashboard" / "app.py"


def test_dashboard_starts_and_its_navigation_reaches_every_page(tmp_path, monkeypatch):
    monkeypatch.setenv("DPAAT_STORE", str(tmp_path))          # an empty store: every page still opens
    at = AppTest.from_file(str(APP), default_timeout=60).run()
    assert not at.exception
    assert at.title[0].value == "DPAAT Lab"
    for script, title in (("runs", "Runs"), ("dynamics", "Training dynamics"), ("robustness", "Robustness"),
                          ("attribution", "Attribution explorer"), ("gallery", "Gallery"), ("tuning", "Tuning"),
                          ("train", "Train")):
        at.switch_page(f"views/{script}.py").run()            # raises for a page the navigation does not register
        assert not at.exception and at.title[0].value == title, script


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store with one finished DPAAT run, one corrupt folder and one incomplete one."""
    path = tmp_path_factory.mktemp("store")
    cfg = RunConfig().replace(data={"spec": "synthetic:n=32,classes=3", "image_size": 16}, attack={"steps": 1},
                              method=method_config("dpaat"), train={"epochs": 3, "batch_size": 16, "device": "cpu"})
    train(cfg, store=path, run_id="small-dpaat")
    train(cfg.replace(method=method_config("pgd_at")), store=path, run_id="small-pgd")
    (path / "broken").mkdir()
    (path / "broken" / "config.json").write_text("{oops")
    (path / "empty").mkdir()
    return path


def _page(store, monkeypatch, page: str) -> AppTest:
    """The app against ``store``, switched to ``views/<page>.py``, rendered without an exception."""
    monkeypatch.setenv("DPAAT_STORE", str(store))
    at = AppTest.from_file(str(APP), default_timeout=120).run()
    at.switch_page(f"views/{page}.py").run()
    assert not at.exception, at.exception
    return at


def test_runs_page_lists_good_and_bad_runs(store, monkeypatch):
    at = _page(store, monkeypatch, "runs")
    assert at.title[0].value == "Runs"
    table = at.dataframe[0].value
    assert set(table.run_id) == {"small-dpaat", "small-pgd", "broken", "empty"}
    good = table.set_index("run_id").loc["small-dpaat"]
    assert good.state == "done" and good.method == "dpaat" and good.epochs == "3/3"
    warnings = " ".join(w.value for w in at.warning)
    assert "broken** is corrupt" in warnings and "config.json" in warnings and "empty** is incomplete" in warnings
    assert sorted(at.multiselect[0].options) == ["small-dpaat", "small-pgd"]   # only readable runs are offered
    scores = table.set_index("run_id")["val_balanced_accuracy"]
    opened = at.multiselect[0].value
    assert len(opened) == 1 and scores[opened[0]] == scores[["small-dpaat", "small-pgd"]].max()   # the better model
    assert len(at.get("plotly_chart")) == 1
    at.multiselect[0].set_value(["small-dpaat", "small-pgd"]).run()           # compare two runs: one chart
    assert not at.exception and len(at.get("plotly_chart")) == 1
    import json
    figure = json.loads(at.get("plotly_chart")[0].proto.spec)
    names = {t["name"] for t in figure["data"] if t.get("showlegend", True) is not False}
    assert names == {"dpaat · resnet8 · seed 0", "pgd_at · resnet8 · seed 0"}      # short labels, legend below
    assert figure["layout"]["legend"]["orientation"] == "h"
    assert sorted(e.label.split(" · ")[0] for e in at.expander) == ["Settings of small-dpaat", "Settings of small-pgd"]


def test_home_summarises_the_store_and_says_where_each_kind_of_user_starts(store, monkeypatch):
    monkeypatch.setenv("DPAAT_STORE", str(store))
    at = AppTest.from_file(str(APP), default_timeout=60).run()
    assert not at.exception
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["finished models"] == "2" and metrics["methods"] == "2" and metrics["runs in the store"] == "4"
    assert [h.value for h in at.subheader] == ["Clinicians: start here", "Researchers: start here"]
    assert any(w.value.startswith("Balanced accuracy") for w in [*at.warning, *at.info])   # the trust line


def test_runs_page_shows_the_reproduction_study_table(tmp_path, store, monkeypatch):
    import shutil

    import pandas as pd

    from dpaat_core.evaluate import reproduction

    study = tmp_path / "store"
    shutil.copytree(store / "small-dpaat", study / "small-dpaat")
    rows = [{"study": s, "variant": v, "seed": seed, **{m: 0.4 + 0.01 * seed for m, _ in reproduction.METRICS}}
            for s in ("main64", "main28") for v in ("pgd_at", "dpaat") for seed in range(3)]
    pd.DataFrame(rows).to_csv(study / reproduction.REPRODUCTION_FILE, index=False)
    at = _page(study, monkeypatch, "runs")
    assert "Reproduction study" in [h.value for h in at.subheader]
    assert at.selectbox[0].options == ["main64", "main28"]
    table = at.dataframe[1].value.set_index("variant")
    assert table.loc["dpaat", "PGD-20"] == "41.0 ± 1.0" and table.loc["dpaat", "seeds"] == 3
    assert table.loc["pgd_at", "paper PGD-20 (ResNet34, 224 px)"] == "63.14"
    (study / reproduction.REPRODUCTION_FILE).write_text("study,variant\nx,y\n")   # a damaged file: a warning
    at = _page(study, monkeypatch, "runs")
    assert any("study table cannot be read" in w.value and "missing columns" in w.value for w in at.warning)


def test_runs_page_says_when_the_store_is_empty(tmp_path, monkeypatch):
    at = _page(tmp_path / "nothing-here", monkeypatch, "runs")
    assert "No runs in" in at.info[0].value


def test_dynamics_page_shows_the_selected_epoch(store, monkeypatch):
    at = _page(store, monkeypatch, "dynamics")
    at.selectbox(key="run_picker_one").set_value("small-dpaat").run()
    assert at.title[0].value == "Training dynamics" and at.selectbox[0].value == "small-dpaat"
    assert at.select_slider[0].value == 3                                    # opens on the last epoch
    charts = at.get("plotly_chart")
    assert len(charts) == 5                      # histogram, fragile fraction, eps, transition heat map, trajectory
    at.select_slider[0].set_value(1).run()
    assert not at.exception and at.select_slider[0].value == 1
    at.number_input[0].set_value(3).run()
    assert not at.exception and len(at.get("image")) == 1


def test_robustness_page_computes_saves_and_draws_curves(store, monkeypatch):
    from dpaat_core.store import runs
    at = _page(store, monkeypatch, "robustness")
    at.multiselect[0].set_value(["small-dpaat"]).run()
    assert at.title[0].value == "Robustness"
    view = at.radio(key="robustness-view")
    assert view.options == ["Adversarial attacks", "Natural corruptions"]
    assert [m.label for m in at.metric] == ["clean accuracy", "robust accuracy", "robust balanced accuracy",
                                            "per-pixel RMS"]
    view.set_value("Natural corruptions").run()               # only the view on show runs
    assert [m.label for m in at.metric] == ["clean accuracy", "accuracy under the corruption"]
    at.radio(key="robustness-view").set_value("Adversarial attacks").run()
    import os
    import time

    from dpaat_core.cli import launch
    button = next(b for b in at.button if "Compute the PGD-20 l2 curve of small-dpaat" in b.label)
    button.click().run()
    assert not at.exception, at.exception
    job = launch.evaluating(store / "small-dpaat")          # a process of its own computes and writes the curve
    assert job is not None and job["pid"] != os.getpid() and "evaluate" in job["argv"]
    at.run()
    assert not [b for b in at.button if "Compute the PGD" in b.label]        # no second start while it runs
    deadline = time.time() + 300
    while launch.evaluating(store / "small-dpaat") is not None:
        assert time.time() < deadline
        time.sleep(0.5)
    at.run()
    saved = runs.read_robustness(store / "small-dpaat")
    assert len(saved) == 8 and (saved.attack == "pgd").all()
    assert "wrote" in (store / ".logs" / "small-dpaat.evaluate.log").read_text()
    assert _titles(at) == ["Accuracy under attack", PER_CLASS]
    assert not [b for b in at.button if "Compute the PGD" in b.label]
    assert any("small-dpaat: the saved curve (robustness.csv, " in c.value for c in at.caption)   # at the curve's eps
    counts = [int(re.search(r"n=(\d+)", x).group(1)) for x in _per_class(at)[0].x]             # the curve's own counts
    assert sum(counts) == saved.n.max()
    at.slider[0].set_value(0.0).run()                        # eps 0: nothing changes
    assert at.metric[1].value == at.metric[0].value
    from dpaat_core.store import loading
    batch = min(16, len(loading.load_run_data(store / "small-dpaat", "test")))   # the page's 16, or the whole split
    tiles = at.get("image")
    assert len(tiles) == batch                                 # every image attacked, clean beside attacked
    captions = [c for t in tiles for c in t.captions]
    assert sorted(int(c.split(" · ")[0][1:]) for c in captions) == list(range(batch))   # (laid out column by column)
    assert all(" · Predicted " in c and ("changed" in c or "unchanged" in c) for c in captions)


PER_CLASS = "Accuracy per class, clean and under attack"


def _titles(at) -> list:
    import plotly.io
    return [plotly.io.from_json(c.proto.spec).layout.title.text for c in at.get("plotly_chart")]


def _per_class(at):
    """The traces of the page's per-class chart."""
    import plotly.io
    return next(f for f in (plotly.io.from_json(c.proto.spec) for c in at.get("plotly_chart"))
                if f.layout.title.text == PER_CLASS).data


def test_robustness_page_draws_each_classs_robust_accuracy_and_names_the_weakest(store, tmp_path, monkeypatch):
    """Nothing saved: the chart holds the live batch's numbers (the metrics above it, class by class); with an audit
    at the slider's eps: the audit's per_class.csv, its counts on the axis and its weakest class in the caption."""
    import shutil

    import pandas as pd

    from dpaat_core.evaluate import audit
    from dpaat_core.store import loading, runs
    from dpaat_core.evaluate.robustness import reference_eps
    own = tmp_path / "store"
    shutil.copytree(store / "small-dpaat", own / "small-dpaat", ignore=shutil.ignore_patterns("*.csv"))
    at = _page(own, monkeypatch, "robustness")
    at.multiselect[0].set_value(["small-dpaat"]).run()
    assert PER_CLASS in _titles(at)
    clean, robust = _per_class(at)
    n = np.array([int(re.search(r"n=(\d+)", x).group(1)) for x in clean.x])
    assert n.sum() == min(16, len(loading.load_run_data(own / "small-dpaat", "test")))       # the live batch
    metric = {m.label: m.value for m in at.metric}
    assert metric["clean accuracy"] == f"{np.nansum(n * _array(clean.y)) / n.sum():.2f}"       # a class not in the
    assert metric["robust accuracy"] == f"{np.nansum(n * _array(robust.y)) / n.sum():.2f}"     # batch has no bar
    assert metric["robust balanced accuracy"] == f"{np.nanmean(_array(robust.y)[n > 0]):.2f}"
    assert any(c.value.startswith("Figures from small-dpaat: this batch") for c in at.caption)

    record = runs.read_record(own / "small-dpaat")
    classes, where = record.classes, dict(split="test", data=record.spec)
    per_class = pd.DataFrame({"class": classes, "n": [40, 25, 5], "accuracy": [0.9, 0.8, 0.6],
                              "robust_accuracy": [0.71, 0.5, 0.12], "average_precision": 0.5, "preset": "pgd20_l2",
                              "class_index": [0, 1, 2], **where})
    protocol = pd.DataFrame([{"preset": "pgd20_l2", "eps": reference_eps(record, "l2"), "accuracy": 0.84,
                              "robust_accuracy": 0.6, **where}])
    audit.save_protocol(own / "small-dpaat", protocol, per_class)
    at.run()
    assert not at.exception
    clean, robust = _per_class(at)
    assert list(clean.x) == [f"{classes[0]} (n=40)", f"{classes[1]} (n=25)", f"{classes[2]} (n=5)"]
    np.testing.assert_allclose(_array(robust.y), [0.71, 0.5, 0.12])
    np.testing.assert_allclose(_array(clean.y), [0.9, 0.8, 0.6])
    text = " ".join(c.value for c in at.caption)
    assert f"small-dpaat: robust accuracy 0.12 on {classes[2]} against 0.71 on {classes[0]}" in text
    assert "Figures from small-dpaat: the audit (per_class.csv, 70 images)" in text
    at.slider[0].set_value(0.0).run()                         # an eps the audit did not run at: the live batch again
    assert any(c.value.startswith("Figures from small-dpaat: this batch") for c in at.caption)


def test_attribution_explorer_explains_a_test_image_and_compares_runs(store, monkeypatch):
    at = _page(store, monkeypatch, "attribution")
    at.selectbox(key="run_picker_one").set_value("small-dpaat").run()
    assert at.title[0].value == "Attribution explorer"
    thumbs = len([b for b in at.button if b.label == "Pick"])
    images = len(at.get("image")) - thumbs          # the thumbnail picker's page, besides
    assert images == 1 + 3 + 2 * 2                  # colour bar; clean, perturbed, perturbation; 2 maps x 2
    assert 0 < thumbs <= 12
    rho = [m for m in at.metric if m.label.startswith("rank agreement")]
    assert len(rho) == 2 and all(-1 <= float(m.value) <= 1 for m in rho)
    at.slider[0].set_value(0.0).run()               # eps 0: the perturbed map is the clean map
    assert all(float(m.value) == 1.0 for m in at.metric if m.label.startswith("rank agreement"))
    compare = next(s for s in at.selectbox if s.label.startswith("Compare with another run"))
    other = next(o for o in compare.options if o != "none")
    compare.set_value(other).run()                  # a second run on the same image, side by side
    assert not at.exception and len(at.get("image")) - thumbs == 1 + 2 * (3 + 2 * 2)
    assert any(h.value.startswith(f"{other} · ") for h in at.subheader)
    at.radio[1].set_value("wrong").run()
    assert not at.exception
    at.radio[0].set_value("Training split (fragile or stable in training)").run()
    from dpaat_core.store import runs
    last = runs.load_dynamics(store / "small-dpaat", 3)
    fragile = set(last["index"][last["fragile"]].tolist())
    for split in ("fragile", "stable"):
        at.radio[2].set_value(split).run()
        assert not at.exception and not at.error
        shown = next(s for s in at.selectbox if s.label == "Image")
        listed = {int(o.split(" ")[0][1:]) for o in shown.options}
        assert listed and (listed <= fragile if split == "fragile" else not listed & fragile)


def test_a_thumbnail_picks_the_image_the_explorer_explains(store, monkeypatch):
    at = _page(store, monkeypatch, "attribution")
    at.selectbox(key="run_picker_one").set_value("small-dpaat").run()
    image = next(s for s in at.selectbox if s.label == "Image")
    picks = [b for b in at.button if b.label == "Pick"]
    listed = [int(o.split(" ")[0][1:]) for o in image.options]
    assert {int(b.key.rsplit("-", 1)[1]) for b in picks} == set(listed[:12])   # the first page of the list
    wanted = int(picks[3].key.rsplit("-", 1)[1])
    assert image.value != wanted
    picks[3].click().run()
    assert not at.exception and next(s for s in at.selectbox if s.label == "Image").value == wanted


def test_attribution_explorer_shows_the_runs_attribution_numbers(tmp_path, store, monkeypatch):
    import shutil

    from dpaat_core.__main__ import main

    shutil.copytree(store / "small-dpaat", tmp_path / "small-dpaat")
    assert main(["attribute", str(tmp_path / "small-dpaat"), "--methods", "gradcam", "--n", "4", "--steps", "1"]) == 0
    at = _page(tmp_path, monkeypatch, "attribution")
    expander = [e for e in at.expander if "attribution.csv" in e.label]
    assert len(expander) == 1
    table = expander[0].dataframe[0].value
    assert list(table.columns) == ["gradcam"] and "spearman" in table.index
    (tmp_path / "small-dpaat" / "attribution.csv").write_text("method\ngradcam\n")
    at = _page(tmp_path, monkeypatch, "attribution")
    assert any("attribution numbers cannot be read" in w.value for w in at.warning)


def test_every_map_page_says_how_far_to_trust_the_maps(store, monkeypatch):
    """A two-epoch model on the synthetic set: the explorer and the gallery both say, in words, not to read its maps
    as its reasons (its accuracy is low), with the figures that say why."""
    for page in ("attribution", "gallery"):
        at = _page(store, monkeypatch, page)
        lines = [w.value for w in at.warning if w.value.startswith("Balanced accuracy")]
        assert len(lines) == 1 and "**Do not read these maps as the model's reasons:**" in lines[0], (page, lines)
    assert "by chance" in lines[0]                           # the gallery's live numbers give the localisation


def test_attribution_explorer_refuses_a_bad_upload(store, monkeypatch):
    at = _page(store, monkeypatch, "attribution")
    at.radio[0].set_value("Upload a JPEG or PNG").run()
    assert not at.exception and not at.get("image")   # nothing to show until a file arrives


def test_train_page_launches_a_run_that_the_other_pages_see(tmp_path, monkeypatch):
    import time
    from dpaat_core.store import runs
    at = _page(tmp_path, monkeypatch, "train")
    assert "No run is training right now." in [i.value for i in at.info]
    at.text_input(key="train-data").set_value("synthetic:n=24,classes=3")
    at.number_input(key="train-epochs").set_value(1)
    at.number_input(key="train-batch").set_value(8)
    at.number_input(key="train-size").set_value(16)
    at.slider(key="train-steps").set_value(1)
    at.slider(key="train-gamma").set_value(0.2)
    at.slider(key="train-cap").set_value(3.0)
    at.selectbox(key="train-augment").set_value("dermoscopy")
    at.text_input(key="train-name").set_value("from-the-page")
    at.button(key="train-launch").click().run()
    assert not at.exception, at.exception
    assert "Launched from-the-page" in at.success[0].value
    deadline = time.time() + 120
    while not ((tmp_path / "from-the-page" / "status.json").exists()
               and runs.read_status(tmp_path / "from-the-page")["state"] == "done"):
        assert time.time() < deadline
        time.sleep(0.2)
    at.run()                                                      # the finished launch, with where to look
    assert any(m.value.startswith("from-the-page is done after 1/1 epochs") for m in at.success), at.success
    assert {b.label for b in at.button} >= {"Open in Runs", "Open in Robustness", "Open in Training dynamics"}
    at.switch_page("views/runs.py").run()
    assert "from-the-page" in set(at.dataframe[0].value.run_id)
    config = runs.read_config(tmp_path / "from-the-page")         # the sliders' values are the run's
    assert (config["attack"]["steps"], config["method"]["gamma"], config["method"]["eps_max_ratio"],
            config["train"]["augment"]) == (1, 0.2, 3.0, "dermoscopy")


def test_train_page_keeps_a_typed_name_and_its_suggestion_follows_the_method(tmp_path, monkeypatch):
    import time
    at = _page(tmp_path, monkeypatch, "train")
    suggested = at.text_input(key="train-name").value
    assert suggested.startswith("dpaat-resnet8-")
    time.sleep(1.1)                                               # a suggestion stamped per rerun would move now
    at.number_input(key="train-epochs").set_value(2).run()
    assert at.text_input(key="train-name").value == suggested
    at.selectbox(key="train-method").set_value("pgd_at").run()   # untouched: it follows the method
    assert at.text_input(key="train-name").value == suggested.replace("dpaat-", "pgd_at-", 1)
    at.text_input(key="train-name").set_value("my-run").run()
    time.sleep(1.1)
    at.selectbox(key="train-method").set_value("trades").run()   # typed: kept through every change
    at.number_input(key="train-epochs").set_value(3).run()
    assert at.text_input(key="train-name").value == "my-run" and not at.exception


def test_train_page_previews_what_the_eps_settings_imply(tmp_path, monkeypatch):
    at = _page(tmp_path, monkeypatch, "train")
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["eps range [floor, cap]"] == "[0.075, 0.600]"          # 0.25 and 2 times eps0 0.3
    assert metrics["stable epochs to the cap"] == "8"                     # 1.1^8 > 2 > 1.1^7
    at.slider(key="train-eps-l2").set_value(0.5).run()
    at.slider(key="train-gamma").set_value(0.3).run()
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["eps range [floor, cap]"] == "[0.125, 1.000]" and metrics["stable epochs to the cap"] == "3"
    assert metrics["after 3 epochs a sample's eps lies in"] == "[0.171, 1.000]"   # 0.5 * 0.7^3, capped 0.5 * 2.2
    at.selectbox(key="train-method").set_value("pgd_at").run()
    assert not at.metric and at.slider(key="train-gamma").disabled              # fixed eps: nothing to preview
    at.button(key="train-time").click().run()
    assert not at.exception and "s per epoch on this machine" in " ".join(i.value for i in at.info)


def test_preview_band_and_bounds():
    from dpaat_core import preview
    band = preview.eps_band(0.3, 0.1, 0.25, 2.0, 20)
    assert band["high"].iloc[1] == pytest.approx(0.33) and band["low"].iloc[1] == pytest.approx(0.27)
    assert band["high"].max() == pytest.approx(0.6) and band["low"].min() == pytest.approx(0.075)
    assert band["high"].iloc[7] < 0.6 and band["high"].iloc[8] == pytest.approx(0.6) and band["low"].iloc[13] > 0.075
    assert preview.epochs_to_bound(0.1, 2.0) == 8 and preview.epochs_to_bound(0.1, 0.25) == 14
    assert preview.epochs_to_bound(0.0, 2.0) == float("inf") and preview.epochs_to_bound(0.2, 1.0) == 0


def test_train_page_refuses_a_bad_config_with_a_message(tmp_path, monkeypatch):
    at = _page(tmp_path, monkeypatch, "train")
    at.text_input(key="train-name").set_value("../escape")
    at.button(key="train-launch").click().run()
    assert not at.exception and "bad run id" in at.error[0].value
    assert not any(tmp_path.iterdir())          # nothing written


def test_pages_fall_back_to_the_synthetic_set_and_say_so(store, tmp_path, monkeypatch):
    import shutil
    from dpaat_core.store import runs
    moved = tmp_path / "moved-store"
    shutil.copytree(store / "small-dpaat", moved / "small-dpaat")
    config = runs.read_config(moved / "small-dpaat")
    config["data"]["spec"] = "npz:/nowhere/gone.npz"
    runs.atomic_write_json(moved / "small-dpaat" / "config.json", config)
    at = _page(moved, monkeypatch, "dynamics")
    said = " ".join(i.value for i in at.info)
    assert "synthetic set" in said and "gone.npz" in said and len(at.get("image")) == 1
    at.text_input(key="data_spec").set_value("synthetic:n=20,classes=3").run()   # a spec typed in the sidebar wins
    assert "the data spec you entered" in " ".join(c.value for c in at.caption)


@pytest.mark.parametrize("page", ["runs", "dynamics", "robustness", "attribution", "tuning", "train"])
def test_every_page_renders_without_an_error_on_empty_and_corrupt_stores(page, tmp_path, monkeypatch):
    (tmp_path / "corrupt" / "bad").mkdir(parents=True)
    (tmp_path / "corrupt" / "bad" / "config.json").write_text("[1, 2")
    for store in (tmp_path / "empty", tmp_path / "corrupt"):
        at = _page(store, monkeypatch, page)
        assert not at.error, [e.value for e in at.error]


DEMO_METHODS = ("erm", "pgd_at", "trades", "dpaat", "dpaat_nosync", "dpaat_fixed")


@pytest.mark.parametrize("page", ["runs", "dynamics", "robustness", "attribution"])
def test_the_shipped_demo_runs_show_on_every_page(page, shared_data, monkeypatch):
    """What a fresh clone shows: the six demo runs in checkpoints/, on their real HAM10000 data."""
    import pandas as pd

    from dpaat_core.store import runs

    store = APP.parents[1] / "checkpoints"
    demo = {f"demo-{m}-resnet8-ham10000" for m in DEMO_METHODS}
    found = {r.run_id: r for r in runs.list_runs(store)}
    assert demo <= set(found) and all(found[d].state == "done" and found[d].has_weights for d in demo)
    for d in demo:   # each demo run carries its curves (both norms, both attacks) and attribution numbers
        curves = runs.read_robustness(store / d)
        assert {("pgd", "l2"), ("pgd", "linf"), ("ifgsm", "l2"), ("ifgsm", "linf")} <= set(zip(curves.attack, curves.norm))
        assert {"gradcam", "saliency"} <= set(runs.read_attribution(store / d)["method"])
    at = _page(store, monkeypatch, page)
    picker = at.sidebar.multiselect[0] if page in ("runs", "robustness") else at.sidebar.selectbox[0]
    assert demo <= set(picker.options)
    assert not any("synthetic set" in i.value for i in at.info)    # its real data, not the synthetic fallback
    if page == "runs":
        assert demo <= set(at.dataframe[0].value.run_id)
        assert at.selectbox[0].options[:2] == ["main64", "main28"]          # the study opens on the 64 px table
        table = at.dataframe[1].value
        assert isinstance(table, pd.DataFrame) and set(DEMO_METHODS) <= set(table.variant)
    else:
        assert at.get("plotly_chart") or at.get("image")
    if page == "dynamics":                  # opens on the compared run that has dynamics, not the default ERM
        assert picker.value == "demo-dpaat-mobilenet_v3_small-ham10000-128px"
        picker.set_value("demo-erm-mobilenet_v3_small-ham10000-128px").run()
        assert any("saved without its per-sample dynamics" in i.value for i in at.info)


def test_a_page_opens_on_its_own_default_until_the_user_picks_a_run(shared_data, monkeypatch):
    """Runs opens on the shipped ERM run (the best audited model); Training dynamics then opens on the compared run
    that has dynamics, not on the ERM run carried over; a run the user picks is carried over as it is."""
    erm, dpaat = (f"demo-{m}-mobilenet_v3_small-ham10000-128px" for m in ("erm", "dpaat"))
    at = _page(APP.parents[1] / "checkpoints", monkeypatch, "runs")
    assert at.sidebar.multiselect[0].value == [erm]
    at.switch_page("views/dynamics.py").run()
    assert not at.exception and at.sidebar.selectbox[0].value == dpaat and at.get("plotly_chart")
    at.sidebar.selectbox[0].set_value(erm).run()                               # the user's own pick
    assert any("saved without its per-sample dynamics" in i.value for i in at.info)
    at.switch_page("views/robustness.py").run()
    assert at.sidebar.multiselect[0].value == [erm]                            # carried over to the next page
    at.switch_page("views/dynamics.py").run()
    assert at.sidebar.selectbox[0].value == erm


def test_viewer_mode_offers_nothing_that_reads_a_path_starts_a_process_or_writes(store, monkeypatch):
    monkeypatch.setenv("DPAAT_STORE", str(store))
    monkeypatch.setenv("DPAAT_VIEWER", "1")
    at = AppTest.from_file(str(APP), default_timeout=120).run()
    assert not at.exception
    for page in ("runs", "dynamics", "robustness", "attribution", "gallery", "tuning"):
        at.switch_page(f"views/{page}.py").run()
        assert not at.exception, page
        assert not at.text_input and not at.get("form"), page                             # no path box, no form
        assert {b.label for b in at.button} <= {"Explore", "Enlarge", "Pick"}, page   # moves, looks
        assert not at.get("download_button") or page == "runs", page
    at.switch_page("views/robustness.py").run()
    at.radio(key="robustness-view").set_value("Natural corruptions").run()            # the other view too
    assert not at.exception and at.metric and not at.button
    at.switch_page("views/attribution.py").run()
    at.radio[0].set_value("Upload a JPEG or PNG").run()
    assert not at.exception and at.get("file_uploader")                                    # uploads stay, in memory
    with pytest.raises(ValueError, match="Could not find a navigation page"):          # not in the navigation
        at.switch_page("views/train.py")
    direct = AppTest.from_file(str(APP.parent / "views" / "train.py"), default_timeout=120).run()   # the script itself
    assert "not available in this viewer" in " ".join(e.value for e in direct.error)
    assert not direct.get("form") and not direct.button and not direct.text_input


def test_outside_viewer_mode_the_controls_are_there(store, monkeypatch):
    monkeypatch.setenv("DPAAT_STORE", str(store))
    monkeypatch.delenv("DPAAT_VIEWER", raising=False)
    at = AppTest.from_file(str(APP), default_timeout=120).run()
    at.switch_page("views/dynamics.py").run()
    assert at.text_input                                        # the data spec box
    at.switch_page("views/train.py").run()
    assert not at.exception and at.button(key="train-launch") and at.slider(key="train-gamma")
    at.switch_page("views/tuning.py").run()
    assert not at.exception and at.get("form") and at.text_input(key="sweep_storage")   # start a sweep, its storage


def test_sessions_sharing_a_cached_model_get_the_maps_each_would_get_alone(store):
    """Streamlit runs each session in its own thread over one cached model; the attack and Captum's hooks change
    the model while they run. Eight explanations at once (four images, two eps: eight cache keys, so nothing is
    shared through the cache) each equal the library's answer computed alone."""
    import threading

    import torch

    from dashboard import compute
    from dpaat_core.store import loading, runs
    from dpaat_core.evaluate.attribution import clean_and_adversarial

    run = runs.load_run(store / "small-dpaat")
    data = loading.load_run_data(run.path, "test")
    net = loading.load_model(run.path)
    methods = ("gradcam", "saliency", "integrated_gradients")
    jobs = [(i, eps) for i in range(4) for eps in (0.2, 0.5)]
    results, errors = {}, []

    def explain(job):
        x, y = data.batch([job[0]])
        try:
            results[job] = compute.explanation(run, x, int(y[0]), "pgd", "l2", job[1], methods)
        except Exception as exc:  # noqa: BLE001 - a thread's error is the test's finding
            errors.append(repr(exc))

    threads = [threading.Thread(target=explain, args=(job,)) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for (i, eps) in jobs:
        x, y = data.batch([i])
        alone = clean_and_adversarial(net, x, y, eps, attack="pgd", norm="l2", steps=compute.EXPLORER_STEPS,
                                      methods=methods)
        for m, (clean, adv) in alone["maps"].items():
            got = results[(i, eps)]["maps"][m]
            assert torch.allclose(torch.from_numpy(got[0]), clean[0, 0], atol=1e-5), (i, eps, m)
            assert torch.allclose(torch.from_numpy(got[1]), adv[0, 0], atol=1e-5), (i, eps, m)


def test_robustness_page_computes_and_compares_corruption_grids(store, tmp_path, monkeypatch):
    """The corruption tab: a missing grid computed by a process of its own, then the heat map, the comparison and
    the corruption error of two runs; the live view shows one corruption with each image's prediction."""
    import shutil
    import time

    from dpaat_core.cli import launch
    from dpaat_core.store import runs
    from dpaat_core.__main__ import main
    own = tmp_path / "store"
    shutil.copytree(store, own, ignore=shutil.ignore_patterns("broken", "empty"))
    assert main(["evaluate", str(own / "small-pgd"), "--corruptions", "all", "--severities", "1,5"]) == 0
    at = _page(own, monkeypatch, "robustness")
    at.multiselect[0].set_value(["small-dpaat", "small-pgd"]).run()
    at.radio(key="robustness-view").set_value("Natural corruptions").run()
    button = next(b for b in at.button if "Compute the corruption grid of small-dpaat" in b.label)
    assert not [b for b in at.button if "corruption grid of small-pgd" in b.label]     # it has one
    button.click().run()
    job = launch.evaluating(own / "small-dpaat")
    assert job is not None and "--corruptions" in job["argv"]
    deadline = time.time() + 300
    while launch.evaluating(own / "small-dpaat") is not None:
        assert time.time() < deadline
        time.sleep(0.5)
    at.run()
    assert not at.exception and len(runs.read_corruptions(own / "small-dpaat")) == 1 + 15 * 5
    tab = at
    assert len(tab.get("plotly_chart")) == 2                 # the heat map of one run, the comparison of both
    table = tab.dataframe[0].value                           # corruption error over the cells both runs have
    assert list(table.index) == ["small-dpaat", "small-pgd"] and table.loc["small-dpaat", "mce"] == 100
    assert table.loc["small-pgd", "cells"] == 15 * 2
    from dpaat_core.evaluate.corruption_eval import corruption_error
    expected = corruption_error({r: runs.read_corruptions(own / r) for r in ("small-dpaat", "small-pgd")})
    assert table.loc["small-pgd", "mce"] == pytest.approx(expected.set_index("run").loc["small-pgd", "mce"], abs=1e-3)
    live = next(s for s in tab.selectbox if s.label == "Corruption")
    live.set_value("black_corner").run()
    tab = at
    assert any("field-of-view radius" in c.value for c in tab.caption)
    assert len(tab.get("image")) == 8                         # 4 clean and 4 corrupted, each with its prediction


def test_attribution_explorer_explains_under_a_natural_corruption(store, monkeypatch):
    at = _page(store, monkeypatch, "attribution")
    at.selectbox(key="run_picker_one").set_value("small-dpaat").run()
    next(s for s in at.selectbox if s.label == "Perturbation").set_value("natural corruption").run()
    assert not at.exception
    next(s for s in at.selectbox if s.label == "Corruption").set_value("gaussian_noise").run()
    at.select_slider[0].set_value(5).run()
    assert not at.exception
    assert any("gaussian noise, noise std 0.26" in c.value for c in at.caption)
    rho = [float(m.value) for m in at.metric if m.label.startswith("rank agreement")]
    assert len(at.get("image")) - len([b for b in at.button if b.label == "Pick"]) == 1 + 3 + 2 * 2
    from dpaat_core.store import loading
    from dpaat_core.evaluate.attribution import clean_and_corrupted, spearman
    index = int(next(s for s in at.selectbox if s.label == "Image").value)
    x, _ = loading.load_run_data(store / "small-dpaat", "test").batch([index])
    out = clean_and_corrupted(loading.load_model(store / "small-dpaat"), x, "gaussian_noise", 5, index=[index],
                              methods=("gradcam", "saliency"))      # the image's own noise draw
    alone = [spearman(a[0, 0], b[0, 0]) for a, b in out["maps"].values()]
    assert rho == pytest.approx(alone, abs=0.006)


def test_gallery_shows_every_test_image_worst_first_and_opens_one_in_the_explorer(store, monkeypatch):
    from dpaat_core.evaluate import gallery
    from dpaat_core.store import loading
    at = _page(store, monkeypatch, "gallery")
    at.selectbox(key="run_picker_one").set_value("small-dpaat").run()
    assert at.title[0].value == "Gallery" and not at.exception
    test = loading.load_run_data(store / "small-dpaat", "test")
    assert len(at.get("image")) == 1 + len(test)                 # the colour bar, and one tile per image (one page)
    off = next(m for m in at.metric if m.label == "maps mostly off the lesion")
    model = loading.load_model(store / "small-dpaat")
    numbers = gallery.image_numbers(model, test, 0.3, "gradcam", steps=10, batch_size=64)
    assert off.value == f"{int((numbers.energy_clean < 0.5).sum())} of {int(numbers.energy_clean.notna().sum())}"
    by_class = next(d.value for d in at.dataframe if "robust_accuracy" in d.value)          # per class, robust too
    expected = gallery.class_outcomes(numbers, test.classes)
    np.testing.assert_allclose(by_class.robust_accuracy, expected.robust_accuracy)
    assert list(by_class.n) == list(test.class_counts) and (expected.robust_accuracy <= expected.accuracy).all()
    assert any("**Weakest class** · small-dpaat: robust accuracy" in c.value for c in at.caption)
    first = gallery.order(numbers, "looks away from the lesion")["index"].tolist()
    tiles = [int(b.key.split("-")[1]) for b in at.button if b.key.startswith("open-")]   # column by column, row-major
    assert tiles == [first[k] for c in range(4) for k in range(c, len(first), 4)]   # lowest lesion share first
    at.radio[1].set_value("wrong").run()                                     # the prediction filter
    wrong = set(numbers.index[numbers.pred_clean != numbers.label])
    assert {int(b.key.split("-")[1]) for b in at.button if b.key.startswith("open-")} == wrong
    at.radio[1].set_value("all").run()
    pick = next(i for i in first if i != 0)                                  # not the explorer's default image
    shown = len(at.get("image"))
    at.button(key=f"large-{pick}").click().run()                             # one tile, large, in a dialog
    assert not at.exception and len(at.get("image")) == shown + 2            # the tile and its colour bar
    next(b for b in at.button if b.key == f"open-{pick}").click().run()      # a click opens it in the explorer
    assert not at.exception and at.title[0].value == "Attribution explorer"
    assert next(s for s in at.selectbox if s.label == "Image").value == pick


def test_gallery_shows_a_first_page_before_every_image_is_explained(store, monkeypatch):
    """Numbers computed for the view come 24 images at a time, and the first 24 reach the page before the rest."""
    from dashboard import compute
    from dpaat_core.data import load_dataset
    from dpaat_core.store import runs
    data = load_dataset("synthetic:n=240,classes=3", "train", 16)
    assert len(data) > 2 * compute.GALLERY_PAGE
    run = runs.load_run(store / "small-dpaat")
    early = []
    table, source = compute.gallery_numbers(run, data, "train", "saliency", first_page=early.append)
    assert source.startswith("computed for this view") and len(table) == len(data)
    assert len(early) == 1 and early[0]["index"].tolist() == list(range(compute.GALLERY_PAGE))
    pd.testing.assert_frame_equal(early[0], table.iloc[:compute.GALLERY_PAGE])    # the numbers the page keeps
    again = []
    compute.gallery_numbers(run, data, "train", "saliency", first_page=again.append)   # cached: nothing to wait for
    assert again == []
    monkeypatch.setenv("DPAAT_STORE", str(store))                      # the page with a split of several pages
    at = AppTest.from_file(str(APP), default_timeout=240).run()
    at.switch_page("views/gallery.py").run()
    at.sidebar.text_input(key="data_spec").set_value("synthetic:n=400,classes=3").run()
    at.selectbox(key="run_picker_one").set_value("small-pgd").run()
    assert not at.exception, at.exception
    assert not any(c.value.startswith("The first 24 of") for c in at.caption)     # cleared once all are there
    assert len([b for b in at.button if b.key.startswith("open-")]) == compute.GALLERY_PAGE
    assert any("images · 24 per page" in c.value for c in at.caption)


def test_gallery_compares_two_runs_on_the_same_images(store, monkeypatch):
    at = _page(store, monkeypatch, "gallery")
    at.selectbox(key="run_picker_one").set_value("small-dpaat").run()
    order = [b.key for b in at.button]
    next(s for s in at.selectbox if s.label.startswith("Compare with")).set_value("small-pgd").run()
    assert not at.exception and [b.key for b in at.button] == order         # same images, same order
    text = " ".join(m.value for m in at.markdown)
    assert "looks at the lesion where **small-pgd** does not on" in text
    show = next(r for r in at.radio if r.label == "Show")
    show.set_value("only small-pgd on the lesion").run()
    assert not at.exception


def test_viewer_mode_says_a_table_is_unreadable_without_naming_server_paths(store, tmp_path, monkeypatch):
    import shutil
    own = tmp_path / "store"
    shutil.copytree(store, own, ignore=shutil.ignore_patterns("broken", "empty"))
    (own / "small-dpaat" / "robustness.csv").write_text("not,a\nrobustness,table\n")
    (own / "small-dpaat" / "attribution.csv").write_text("oops\n")
    for viewer in ("1", ""):
        monkeypatch.setenv("DPAAT_VIEWER", viewer)
        at = _page(own, monkeypatch, "robustness")
        at.multiselect[0].set_value(["small-dpaat"]).run()
        said = " ".join(w.value for w in at.warning)
        assert "small-dpaat: a saved table cannot be read" in said
        assert (str(own) in said) == (viewer == ""), said          # the path only outside viewer mode
        at.switch_page("views/attribution.py").run()
        at.selectbox(key="run_picker_one").set_value("small-dpaat").run()
        said = " ".join(w.value for w in at.warning)
        assert "attribution numbers cannot be read" in said and (str(own) in said) == (viewer == ""), said


def test_train_page_starts_a_run_from_another_runs_weights(store, tmp_path, monkeypatch):
    import json
    import shutil
    import time

    from dpaat_core.store import runs
    own = tmp_path / "store"
    shutil.copytree(store, own, ignore=shutil.ignore_patterns("broken", "empty"))
    at = _page(own, monkeypatch, "train")
    at.text_input(key="train-data").set_value("synthetic:n=32,classes=3")
    at.number_input(key="train-epochs").set_value(1)
    at.number_input(key="train-size").set_value(16)
    at.slider(key="train-steps").set_value(1)
    next(s for s in at.selectbox if s.label.startswith("Start from")).set_value("small-pgd")
    at.text_input(key="train-name").set_value("hardened")
    at.button(key="train-launch").click().run()
    assert not at.exception and "Launched hardened" in at.success[0].value
    deadline = time.time() + 120
    while not ((own / "hardened" / "status.json").exists() and runs.read_status(own / "hardened")["state"] == "done"):
        assert time.time() < deadline, (own / ".logs" / "hardened.log").read_text()
        time.sleep(0.2)
    config = json.loads((own / "hardened" / "config.json").read_text())
    assert config["model"]["init_from"] == str(own / "small-pgd") and config["init"]["run_id"] == "small-pgd"


def test_eps_slider_snaps_a_browsers_floating_point_steps_to_the_grid():
    """Four arrow-key steps from 0.3 arrive as 0.23999999999999994; the attack runs at the 0.24 the page shows."""
    def app():
        import streamlit as st

        from dashboard.widgets import eps_slider
        st.text(repr(eps_slider(st, 0.3)))

    at = AppTest.from_function(app, default_timeout=30).run()
    assert at.text[0].value == "0.3"
    at.slider[0].set_value(0.3 - 0.015 - 0.015 - 0.015 - 0.015).run()
    assert at.text[0].value == "0.24"
    at.slider[0].set_value(1.2).run()
    assert at.text[0].value == "1.2"


@pytest.fixture(scope="module")
def certified_store(store, tmp_path_factory):
    """A copy of ``store``'s small-dpaat run with certificates of its whole test split (sigma 0.25, n 200)."""
    import shutil

    from dpaat_core.store import loading, runs
    from dpaat_core.evaluate.certify import certify_dataset
    path = tmp_path_factory.mktemp("certified")
    shutil.copytree(store / "small-dpaat", path / "small-dpaat", ignore=shutil.ignore_patterns("*.csv"))
    run_dir = path / "small-dpaat"
    test = loading.load_run_data(run_dir, "test")
    rows = certify_dataset(loading.load_model(run_dir), test, 0.25, n0=50, n=200)
    runs.save_certified(run_dir, rows.assign(split="test", data=runs.read_config(run_dir)["data"]["spec"]))
    return path


def _array(values) -> np.ndarray:
    """A plotly trace's numbers: a list, or the typed-array form ``{"dtype", "bdata"}`` plotly sends to the browser."""
    import base64
    if isinstance(values, dict) and "bdata" in values:
        return np.frombuffer(base64.b64decode(values["bdata"]), dtype=values["dtype"])
    return np.asarray(values, dtype=float)


def test_robustness_page_draws_certified_accuracy_beside_the_attacks(certified_store, monkeypatch):
    import plotly.io

    from dpaat_core.store import runs
    from dpaat_core.evaluate.certify import certified_accuracy
    at = _page(certified_store, monkeypatch, "robustness")
    at.multiselect[0].set_value(["small-dpaat"]).run()
    assert not at.exception
    assert "Certified robustness (randomized smoothing)" in [h.value for h in at.subheader]
    charts = [plotly.io.from_json(c.proto.spec) for c in at.get("plotly_chart")]
    chart = next(c for c in charts if "Certified against attacked" in (c.layout.title.text or ""))
    saved = runs.read_certified(certified_store / "small-dpaat")
    trace = next(t for t in chart.data if "certified (σ 0.25, n 200" in t.name)
    x, y = _array(trace.x), _array(trace.y)
    assert len(x) == 101 and x[0] == 0
    np.testing.assert_allclose(y, certified_accuracy(saved, x))     # the page draws the file's curve
    table = at.dataframe[-1].value
    assert table.loc[0, "run"] == "small-dpaat" and table.loc[0, "images"] == len(saved)
    assert not [b for b in at.button if b.label.startswith("Certify small-dpaat")]     # certified: nothing to start


def test_robustness_page_starts_a_certify_process_for_a_run_without_radii(tmp_path, store, monkeypatch):
    import shutil
    import time

    from dpaat_core.cli import launch
    from dpaat_core.store import runs
    shutil.copytree(store / "small-pgd", tmp_path / "small-pgd")
    at = _page(tmp_path, monkeypatch, "robustness")
    at.multiselect[0].set_value(["small-pgd"]).run()
    next(b for b in at.button if b.label.startswith("Certify small-pgd at σ 0.25")).click().run()
    assert not at.exception, at.exception
    job = launch.evaluating(tmp_path / "small-pgd")
    assert job is not None and job["argv"][2] == "certify" and "--sigma" in job["argv"]
    deadline = time.time() + 300
    while launch.evaluating(tmp_path / "small-pgd") is not None:
        assert time.time() < deadline
        time.sleep(0.5)
    saved = runs.read_certified(tmp_path / "small-pgd")
    assert len(saved) and set(saved["sigma"]) == {0.25} and set(saved["n"]) == {500}


def test_explorer_shows_the_images_certified_radius_and_marks_it_on_the_slider(certified_store, monkeypatch):
    from dpaat_core.store import runs
    at = _page(certified_store, monkeypatch, "attribution")
    at.selectbox(key="run_picker_one").set_value("small-dpaat").run()
    index = next(s for s in at.selectbox if s.label == "Image").value
    row = runs.read_certified(certified_store / "small-dpaat").set_index("index").loc[index]
    text = " ".join(m.value for m in at.markdown)
    if row["prediction"] < 0:
        assert "The smoothed model abstains on this image" in text
    else:
        assert f"Certified l2 radius {row['radius']:.3f}" in text
    assert any(c.proto.spec and '"height":70' in c.proto.spec.replace(" ", "") for c in at.get("plotly_chart"))
    at.radio[0].set_value("Training split (fragile or stable in training)").run()    # not certified: no line
    assert not at.exception and not [m for m in at.markdown if "Certified l2 radius" in m.value
                                     or "abstains on this image" in m.value]


def test_gallery_sorts_by_the_smallest_certified_radius(certified_store, monkeypatch):
    from dpaat_core.store import runs
    at = _page(certified_store, monkeypatch, "gallery")
    at.selectbox(key="run_picker_one").set_value("small-dpaat").run()
    sort = next(s for s in at.selectbox if s.label == "Sort")
    sort.set_value("smallest certified radius").run()
    assert not at.exception
    saved = runs.read_certified(certified_store / "small-dpaat")
    key = saved["radius"].where(saved["prediction"] >= 0, -1.0)
    want = saved.assign(key=key).sort_values(["key", "index"])["index"].tolist()
    tiles = [int(b.key.split("-")[1]) for b in at.button if b.key.startswith("open-")]
    assert tiles == [want[k] for c in range(4) for k in range(c, len(want), 4)]
    captions = " ".join(str(i.proto) for i in at.get("image"))
    assert (" · abstains" in captions) or re.search(r" · r \d\.\d\d \(\w", captions)


@pytest.fixture(scope="module")
def sweep_store(tmp_path_factory):
    """A store holding a three-trial sweep on the synthetic set (SQLite, the default storage)."""
    import subprocess
    import sys
    path = tmp_path_factory.mktemp("sweeps")
    done = subprocess.run([sys.executable, "-m", "dpaat_core", "sweep", "tiny", "--data", "synthetic:n=60,classes=3",
                           "--image-size", "16", "--method", "dpaat", "--epochs", "2", "--steps", "2",
                           "--batch-size", "16", "--eval-steps", "2", "--threads", "1", "--device", "cpu",
                           "--space", "eps=0.1:0.6,gamma=0.05:0.3", "--trials", "3", "--store", str(path)],
                          cwd=APP.parents[1], capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    return path


def test_tuning_page_shows_a_sweep_narrows_it_and_opens_a_trials_run(sweep_store, monkeypatch):
    at = _page(sweep_store, monkeypatch, "tuning")
    assert at.title[0].value == "Tuning" and at.selectbox[0].value == "tiny"
    assert len(at.get("plotly_chart")) == 4                         # Pareto front, history, importance, parallel
    table = at.dataframe[0].value
    assert len(table) == 3 and set(table["state"]) == {"complete"}
    assert {"param eps", "param gamma", "pgd20_balanced", "balanced_accuracy"} <= set(table.columns)
    assert "3 of 3 complete trials" in " ".join(c.value for c in at.caption)
    eps = sorted(table["param eps"])
    at.sidebar.slider(key="range-tiny-param eps").set_value((eps[0], (eps[0] + eps[1]) / 2)).run()   # one trial left
    assert not at.exception
    assert "1 of 3 complete trials" in " ".join(c.value for c in at.caption)
    assert len(at.dataframe[0].value) == 1
    run_id = at.selectbox(key="open-trial-tiny").value
    assert run_id == at.dataframe[0].value["run"].iloc[0]
    at.button(key="open-Robustness").click().run()
    assert not at.exception and at.title[0].value == "Robustness"
    assert at.session_state["runs"] == [run_id]


def test_tuning_page_starts_a_sweep_as_a_process(tmp_path, monkeypatch):
    import time
    at = _page(tmp_path, monkeypatch, "tuning")
    assert "No sweeps in this store yet" in " ".join(i.value for i in at.info)
    form = at.get("form")[0]
    assert form is not None
    at.text_input(key="sweep-name").set_value("from-page")
    at.text_input(key="sweep-data").set_value("synthetic:n=48,classes=3")
    at.number_input(key="sweep-size").set_value(16)
    at.number_input(key="sweep-epochs").set_value(1)
    at.number_input(key="sweep-trials").set_value(2)
    at.text_input(key="sweep-space").set_value("eps=0.1:0.5")
    at.button[0].click().run()
    assert not at.exception and "Sweep from-page started" in at.success[0].value
    deadline = time.time() + 240
    while "from-page" not in sweep_names(tmp_path) or not _finished(tmp_path, "from-page", 2):
        assert time.time() < deadline, (tmp_path / ".logs" / "sweep-from-page.log").read_text()[-500:]
        time.sleep(1)
    at.run()
    assert at.selectbox[0].value == "from-page" and len(at.dataframe[0].value) == 2


def sweep_names(store):
    from dpaat_core.sweep import list_sweeps
    return list_sweeps(store)


def _finished(store, name, n):
    import optuna
    from dpaat_core.sweep import open_storage
    study = optuna.load_study(study_name=name, storage=open_storage(None, store))
    return sum(t.state.name == "COMPLETE" for t in study.get_trials()) >= n


def test_tuning_page_refuses_a_malformed_space_before_starting_anything(tmp_path, monkeypatch):
    at = _page(tmp_path, monkeypatch, "tuning")
    at.text_input(key="sweep-space").set_value("eps=0.5:0.1")
    at.button[0].click().run()
    assert not at.exception and "low < high" in at.error[0].value
    assert not (tmp_path / ".logs").exists()


def test_trials_of_a_sweep_are_not_what_the_pages_open_on(sweep_store):
    from dashboard.state import default_runs
    from dpaat_core.store import runs
    found = runs.list_runs(sweep_store)
    assert all(r.sweep and r.sweep.startswith("tiny #") for r in found)
    assert default_runs(found) != []                               # only trials: the newest of them
    table = runs.runs_table(found)
    assert set(table["sweep"]) == {"tiny #0", "tiny #1", "tiny #2"}
    assert "val_robust_balanced_accuracy" in table


def test_tuning_page_in_viewer_mode_shows_the_demo_sweep_without_server_paths(monkeypatch):
    monkeypatch.setenv("DPAAT_VIEWER", "1")
    at = _page(APP.parents[1] / "checkpoints", monkeypatch, "tuning")
    assert at.selectbox[0].value == "demo-eps" and len(at.get("plotly_chart")) == 4
    captions = " ".join(c.value for c in at.caption)
    assert "npz:ham10000_28.npz" in captions and "shared/data" not in captions
    assert not at.text_input and not at.get("form")                   # no storage box, no sweep to start
