"""Natural corruptions: each one does what MedMNIST-C's does (checked against PIL / scipy where they define it),
reproducibly per image; the corruption grid, the corruption error and the CLI around them."""
import io
import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageEnhance

from dpaat_core.evaluate import corruptions as C
from dpaat_core.store import runs
from dpaat_core.evaluate.corruption_eval import corruption_error, corruption_grid
from dpaat_core.data import load_dataset
from conftest import run_cli


def _images(n=4, size=32, seed=0) -> torch.Tensor:
    """Smooth random colour images (a lesion-like blob on skin-like ground), values well inside [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    blob = torch.exp(-(xx ** 2 + yy ** 2) * 3)
    base = torch.rand(n, 3, 1, 1, generator=g) * 0.3 + 0.45
    return (base - 0.3 * blob + 0.05 * torch.rand(n, 3, size, size, generator=g)).clamp(0, 1)


def _pil(x: torch.Tensor) -> Image.Image:
    return Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def _tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)


@pytest.mark.parametrize("name", C.NAMES)
def test_every_corruption_keeps_shape_and_range_changes_the_image_and_repeats(name):
    x = _images(size=224 if name == "characters" else 32)   # characters are 3-4 px letters at 224 px
    for severity in C.SEVERITIES:
        out = C.corrupt(x, name, severity, seed=1)
        assert out.shape == x.shape and out.dtype == x.dtype
        assert out.min() >= 0 and out.max() <= 1
        assert (out - x).abs().max() > 1 / 255, (name, severity)
        assert torch.equal(out, C.corrupt(x, name, severity, seed=1))      # same seed, same images: same result
    assert torch.equal(x, _images(size=x.shape[-1]))                      # the input is left as it was


@pytest.mark.parametrize("name", ["gaussian_noise", "speckle_noise", "impulse_noise", "shot_noise", "motion_blur",
                                  "characters"])
def test_random_corruptions_are_seeded_per_image_not_per_batch(name):
    x = _images(n=6, size=48)
    whole = C.corrupt(x, name, 3, seed=5, index=range(10, 16))
    part = C.corrupt(x[[4, 1]], name, 3, seed=5, index=[14, 11])          # other batch, other order
    assert torch.equal(whole[[4, 1]], part)
    assert not torch.equal(whole, C.corrupt(x, name, 3, seed=6, index=range(10, 16)))   # another seed: other draws
    assert not torch.equal(whole[0], C.corrupt(x[:1], name, 3, seed=5, index=[11])[0])   # another index too


@pytest.mark.parametrize("name", ["gaussian_noise", "speckle_noise", "impulse_noise", "shot_noise", "brightness_up",
                                  "brightness_down", "contrast_down", "pixelate", "jpeg_compression", "zoom_blur"])
def test_a_higher_severity_changes_the_image_more(name):
    x = _images(n=8, size=64)
    change = [float((C.corrupt(x, name, s) - x).abs().mean()) for s in C.SEVERITIES]
    assert change[-1] > change[0] and sum(b >= a for a, b in zip(change, change[1:])) >= 3, change


@pytest.mark.parametrize("name, enhancer", [("brightness_up", ImageEnhance.Brightness),
                                            ("brightness_down", ImageEnhance.Brightness),
                                            ("contrast_up", ImageEnhance.Contrast),
                                            ("contrast_down", ImageEnhance.Contrast)])
def test_colour_corruptions_match_pil_as_medmnist_c_uses_it(name, enhancer):
    x = _images(n=3, size=32)
    for severity in (1, 5):
        factor = C.CORRUPTIONS[name].params[severity - 1]
        ours = C.corrupt(x, name, severity)
        for i in range(3):
            theirs = _tensor(enhancer(_pil(x[i])).enhance(factor))
            assert (ours[i] - theirs).abs().max() <= 3 / 255, (name, severity)


def test_pixelate_and_jpeg_match_pil():
    x = _images(n=2, size=40)
    for i in range(2):
        img = _pil(x[i])
        small = img.resize((int(40 * 0.4), int(40 * 0.4)), Image.BOX).resize((40, 40), Image.BOX)
        assert (C.corrupt(x, "pixelate", 3)[i] - _tensor(small)).abs().mean() <= 2 / 255
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=10)
        theirs = _tensor(Image.open(buf).convert("RGB"))
        assert (C.corrupt(x, "jpeg_compression", 4)[i] - theirs).abs().mean() <= 2 / 255


def test_zoom_blur_matches_medmnist_c_clipped_zoom():
    from scipy.ndimage import zoom as scizoom
    x = _images(n=1, size=64)
    img = x[0].permute(1, 2, 0).numpy()
    zooms = C.CORRUPTIONS["zoom_blur"].params[2]
    out = np.zeros_like(img)
    for z in zooms:                                   # MedMNIST-C's clipped_zoom
        ch = int(np.ceil(64 / z))
        top = (64 - ch) // 2
        zoomed = scizoom(img[top:top + ch, top:top + ch], (z, z, 1), order=1)
        trim = (zoomed.shape[0] - 64) // 2
        out += zoomed[trim:trim + 64, trim:trim + 64]
    theirs = torch.from_numpy((img + out) / (len(zooms) + 1)).permute(2, 0, 1)
    assert (C.corrupt(x, "zoom_blur", 3)[0] - theirs).abs().mean() <= 2 / 255


def test_noise_levels_are_the_published_ones():
    x = torch.full((2, 3, 96, 96), 0.5)
    for s, c in zip(C.SEVERITIES, C.CORRUPTIONS["gaussian_noise"].params):
        assert abs(float((C.corrupt(x, "gaussian_noise", s) - x).std()) - c) < 0.1 * c
    flipped = (C.corrupt(x, "impulse_noise", 5) != x).float().mean()
    assert abs(float(flipped) - 0.17) < 0.01                  # the share of values set to 0 or 1
    shot = C.corrupt(x, "shot_noise", 1)                      # Poisson(0.5 * 60) / 60: mean kept, variance 0.5 / 60
    assert abs(float(shot.mean()) - 0.5) < 0.005 and abs(float(shot.var()) / (0.5 / 60) - 1) < 0.05


def test_black_corner_blacks_out_everything_outside_the_field_of_view():
    x = torch.rand(1, 3, 64, 64) * 0.5 + 0.25
    for s, factor in zip(C.SEVERITIES, C.CORRUPTIONS["black_corner"].params):
        out = C.corrupt(x, "black_corner", s)[0]
        yy, xx = np.mgrid[:64, :64] - 32
        outside = torch.from_numpy(xx ** 2 + yy ** 2 > int(32 * factor) ** 2)
        assert out[:, outside].eq(0).all() and torch.equal(out[:, ~outside], x[0][:, ~outside])


def test_blurs_scale_their_pixel_sizes_with_the_image_and_say_so():
    assert "2.29 px at 64" in C.describe("defocus_blur", 5, 64) and "8 px at 224" in C.describe("defocus_blur", 5, 64)
    assert C.describe("motion_blur", 5, 224).endswith("21 px long at 224")
    x = _images(n=2, size=224)
    big = (C.corrupt(x, "defocus_blur", 5) - x).abs().mean()
    small = (C.corrupt(x, "defocus_blur", 1) - x).abs().mean()
    assert big > small > 0


def test_grey_images_are_corrupted_too():
    x = _images(n=2, size=32)[:, :1]
    for name in C.NAMES:
        out = C.corrupt(x, name, 3 if name != "characters" else 5)
        assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1, name
        assert (out - x).abs().max() > 0, name


@pytest.mark.parametrize("name, severity, message", [
    ("blur", 1, "unknown corruption 'blur'; known: pixelate, jpeg_compression"),
    ("pixelate", 0, "severity must be an integer from 1 to 5, got 0"),
    ("pixelate", 6, "got 6"), ("pixelate", 2.5, "got 2.5"), ("pixelate", True, "got True")])
def test_a_bad_name_or_severity_names_the_allowed_values(name, severity, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        C.corrupt(_images(n=1), name, severity)
    with pytest.raises(ValueError, match="shape"):
        C.corrupt(torch.rand(3, 8, 8), "pixelate", 1)


def test_names_and_severities_parse_from_the_command_line_form():
    assert C.parse_names("all") == list(C.NAMES)
    assert C.parse_names("zoom_blur, pixelate,zoom_blur") == ["zoom_blur", "pixelate"]
    assert C.parse_severities("5,1,3") == [1, 3, 5]
    for bad in ("", "x"):
        with pytest.raises(ValueError):
            C.parse_severities(bad)
    with pytest.raises(ValueError, match="known"):
        C.parse_names("pixelate,fog")


class _Threshold(torch.nn.Module):
    """Class 1 when the mean brightness is above 0.45: a model whose answer each corruption moves predictably."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        m = x.mean(dim=(1, 2, 3)) - 0.45 + 0 * self.w
        return torch.stack([-m, m], 1)


def test_the_grid_counts_what_the_model_gets_right_under_each_corruption():
    ds = load_dataset("synthetic:n=40,classes=2", "test", 16)
    grid = corruption_grid(_Threshold(), ds, ["brightness_up", "brightness_down", "pixelate"], [1, 5], batch_size=7)
    assert len(grid) == 1 + 3 * 2 and set(grid.corruption) == {"clean", "brightness_up", "brightness_down", "pixelate"}
    y = ds.labels.numpy()
    for _, row in grid.iterrows():    # recompute each cell by hand
        x = ds.batch(range(len(ds)))[0]
        xc = x if row.corruption == "clean" else C.corrupt(x, row.corruption, int(row.severity), 0, range(len(ds)))
        pred = (xc.mean(dim=(1, 2, 3)) > 0.45).long().numpy()
        assert row.accuracy == pytest.approx((pred == y).mean()) and row.n == len(ds)
    up5 = grid.set_index(["corruption", "severity"]).loc[("brightness_up", 5)]
    assert up5["accuracy:" + ds.classes[1]] == 1.0          # everything brighter: class 1 for all


def test_corruption_error_is_100_for_the_reference_and_scales_with_errors():
    def grid(clean, errs):
        rows = [{"corruption": "clean", "severity": 0, "accuracy": clean}]
        rows += [{"corruption": c, "severity": s, "accuracy": 1 - e} for (c, s), e in errs.items()]
        return pd.DataFrame(rows)
    ref = grid(0.9, {("a", 1): 0.2, ("a", 2): 0.4, ("b", 1): 0.5, ("b", 2): 0.5})
    half = grid(0.95, {("a", 1): 0.1, ("a", 2): 0.2, ("b", 1): 0.25, ("b", 2): 0.25, ("c", 1): 0.9})
    table = corruption_error({"ref": ref, "half": half}).set_index("run")
    assert table.loc["ref", "mce"] == pytest.approx(100) and table.loc["half", "mce"] == pytest.approx(50)
    assert table.loc["half", "cells"] == 4                  # corruption c is not in the reference: left out
    # relative: (0.3 - 2*0.05) / (0.6 - 2*0.1) = 0.5 for a, (0.5 - 0.1) / (1.0 - 0.2) = 0.5 for b
    assert table.loc["half", "relative_mce"] == pytest.approx(50)
    assert table.loc["half", "mean_corrupted"] == pytest.approx(1 - 0.2)
    with pytest.raises(ValueError, match="reference run 'x'"):
        corruption_error({"ref": ref}, "x")
    # a reference that makes no error on a corruption leaves no ratio: mCE is NaN, not a mean over the rest
    perfect = grid(0.9, {("a", 1): 0.0, ("a", 2): 0.0, ("b", 1): 0.5, ("b", 2): 0.5})
    table = corruption_error({"ref": perfect, "half": half}).set_index("run")
    assert np.isnan(table.loc["half", "mce"])
    # relative mCE averages over the corruptions that cost the reference something (here b only)
    assert table.loc["half", "relative_corruptions"] == 1
    assert table.loc["half", "relative_mce"] == pytest.approx(100 * (0.5 - 0.1) / (1.0 - 0.2))


def _tiny_run(store):
    from dpaat_core.config import RunConfig, method_config
    from dpaat_core.train.loop import train
    cfg = RunConfig().replace(data={"spec": "synthetic:n=40,classes=3", "image_size": 16}, attack={"steps": 1},
                              method=method_config("erm"), train={"epochs": 1, "batch_size": 16, "device": "cpu"})
    return train(cfg, store=store, run_id="erm")



def test_evaluate_corruptions_merges_into_its_own_file_and_leaves_the_curves(tmp_path):
    run = _tiny_run(tmp_path)
    assert run_cli("evaluate", str(run), "--steps", "1", "--eps-grid", "0,0.3").returncode == 0
    curves = (run / "robustness.csv").read_text()
    done = run_cli("evaluate", str(run), "--corruptions", "pixelate,black_corner", "--severities", "1,5")
    assert done.returncode == 0, done.stderr
    assert "black_corner" in done.stdout and "mean corrupted accuracy" in done.stdout
    table = runs.read_corruptions(run)
    assert sorted(zip(table.corruption, table.severity)) == [("black_corner", 1), ("black_corner", 5), ("clean", 0),
                                                            ("pixelate", 1), ("pixelate", 5)]
    assert (run / "robustness.csv").read_text() == curves
    # a second evaluation of other cells keeps the first one's; the same cells are replaced, not repeated
    assert run_cli("evaluate", str(run), "--corruptions", "pixelate", "--severities", "3").returncode == 0
    table = runs.read_corruptions(run)
    assert len(table) == 6 and table.duplicated(["corruption", "severity"]).sum() == 0
    # the corruption error against a reference run (here: itself, so 100)
    ref = run_cli("evaluate", str(run), "--corruptions", "pixelate", "--severities", "1,3,5", "--reference", str(run))
    assert ref.returncode == 0 and "mCE 100.0" in ref.stdout, ref.stdout


@pytest.mark.parametrize("flags, message", [
    (["--corruptions", "fog"], "unknown corruption 'fog'; known: pixelate"),
    (["--corruptions", "pixelate", "--severities", "0,6"], "severity must be an integer from 1 to 5"),
    (["--reference", "x"], "--reference applies to --corruptions only"),
    (["--severities", "1"], "--severities applies to --corruptions only"),     # not a silent attack curve
    (["--corruptions", "pixelate", "--reference", "no-such-run"], "--reference no-such-run: not a run folder"),
    (["--corruptions", "pixelate", "--max-samples", "8", "--protocol"], "--protocol, --max-samples do(es) not apply")])
def test_a_bad_corruption_flag_is_one_line_and_writes_nothing(tmp_path, flags, message):
    run = _tiny_run(tmp_path)
    proc = run_cli("evaluate", str(run), *flags)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (run / "corruptions.csv").exists() and not (run / "robustness.csv").exists()


def test_a_reference_without_the_data_is_refused_before_the_work(tmp_path):
    run = _tiny_run(tmp_path)
    proc = run_cli("evaluate", str(run), "--corruptions", "pixelate", "--reference", str(run))
    assert proc.returncode == 2 and "its corruptions.csv has no rows" in proc.stderr
    assert not (run / "corruptions.csv").exists()


def test_explaining_under_a_corruption_uses_the_corrupted_images(tmp_path):
    from dpaat_core.store import loading
    from dpaat_core.evaluate.attribution import clean_and_corrupted, explain_pair
    run = _tiny_run(tmp_path)
    model, data = loading.load_model(run), loading.load_run_data(run, "test")
    x, _ = data.batch([0, 1])
    out = clean_and_corrupted(model, x, "black_corner", 4, index=[0, 1], methods=("gradcam", "saliency"))
    assert torch.equal(out["x_adv"], C.corrupt(x, "black_corner", 4, index=[0, 1]))
    again = explain_pair(model, x, out["x_adv"], methods=("gradcam", "saliency"))
    for m in ("gradcam", "saliency"):
        assert torch.allclose(out["maps"][m][1], again["maps"][m][1])
    assert json.dumps(sorted(out)) == json.dumps(sorted(again))
