"""``python -m dpaat_core attribute RUN_DIR``: attribution numbers written into the run."""
from __future__ import annotations

import pandas as pd
import pytest

from dpaat_core.store import loading, runs
from dpaat_core.__main__ import main
from dpaat_core.config import RunConfig, method_config
from dpaat_core.train.loop import train


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    cfg = RunConfig().replace(data={"spec": "synthetic:n=64,classes=3", "image_size": 16}, attack={"steps": 2},
                              method=method_config("erm"), train={"epochs": 1, "batch_size": 16, "device": "cpu"})
    return train(cfg, store=tmp_path_factory.mktemp("store"), run_id="erm")


def test_attribute_writes_a_summary_per_method(run, capsys):
    assert main(["attribute", str(run), "--methods", "gradcam,saliency", "--n", "6", "--steps", "2"]) == 0
    table = pd.read_csv(run / "attribution.csv")
    assert set(table["method"]) == {"gradcam", "saliency"}
    spearman = table[table["metric"] == "spearman"].set_index("method")
    assert ((spearman["mean"] >= -1) & (spearman["mean"] <= 1)).all()
    assert (spearman["n"] == 6).all()
    assert table["eps"].unique().tolist() == [runs.read_config(run)["attack"]["eps"]]
    assert "spearman" in capsys.readouterr().out


@pytest.mark.parametrize("extra, says", [(["--methods", "gradcam,nope"], "--methods"), (["--n", "0"], "--n"),
                                         (["--eps", "-1"], "--eps")])
def test_bad_input_exits_2_with_one_line_and_keeps_the_old_file(run, capsys, extra, says):
    (run / "attribution.csv").write_text("kept\n")
    assert main(["attribute", str(run), *extra]) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1
    assert (run / "attribution.csv").read_text() == "kept\n"


def test_attribute_all_writes_every_images_numbers_and_merges_per_method(tmp_path, run, capsys):
    import shutil
    own = tmp_path / "run"
    shutil.copytree(run, own)
    (own / "attribution.csv").unlink(missing_ok=True)
    assert main(["attribute", str(own), "--methods", "gradcam,saliency", "--n", "5", "--steps", "2"]) == 0
    assert main(["attribute", str(own), "--methods", "gradcam", "--n", "all", "--steps", "2"]) == 0
    n_test = len(loading.load_run_data(own, "test"))
    images = runs.read_attribution_images(own)
    cam, sal = images[images.method == "gradcam"], images[images.method == "saliency"]
    assert list(cam["index"]) == list(range(n_test)) and len(sal) == 5       # gradcam replaced, saliency kept
    assert cam["confidence_clean"].between(0, 1).all() and cam["spearman"].between(-1, 1).all()
    means = runs.read_attribution(own).set_index(["method", "metric"])
    assert means.loc[("gradcam", "spearman"), "n"] == n_test and means.loc[("saliency", "spearman"), "n"] == 5
    assert means.loc[("gradcam", "spearman"), "mean"] == pytest.approx(cam["spearman"].mean())
    assert "attribution_images.csv" in capsys.readouterr().err
