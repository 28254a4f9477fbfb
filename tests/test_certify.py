"""Randomized smoothing (dpaat_core.evaluate.certify) against closed forms.

A linear classifier's smoothed class probabilities are known exactly: for ``f(x) = [w.x + b > 0]`` under
``N(0, sigma^2 I)`` noise, ``P(f = 1) = Phi((w.x + b) / (sigma |w|))``, so the true certified radius is the distance to
the decision boundary, ``|w.x + b| / |w|``. Bounds are checked against scipy's own binomial interval and normal
quantile, never against the module's output.
"""
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
from scipy.stats import binomtest, norm

from dpaat_core.store import runs
from dpaat_core.attack.attacks import pgd
from dpaat_core.evaluate.certify import (ABSTAIN, certified_accuracy, certified_radius, certify, certify_dataset, fullest,
                                lower_confidence_bound, noise_counts, predict, summary)
from conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]


class Linear(nn.Module):
    """Two classes: class 1 where ``w.x + b > 0`` (logits ``[-s, s]``), inputs of any shape ``[B, ...]``."""

    def __init__(self, w: torch.Tensor, b: float = 0.0):
        super().__init__()
        self.w = nn.Parameter(w.clone().float(), requires_grad=False)
        self.b = b

    def forward(self, x):
        s = (x.flatten(1) * self.w.flatten()).sum(1, keepdim=True) + self.b
        return torch.cat([-s, s], 1)


def test_lower_bound_is_scipys_one_sided_clopper_pearson_and_the_radius_is_sigma_times_phi_inverse():
    alpha = 0.001
    for k, n in ((0, 100), (1, 100), (57, 100), (99, 100), (100, 100), (9_990, 10_000), (5_000, 10_000)):
        # a two-sided exact interval at 1 - 2 alpha has the one-sided 1 - alpha lower bound as its low end
        want = binomtest(k, n).proportion_ci(confidence_level=1 - 2 * alpha, method="exact").low
        assert lower_confidence_bound(k, n, alpha) == pytest.approx(want, abs=1e-12), (k, n)
    p = np.array([0.3, 0.5, 0.5000001, 0.75, 0.99, 0.999])
    r = certified_radius(p, 0.25)
    assert np.isnan(r[:2]).all(), "no radius at pA <= 1/2: the classifier abstains"
    np.testing.assert_allclose(r[2:], 0.25 * norm.ppf(p[2:]), rtol=1e-12)


@pytest.mark.parametrize("sigma", [0.5, 1.0])
def test_certified_radius_never_exceeds_the_true_one_and_closes_in_as_n_grows(sigma):
    x = torch.tensor([[-1.3], [-0.4], [0.25], [0.6], [1.0], [1.6]]) * sigma
    true = x.abs().squeeze(1).numpy()                         # distance to the boundary x = 0
    model = Linear(torch.ones(1))
    gaps = {}
    for n in (1_000, 100_000):
        # each certificate may fail with probability alpha = 0.001 (seed 3 draws such a 3.1-sigma count for the
        # first image at n = 100,000: 2e-5 above its true radius); seed 0 is a typical draw
        out = certify(model, x, sigma, 2, n0=100, n=n, alpha=0.001, seed=0)
        assert (out["prediction"].to_numpy() == (x.squeeze(1) > 0).long().numpy()).all()
        assert (out["radius"].to_numpy() <= true + 1e-12).all(), f"n={n}: certified {out['radius'].tolist()} > {true}"
        gaps[n] = true - out["radius"].to_numpy()
    # stated tolerance at n = 100,000: within 0.05 sigma of the true radius (the bound's width is ~0.02 sigma here)
    assert (gaps[100_000] <= 0.05 * sigma).all(), gaps[100_000]
    assert (gaps[100_000] < gaps[1_000]).all()


def test_abstains_where_the_top_class_is_not_clearly_above_one_half():
    model = Linear(torch.ones(1))
    x = torch.tensor([[0.0], [0.002], [-0.002], [2.0]])       # on the boundary, a hair off it, and far from it
    out = certify(model, x, 1.0, 2, n0=100, n=2_000, alpha=0.001, seed=0)
    assert (out["prediction"].to_numpy()[:3] == ABSTAIN).all()
    assert out["radius"].isna().to_numpy()[:3].all()
    assert out["prediction"].iloc[3] == 1 and out["radius"].iloc[3] > 1.0
    # PREDICT abstains on a tie and answers far from it
    assert predict(model, x, 1.0, 2, n=2_000, seed=0).tolist() == [ABSTAIN, ABSTAIN, ABSTAIN, 1]

    class Uniform(nn.Module):   # three classes, each a third of the noise: never certified
        def forward(self, x):
            u = x.flatten(1)[:, 0]
            k = torch.bucketize(u, torch.tensor([-0.4307, 0.4307]))   # norm.ppf(1/3) = -0.4307
            return nn.functional.one_hot(k, 3).float()

    out = certify(Uniform(), torch.zeros(3, 1), 1.0, 3, n0=100, n=3_000, seed=1)
    assert (out["prediction"] == ABSTAIN).all() and out["pa_lower"].max() < 0.4


def test_pgd_below_the_certified_radius_never_flips_the_smoothed_prediction():
    """On a linear model the l2 attack is exact (it walks along -w to the boundary), so this is the tightest case."""
    torch.manual_seed(0)
    shape, sigma = (1, 4, 4), 0.5
    w = torch.randn(shape)
    x = 0.3 + 0.4 * torch.rand(16, *shape)
    model = Linear(w, b=-(w.flatten() * 0.5).sum().item())    # boundary through the grey image 0.5
    out = certify(model, x, sigma, 2, n0=100, n=5_000, seed=0)
    certified = out[out["prediction"] != ABSTAIN]
    assert len(certified) >= 8, "most images are certified"
    keep = torch.from_numpy(certified["index"].to_numpy().copy())
    xs, pred = x[keep], torch.tensor(certified["prediction"].to_numpy())
    radius = torch.tensor(certified["radius"].to_numpy()).float()
    fixed = sigma * torch.randn(20_000, *shape, generator=torch.Generator().manual_seed(9))   # Monte Carlo, fixed noise

    def smoothed_share(images):
        """Per image, the share of the fixed noise draws that the base classifier puts in the certified class."""
        return torch.stack([(model(img + fixed).argmax(1) == p).float().mean() for img, p in zip(images, pred)])

    x_adv = pgd(model, xs, pred, radius * 0.99, radius * 0.99 / 4, 50, "l2", validate=False)
    moved = (x_adv - xs).flatten(1).norm(dim=1)
    assert (moved <= radius * 0.99 + 1e-5).all()
    assert (smoothed_share(x_adv) > 0.5).all(), "an attack inside the certified radius changed the smoothed class"
    exact = norm.cdf(((x_adv.flatten(1) @ w.flatten() + model.b) * (2 * pred - 1)).numpy()
                     / (sigma * w.norm().item()))
    assert (exact > 0.5).all()
    # the attack is not toothless: twice the largest true radius flips every image that stays inside [0, 1]
    far = pgd(model, xs, pred, torch.full_like(radius, 2 * float(radius.max()) + 2 * sigma), radius.max(), 200, "l2",
              validate=False)
    assert (smoothed_share(far) < 0.5).float().mean() > 0.5


def test_an_images_certificate_depends_on_its_index_and_seed_not_on_its_batch():
    model = Linear(torch.randn(1, 6, 6), b=0.1)
    x = torch.rand(5, 1, 6, 6)
    whole = certify(model, x, 0.3, 2, n0=50, n=450, seed=7, batch_size=1000)
    part = certify(model, x[[1, 3]], 0.3, 2, n0=50, n=450, seed=7, index=[1, 3], batch_size=30)
    pd.testing.assert_frame_equal(part.reset_index(drop=True), whole.iloc[[1, 3]].reset_index(drop=True))
    other = noise_counts(model, x, 450, 0.3, 2, index=range(5), seed=8)
    same = noise_counts(model, x, 450, 0.3, 2, index=range(5), seed=7)
    assert not np.array_equal(other, same) and same.sum() == 5 * 450


def _store(tmp_path):
    """A trained run on the synthetic set (16 px, resnet8, 1 epoch, gaussian) in a fresh store."""
    done = subprocess.run([sys.executable, "-m", "dpaat_core", "train", "--data", "synthetic:n=96,classes=3",
                           "--model", "resnet8", "--method", "gaussian", "--sigma", "0.25", "--epochs", "1",
                           "--image-size", "16", "--store", str(tmp_path), "--quiet", "--device", "cpu"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    return Path(done.stdout.strip().splitlines()[-1])


def _certify(run_dir, *flags):
    return run_cli("certify", run_dir, *flags)


@pytest.mark.slow
def test_certify_command_merges_rows_and_a_quick_look_never_replaces_a_fuller_run(tmp_path):
    run_dir = _store(tmp_path)
    full = _certify(run_dir, "--sigma", "0.25", "--n", "200", "--n0", "20", "--device", "cpu")
    assert full.returncode == 0, full.stderr
    assert "certified accuracy: 0: " in full.stdout and "abstains on" in full.stdout
    table = runs.read_certified(run_dir)
    test_size = len(pd.read_csv(run_dir / "certified.csv"))
    assert test_size == len(table) > 0 and set(table["sigma"]) == {0.25}
    assert table["pa_lower"].between(0, 1).all()
    assert (table["radius"].isna() == (table["prediction"] == ABSTAIN)).all()
    assert (table["correct"] == (table["prediction"] == table["label"])).all()
    quick = _certify(run_dir, "--sigma", "0.25", "--n", "50", "--n0", "20", "--max-samples", "3", "--device", "cpu")
    assert quick.returncode == 0, quick.stderr
    other = _certify(run_dir, "--sigma", "0.5", "--n", "50", "--n0", "20", "--max-samples", "4", "--device", "cpu")
    assert other.returncode == 0, other.stderr
    table = runs.read_certified(run_dir)
    assert len(table) == test_size + 3 + 4, "every setting's rows are kept"
    # --max-samples draws the images evaluate --max-samples draws (the run's split seed), by their split index
    from dpaat_core.store.loading import load_run_data
    small, whole = load_run_data(run_dir, "test", max_samples=3), load_run_data(run_dir, "test")
    quick_rows = table[(table.n == 50) & (table.sigma == 0.25)]
    assert [whole.source_ids[i] for i in quick_rows["index"]] == list(small.source_ids)
    chosen = fullest(table)
    assert len(chosen[chosen.sigma == 0.25]) == test_size and set(chosen[chosen.sigma == 0.25]["n"]) == {200}
    assert len(chosen[chosen.sigma == 0.5]) == 4
    # the report's certified section: the fullest setting's numbers per sigma, per class, the curve beside PGD
    from dpaat_core.report import report_html
    page = report_html([run_dir], n_examples=0)
    assert "Certified robustness (randomized smoothing)" in page and "certified_accuracy@0.25" in page
    full_rows = chosen[chosen.sigma == 0.25]
    assert f"{summary(full_rows)['certified_accuracy@0']:.3f}" in page
    assert "Certified against attacked accuracy (l2)" in page
    again = _certify(run_dir, "--sigma", "0.25", "--n", "200", "--n0", "20", "--device", "cpu")
    assert again.returncode == 0 and len(runs.read_certified(run_dir)) == test_size + 7, "same setting: replaced"
    pd.testing.assert_frame_equal(runs.read_certified(run_dir), table)   # seeded: the same numbers again


def test_certify_refuses_bad_settings_in_one_line_before_any_work(tmp_path):
    for flags, message in ((["--sigma", "0"], "--sigma must be"), (["--sigma", "inf"], "--sigma must be"),
                           (["--sigma", "0.25", "--n", "0"], "--n must be"),
                           (["--sigma", "0.25", "--alpha", "0.5"], "--alpha must be"),
                           (["--sigma", "0.25", "--max-samples", "0"], "--max-samples must be")):
        done = _certify(tmp_path / "no-such-run", *flags)
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr
    done = _certify(tmp_path / "no-such-run", "--sigma", "0.25")
    assert done.returncode == 2 and "no-such-run" in done.stderr and "Traceback" not in done.stderr


def test_certify_works_on_an_imported_run(tmp_path, shared_data):
    source = ROOT / "checkpoints" / "demo-imported-mobilenet_v3_small-ham10000"
    run_dir = tmp_path / source.name
    shutil.copytree(source, run_dir)
    (run_dir / "certified.csv").unlink(missing_ok=True)
    spec = f"npz:{shared_data / 'ham10000_sample.npz'}"
    done = _certify(run_dir, "--sigma", "0.12", "--n", "100", "--n0", "20", "--max-samples", "3", "--data", spec,
                    "--device", "cpu")
    assert done.returncode == 0, done.stderr
    table = runs.read_certified(run_dir)
    assert len(table) == 3 and set(table["data"]) == {spec} and table["index"].is_unique


def test_summary_and_certified_accuracy_count_only_right_unabstained_images():
    frame = pd.DataFrame({"label": [0, 1, 1, 0], "prediction": [0, 1, ABSTAIN, 1], "correct": [True, True, False, False],
                          "radius": [0.3, 0.8, math.nan, 1.2], "sigma": 0.25, "n": 100})
    np.testing.assert_allclose(certified_accuracy(frame, [0, 0.25, 0.5, 1.0]), [0.5, 0.5, 0.25, 0.0])
    s = summary(frame)
    assert s["images"] == 4 and s["abstain_rate"] == 0.25 and s["median_radius_correct"] == pytest.approx(0.55)
    assert s["certified_accuracy@0.5"] == 0.25


def test_certify_dataset_names_classes_and_abstentions(shared_data):
    from dpaat_core.data import load_dataset
    ds = load_dataset(f"npz:{shared_data / 'ham10000_sample.npz'}", "test", 16, max_samples=6)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, ds.num_classes))
    out = certify_dataset(model, ds, 0.1, n0=20, n=60, indices=[0, 2, 5])
    assert out["index"].tolist() == [0, 2, 5] and out["label"].tolist() == ds.labels[[0, 2, 5]].tolist()
    names = [*ds.classes, "abstain"]
    assert all(c == names[p] for c, p in zip(out["class"], out["prediction"]))
    assert set(out.columns) >= {"sigma", "n0", "n", "alpha", "seed", "pa_lower", "radius", "correct", "top_class"}


def test_a_report_of_an_uncertified_run_names_the_command(tmp_path):
    from dpaat_core.report import report_html
    source = ROOT / "checkpoints" / "demo-erm-resnet8-ham10000"
    run_dir = tmp_path / source.name
    shutil.copytree(source, run_dir, ignore=shutil.ignore_patterns("certified.csv"))
    page = report_html([run_dir], n_examples=0)
    assert f"python -m dpaat_core certify {run_dir} --sigma 0.25" in page


def test_the_gallery_puts_abstentions_first_then_the_smallest_radius_and_uncertified_images_last():
    from dpaat_core.evaluate import gallery
    numbers = pd.DataFrame({"index": range(6), "label": 0, "pred_clean": 0, "spearman": 0.5,
                            "confidence_clean": 0.9})
    certified = pd.DataFrame({"index": [0, 1, 2, 3, 4], "sigma": 0.25, "prediction": [0, ABSTAIN, 0, 1, ABSTAIN],
                              "radius": [0.4, math.nan, 0.1, 0.2, math.nan]})
    table = gallery.with_certificates(numbers, certified)
    assert gallery.order(table, "smallest certified radius")["index"].tolist() == [1, 4, 2, 3, 0, 5]
    with pytest.raises(ValueError, match="certify RUN"):
        gallery.order(numbers, "smallest certified radius")


def test_certified_chart_draws_both_curves_escapes_names_and_says_when_there_is_nothing():
    from dpaat_core.plots import certified_chart
    assert "no certified radii yet" in certified_chart(pd.DataFrame()).layout.annotations[0].text
    name = "<b>x</b>"
    frame = pd.DataFrame({"run": name, "sigma": 0.25, "n": 100, "radius": [0.1, math.nan, 0.3],
                          "correct": [True, False, True], "prediction": [0, ABSTAIN, 1]})
    curves = pd.DataFrame({"run": name, "eps": [0, 0.3, 0.6], "accuracy": [0.5, 0.3, 0.1], "attack": "pgd",
                           "norm": ["l2", "l2", "linf"], "steps": 20, "monotone": True, "split": "test", "data": "d",
                           "n": 128})
    fig = certified_chart(frame, curves)
    names = [t.name for t in fig.data]
    assert len(names) == 2 and not any("<b>" in n for n in names)
    attacked, certified = fig.data
    assert "attacked (PGD-20, 128 images)" in attacked.name and list(attacked.x) == [0, 0.3]   # l2 only
    assert certified.line.dash == "dash" and certified.y[0] == pytest.approx(2 / 3)


def test_a_model_with_non_finite_weights_is_refused_and_nothing_is_written(tmp_path):
    source = ROOT / "checkpoints" / "demo-erm-resnet8-ham10000"
    run_dir = tmp_path / source.name
    shutil.copytree(source, run_dir, ignore=shutil.ignore_patterns("certified.csv"))
    state = runs.load_weights(run_dir / "weights.safetensors")
    name = next(k for k, v in state.items() if v.is_floating_point() and "weight" in k)
    state[name] = torch.full_like(state[name], math.nan)
    runs.save_weights(run_dir / "weights.safetensors", state)
    done = _certify(run_dir, "--sigma", "0.25", "--n", "50", "--n0", "10", "--max-samples", "2", "--device", "cpu")
    assert done.returncode == 2 and f"{name} holds NaN or infinite values" in done.stderr   # refused on load
    assert "Traceback" not in done.stderr
    assert not (run_dir / "certified.csv").exists()


def test_a_certified_table_with_a_bad_cell_is_refused_by_name(tmp_path):
    (tmp_path / "certified.csv").write_text("sigma,n0,n,alpha,split,data,index,label,prediction,correct,pa_lower,"
                                            "radius\n0.25,100,500,0.001,test,d,0,1,1,True,0.9,oops\n")
    with pytest.raises(runs.RunError, match="column radius"):
        runs.read_certified(tmp_path)
    (tmp_path / "certified.csv").write_text("sigma,n0,n,alpha,split,data,index,label,prediction,correct,pa_lower,"
                                            "radius\n0.25,100,500,0.001,test,d,0,1,-1,False,0.4,\n")
    assert runs.read_certified(tmp_path)["radius"].isna().all()
