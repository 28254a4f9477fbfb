"""bench/hd_demos.py: finished runs on the JPEG layout become demo runs that a fresh checkout opens, audited."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors import safe_open

from dpaat_core.__main__ import main
from dpaat_core.store import loading, runs

ROOT = Path(__file__).resolve().parents[1]
JPEGS = ROOT.parent / "shared" / "data" / "ham10000_images"


def test_shipped_runs_point_at_the_checkouts_data_and_at_each_other_and_carry_their_audit(tmp_path, capsys,
                                                                                           monkeypatch):
    monkeypatch.chdir(ROOT)
    store, dest = tmp_path / "store", tmp_path / "checkpoints"
    common = ["--epochs", "1", "--image-size", "16", "--steps", "1", "--device", "cpu", "--quiet", "--store", str(store)]
    assert main(["train", "--data", f"ham10000:{JPEGS.resolve()}", "--model", "resnet8", "--method", "erm",
                 "--gradcam-layer", "layer2", "--name", "erm", *common]) == 0
    assert main(["train", "--init-from", str(store / "erm"), "--method", "pgd_at", "--name", "hard", *common]) == 0
    assert main(["train", "--init-from", str(store / "erm"), "--method", "dpaat", "--name", "dp", *common]) == 0
    capsys.readouterr()
    refused = subprocess.run([sys.executable, "bench/hd_demos.py", str(store / "hard"), "--dest", str(dest)],
                             cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert refused.returncode != 0 and "which is not shipped: give that run first" in refused.stderr
    assert not dest.exists() or not any(dest.iterdir())                       # nothing half-made left behind
    proc = subprocess.run([sys.executable, "bench/hd_demos.py", str(store / "erm"), str(store / "hard"),
                           "--dest", str(dest), "--curve-samples", "4"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    later = subprocess.run([sys.executable, "bench/hd_demos.py", str(store / "dp"), "--dest", str(dest),   # its source
                            "--curve-samples", "4"], cwd=ROOT, capture_output=True, text=True, timeout=600)  # shipped
    assert later.returncode == 0, later.stderr[-2000:]
    erm, hard = dest / "demo-erm-resnet8-ham10000-16px", dest / "demo-pgd_at-resnet8-ham10000-16px"
    dp = dest / "demo-dpaat-resnet8-ham10000-16px"
    assert sorted(p.name for p in dest.iterdir()) == sorted([erm.name, hard.name, dp.name])   # no temporary folder
    assert sorted(f.name for f in (dp / "dynamics").iterdir()) == ["epoch_001.npz"]   # the eps memory, per epoch
    config = json.loads((hard / "config.json").read_text())
    assert config["run_id"] == hard.name and config["data"]["spec"] == "ham10000:../shared/data/ham10000_images"
    assert config["dataset"]["source_path"] == "../shared/data/ham10000_images"
    assert config["model"]["init_from"] == f"checkpoints/{erm.name}" and config["init"]["run_id"] == erm.name
    assert config["model"]["gradcam_layer"] == "backbone.layer2"                   # kept from the run it started from
    assert not (erm / "dynamics").exists() and not (hard / "dynamics").exists()     # no eps memory to show
    assert not (erm / "last.pt").exists() and (erm / "fp16_check.json").is_file()
    for run_dir in (erm, hard, dp):
        run = runs.load_run(run_dir)
        assert run.state == "done" and run.has_weights
        stored = safe_open(str(run_dir / "weights.safetensors"), "pt")
        assert {stored.get_tensor(k).dtype for k in stored.keys()} & {torch.float16}     # rounded, as shipped
        check = json.loads((run_dir / "fp16_check.json").read_text())
        assert check["n"] == len(loading.load_run_data(run_dir, "test")) and "changed_clean_predictions" in check
        test = loading.load_run_data(run_dir, "test")                # the relative spec, from the checkout
        protocol = pd.read_csv(run_dir / "protocol.csv")
        assert {"pgd", "ifgsm"} <= set(protocol["attack"]) and {"l2", "linf"} <= set(protocol["norm"])
        assert (run_dir / "per_class.csv").is_file() and (run_dir / "apgd.csv").is_file()
        assert pd.read_csv(run_dir / "per_class.csv").groupby("preset").n.sum().eq(len(test)).all()   # all images
        assert set(runs.read_robustness(run_dir).n) == {min(4, len(test))}                   # the curves: a draw
        images = runs.read_attribution_images(run_dir)
        assert set(images["method"]) == {"gradcam", "saliency"}
        assert set(images[images["method"] == "gradcam"]["index"]) == set(range(len(test)))   # every test image
        assert not (run_dir / "report.html").exists()
    text = proc.stdout + proc.stderr
    assert f"[ship] {erm.name}" in text and f"[ship] {hard.name}" in text
    assert json.loads((dp / "config.json").read_text())["model"]["init_from"] == f"checkpoints/{erm.name}"


def test_a_run_continuing_a_shipped_run_replaces_it_and_names_its_source_by_the_commit_that_held_it(tmp_path,
                                                                                                   monkeypatch):
    """Shipping a run that continued a shipped one (``--init-from checkpoints/ID``) under the same id: refused until
    a commit holds the source, then the record names ``ID@COMMIT`` (whose weights are the ones it started from),
    never itself; shipping it again over its own weights is refused."""
    monkeypatch.chdir(ROOT)
    store, dest = tmp_path / "store", tmp_path / "checkpoints"
    common = ["--epochs", "1", "--image-size", "16", "--device", "cpu", "--quiet", "--store", str(store)]
    assert main(["train", "--data", f"ham10000:{JPEGS.resolve()}", "--model", "resnet8", "--method", "erm",
                 "--gradcam-layer", "layer2", "--name", "erm", *common]) == 0

    def ship(run):
        return subprocess.run([sys.executable, "bench/hd_demos.py", str(store / run), "--dest", str(dest),
                               "--curve-samples", "4"], cwd=ROOT, capture_output=True, text=True, timeout=600)

    assert ship("erm").returncode == 0
    shipped = dest / "demo-erm-resnet8-ham10000-16px"
    assert main(["train", "--init-from", str(shipped), "--method", "erm", "--name", "more", *common]) == 0
    refused = ship("more")
    assert refused.returncode != 0 and "which no commit holds: commit it first" in refused.stderr
    assert runs.load_run(shipped).record.init is None                                    # the shipped run kept
    git = dict(cwd=dest, check=True, capture_output=True, text=True)
    subprocess.run(["git", "init", "-q"], **git)
    subprocess.run(["git", "add", "."], **git)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "erm"], **git)
    full = subprocess.run(["git", "log", "-1", "--format=%H"], **git).stdout.strip()
    commit = full[:7]
    proc = ship("more")
    assert proc.returncode == 0, proc.stderr[-2000:]
    config = json.loads((shipped / "config.json").read_text())
    assert config["init"]["run_id"] == f"{shipped.name}@{commit}" and config["init"]["commit"] == full
    assert config["model"]["init_from"] == f"checkpoints/{shipped.name}@{commit}"
    held = subprocess.run(["git", "show", f"{commit}:{shipped.name}/weights.safetensors"], cwd=dest, check=True,
                          capture_output=True).stdout
    assert hashlib.sha256(held).hexdigest() == config["init"]["weights_sha256"]          # what it started from
    assert runs.load_run(shipped).epochs_done == 1 and sorted(p.name for p in dest.iterdir()) == [".git",
                                                                                                shipped.name]
    again = ship("more")                  # its source folder now holds its own weights, not the ones it started from
    assert again.returncode != 0 and "did not start from the weights shipped as" in again.stderr


def test_the_shipped_store_stays_small_enough_to_travel_with_the_checkout():
    """Every file of checkpoints/ under 20 MB and the store under 40 MB: the checkout goes to a GPU machine whole."""
    files = [f for f in (ROOT / "checkpoints").rglob("*") if f.is_file()]
    sizes = {f.relative_to(ROOT): f.stat().st_size for f in files}
    assert max(sizes.values()) < 20e6, max(sizes, key=sizes.get)
    assert sum(sizes.values()) < 40e6, sum(sizes.values())


HD = ("erm", "pgd_at", "dpaat")


def test_a_fresh_clone_opens_on_a_128px_model_whose_maps_say_how_far_to_trust_them(shared_data):
    """The shipped 128 px runs (bench/hd_demos.py): one of them is what every page opens on, the Robustness page
    compares the three, their audited accuracy is their weights' own, Grad-CAM explains an 8x8 map, and the trust
    line beside the maps gives the audited figures."""
    from dpaat_core.evaluate import defaults, trust
    from dpaat_core.evaluate.audit import read_protocol
    from dpaat_core.evaluate.robustness import clean_logits
    from dpaat_core.models import gradcam_layer
    store = ROOT / "checkpoints"
    shipped = [f"demo-{m}-mobilenet_v3_small-ham10000-128px" for m in HD]
    found = runs.list_runs(store)
    opened = defaults.default_run(found, store)
    assert opened in shipped
    assert set(defaults.comparison(found, store)) >= set(shipped)
    for run_id in shipped:
        run = runs.load_run(store / run_id)
        assert run.state == "done" and run.record.image_size == 128
        model, test = loading.load_model(run.path), loading.load_run_data(run.path, "test")
        assert len(test) == 1828 and test.masks is not None
        protocol = runs.select(read_protocol(run.path), split="test").set_index("preset")
        assert protocol["n"].eq(len(test)).all()                      # the whole test split
        pred = clean_logits(model, test).argmax(1).numpy()
        recall = [float((pred[test.labels.numpy() == k] == k).mean()) for k in range(7)]
        assert sum(recall) / 7 == pytest.approx(protocol.loc["pgd20_l2", "balanced_accuracy"], abs=1e-6)
        shapes = []
        hook = gradcam_layer(model).register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape[-2:])))
        model(test.batch(torch.arange(2))[0])
        hook.remove()
        assert shapes == [(8, 8)]
        balanced, source = trust.accuracy(run.path, run.record, run.best)
        where = trust.saved_localisation(run.path, run.record, "gradcam")
        assert source == "test split, audit" and where.images >= 1800
        level, text = trust.trust_line(balanced, source, where)
        assert f"Balanced accuracy {balanced:.2f} (test split, audit)" in text
        assert (level == "trust") == (balanced >= trust.WEAK_ACCURACY and where.low >= trust.LOCALISATION_MARGIN)
