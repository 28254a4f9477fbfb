"""A run's model and data, rebuilt from its folder: the classifier from its weights (checked against the
architecture its config names) and a split of its data (checked against the classes it predicts)."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from dpaat_core.errors import RunError
from dpaat_core.models import model_from_config, state_mismatch
from dpaat_core.store.runs import load_checkpoint, load_weights, read_record


def load_model(run_dir, device="cpu", weights: str = "best") -> torch.nn.Module:
    """The run's classifier, eval mode, on ``device``: ``"best"`` from weights.safetensors, ``"last"`` from last.pt."""
    run_dir = Path(run_dir)
    record = read_record(run_dir)
    name, num_classes = record.model.name, record.dataset.num_classes
    try:
        model = model_from_config(asdict(record.model), num_classes, record.dataset.in_channels)
    except (ValueError, KeyError, TypeError, RunError) as exc:
        raise RunError(f"{run_dir / 'config.json'}: cannot build the model ({exc})") from None
    if weights not in ("best", "last"):
        raise ValueError(f"weights must be 'best' or 'last', got {weights!r}")
    file = run_dir / ("weights.safetensors" if weights == "best" else "last.pt")
    state = load_weights(file) if weights == "best" else load_checkpoint(file).get("model")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RunError(f"{file}: no 'model' state_dict of tensors in it")
    missing, unexpected, shapes = state_mismatch(model.state_dict(), state)
    problems = [f"missing {k}" for k in missing] + [f"unexpected {k}" for k in unexpected]
    problems += [f"{k} has shape {found}, the model {want}" for k, found, want in shapes]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise RunError(f"{file}: weights do not fit a {name} with {num_classes} classes: {'; '.join(problems[:3])}{more}")
    broken = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise RunError(f"{file}: {broken[0]} holds NaN or infinite values (training diverged, or the file was made "
                       "so); these weights cannot give a prediction")
    model.load_state_dict(state, strict=True)  # copy_ casts to the model's dtypes: float16 files load into float32
    return model.to(device).eval()


def load_run_data(run_dir, split: str = "test", spec: str | None = None, max_samples: int | None = None,
                  progress: bool = False, root: str | None = None, on_progress=None):
    """A split of the run's own data (or of ``spec``, with medmnist files under ``root``), at the
    run's image size and split seed; data of another class count or channel count is refused.
    ``on_progress(done, total, what)``: called as image files are decoded (see :func:`dpaat_core.data.load_dataset`)."""
    from dpaat_core.data import load_dataset  # here, not at the top: listing runs should not need torchvision

    record = read_record(run_dir)
    spec = spec or record.spec
    if spec is None:
        raise RunError(f"{run_dir}: the run names no data (an import with --classes only): pass --data SPEC")
    dataset = load_dataset(spec, split, record.image_size, root=root or record.root,
                           max_samples=max_samples, seed=record.seed, progress=progress,
                           on_progress=on_progress)
    expected = record.dataset
    if dataset.num_classes != expected.num_classes or dataset.in_channels != expected.in_channels:
        raise RunError(f"{spec}: {dataset.num_classes} classes and {dataset.in_channels} channels, "
                       f"but the run's model takes {expected.in_channels} channels and predicts "
                       f"{expected.num_classes} classes")
    if expected.classes and list(dataset.classes) != list(expected.classes):
        raise RunError(f"{spec}: its classes are {', '.join(map(str, dataset.classes))}; the run "
                       f"predicts {', '.join(record.classes)} (same count, other classes or order)")
    return dataset
