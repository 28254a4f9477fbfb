"""``python -m dpaat_core audit`` and ``report``: every part of the audit lands in the run folder with the numbers the
library computes on its own, a second dataset adds to the first, and the report is one file that says what it shows,
escapes what it reads and needs nothing from outside."""
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dpaat_core.store import loading, runs
from dpaat_core.__main__ import main
from dpaat_core.evaluate.audit import audit, has_gradcam, read_apgd, read_per_class, read_protocol
from dpaat_core.config import RunConfig, method_config
from dpaat_core.evaluate.robustness import evaluate
from dpaat_core.report import example_index, report_html
from dpaat_core.train.loop import train

DATA = "synthetic:n=48,classes=3"


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    """A small DPAAT run, audited once (a seeded quarter of its attribution images)."""
    store = tmp_path_factory.mktemp("store")
    cfg = RunConfig().replace(data={"spec": DATA, "image_size": 32}, attack={"steps": 1},
                              method=method_config("dpaat"), train={"epochs": 2, "batch_size": 16, "device": "cpu"})
    run = train(cfg, store=store, run_id="small")
    lines = []
    out = audit(run, apgd_steps=5, progress=False, log=lines.append, n_attribution=6)
    return run, out, lines


def _copy(run, tmp_path, name: str):
    """A copy of the audited run to change (the module's fixture stays as it is)."""
    import shutil
    return Path(shutil.copytree(run, tmp_path / name))


def test_the_audit_writes_each_part_with_the_librarys_numbers(audited):
    run, out, lines = audited
    config = runs.read_config(run)
    protocol = read_protocol(run)
    assert list(protocol.preset) == ["ifgsm_l2", "ifgsm_linf", "pgd20_l2", "pgd20_linf"]    # merged, sorted
    assert (protocol.split == "test").all() and (protocol.data == DATA).all()
    model, test = loading.load_model(run), loading.load_run_data(run, "test")
    alone = evaluate(model, test, "pgd", "l2", config["attack"]["eps"], 20)    # the same attack, run on its own
    row = protocol.set_index("preset").loc["pgd20_l2"]
    assert row.robust_accuracy == pytest.approx(alone.robust_accuracy) and row.accuracy == pytest.approx(alone.accuracy)
    per_class = read_per_class(run)
    mine = per_class[per_class.preset == "pgd20_l2"].sort_values("class_index")
    assert list(mine["class"]) == list(test.classes) and mine.n.sum() == len(test)
    np.testing.assert_allclose(mine.robust_accuracy, alone.per_class.robust_accuracy)
    curves = runs.read_robustness(run)
    assert set(curves.norm) == {"l2", "linf"} and (curves.attack == "pgd").all() and len(curves) == 16
    apgd = read_apgd(run).iloc[0]
    assert apgd.norm == config["attack"]["norm"] and apgd.robust_accuracy <= apgd.pgd20 == pytest.approx(row.robust_accuracy)
    attribution = runs.read_attribution(run)
    assert set(attribution.method) == {"gradcam", "saliency"} and (attribution.n <= 6).all()
    assert len(runs.read_attribution_images(run)) == 2 * 6
    assert [line.split(":")[0] for line in lines] == ["protocol", "curves", "APGD check (l2 eps 0.3)", "attribution (clean vs PGD-10 map agreement, Spearman)"]
    assert not out["skipped"]


def test_an_audit_on_other_data_adds_to_the_first(audited, tmp_path):
    run, _, _ = audited
    copy = _copy(run, tmp_path, "small")
    other = "synthetic:n=40,classes=3,seed=5"
    audit(copy, data=other, apgd_steps=2, progress=False, log=lambda line: None, n_attribution=4)
    protocol = read_protocol(copy)
    assert len(protocol) == 8 and set(protocol.data) == {DATA, other}
    assert set(read_apgd(copy).data) == {DATA, other} and set(runs.read_robustness(copy).data) == {DATA, other}
    assert len(read_per_class(copy)) == 2 * 4 * 3


def test_curves_and_the_apgd_check_on_a_draw_leave_the_protocol_on_every_image(audited, tmp_path, capsys):
    """``--curve-samples 4``: the costly parts on the draw ``evaluate --max-samples 4`` makes, the protocol and the
    maps on all images."""
    from dpaat_core.data.dataset import sample_indices
    run, _, _ = audited
    copy = _copy(run, tmp_path, "small")
    for name in ("protocol.csv", "per_class.csv", "robustness.csv", "apgd.csv"):
        (copy / name).unlink()
    assert main(["audit", str(copy), "--curve-samples", "4", "--apgd-steps", "2", "--attribution-images", "3",
                 "--no-report"]) == 0
    test = loading.load_run_data(copy, "test")
    assert read_per_class(copy).groupby("preset").n.sum().eq(len(test)).all()       # the protocol: every image
    curves = runs.read_robustness(copy)
    assert set(curves.n) == {4} and set(curves.norm) == {"l2", "linf"}
    pick = sample_indices(len(test), 4, 0)
    few = test.subset(pick.tolist())
    alone = evaluate(loading.load_model(copy), few, "pgd", "l2", 0.3, 20)          # the curve's point, on its own
    point = curves[(curves.norm == "l2") & ((curves.eps - 0.3).abs() < 1e-9)].iloc[0]
    assert point.accuracy == pytest.approx(alone.robust_accuracy)
    apgd = read_apgd(copy).iloc[0]
    assert apgd.n == 4 and apgd.pgd20 == pytest.approx(alone.robust_accuracy)
    assert "4 images" in capsys.readouterr().err
    assert main(["audit", str(copy), "--curve-samples", "0"]) == 2


def test_audit_command_prints_the_report_and_refuses_a_run_without_data(audited, tmp_path, capsys):
    run, _, _ = audited
    copy = _copy(run, tmp_path, "small")
    assert main(["audit", str(copy), "--max-samples", "12", "--apgd-steps", "2", "--attribution-images", "3",
                 "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert out.strip().splitlines()[-1] == str(copy / "report.html") and (copy / "report.html").is_file()
    assert "audit" in err and "APGD check" in err                       # the one bar and each part's line
    assert read_protocol(copy).n.max() == 12
    config = json.loads((copy / "config.json").read_text())
    config["data"]["spec"] = None                                       # a trained run must name its data
    (copy / "config.json").write_text(json.dumps(config))
    assert main(["audit", str(copy), "--device", "cpu"]) == 2
    assert "config.json: data.spec must be a data spec" in capsys.readouterr().err
    imported = {"origin": "imported", "source": {"file": "w.pt", "sha256": "0"}, "method": {"name": "imported"},
                "model": config["model"], "data": config["data"], "dataset": config["dataset"]}
    (copy / "config.json").write_text(json.dumps(imported))             # as an import with --classes leaves it
    assert main(["audit", str(copy), "--device", "cpu"]) == 2
    assert "pass --data SPEC" in capsys.readouterr().err
    assert main(["audit", str(copy), "--apgd-steps", "0"]) == 2
    assert main(["report", str(copy), "-o", str(tmp_path / "r.pdf")]) == 2
    assert "name it .html" in capsys.readouterr().err


def _tags(text: str) -> str:
    """The markup of ``text`` without plotly's library (whose code names URLs it never loads here)."""
    import plotly.offline
    library = plotly.offline.get_plotlyjs()
    assert text.count(library) <= 1
    return text.replace(library, "")


def _scripts_allowed(text: str) -> bool:
    """Every script of the page is allowed by its policy's hashes, and the policy allows nothing else."""
    import base64
    import hashlib
    policy = re.search(r'Content-Security-Policy" content="([^"]*)"', text.replace("'Content", '"Content').replace(
        "-Policy' content", '-Policy" content')).group(1)
    allowed = set(re.findall(r"'sha256-([^']+)'", policy))
    found = {base64.b64encode(hashlib.sha256(code.encode()).digest()).decode()
             for code in re.findall(r"<script[^>]*>(.*?)</script>", text, flags=re.S)}
    return found == allowed and "unsafe-inline' 'sha" not in policy and "script-src 'unsafe" not in policy


def test_the_report_is_self_contained_and_shows_each_part(audited):
    run, _, _ = audited
    text = report_html([run], n_examples=3)
    markup = _tags(text)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", markup)     # nothing fetched from outside
    assert "<link" not in markup and "@import" not in markup
    assert "default-src 'none'" in markup and _scripts_allowed(text)       # and the browser is told so
    for part in ("How to read this", "Accuracy, clean and under attack", "Per class", "APGD check",
                 "Robustness curves", "Attribution: clean against attacked", "Examples: PGD-10 l2"):
        assert part in markup, part
    assert markup.count("data:image/png;base64,") == 3 * 4                 # image, attacked, two maps, 3 examples
    protocol = read_protocol(run).set_index("preset")
    assert f"{protocol.loc['pgd20_l2', 'robust_accuracy']:.4f}" in markup
    assert "dpaat training of resnet8 for 2 epochs" in markup and "from scratch" in markup


def test_the_report_compares_runs_and_says_what_is_missing(audited, tmp_path):
    run, _, _ = audited
    bare = train(RunConfig().replace(data={"spec": DATA, "image_size": 32}, method=method_config("erm"),
                                     train={"epochs": 1, "batch_size": 16, "device": "cpu"}),
                 store=tmp_path, run_id="bare")
    markup = _tags(report_html([run, bare], n_examples=2))
    assert "<h2>Comparison</h2>" in markup and markup.count("python -m dpaat_core audit") >= 3
    table = markup[markup.index("<h2>Comparison</h2>"):].split("</table>")[0]
    header = re.findall(r"<th>(.*?)</th>", table)
    rows = [re.findall(r"<td>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", table, flags=re.S)]
    column = header.index("PGD-20 l2")
    robust = read_protocol(run).set_index("preset").loc["pgd20_l2", "robust_accuracy"]
    assert [r[0] for r in rows] == ["small", "bare"] and rows[0][column] == f"{robust:.3f}" and rows[1][column] == "–"
    note = markup[markup.index("<h2>Comparison</h2>"):].split("</table>")[1].split("</p>")[0]
    assert "Not audited yet" in note and f"python -m dpaat_core audit {bare}" in note and "small" not in note


def test_the_report_draws_each_classs_robust_accuracy_and_names_the_weakest_class(audited, tmp_path):
    """Beside the per-class table: the bar figure (the classes with their counts) and the weakest class in one line;
    several runs: one figure with all of them."""
    import html

    from dpaat_core.evaluate.class_robustness import weakest_sentence
    run, _, _ = audited
    hand = _copy(run, tmp_path, "hand")                       # the audit's per_class.csv with numbers chosen here
    per_class = read_per_class(hand)
    pgd = per_class.preset == "pgd20_l2"
    per_class.loc[pgd, "n"] = per_class.loc[pgd, "class_index"].map({0: 40, 1: 25, 2: 5})
    per_class.loc[pgd, "robust_accuracy"] = per_class.loc[pgd, "class_index"].map({0: 0.71, 1: 0.5, 2: 0.12})
    per_class.to_csv(hand / "per_class.csv", index=False)
    classes = list(per_class[pgd].sort_values("class_index")["class"])
    markup = _tags(report_html([hand], n_examples=0))
    title = "Accuracy per class, clean and under attack"
    assert markup.count(title) == 1 and '<div class="side">' in markup
    part = markup[markup.index("<h3>Per class"):markup.index("<h3>APGD check")]
    assert title in part and "plotly-graph-div" in part                            # the figure beside the table
    for name, n in zip(classes, (40, 25, 5)):
        assert f"{name} (n={n})" in part
    sentence = f"hand: robust accuracy 0.12 on {classes[2]} against 0.71 on {classes[0]}"
    assert weakest_sentence("hand", per_class[pgd]) == sentence
    assert f"<p><b>Weakest class</b>: {html.escape(sentence)}.</p>" in part
    copy = _copy(run, tmp_path, "other")
    both = _tags(report_html([run, copy], n_examples=0))
    comparison = both[both.index("<h2>Comparison</h2>"):both.index('<h2 id="small">')]
    assert both.count(title) == 1 and title in comparison                           # one figure, every run in it
    assert '"name":"small · robust"' in comparison and '"name":"other · robust"' in comparison
    assert both.count("<b>Weakest class</b>") == 4                                  # the comparison and each run's


def test_the_report_escapes_what_it_reads_from_a_run_folder(audited, tmp_path):
    """Names from config.json and the CSVs are shown as text: a hostile run folder runs no script of its own, and
    the page's policy would not run one (only the scripts it wrote, by hash)."""
    run, _, _ = audited
    copy = _copy(run, tmp_path, "hostile")
    config = json.loads((copy / "config.json").read_text())
    config["init"] = {"run_id": "<script>alert(1)</script>", "origin": "imported"}
    config["model"]["name"] = "<img src=x onerror=alert(2)>"
    config["model"]["normalization"] = {"mean": [0.5] * 3, "std": [0.5] * 3}   # any name, as a start from an import
    (copy / "config.json").write_text(json.dumps(config))
    per_class = pd.read_csv(copy / "per_class.csv")
    per_class.loc[per_class.class_index == 0, "class"] = "<script>alert(3)</script>"
    per_class.to_csv(copy / "per_class.csv", index=False)
    apgd = pd.read_csv(copy / "apgd.csv").assign(attacks="<b onmouseover=alert(4)>apgd</b>")
    apgd.to_csv(copy / "apgd.csv", index=False)
    text = report_html([copy], n_examples=1)
    markup = _tags(text)
    assert "alert(3)" in markup and "onmouseover=alert(4)" in markup           # the hostile rows are on show ...
    assert not re.search(r"<(script>alert|img src=x|b onmouseover)", markup)   # ... as text, never as tags
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in markup and "&lt;img src=x onerror=alert(2)&gt;" in markup
    assert _scripts_allowed(text)
    config["attack"]["norm"] = "<script>alert(5)</script>"                      # not a norm at all: refused
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(runs.RunError, match="attack.norm must be one of l2, linf"):
        report_html([copy], n_examples=0)


def test_an_older_protocol_table_without_a_data_column_is_merged_not_fatal(audited, tmp_path):
    run, _, _ = audited
    copy = _copy(run, tmp_path, "old")
    old = pd.read_csv(copy / "protocol.csv").drop(columns=["data"])           # as evaluate --protocol wrote it
    old.to_csv(copy / "protocol.csv", index=False)
    assert main(["evaluate", str(copy), "--protocol", "--steps", "1", "--eps-grid", "0", "--max-samples", "6",
                 "--device", "cpu"]) == 0
    protocol = read_protocol(copy)
    assert len(protocol) == 8 and protocol.data.isna().sum() == 4 and (protocol.data == DATA).sum() == 4
    per_class = read_per_class(copy)                                          # replaced with the new evaluation's
    assert len(per_class) == 4 * 3 and (per_class.groupby("preset").n.sum() == 6).all()


def test_a_model_without_a_gradcam_layer_is_audited_and_reported_with_saliency(tmp_path):
    """An imported model whose config names no Grad-CAM layer (what importing a ViT records): the audit measures
    saliency only and says why, and the report's examples use saliency."""
    import torchvision
    from dpaat_core.store.importing import import_model
    torch.manual_seed(0)
    net = torchvision.models.squeezenet1_1(num_classes=3)
    torch.save(net.state_dict(), tmp_path / "squeeze.pt")
    run = import_model("squeezenet1_1", tmp_path / "squeeze.pt", 32, ["round-brown", "irregular-dark", "vascular-red"],
                       tmp_path / "store",
                       data_spec="synthetic:n=30,classes=3")
    config = json.loads((run / "config.json").read_text())
    config["model"]["gradcam_layer"] = None
    (run / "config.json").write_text(json.dumps(config))
    out = audit(run, apgd_steps=2, progress=False, log=lambda line: None, n_attribution=3)
    assert "no Grad-CAM" in out["skipped"]["gradcam"] and set(runs.read_attribution(run).method) == {"saliency"}
    markup = _tags(report_html([run], n_examples=2))
    assert "saliency (the model has no Grad-CAM layer)" in markup and "saliency agreement" in markup


def test_examples_show_every_class_before_repeating_one():
    from dpaat_core.data import load_dataset
    data = load_dataset("synthetic:n=60,classes=4", "test", 32)
    index = example_index(data, 6)
    labels = data.labels[index].tolist()
    assert len(set(labels[:4])) == 4 and len(set(index)) == 6


def test_a_model_without_a_feature_map_has_no_gradcam():
    from dpaat_core.models import Classifier
    net = Classifier("t", torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3)), 3, 3)
    assert not has_gradcam(net)


def test_the_shipped_imported_and_hardened_demo_runs_hold_their_audit(shared_data):
    """The README's before/after figures come from these two runs' tables; the models still give them."""
    from dpaat_core.evaluate.robustness import clean_logits
    store = Path(__file__).resolve().parents[1] / "checkpoints"
    imported, hardened = (store / f"demo-{k}-mobilenet_v3_small-ham10000" for k in ("imported", "hardened"))
    config = runs.read_config(hardened)
    assert runs.read_config(imported)["origin"] == "imported" and config["init"]["origin"] == "imported"
    assert (store.parent / config["init"]["run"]).resolve() == imported.resolve()      # its start ships beside it
    for run in (imported, hardened):
        assert runs.load_run(run).state == "done"
        protocol = read_protocol(run).set_index("preset")
        assert len(protocol) == 4 and len(read_per_class(run)) == 4 * 7 and len(read_apgd(run)) == 1
        assert set(runs.read_robustness(run).norm) == {"l2", "linf"}
        assert runs.read_attribution(run).n.max() == 666           # every test image (a constant map has no rank)
        test = loading.load_run_data(run, "test")
        pred = clean_logits(loading.load_model(run), test).argmax(1)
        assert float((pred == test.labels).float().mean()) == pytest.approx(protocol.loc["pgd20_l2", "accuracy"])
    robust = [read_protocol(r).set_index("preset").loc["pgd20_l2", "robust_accuracy"] for r in (imported, hardened)]
    assert robust[0] < 0.05 < 0.2 < robust[1]                        # what the README says DPAAT did to it
