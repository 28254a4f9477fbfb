"""Classifier registry: torchvision backbones and a small CPU ResNet, all taking images in [0, 1].

Input normalisation is the model's first layer, so attacks and attributions work in pixel
space. Each architecture names its Grad-CAM layer (:func:`gradcam_layer`). Pretrained
ImageNet weights come from torchvision's local cache only: missing weights are an error,
never a silent random initialisation.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
import torchvision.models as tvm
from torchvision.models.resnet import BasicBlock

from dpaat_core.errors import ConfigError, ImportProblem

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PretrainedWeightsMissing(FileNotFoundError):
    """ImageNet weights were asked for but are not in torchvision's local cache."""


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, for ``x`` float ``[B, C, H, W]`` in [0, 1]."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


def default_normalization(in_channels: int) -> tuple[tuple, tuple]:
    """ImageNet's mean and std for RGB; their grey-level means for one channel."""
    return (IMAGENET_MEAN, IMAGENET_STD) if in_channels == 3 else ((0.449,) * in_channels, (0.226,) * in_channels)


class Classifier(nn.Module):
    """``normalize`` then ``backbone``; ``arch``, ``num_classes`` and ``in_channels`` describe it. ``mean``/``std``
    default to :func:`default_normalization`; ``gradcam`` is the dotted path (under the classifier) of the layer
    Grad-CAM uses when the architecture is not one of :data:`ARCHS` (None: it has none)."""

    def __init__(self, arch: str, backbone: nn.Module, num_classes: int, in_channels: int, mean=None, std=None,
                 gradcam: Optional[str] = None):
        super().__init__()
        default_mean, default_std = default_normalization(in_channels)
        self.normalize = Normalize(default_mean if mean is None else mean, default_std if std is None else std)
        self.backbone = backbone
        self.arch, self.num_classes, self.in_channels, self.gradcam = arch, num_classes, in_channels, gradcam

    def forward(self, x):
        return self.backbone(self.normalize(x))


class ResNet8(nn.Module):
    """CIFAR-style ResNet: a 3x3 stem and three stages of one basic block (16/32/64 channels)."""

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, width: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        stages, c_in = [], width
        for i, c_out in enumerate((width, 2 * width, 4 * width)):
            stride = 1 if i == 0 else 2
            down = None
            if stride != 1 or c_in != c_out:
                down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))
            stages.append(BasicBlock(c_in, c_out, stride=stride, downsample=down))
            c_in = c_out
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18_small(num_classes: int = 1000) -> nn.Module:
    """ResNet-18 for small images (28-64 px): torchvision's, with a 3x3 stride-1 stem and no max-pool, so a 28 px
    image reaches the last stage at 4x4 instead of 1x1 (the ResNet-18 MedMNIST v2 reports at 28 px)."""
    model = tvm.resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return model


@dataclass(frozen=True)
class Arch:
    """How to build one architecture and where its parts are (dotted submodule paths)."""

    builder: Callable[..., nn.Module]
    weights: Optional[object]  # torchvision weights enum member, None if there are none
    first_conv: str
    head: str
    gradcam: str


ARCHS: dict[str, Arch] = {
    "resnet8": Arch(ResNet8, None, "conv1", "fc", "layer3"),
    "resnet18": Arch(tvm.resnet18, tvm.ResNet18_Weights.IMAGENET1K_V1, "conv1", "fc", "layer4"),
    "resnet18_small": Arch(resnet18_small, None, "conv1", "fc", "layer4"),
    "resnet34": Arch(tvm.resnet34, tvm.ResNet34_Weights.IMAGENET1K_V1, "conv1", "fc", "layer4"),
    "resnet50": Arch(tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V2, "conv1", "fc", "layer4"),
    "densenet121": Arch(tvm.densenet121, tvm.DenseNet121_Weights.IMAGENET1K_V1, "features.conv0", "classifier", "features.norm5"),
    "efficientnet_b0": Arch(tvm.efficientnet_b0, tvm.EfficientNet_B0_Weights.IMAGENET1K_V1, "features.0.0", "classifier.1", "features.8"),
    "mobilenet_v3_small": Arch(tvm.mobilenet_v3_small, tvm.MobileNet_V3_Small_Weights.IMAGENET1K_V1, "features.0.0", "classifier.3", "features.12"),
}
MODEL_NAMES = tuple(ARCHS)


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def pretrained_cache_path(name: str) -> Path:
    """Where torchvision keeps the ImageNet weights of ``name`` (``$TORCH_HOME/hub/checkpoints``)."""
    weights = ARCHS[name].weights
    if weights is None:
        raise ValueError(f"{name} has no pretrained ImageNet weights; use pretrained=False")
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def _load_pretrained(name: str, backbone: nn.Module) -> None:
    path = pretrained_cache_path(name)
    if not path.is_file():
        raise PretrainedWeightsMissing(
            f"ImageNet weights for {name} are not in torchvision's cache: {path} is missing. "
            f"On a machine with internet access run: python -c \"import torchvision; torchvision.models.{name}"
            f"(weights='DEFAULT')\" and copy {path.name} into {path.parent} (or set TORCH_HOME), "
            f"or train from scratch with pretrained=False."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise PretrainedWeightsMissing(f"{path}: not a loadable weights file ({exc.__class__.__name__}: {exc})") from exc
    try:
        backbone.load_state_dict(state)
    except RuntimeError as exc:
        raise PretrainedWeightsMissing(f"{path}: these are not {name} ImageNet weights ({str(exc).splitlines()[0]})") from exc


def _adapt_first_conv(backbone: nn.Module, path: str, in_channels: int) -> None:
    conv = backbone.get_submodule(path)
    new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, conv.bias is not None)
    with torch.no_grad():  # keep pretrained filters: their mean over RGB, for every input channel
        new.weight.copy_(conv.weight.mean(dim=1, keepdim=True).expand_as(new.weight))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    _set_submodule(backbone, path, new)


def _replace_head(backbone: nn.Module, path: str, num_classes: int) -> None:
    head = backbone.get_submodule(path)
    _set_submodule(backbone, path, nn.Linear(head.in_features, num_classes))


def build_model(name: str, num_classes: int, in_channels: int = 3, pretrained: bool = False) -> Classifier:
    """A :class:`Classifier` taking ``[B, in_channels, H, W]`` in [0, 1] and giving ``[B, num_classes]`` logits."""
    if name not in ARCHS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)}")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer of at least 2, got {num_classes!r}")
    if in_channels not in (1, 3):
        raise ValueError(f"in_channels must be 1 (grayscale) or 3 (RGB), got {in_channels!r}")
    arch = ARCHS[name]
    if pretrained:
        if arch.weights is None:
            raise ValueError(f"{name} has no pretrained ImageNet weights; use pretrained=False")
        backbone = arch.builder(weights=None)
        _load_pretrained(name, backbone)
        _replace_head(backbone, arch.head, num_classes)
        if in_channels != 3:
            _adapt_first_conv(backbone, arch.first_conv, in_channels)
    else:
        backbone = arch.builder(num_classes=num_classes) if arch.weights is None else arch.builder(weights=None, num_classes=num_classes)
        if in_channels != 3:
            _adapt_first_conv(backbone, arch.first_conv, in_channels)
    return Classifier(name, backbone, num_classes, in_channels)


class NoGradCamLayer(TypeError):
    """The architecture has no 4-D feature map before its pooling (a vision transformer): Grad-CAM does not apply."""


def gradcam_layer(model: nn.Module) -> nn.Module:
    """The layer Grad-CAM should use: the last convolutional stage of the backbone (for an imported architecture,
    the layer :func:`find_gradcam_layer` found or the user named)."""
    model = getattr(model, "module", model)  # DDP / DataParallel
    model = getattr(model, "_orig_mod", model)  # torch.compile
    if not isinstance(model, Classifier):
        raise TypeError(f"gradcam_layer needs a model from build_model, got {type(model).__name__}")
    if model.arch in ARCHS and model.gradcam is None:
        return model.backbone.get_submodule(ARCHS[model.arch].gradcam)
    if model.gradcam is None:
        raise NoGradCamLayer(f"{model.arch} has no 4-D feature map before its pooling (a vision transformer's tokens): "
                             "Grad-CAM does not apply; saliency, integrated gradients and occlusion do")
    return model.get_submodule(model.gradcam)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


MEAN_LIMIT, STD_RANGE = 1e3, (1e-4, 1e3)


def check_normalization(what: str, values, channels: Optional[int] = None) -> tuple[float, ...]:
    """``values`` as a tuple of finite floats for ``what`` ("mean" or "std", one per channel when ``channels`` is
    given): a mean within +-MEAN_LIMIT, a std within STD_RANGE; else a ConfigError that names the value."""
    try:
        values = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a list of numbers, one per channel, got {values!r}") from None
    if not values or (channels is not None and len(values) != channels):
        raise ConfigError(f"{what} needs {channels or 'one or more'} number(s), one per channel, got {list(values)}")
    if not all(math.isfinite(v) for v in values):
        raise ConfigError(f"{what} must be finite numbers, got {list(values)}")
    lo, hi = (-MEAN_LIMIT, MEAN_LIMIT) if what.endswith("mean") else STD_RANGE
    if not all(lo <= v <= hi for v in values):
        raise ConfigError(f"{what} values must lie in [{lo:g}, {hi:g}] (pixels in [0, 1]), got {list(values)}")
    return values


# --- any torchvision/timm architecture, for imported runs and runs started from them ---------------------------

def _torchvision_names() -> list[str]:
    return tvm.list_models(module=tvm)


def build_backbone(arch: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """A freshly initialised ``arch`` with a ``num_classes`` head (no weights downloaded)."""
    if arch in ARCHS:
        return build_model(arch, num_classes, in_channels).backbone
    if arch.startswith("timm:"):
        try:
            import timm
        except ImportError:
            raise ImportProblem(f"{arch}: timm is not installed (python -m pip install timm)") from None
        try:
            return timm.create_model(arch[5:], pretrained=False, num_classes=num_classes, in_chans=in_channels)
        except Exception as exc:  # noqa: BLE001 - timm's unknown-model error types vary by version
            raise ImportProblem(f"{arch}: timm cannot build it ({str(exc).splitlines()[0]})") from None
    if arch not in _torchvision_names():
        raise ImportProblem(f"unknown architecture {arch!r}: give a torchvision classification model's name "
                            "(resnet50, efficientnet_b0, convnext_tiny, vit_b_16, ...) or timm:<name>")
    model = tvm.get_model(arch, weights=None, num_classes=num_classes)
    if in_channels != 3:
        first = next((n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
        if first is None:
            raise ImportProblem(f"{arch}: no first convolution to give {in_channels} input channel(s)")
        _adapt_first_conv(model, first, in_channels)
    return model


def find_gradcam_layer(model: nn.Module, image_size: int, in_channels: int = 3) -> Optional[str]:
    """The dotted path (under ``model``) of Grad-CAM's layer by the module docstring's rule, or None."""
    finished: list[tuple[str, int, int]] = []      # (name, ndim, pixels) in the order the modules finish
    hooks = []
    for name, module in model.named_modules():
        if not name:
            continue

        def record(_m, _inp, out, name=name):
            if isinstance(out, torch.Tensor):
                pixels = out.shape[-1] * out.shape[-2] if out.dim() == 4 else 0
                finished.append((name, out.dim(), pixels))
        hooks.append(module.register_forward_hook(record))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.rand(1, in_channels, image_size, image_size))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    last = None
    for k, (name, ndim, pixels) in enumerate(finished):
        if ndim == 4 and pixels > 1:
            last = k
    if last is None or any(ndim == 3 for _, ndim, _ in finished[last + 1:]):
        return None
    return finished[last][0]


def state_mismatch(expected: dict, state: dict) -> tuple[list[str], list[str], list[tuple[str, list, list]]]:
    """How ``state`` fails to fit a model whose state dict is ``expected``: its missing keys, unexpected keys and
    (key, found shape, expected shape) of each mismatch; all empty when it fits."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [(k, list(state[k].shape), list(v.shape)) for k, v in expected.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    return missing, unexpected, shapes


def model_from_config(model: dict, num_classes: int, in_channels: int = 3, pretrained: bool = False) -> nn.Module:
    """The freshly initialised classifier a config's ``model`` section describes: with its own normalisation (an
    imported run, or one started from it: any torchvision/timm architecture) :func:`build_classifier`, else the
    registry's :func:`build_model`, explained at the config's ``gradcam_layer`` when it names one."""
    if model.get("normalization"):
        return build_classifier(model, num_classes, in_channels)
    built = build_model(model["name"], num_classes, in_channels, pretrained)
    if model.get("gradcam_layer"):
        built.gradcam = gradcam_path(built, model["gradcam_layer"], "model.gradcam_layer", ConfigError)
    return built


def gradcam_path(model: Classifier, layer: str, flag: str, error: type = ConfigError) -> str:
    """``layer`` (a dotted module path in the backbone, ``backbone.`` optional) as a path under the classifier;
    ``error`` naming ``flag`` when the architecture has no such module."""
    path = layer if layer.startswith("backbone.") else f"backbone.{layer}"
    try:
        model.get_submodule(path)
    except AttributeError:
        raise error(f"{flag} {path.removeprefix('backbone.')}: {model.arch} has no such module") from None
    return path


def check_gradcam_layer(model: Classifier, layer: str, image_size: int, flag: str,
                        error: type = ConfigError) -> str:
    """The path of ``layer`` (:func:`gradcam_path`) after checking that it gives a feature map ``(N, C, H, W)`` on an
    ``image_size`` image; ``error`` naming ``flag`` otherwise. The model's mode and the global RNG are left as
    they were."""
    path = gradcam_path(model, layer, flag, error)
    module, shapes = model.get_submodule(path), []
    hook = module.register_forward_hook(lambda _m, _i, out: shapes.append(getattr(out, "shape", None)))
    was_training = model.training
    probe = torch.rand(1, model.in_channels, image_size, image_size, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            model.eval()(probe.to(next(model.parameters()).device))
    finally:
        hook.remove()
        model.train(was_training)
    shape = shapes[-1] if shapes else None
    if shape is None or len(shape) != 4:
        what = "never runs in the forward pass" if not shapes else f"gives {tuple(shape) if shape else 'no tensor'}"
        raise error(f"{flag} {path.removeprefix('backbone.')}: a {type(module).__name__} that {what}, not a feature "
                    "map (N, C, H, W); leave it out for the architecture's last convolutional stage")
    return path


def build_classifier(model: dict, num_classes: int, in_channels: int = 3) -> Classifier:
    """The classifier a config's ``model`` section describes with its own normalisation and Grad-CAM layer (an
    imported run, or one started from it), freshly initialised."""
    norm = model.get("normalization") or {}
    if norm:
        norm = {"mean": check_normalization("model.normalization.mean", norm.get("mean"), in_channels),
                "std": check_normalization("model.normalization.std", norm.get("std"), in_channels)}
    return Classifier(model["name"], build_backbone(model["name"], num_classes, in_channels), num_classes,
                      in_channels, norm.get("mean"), norm.get("std"), model.get("gradcam_layer"))
