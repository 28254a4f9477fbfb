"""Attribution maps and their metrics, against Captum, autograd, scipy and constructed cases.

The tests marked ``device`` run models and images on ``$DPAAT_TEST_DEVICE`` (see conftest.py); the
metrics (numpy) and the argument checks run on the CPU.
"""
import math

import matplotlib
import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn.functional as F
from captum.attr import LayerGradCam

from dpaat_core.attack import attacks
from dpaat_core.evaluate.attribution import (
    METHODS, attribute, attribution_report, clean_and_adversarial, energy_in_mask, overlay, pointing_game, spearman,
    ssim, summarize_report, topk_iou,
)
from dpaat_core.data import load_dataset
from dpaat_core.data.dataset import ImageDataset
from dpaat_core.models import build_model, gradcam_layer
from conftest import TEST_DEVICE, on_device

SYNTHETIC = "synthetic:n=512,classes=4"


def _model(name="resnet8", classes=4, channels=3, seed=0, device="cpu"):
    torch.manual_seed(seed)
    return build_model(name, classes, in_channels=channels).to(device).eval()


def _device_model(*args, **kwargs):
    """:func:`_model` (the same weights: drawn on the CPU) on TEST_DEVICE."""
    return _model(*args, device=TEST_DEVICE, **kwargs)


@pytest.fixture(scope="module")
def trained():
    """A resnet8 trained on 32 px synthetic lesions: 200 Adam steps of 32 images (~3 s on 2 cores, ~85-100% test accuracy),
    on TEST_DEVICE."""
    data = load_dataset(SYNTHETIC, "train", 32)
    model, g = _device_model(seed=0).train(), torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(200):
        idx = torch.randint(len(data), (32,), generator=g)
        loss = F.cross_entropy(model(on_device(data.images[idx].float() / 255)), on_device(data.labels[idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def synthetic_test():
    """Images and labels on TEST_DEVICE, masks on the CPU (the metrics take them there)."""
    data = load_dataset(SYNTHETIC, "test", 32)
    return *on_device(data.images.float() / 255, data.labels), data.masks


# ---------------------------------------------------------------- maps

@pytest.mark.device
@pytest.mark.parametrize("name,size", [("resnet8", 32), ("mobilenet_v3_small", 128)])  # mobilenet: a 4x4 CAM at 128 px
def test_gradcam_is_captums_layer_gradcam_upsampled(name, size):
    model = _device_model(name)
    x, target = on_device(torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2]))
    cam = LayerGradCam(model, gradcam_layer(model)).attribute(x, target, relu_attributions=True)
    expected = F.interpolate(cam.detach(), size=(size, size), mode="bilinear", align_corners=False)
    assert cam.shape[-1] < size and expected.amax() > 0  # a coarse, non-trivial map is being upsampled
    torch.testing.assert_close(attribute(model, x, target, "gradcam"), expected)


@pytest.mark.device
def test_gradcam_matches_a_hand_computation(trained, synthetic_test):
    x, y = synthetic_test[0][:4], synthetic_test[1][:4]
    layer, seen = gradcam_layer(trained), {}
    handle = layer.register_forward_hook(lambda m, i, o: seen.__setitem__("features", o))
    logits = trained(x)
    handle.remove()
    (grads,) = torch.autograd.grad(logits.gather(1, y[:, None]).sum(), seen["features"])
    weights = grads.mean((2, 3), keepdim=True)  # Selvaraju et al.: channel weight = spatial mean of the gradient
    cam = F.relu((weights * seen["features"]).sum(1, keepdim=True))
    expected = F.interpolate(cam, size=(32, 32), mode="bilinear", align_corners=False).detach()
    torch.testing.assert_close(attribute(trained, x, y, "gradcam"), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.device
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("channels", [3, 1])
def test_every_method_gives_one_map_per_image(method, channels):
    model = _device_model(channels=channels)
    x = on_device(torch.rand(2, channels, 32, 32, generator=torch.Generator().manual_seed(0)))
    maps = attribute(model, x, 1, method)
    assert maps.shape == (2, 1, 32, 32) and maps.dtype == torch.float32 and not maps.requires_grad
    assert maps.device == x.device
    assert torch.isfinite(maps).all()
    if method != "occlusion":  # occlusion may be negative: hiding a patch can raise the score
        assert (maps >= 0).all()


@pytest.mark.device
def test_saliency_is_the_absolute_input_gradient_summed_over_channels():
    model = _device_model()
    x, target = on_device(torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2)), torch.tensor([3, 0, 1]))
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(xg).gather(1, target[:, None]).sum(), xg)
    torch.testing.assert_close(attribute(model, x, target, "saliency"), grad.abs().sum(1, keepdim=True))


@pytest.mark.device
def test_model_flags_are_restored_and_parameters_get_no_grad():
    model = _device_model().train()
    model.backbone.layer2.eval()  # a mixed state, which a plain model.train() afterwards would lose
    flags = [m.training for m in model.modules()]
    bn = model.backbone.bn1.running_mean.clone()
    x = on_device(torch.rand(2, 3, 32, 32))
    for method in METHODS:
        attribute(model, x, on_device(torch.tensor([0, 1])), method)
    assert [m.training for m in model.modules()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(model.backbone.bn1.running_mean, bn)  # ran in eval mode: statistics untouched


@pytest.mark.parametrize("x,target,method,match", [
    (torch.rand(2, 3, 8, 8), 0, "lime", "gradcam, integrated_gradients, saliency, occlusion, guided_gradcam"),
    (torch.rand(3, 8, 8), 0, "gradcam", r"\[B, C, H, W\]"),
    ((torch.rand(2, 3, 8, 8) * 255).to(torch.uint8), 0, "gradcam", "float"),
    (torch.rand(2, 3, 8, 8) * 2, 0, "gradcam", r"\[0, 1\]"),
    (torch.rand(2, 3, 8, 8), torch.tensor([0, 1, 2]), "gradcam", "target"),
])
def test_bad_arguments_are_refused(x, target, method, match):
    with pytest.raises(ValueError, match=match):
        attribute(_model(), x, target, method)


# ---------------------------------------------------------------- clean vs adversarial

@pytest.mark.device
@pytest.mark.parametrize("attack,norm,eps", [("pgd", "l2", 1.0), ("ifgsm", "linf", 8 / 255), ("fgsm", "linf", 8 / 255)])
def test_clean_and_adversarial_explains_both_for_the_clean_prediction(attack, norm, eps):
    model = _device_model()
    x, y = on_device(torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3)), torch.tensor([0, 1, 2, 3]))
    out = clean_and_adversarial(model, x, y, eps, "saliency", attack, norm, steps=3, generator=torch.Generator().manual_seed(0))
    expected = {"pgd": lambda: attacks.pgd(model, x, y, eps, eps / 4, 3, norm, generator=torch.Generator().manual_seed(0)),
                "ifgsm": lambda: attacks.ifgsm(model, x, y, eps, eps / 3, 3, norm),
                "fgsm": lambda: attacks.fgsm(model, x, y, eps, norm)}[attack]()
    torch.testing.assert_close(out["x_adv"], expected)  # default step: eps/4 (pgd), eps/steps (ifgsm)
    delta = (out["x_adv"] - x).flatten(1)
    size = delta.norm(dim=1) if norm == "l2" else delta.abs().amax(1)
    assert (size <= eps + 1e-5).all() and (size > 0).any() and out["x_adv"].min() >= 0 and out["x_adv"].max() <= 1
    with torch.no_grad():
        torch.testing.assert_close(out["prob_clean"], model(x).softmax(1))
        torch.testing.assert_close(out["prob_adv"], model(out["x_adv"]).softmax(1))
    assert torch.equal(out["pred_clean"], out["prob_clean"].argmax(1)) and torch.equal(out["pred_adv"], out["prob_adv"].argmax(1))
    # Both maps explain the clean prediction, not the adversarial one.
    torch.testing.assert_close(out["map_adv"], attribute(model, out["x_adv"], out["pred_clean"], "saliency"))
    torch.testing.assert_close(out["map_clean"], attribute(model, x, out["pred_clean"], "saliency"))


@pytest.mark.device
def test_zero_budget_gives_identical_maps():
    model, (x, y) = _device_model(), on_device(torch.rand(3, 3, 32, 32), torch.tensor([0, 1, 2]))
    out = clean_and_adversarial(model, x, y, 0.0, "gradcam", target=on_device(torch.tensor([2, 2, 2])))
    assert torch.equal(out["x_adv"], x) and torch.equal(out["map_clean"], out["map_adv"])
    a, b = out["map_clean"], out["map_adv"]
    assert a.amax() > 0
    np.testing.assert_allclose(spearman(a, b), 1.0, atol=1e-9)
    np.testing.assert_allclose(topk_iou(a, b), 1.0)
    np.testing.assert_allclose(ssim(a, b), 1.0, atol=1e-9)


# ---------------------------------------------------------------- agreement between maps

def _noise(n, seed, size=64):
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed))


def test_a_map_agrees_perfectly_with_itself_and_with_a_monotone_transform():
    a = _noise(4, 0) + 0.01
    assert spearman(a, a).shape == (4,)
    np.testing.assert_allclose(spearman(a, a), 1.0, atol=1e-9)
    np.testing.assert_allclose(topk_iou(a, a), 1.0)
    np.testing.assert_allclose(ssim(a, a), 1.0, atol=1e-9)
    np.testing.assert_allclose(spearman(a, a**2), 1.0, atol=1e-9)  # ranks only
    np.testing.assert_allclose(ssim(a, 3 * a + 2), 1.0, atol=1e-9)  # scale-free: maps are min-max normalised first
    assert isinstance(spearman(a[0, 0], a[0, 0]), float)  # one [H, W] map -> a plain number


def test_independent_noise_maps_agree_at_chance_level():
    a, b, k = _noise(16, 1), _noise(16, 2), 0.1
    assert np.abs(spearman(a, b)).max() < 0.1
    assert abs(topk_iou(a, b, k).mean() - k / (2 - k)) < 0.015  # E|top ∩ top'| = k^2 N
    assert ssim(a, b).max() < 0.2


def test_topk_iou_compares_the_highest_pixels():
    hot = torch.zeros(32, 32)
    hot[:8, :13] = 10.0  # ~10% of the pixels
    a, b = hot + 0.1 * _noise(1, 3, 32)[0, 0], hot + 0.1 * _noise(1, 4, 32)[0, 0]
    assert topk_iou(a, b, k=104 / 1024) == 1.0  # same hot region, different cold background
    assert topk_iou(a, torch.roll(b, 16, dims=1), k=104 / 1024) == 0.0


def test_spearman_matches_scipy_on_maps_with_ties():
    g = torch.Generator().manual_seed(5)
    a, b = torch.randint(0, 4, (16, 16), generator=g).float(), torch.rand(16, 16, generator=g).round(decimals=1)
    expected = scipy.stats.spearmanr(a.flatten().numpy(), b.flatten().numpy()).statistic
    assert abs(expected) > 0.01 and spearman(a, b) == pytest.approx(expected, abs=1e-12)
    assert math.isnan(spearman(torch.ones(16, 16), b))


# ---------------------------------------------------------------- localisation

def test_energy_in_mask_and_pointing_game_by_construction():
    mask = torch.zeros(2, 16, 16, dtype=torch.uint8)
    mask[0, 4:8, 4:12] = 1
    mask[1, 10:, :] = 1
    fraction = mask.float().mean((1, 2)).numpy()
    np.testing.assert_allclose(energy_in_mask(mask[:, None].float(), mask), 1.0)
    np.testing.assert_allclose(energy_in_mask(torch.ones(2, 1, 16, 16), mask), fraction)
    signed = mask[:, None].float() - 2 * (1 - mask[:, None].float())  # negative outside: only the positive part counts
    np.testing.assert_allclose(energy_in_mask(signed, mask.bool()), 1.0)
    assert math.isnan(energy_in_mask(torch.zeros(16, 16), mask[0]))

    peak = torch.zeros(2, 1, 16, 16)
    peak[0, 0, 5, 6] = 1.0  # inside mask 0
    peak[1, 0, 2, 2] = 1.0  # outside mask 1
    np.testing.assert_array_equal(pointing_game(peak, mask), [1.0, 0.0])
    assert pointing_game(peak[0, 0], mask[0]) == 1.0 and math.isnan(pointing_game(torch.ones(16, 16), mask[0]))
    tie = peak[0, 0].clone()
    tie[15, 15] = 1.0  # a second, equal maximum outside: the first in row-major order decides
    tie_first_outside = peak[0, 0].clone()
    tie_first_outside[0, 0] = 1.0
    assert pointing_game(tie, mask[0]) == 1.0 and pointing_game(tie_first_outside, mask[0]) == 0.0


def _localisation(maps, masks):
    """Energy in the own mask over (a) the mask fraction and (b) the energy in other images' masks; pointing, own and other."""
    energy, fraction = energy_in_mask(maps, masks), masks.float().mean((1, 2)).numpy()
    ok = ~np.isnan(energy)
    others = [masks[torch.roll(torch.arange(len(masks)), s)] for s in range(1, 9)]
    energy_others = np.nanmean([energy_in_mask(maps, m) for m in others])
    return {"vs_fraction": energy[ok].mean() / fraction[ok].mean(), "vs_others": np.nanmean(energy) / energy_others,
            "pointing": np.nanmean(pointing_game(maps, masks)),
            "pointing_others": np.nanmean([pointing_game(maps, m) for m in others])}


def test_synthetic_lesions_sit_near_the_centre_so_mask_fraction_is_a_weak_chance_level(synthetic_test):
    # A fixed central blob, no model at all, already beats the mask fraction three times over; only the
    # comparison with other images' masks (same maps, masks shuffled) calls it chance.
    masks = synthetic_test[2]
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    blob = torch.exp(-((yy - 15.5) ** 2 + (xx - 15.5) ** 2) / 72).expand(len(masks), 1, 32, 32)
    scores = _localisation(blob, masks)
    assert scores["vs_fraction"] > 2.5 and 0.9 < scores["vs_others"] < 1.1  # measured 3.08 and ~1.0


@pytest.mark.device
def test_a_trained_model_attends_to_the_lesion(trained, synthetic_test):
    x, y, masks = synthetic_test
    # Saliency separates trained from random best at 32 px; Grad-CAM's 8x8 map is mostly centre bias.
    sal = _localisation(attribute(trained, x, y, "saliency"), masks)
    assert sal["vs_fraction"] > 2.0 and sal["vs_others"] > 1.2  # measured 2.8-4.1 and 1.29-1.48 over 7 trainings
    cam = _localisation(attribute(trained, x, y, "gradcam"), masks)
    assert cam["vs_fraction"] > 2.5 and cam["vs_others"] > 1.1  # measured 3.07-3.48 and 1.24-1.29
    assert cam["pointing"] > cam["pointing_others"] + 0.2  # measured 0.80-0.88 against 0.48-0.55


@pytest.mark.device
def test_a_random_model_attends_at_chance(synthetic_test):
    x, y, masks = synthetic_test
    sal = _localisation(attribute(_device_model(seed=0), x, y, "saliency"), masks)
    # measured over 14 initialisations: 0.85-1.44 against the fraction, 0.86-1.13 against other masks
    assert 0.7 < sal["vs_fraction"] < 1.6 and 0.75 < sal["vs_others"] < 1.2


# ---------------------------------------------------------------- report

MASK_COLUMNS = ["mask_fraction", "energy_clean", "energy_adv", "energy_other_mask", "pointing_clean", "pointing_adv"]


@pytest.mark.device
def test_attribution_report_on_real_ham10000(shared_data):
    data = load_dataset(f"npz:{shared_data / 'ham10000_sample.npz'}", "test", 32)
    model = _device_model(classes=data.num_classes)
    df = attribution_report(model, data, 0.5, "gradcam", steps=3, n=8, batch_size=4, seed=1, device=TEST_DEVICE)
    assert list(df.columns) == ["index", "label", "pred_clean", "pred_adv", "confidence_clean", "confidence_adv",
                                "correct_clean", "correct_adv", "spearman", "topk_iou", "ssim"] + MASK_COLUMNS
    assert df["confidence_clean"].between(1 / data.num_classes, 1).all()
    # each image's row is its own: the same in another batch and order (its attack starts from its own point)
    again = attribution_report(model, data, 0.5, "gradcam", steps=3, batch_size=3, seed=1, device=TEST_DEVICE,
                               index=df["index"].tolist()[::-1]).set_index("index")
    mine = df.set_index("index").loc[again.index]
    for col in ("pred_adv", "spearman", "topk_iou", "energy_clean", "energy_adv", "confidence_adv"):
        np.testing.assert_allclose(mine[col].astype(float), again[col].astype(float), rtol=1e-4, atol=1e-5,
                                   err_msg=col)
    assert len(df) == 8 and df["index"].is_unique and df["index"].between(0, len(data) - 1).all()
    np.testing.assert_array_equal(df["label"], data.labels[df["index"]].numpy())
    np.testing.assert_allclose(df["mask_fraction"], data.masks[df["index"]].float().mean((1, 2)).numpy())
    assert df["mask_fraction"].between(0, 1).all() and df["mask_fraction"].std() > 0  # masks vary from image to image
    for column, lo, hi in [("spearman", -1, 1), ("topk_iou", 0, 1), ("ssim", -1, 1), ("energy_clean", 0, 1),
                           ("energy_adv", 0, 1), ("pointing_clean", 0, 1), ("pointing_adv", 0, 1),
                           ("energy_other_mask", 0, 1)]:
        values = df[column].dropna()
        assert len(values) and values.between(lo, hi).all(), column
    assert set(df["pointing_clean"].dropna()) <= {0.0, 1.0}
    # energy_other_mask scores each clean map on the next drawn image's mask
    from dpaat_core.evaluate.attribution import attribute
    x = on_device(data.images[df["index"]].float() / 255)
    maps = attribute(model, x, on_device(torch.tensor(df["pred_clean"].to_numpy())), "gradcam")
    np.testing.assert_allclose(df["energy_other_mask"], energy_in_mask(maps, data.masks[np.roll(df["index"], -1)]),
                               rtol=1e-4, atol=1e-6)
    assert df.attrs == {"method": "gradcam", "eps": 0.5, "attack": "pgd", "norm": "l2", "steps": 3, "seed": 1}

    summary = summarize_report(df)
    assert list(summary.columns) == ["mean", "std", "median", "n"]
    assert "ssim" in summary.index and "correct_adv" in summary.index and "label" not in summary.index
    assert summary.loc["ssim", "mean"] == pytest.approx(df["ssim"].mean())
    assert summary.loc["energy_clean", "n"] == df["energy_clean"].notna().sum()
    assert summary.loc["correct_clean", "mean"] == pytest.approx(df["correct_clean"].mean())

    again = attribution_report(model, data, 0.5, "gradcam", steps=3, n=8, batch_size=8, seed=1, device=TEST_DEVICE)
    np.testing.assert_array_equal(again["index"], df["index"])  # the draw depends on the seed, not the batching


@pytest.mark.device
def test_attribution_report_without_masks_has_no_mask_columns():
    data = load_dataset(SYNTHETIC, "test", 16)
    bare = ImageDataset(data.images[:6], data.labels[:6], data.classes, data.source)
    df = attribution_report(_device_model(), bare, 0.3, "saliency", attack="fgsm", norm="linf", n=100, batch_size=4,
                            device=TEST_DEVICE)
    assert len(df) == 6 and not set(MASK_COLUMNS) & set(df.columns)


# ---------------------------------------------------------------- overlay

def test_overlay_blends_the_colormap_over_the_image():
    image = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(6))
    plain = np.round(image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    out = overlay(image, torch.full((16, 16), 0.3))
    assert out.dtype == np.uint8 and out.shape == (16, 16, 3)
    np.testing.assert_array_equal(out, plain)  # a constant map carries nothing to show

    attribution = torch.zeros(1, 16, 16)
    attribution[0, :4, :4] = 1.0
    attribution[0, 0, 0] = 50.0  # one outlier above the 99th percentile must not wash the rest out
    out = overlay(image, attribution, alpha=1.0, cmap="jet")
    jet = matplotlib.colormaps["jet"]
    hot, cold = np.round(np.array(jet(1.0)[:3]) * 255), np.round(np.array(jet(0.0)[:3]) * 255)
    np.testing.assert_array_equal(out[2, 3], hot)
    np.testing.assert_array_equal(out[10, 10], cold)
    half = overlay(image, attribution, alpha=0.5, cmap="jet")
    np.testing.assert_allclose(half[2, 3], 0.5 * image[:, 2, 3].numpy() * 255 + 0.5 * hot, atol=1)
    default = overlay(image, attribution, alpha=1.0)                   # a perceptually uniform scale, not a rainbow
    inferno = matplotlib.colormaps["inferno"]
    np.testing.assert_array_equal(default[2, 3], np.round(np.array(inferno(1.0)[:3]) * 255))
    with pytest.raises(ValueError, match="opacity"):
        overlay(image, attribution, alpha=1.5)


def test_overlay_draws_the_lesions_outline():
    from dpaat_core.evaluate.attribution import OUTLINE, outline
    image = torch.full((3, 16, 16), 0.5)
    mask = torch.zeros(16, 16, dtype=torch.uint8)
    mask[4:12, 4:12] = 1
    edge = outline(mask)
    assert edge.sum() == 4 * 8 - 4 and edge[4, 4] and edge[11, 7] and not edge[7, 7] and not edge[2, 2]
    out = overlay(image, torch.rand(16, 16), mask=mask)
    np.testing.assert_array_equal(out[4, 6], np.round(np.array(OUTLINE) * 255))
    assert not np.array_equal(out[7, 7], np.round(np.array(OUTLINE) * 255))
    with pytest.raises(ValueError, match="does not match"):
        overlay(image, torch.rand(16, 16), mask=torch.ones(8, 8))


def test_the_prediction_in_words():
    from dpaat_core.evaluate.attribution import prediction_sentence, prediction_words
    classes = ["akiec", "bkl", "df"]
    assert (prediction_sentence(classes, [0.42, 0.3, 0.28], 2, [0.2, 0.52, 0.28], "PGD eps 0.3")
            == "Predicted akiec 42% ✗ (true df) → bkl 52% under PGD eps 0.3 ✗, changed")
    assert prediction_words(classes, 1, 0.9, 1, 1, 0.8, "attack") == "Predicted bkl 90% ✓ → bkl 80% under attack ✓, unchanged"
    assert prediction_words(classes, 0, 0.5) == "Predicted akiec 50%"


def test_overlay_takes_grey_and_uint8_images():
    grey = torch.rand(1, 16, 16)
    out = overlay(grey, torch.ones(16, 16))
    assert out.shape == (16, 16, 3) and (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    rgb8 = (np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8)
    np.testing.assert_array_equal(overlay(rgb8, np.zeros((1, 16, 16))), rgb8)
    assert overlay(rgb8, np.arange(256.0).reshape(16, 16)).shape == (16, 16, 3)
    with pytest.raises(ValueError):
        overlay(grey, torch.ones(8, 8))


def test_an_enlarged_image_repeats_each_pixel_by_a_whole_factor():
    from dpaat_core.evaluate.attribution import enlarged
    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    big = enlarged(image, width=10)                                  # 10 // 3: each pixel becomes 3 x 3
    assert big.shape == (6, 9, 3) and big.dtype == np.uint8
    np.testing.assert_array_equal(big[::3, ::3], image)
    np.testing.assert_array_equal(big[4, 7], image[1, 2])
    assert enlarged(image, width=2).shape == image.shape             # never smaller than the image
