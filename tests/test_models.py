"""Model registry: shapes, normalisation inside the model, Grad-CAM layers, pretrained weights."""
import os
import pickle

import pytest
import torch
import torch.nn as nn
import torchvision

from dpaat_core.models import (
    IMAGENET_MEAN, IMAGENET_STD, MODEL_NAMES, PretrainedWeightsMissing, build_model, count_parameters,
    gradcam_layer, pretrained_cache_path,
)


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("channels", [3, 1])
def test_every_model_builds_and_classifies(name, channels):
    model = build_model(name, 5, in_channels=channels).eval()
    x = torch.rand(2, channels, 32, 32)
    seen = {}
    handle = gradcam_layer(model).register_forward_hook(lambda m, i, o: seen.setdefault("out", o))
    with torch.no_grad():
        logits = model(x)
    handle.remove()
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()
    assert seen["out"].ndim == 4  # a spatial feature map for Grad-CAM
    assert model.arch == name and model.num_classes == 5 and model.in_channels == channels


def test_normalisation_is_inside_the_model():
    model = build_model("resnet8", 3).eval()
    x = torch.rand(2, 3, 16, 16)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.backbone((x - mean) / std))


def test_resnet8_is_small_and_gradcam_layers_are_the_last_stage():
    assert 50_000 < count_parameters(build_model("resnet8", 7)) < 150_000
    model = build_model("resnet18", 7)
    assert gradcam_layer(model) is model.backbone.layer4


def test_the_small_image_resnet18_keeps_a_4x4_map_at_28_px_where_torchvision_s_keeps_1x1():
    x = torch.rand(2, 3, 28, 28)
    for name, side in (("resnet18", 1), ("resnet18_small", 4)):
        model, seen = build_model(name, 7).eval(), {}
        gradcam_layer(model).register_forward_hook(lambda m, i, o: seen.setdefault("out", o))
        with torch.no_grad():
            model(x)
        assert seen["out"].shape[-2:] == (side, side), name
    small, full = build_model("resnet18_small", 7), build_model("resnet18", 7)
    assert small.backbone.conv1.kernel_size == (3, 3) and small.backbone.conv1.stride == (1, 1)
    assert count_parameters(full) - count_parameters(small) == 64 * 3 * (7 * 7 - 3 * 3)   # the stem's weights only


@pytest.mark.parametrize(
    "args,match",
    [(("vgg11", 3), "unknown model"), (("resnet8", 1), "num_classes"), (("resnet8", 3, 2), "in_channels")],
)
def test_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        build_model(*args)


def test_gradcam_layer_needs_a_registry_model():
    with pytest.raises(TypeError):
        gradcam_layer(nn.Linear(2, 2))


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    return tmp_path


def test_pretrained_without_cached_weights_fails_clearly(torch_home):
    with pytest.raises(PretrainedWeightsMissing, match="not in torchvision's cache") as err:
        build_model("resnet18", 7, pretrained=True)
    assert str(pretrained_cache_path("resnet18")) in str(err.value)
    with pytest.raises(ValueError, match="no pretrained"):
        build_model("resnet8", 7, pretrained=True)


def test_pretrained_loads_from_the_local_cache(torch_home):
    reference = torchvision.models.resnet18(weights=None)
    path = pretrained_cache_path("resnet18")
    path.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), path)
    model = build_model("resnet18", 7, pretrained=True)
    assert torch.equal(model.backbone.layer3[0].conv1.weight, reference.layer3[0].conv1.weight)
    assert model.backbone.fc.out_features == 7
    gray = build_model("resnet18", 7, in_channels=1, pretrained=True)
    torch.testing.assert_close(gray.backbone.conv1.weight, reference.conv1.weight.mean(1, keepdim=True))


def test_pretrained_file_of_another_architecture_is_refused(torch_home):
    path = pretrained_cache_path("resnet18")
    path.parent.mkdir(parents=True)
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    with pytest.raises(PretrainedWeightsMissing, match="not resnet18 ImageNet weights"):
        build_model("resnet18", 7, pretrained=True)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch exploited",))


def test_hostile_weights_file_is_never_unpickled(torch_home, monkeypatch):
    monkeypatch.chdir(torch_home)
    path = pretrained_cache_path("resnet18")
    path.parent.mkdir(parents=True)
    with open(path, "wb") as f:
        pickle.dump({"conv1.weight": _Exploit()}, f)
    with pytest.raises(PretrainedWeightsMissing, match="not a loadable weights file"):
        build_model("resnet18", 7, pretrained=True)
    assert not (torch_home / "exploited").exists()
