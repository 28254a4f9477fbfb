"""The faults a careless user and a hostile visitor found in the newer commands: each is one clear line (or a result
that says what it is), and nothing saved is lost or half-written."""
from __future__ import annotations

import base64
import contextlib
import hashlib
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import safetensors.torch
import torch

from dpaat_core import plots
from dpaat_core.cli import launch
from dpaat_core.store import runs
from dpaat_core.config import RunConfig, method_config
from dpaat_core.report import report_html
from dpaat_core.train.loop import train
from conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def cli(*argv, timeout=300) -> subprocess.CompletedProcess:
    """The command in its own interpreter, for hostile input that could hang or exhaust the process (a FIFO, a
    deeply nested config, a huge draw); the rest run in this one (``run_cli``)."""
    return subprocess.run([sys.executable, "-m", "dpaat_core", *map(str, argv)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def one_line(done: subprocess.CompletedProcess, says: str) -> None:
    """Exit 2 with one ``error:`` line that says ``says``, and no traceback."""
    err = done.stderr
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error")]
    assert done.returncode == 2 and "Traceback" not in err and len(lines) == 1, err[-2000:]
    assert says in lines[0], lines[0]


def tiny_run(store: Path, name="r", size=16, epochs=1, spec="synthetic:n=24,classes=3") -> Path:
    cfg = RunConfig().replace(data={"spec": spec, "image_size": size}, attack={"steps": 1},
                              method=method_config("erm"), train={"epochs": epochs, "batch_size": 16, "device": "cpu"})
    return train(cfg, store=store, run_id=name)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return tiny_run(tmp_path_factory.mktemp("store"), "tiny")


@contextlib.contextmanager
def read_only(folder: Path):
    """``folder`` that this process cannot write into: mode 0555, or for root (whom modes do not stop) the
    immutable attribute; skipped where neither holds."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield folder
        finally:
            folder.chmod(0o755)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
        pytest.skip("running as root on a file system without chattr +i: no folder here is read-only to us")
    try:
        yield folder
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


# ------------------------------------------------------------------------------- 1, 2, 14: import's bad inputs

@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A resnet18's weights as a user would save them, and broken copies: NaN, inf, a FIFO."""
    import torchvision
    folder = tmp_path_factory.mktemp("weights")
    state = torchvision.models.resnet18(num_classes=3).state_dict()
    torch.save(state, folder / "good.pt")
    nan = dict(state) | {"fc.weight": torch.full_like(state["fc.weight"], math.nan)}
    safetensors.torch.save_file({k: v.contiguous() for k, v in nan.items()}, folder / "nan.safetensors")
    torch.save(dict(state) | {"conv1.weight": state["conv1.weight"].clone().fill_(math.inf)}, folder / "inf.pt")
    os.mkfifo(folder / "fifo")
    return folder


@pytest.mark.parametrize("flags, says", [
    (["--weights", "nan.safetensors"], "fc.weight holds NaN or infinite values"),
    (["--weights", "inf.pt"], "conv1.weight holds NaN or infinite values"),
    (["--std", "inf,1,1"], "--std must be finite numbers"),
    (["--mean", "1e308,1,1", "--std", "1e-308,1,1"], "--mean values must lie in [-1000, 1000]"),
    (["--std", "1e-308,1,1"], "--std values must lie in [0.0001, 1000]"),
    (["--mean", "nan,0.5,0.5"], "--mean must be finite numbers"),
    (["--gradcam-layer", "fc"], "--gradcam-layer fc: a Linear that gives (1, 3), not a feature map"),
    (["--gradcam-layer", "avgpool"], None),                               # 4-D, 1x1: allowed (a map of one pixel)
    (["--weights", "."], "a folder, not a weights file"),
    (["--weights", "fifo"], "not a regular file"),
    (["--weights", "/dev/zero"], "not a regular file"),
])
def test_an_import_of_weights_that_cannot_predict_is_refused(weights, tmp_path, flags, says):
    argv = {"--arch": "resnet18", "--weights": "good.pt", "--image-size": "32", "--classes": "a,b,c",
            "--store": str(tmp_path), "--name": "bad"}
    argv.update(zip(flags[::2], flags[1::2]))
    argv["--weights"] = str(weights / argv["--weights"])
    done = cli("import", *[x for kv in argv.items() for x in kv])
    if says is None:
        assert done.returncode == 0, done.stderr
        return
    one_line(done, says)
    assert not (tmp_path / "bad").exists()


def test_a_run_whose_weights_turned_non_finite_says_so(run, tmp_path):
    broken = shutil.copytree(run, tmp_path / "broken")
    state = safetensors.torch.load_file(str(broken / "weights.safetensors"))
    first = next(k for k, v in state.items() if v.is_floating_point())
    state[first] = torch.full_like(state[first], math.nan)
    safetensors.torch.save_file(state, str(broken / "weights.safetensors"))
    one_line(run_cli("evaluate", broken, "--eps-grid", "0,0.1", "--max-samples", "4"),
             f"{first} holds NaN or infinite values")
    assert not (broken / "robustness.csv").exists()


def test_a_reference_with_no_errors_explains_its_mce(run, tmp_path):
    reference = shutil.copytree(run, tmp_path / "perfect")
    done = run_cli("evaluate", run, "--corruptions", "all", "--severities", "1")
    assert done.returncode == 0, done.stderr
    grid = runs.read_corruptions(run)
    runs.atomic_write_text(reference / runs.CORRUPTIONS_FILE, grid.assign(accuracy=1.0, balanced_accuracy=1.0)
                           .to_csv(index=False))
    done = run_cli("evaluate", run, "--corruptions", "all", "--severities", "1", "--reference", reference)
    assert done.returncode == 0, done.stderr
    assert "mCE undefined (the reference makes no error under" in done.stdout
    assert "relative mCE undefined (no corruption lowers the reference's accuracy)" in done.stdout
    assert "nan" not in done.stdout.split("mean corrupted accuracy")[1]


# --------------------------------------------------------------------------------------------- 3, 4, 5: report

def _table_with_a_bad_cell(run_dir: Path, name: str) -> None:
    rows = {"protocol.csv": "preset,accuracy,robust_accuracy,eps,split,data\npgd20_l2,0.5,zero point four,0.3,test,x\n",
            "apgd.csv": "norm,split,data,eps,pgd20,robust_accuracy\nl2,test,x,0.3,0.4,about a third\n",
            "attribution.csv": "method,metric,mean,std,median,n,split,data\ngradcam,spearman,high,0.1,0.5,8,test,x\n"}
    (run_dir / name).write_text(rows[name])


@pytest.mark.parametrize("name, column", [("protocol.csv", "robust_accuracy"), ("apgd.csv", "robust_accuracy"),
                                          ("attribution.csv", "mean")])
def test_a_report_on_a_table_with_a_word_for_a_number_names_the_file(run, tmp_path, name, column):
    damaged = shutil.copytree(run, tmp_path / "damaged")
    _table_with_a_bad_cell(damaged, name)
    done = run_cli("report", damaged, "-o", tmp_path / "r.html", "--examples", "0")
    one_line(done, f"{damaged / name}: column {column}, row 2 holds")
    assert not (tmp_path / "r.html").exists()


MARKUP = "<b>l2</b><a href='https://example.org'>x</a>"


def test_markup_in_a_saved_table_is_text_in_every_figure(run):
    curves = pd.DataFrame({"eps": [0, 0.3], "accuracy": [0.9, 0.4], "attack": "pgd", "norm": MARKUP, "steps": 20,
                           "run": "r"})
    fig = plots.robustness_chart(curves)
    shown = [a.text for a in fig.layout.annotations] + [fig.layout.xaxis.title.text, fig.layout.title.text]
    shown += [t.hovertemplate for t in fig.data] + [t.name for t in fig.data]
    assert not [s for s in shown if s and ("<b>" in s or "<a " in s)], shown
    assert any("&lt;b&gt;l2&lt;/b&gt;" in s for s in shown if s)


def test_the_report_lets_only_its_own_scripts_run(run, tmp_path):
    marked = shutil.copytree(run, tmp_path / "marked")
    curves = pd.DataFrame({"eps": [0, 0.3], "accuracy": [0.9, 0.4], "attack": "pgd", "norm": MARKUP, "steps": 20,
                           "monotone": True, "n": 8, "split": "test", "data": "synthetic:n=24,classes=3"})
    curves.to_csv(marked / "robustness.csv", index=False)
    page = report_html([marked], n_examples=0)
    policy = re.search(r'script-src ([^;]*);', page).group(1)
    allowed = set(re.findall(r"'sha256-([^']+)'", policy))
    scripts = re.findall(r"<script[^>]*>(.*?)</script>", page, flags=re.S)
    digest = {base64.b64encode(hashlib.sha256(s.encode()).digest()).decode(): s for s in scripts}
    figures = page.count('class="plotly-graph-div"')
    assert figures >= 1 and len(allowed) == figures + 1                  # plotly itself and one script a figure
    assert all(h in digest and ("Plotly.newPlot" in digest[h] or len(digest[h]) > 1_000_000) for h in allowed)
    assert "<b>l2</b>" not in page


def test_a_viewers_report_names_no_path_of_the_server(tmp_path):
    data = tmp_path / "private" / "clinic"
    data.mkdir(parents=True)
    shutil.copy(SHARED / "ham10000_sample.npz", data / "derma.npz")
    run_dir = tiny_run(tmp_path / "store", "seen", spec=f"npz:{data / 'derma.npz'}")
    page = report_html([run_dir], n_examples=2, viewer=True)
    assert str(tmp_path) not in page and "/private/clinic" not in page
    assert "npz derma.npz" in page and "audit &lt;store&gt;/seen" in page
    full = report_html([run_dir], n_examples=0)                           # the owner's own report keeps them
    assert str(data / "derma.npz") in full


# ----------------------------------------------------------------------------------------- 6, 7: train's inputs

def _config_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.json"
    path.write_text(text)
    return path


BASE = '"data": {"spec": "synthetic:n=24,classes=3", "image_size": 16}, "method": {"name": "erm"}'


@pytest.mark.parametrize("text, says", [
    ('{' + BASE + ', "trian": {"epochs": 1}}', "unknown section(s) 'trian'"),
    ('{"data": {"spec": "synthetic:n=100000000"}, "method": {"name": "erm"}, "train": {"epochs": 1}}',
     "synthetic n must be at most 100,000"),
    ('{' + BASE + ', "train": {"epochs": 1}, "model": {"name": "resnet8", "normalization": '
                  '{"mean": [0, 0, 0], "std": [0, 0, 0]}}}', "model.normalization.std values must lie in"),
    ('{' + BASE + ', "train": {"epochs": 1, "device": "cuda"}}', "no CUDA device is available"),
    ('{"a":' * 100_000 + '1' + '}' * 100_000, "nested too deeply"),
], ids=["misspelt-section", "huge-synthetic", "zero-std", "cuda", "deep-nesting"])
def test_a_bad_config_file_is_one_line_and_leaves_no_run(tmp_path, text, says):
    if "cuda" in text and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    done = cli("train", "--config", _config_file(tmp_path, text), "--store", tmp_path / "store", timeout=60)
    one_line(done, says)
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").iterdir())


def test_synthetic_data_too_big_to_draw_is_refused_before_drawing():
    from dpaat_core.data import DataError, load_dataset
    with pytest.raises(DataError, match="would take about 264 GiB"):
        load_dataset("synthetic:n=90000", "train", 256)


@pytest.mark.parametrize("source, says", [("missing", "no such folder"), ("file.pt", "a file, not a run folder"),
                                          ("corrupt", "not a run to start from (corrupt/config.json: not valid JSON")])
def test_a_bad_start_names_the_source_not_the_data(tmp_path, source, says):
    (tmp_path / "file.pt").write_bytes(b"\0")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "config.json").write_text("{nope")
    done = subprocess.run([sys.executable, "-m", "dpaat_core", "train", "--init-from", source, "--method", "erm",
                           "--epochs", "1", "--store", "store"], cwd=tmp_path, capture_output=True, text=True,
                          env=os.environ | {"PYTHONPATH": str(ROOT)}, timeout=120)
    one_line(done, f"--init-from {source}: {says}")


# ------------------------------------------------------------------------------------------------ 8: 8 px images

@pytest.mark.slow
def test_attribute_and_audit_work_on_8_px_images(tmp_path):
    small = tiny_run(tmp_path, "small", size=8)
    done = run_cli("attribute", small, "--n", "4", "--methods", "saliency")
    assert done.returncode == 0, done.stderr
    ssim = runs.read_attribution(small).query("metric == 'ssim'")["mean"]
    assert len(ssim) == 1 and -1 <= float(ssim.iloc[0]) <= 1
    done = run_cli("audit", small, "--max-samples", "8", "--attribution-images", "4", "--apgd-steps", "2", "--no-report")
    assert done.returncode == 0, done.stderr


# -------------------------------------------------------------------------------- 9, 10, 11, 12: what is saved

@pytest.mark.slow
def test_a_run_still_training_is_not_measured(tmp_path):
    cfg = RunConfig().replace(data={"spec": "synthetic:n=400,classes=3", "image_size": 32}, attack={"steps": 3},
                              method=method_config("dpaat"), train={"epochs": 50, "batch_size": 8, "device": "cpu"})
    launch.launch(cfg, tmp_path, "busy")
    busy = tmp_path / "busy"
    try:
        for _ in range(600):
            if (busy / "status.json").exists() and runs.load_run(busy).state == "running":
                break
            time.sleep(0.1)
        for argv in (["evaluate", busy, "--eps-grid", "0,0.1", "--max-samples", "4"],
                     ["attribute", busy, "--n", "2", "--methods", "saliency"]):
            one_line(run_cli(*argv), "busy is still training (epoch")
        assert not (busy / "robustness.csv").exists() and not (busy / "attribution.csv").exists()
    finally:
        launch.stop(busy)


def test_a_quick_look_does_not_replace_a_fuller_curve(run):
    for n in ("5", "3"):
        done = run_cli("evaluate", run, "--eps-grid", "0,0.3", "--max-samples", n, "--steps", "2")
        assert done.returncode == 0, done.stderr
    every = runs.read_robustness(run, fullest=False)
    assert sorted(every.n.unique()) == [3, 5] and len(every) == 4
    shown = runs.read_robustness(run)
    assert list(shown.n.unique()) == [5] and sorted(shown.eps) == [0, 0.3]


def test_a_read_only_run_is_refused_before_any_work(run, tmp_path):
    frozen = shutil.copytree(run, tmp_path / "frozen")
    before = {p.name: p.read_bytes() for p in frozen.iterdir() if p.is_file()}
    with read_only(frozen):
        for command in (["attribute", frozen, "--n", "4", "--methods", "saliency"],
                        ["audit", frozen, "--max-samples", "4", "--no-report"]):
            done = run_cli(*command)
            one_line(done, f"{frozen}: cannot write into this run folder")
            assert "nothing was computed" in done.stderr
    assert {p.name: p.read_bytes() for p in frozen.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("where, says", [("missing/r.html", "its folder"), ("afile/r.html", "is a file, not a folder"),
                                         ("sub.html", "a folder; name the report's file")])
def test_a_report_into_a_bad_place_names_that_place(run, tmp_path, where, says):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "sub.html").mkdir()
    done = run_cli("report", run, "-o", tmp_path / where, "--examples", "0")
    one_line(done, says)
    assert ".tmp" not in done.stderr


def test_a_report_into_a_read_only_folder_names_the_report(run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with read_only(out):
        done = run_cli("report", run, "-o", out / "r.html", "--examples", "0")
    one_line(done, f"{out / 'r.html'}: cannot write the report there")
    assert ".tmp" not in done.stderr
