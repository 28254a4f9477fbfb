"""Bring a classifier trained elsewhere into the run store: ``python -m dpaat_core import``.

Any torchvision classification architecture by its name, or ``timm:<name>`` when timm is installed, with weights
from a ``.safetensors`` file or a PyTorch checkpoint read with ``weights_only=True`` (a state dict, directly or
under a ``state_dict`` / ``model`` key; a ``module.`` prefix from DataParallel/DDP is removed). Normalisation goes
inside the model, as for every run: the imported model takes images in [0, 1]. Everything is checked before the
run folder is made, so a failed import leaves nothing in the store.

Grad-CAM's layer (:func:`find_gradcam_layer`): the last module, in the order the forward pass finishes them,
whose output is a 4-D feature map with more than one pixel, provided no module after it gives 3-D tokens. For a
CNN that is its last convolutional stage (before global pooling); a vision transformer has none, and gets
saliency, integrated gradients and occlusion only.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn

from .config import ConfigError, check_normalization
from .models import ARCHS, Classifier, _adapt_first_conv, build_model, default_normalization
from .runs import RunError

ORIGIN = "imported"


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file, read in chunks (weights files can be large)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class ImportProblem(RunError):
    """The architecture, the weights file or a setting does not fit: the message names the problem."""


def _torchvision_names() -> list[str]:
    import torchvision.models as tvm
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
    import torchvision.models as tvm
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


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of ``path``: safetensors, or a PyTorch checkpoint read with ``weights_only=True`` (never
    unpickled beyond plain tensors and containers), unwrapped from ``state_dict``/``model`` and ``module.``."""
    from .runs import load_checkpoint, load_weights
    path = Path(path)
    if path.is_dir():
        raise ImportProblem(f"{path}: a folder, not a weights file")
    if path.exists() and not path.is_file():
        raise ImportProblem(f"{path}: not a regular file (a device, a pipe or a socket); give a weights file")
    if not path.is_file():
        raise ImportProblem(f"{path}: no such file")
    try:
        state = load_weights(path) if path.suffix == ".safetensors" else load_checkpoint(path)
    except RunError as exc:
        raise ImportProblem(str(exc)) from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state.get(key), dict):
            state = state[key]
            break
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ImportProblem(f"{path}: not a checkpoint of model weights (no tensors in it, nor under state_dict or "
                            "model)")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    broken = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise ImportProblem(f"{path}: {broken[0]} holds NaN or infinite values"
                            + (f" (and {len(broken) - 1} more tensors)" if len(broken) > 1 else "")
                            + "; these weights cannot give a prediction")
    return tensors


def _fit(backbone: nn.Module, state: dict, arch: str, num_classes: int, path: Path) -> None:
    from .loading import state_mismatch
    missing, unexpected, shapes = state_mismatch(backbone.state_dict(), state)
    heads = [(k, f, e) for k, f, e in shapes if len(e) >= 1 and e[0] == num_classes and f[0] != num_classes
             and e[1:] == f[1:]]
    if heads and len(heads) == len(shapes) and not missing and not unexpected:
        k, found, _ = heads[0]
        raise ImportProblem(f"{path}: its head ({k}) predicts {found[0]} classes, but {num_classes} were given")
    problems = []
    if missing:
        problems.append(f"missing keys {', '.join(missing[:3])}" + (f" (+{len(missing) - 3} more)" if len(missing) > 3
                                                                   else ""))
    if unexpected:
        problems.append(f"unexpected keys {', '.join(unexpected[:3])}"
                        + (f" (+{len(unexpected) - 3} more)" if len(unexpected) > 3 else ""))
    if shapes:
        k, f, e = shapes[0]
        problems.append(f"{k} is {f} where {arch} has {e}"
                        + (f" (+{len(shapes) - 1} more shape mismatches)" if len(shapes) > 1 else ""))
    if problems:
        raise ImportProblem(f"{path}: these are not {arch} weights: {'; '.join(problems)}")
    backbone.load_state_dict(state, strict=True)


def _channels(values: Optional[Sequence[float]], in_channels: int, what: str, default) -> tuple:
    if values is None:
        return tuple(default)
    values = tuple(values)
    try:
        return check_normalization(f"--{what}", values * in_channels if len(values) == 1 else values, in_channels)
    except ConfigError as exc:
        raise ImportProblem(str(exc)) from None


def _check_gradcam_layer(model: Classifier, path: str, arch: str, image_size: int, in_channels: int) -> None:
    """Refuse a Grad-CAM layer that does not exist or does not give a feature map ``(N, C, H, W)``."""
    try:
        module = model.get_submodule(path)
    except AttributeError:
        raise ImportProblem(f"--gradcam-layer {path.removeprefix('backbone.')}: {arch} has no such module") from None
    shapes = []
    hook = module.register_forward_hook(lambda _m, _i, out: shapes.append(getattr(out, "shape", None)))
    try:
        with torch.no_grad():
            model.eval()(torch.rand(1, in_channels, image_size, image_size))
    finally:
        hook.remove()
    shape = shapes[-1] if shapes else None
    if shape is None or len(shape) != 4:
        what = "never runs in the forward pass" if not shapes else f"gives {tuple(shape) if shape else 'no tensor'}"
        raise ImportProblem(f"--gradcam-layer {path.removeprefix('backbone.')}: a {type(module).__name__} that "
                            f"{what}, not a feature map (N, C, H, W); leave the flag out to find the last one")


def import_model(arch: str, weights: str | Path, image_size: int, classes: Sequence[str], store: str | Path,
                 name: Optional[str] = None, mean=None, std=None, in_channels: int = 3,
                 gradcam_layer: Optional[str] = None, data_spec: Optional[str] = None) -> Path:
    """Check everything, then write the run folder of origin ``imported`` (config, weights, status ``done``)."""
    from . import runs
    weights = Path(weights)
    classes = [str(c) for c in classes]
    if len(classes) < 2 or len(set(classes)) != len(classes):
        raise ImportProblem(f"--classes needs at least 2 different names, got {classes}")
    if not isinstance(image_size, int) or not 8 <= image_size <= 1024:
        raise ImportProblem(f"--image-size must be an integer from 8 to 1024, got {image_size!r}")
    if in_channels not in (1, 3):
        raise ImportProblem(f"--channels must be 1 or 3, got {in_channels!r}")
    d_mean, d_std = default_normalization(in_channels)
    mean, std = _channels(mean, in_channels, "mean", d_mean), _channels(std, in_channels, "std", d_std)
    if name is not None:
        runs.check_run_id(name)
    backbone = build_backbone(arch, len(classes), in_channels)
    _fit(backbone, read_weights(weights), arch, len(classes), weights)
    model = Classifier(arch, backbone, len(classes), in_channels, mean, std)
    if gradcam_layer is not None:
        path = gradcam_layer if gradcam_layer.startswith("backbone.") else f"backbone.{gradcam_layer}"
        _check_gradcam_layer(model, path, arch, image_size, in_channels)
    else:
        path = find_gradcam_layer(model, image_size, in_channels)
    digest = file_sha256(weights)
    config = {
        "origin": ORIGIN,
        "source": {"file": str(weights), "sha256": digest},
        "model": {"name": arch, "pretrained": False, "normalization": {"mean": list(mean), "std": list(std)},
                  "gradcam_layer": path},
        "data": {"spec": data_spec, "image_size": image_size, "max_samples": None, "root": None},
        "method": {"name": ORIGIN},
        "dataset": {"classes": classes, "num_classes": len(classes), "in_channels": in_channels,
                    "image_size": image_size},
    }
    run_dir = runs.create_run(store, config, name or f"imported-{arch.replace(':', '-')}-{digest[:8]}")
    try:
        runs.save_weights(run_dir / "weights.safetensors", model.state_dict())
        runs.write_status(run_dir, "done", f"imported from {weights.name}", phase="done")
    except BaseException:
        import shutil
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return run_dir


def model_from_config(model: dict, num_classes: int, in_channels: int = 3, pretrained: bool = False) -> nn.Module:
    """The freshly initialised classifier a config's ``model`` section describes: with its own normalisation (an
    imported run, or one started from it: any torchvision/timm architecture) :func:`build_classifier`, else the
    registry's :func:`~dpaat_core.models.build_model`."""
    if model.get("normalization"):
        return build_classifier(model, num_classes, in_channels)
    from .models import build_model
    return build_model(model["name"], num_classes, in_channels, pretrained)


def build_classifier(model: dict, num_classes: int, in_channels: int = 3) -> Classifier:
    """The classifier a config's ``model`` section describes with its own normalisation and Grad-CAM layer (an
    imported run, or one started from it), freshly initialised."""
    norm = model.get("normalization") or {}
    if norm:
        norm = {"mean": check_normalization("model.normalization.mean", norm.get("mean"), in_channels),
                "std": check_normalization("model.normalization.std", norm.get("std"), in_channels)}
    return Classifier(model["name"], build_backbone(model["name"], num_classes, in_channels), num_classes,
                      in_channels, norm.get("mean"), norm.get("std"), model.get("gradcam_layer"))
