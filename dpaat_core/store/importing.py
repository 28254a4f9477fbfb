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

from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn

from dpaat_core.config import ConfigError, check_normalization
from dpaat_core.store import runs
from dpaat_core.errors import ImportProblem, RunError
from dpaat_core.models import (Classifier, build_backbone, check_gradcam_layer, default_normalization,
                               find_gradcam_layer, state_mismatch)

ORIGIN = "imported"


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of ``path``: safetensors, or a PyTorch checkpoint read with ``weights_only=True`` (never
    unpickled beyond plain tensors and containers), unwrapped from ``state_dict``/``model`` and ``module.``."""
    path = Path(path)
    if path.is_dir():
        raise ImportProblem(f"{path}: a folder, not a weights file")
    if path.exists() and not path.is_file():
        raise ImportProblem(f"{path}: not a regular file (a device, a pipe or a socket); give a weights file")
    if not path.is_file():
        raise ImportProblem(f"{path}: no such file")
    try:
        state = runs.load_weights(path) if path.suffix == ".safetensors" else runs.load_checkpoint(path)
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


def import_model(arch: str, weights: str | Path, image_size: int, classes: Sequence[str], store: str | Path,
                 name: Optional[str] = None, mean=None, std=None, in_channels: int = 3,
                 gradcam_layer: Optional[str] = None, data_spec: Optional[str] = None) -> Path:
    """Check everything, then write the run folder of origin ``imported`` (config, weights, status ``done``)."""
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
        path = check_gradcam_layer(model, gradcam_layer, image_size, "--gradcam-layer", ImportProblem)
    else:
        path = find_gradcam_layer(model, image_size, in_channels)
    digest = runs.file_sha256(weights)
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
