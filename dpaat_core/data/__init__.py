"""Datasets behind one entry point, :func:`load_dataset`, for every source the project reads.

Data specs:

* ``npz:<path>``: a MedMNIST-format npz (e.g. ``../shared/data/ham10000_sample.npz``);
* ``medmnist:<flag>[@<size>]``: a MedMNIST 2D set from the data root, downloaded when missing;
* ``ham10000:<dir>``: HAM10000's original JPEG layout with ``HAM10000_metadata.csv``;
* ``folder:<dir>``: torchvision ImageFolder layout;
* ``synthetic[:n=512,classes=4,seed=0]``: procedural lesions with masks, for offline use.

Corrupt or unreadable image files are skipped with one warning that counts them; everything
else that is wrong (missing files, wrong keys or columns, bad labels, empty splits) raises a
:class:`DataError` that names the file and the problem.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from dpaat_core.data.dataset import SPLITS, DataError, DataNotFoundError, DataWarning, ImageDataset, cap_samples, sample_indices
from dpaat_core.data.ham10000 import HAM10000_CLASSES, load_ham10000
from dpaat_core.data.images import OnProgress
from dpaat_core.data.folder import load_folder
from dpaat_core.data.npz import data_root, load_medmnist, load_npz
from dpaat_core.data.synthetic import load_synthetic

SOURCES = ("npz", "medmnist", "ham10000", "folder", "synthetic")

__all__ = [
    "SPLITS", "SOURCES", "DataError", "DataNotFoundError", "DataWarning", "ImageDataset", "HAM10000_CLASSES",
    "load_dataset", "parse_spec", "display_name", "data_root", "cap_samples", "sample_indices",
]


def parse_spec(spec: str) -> tuple[str, str]:
    """``"kind:argument"`` to ``(kind, argument)``, checking the kind."""
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"a data spec is a string like 'npz:<path>' or 'synthetic', got {spec!r}")
    kind, _, arg = spec.strip().partition(":")
    if kind not in SOURCES:
        raise DataError(f"unknown data source {kind!r} in {spec!r}; use one of: {', '.join(f'{s}:' for s in SOURCES)}")
    if kind not in ("synthetic",) and not arg:
        raise DataError(f"data spec {spec!r} needs a {'flag' if kind == 'medmnist' else 'path'} after '{kind}:'")
    return kind, arg


def display_name(spec) -> str:
    """A data spec as a page may show it to anyone: the source and the file's or folder's own name, never the path
    on the server (``npz:/srv/data/derma.npz`` is ``npz derma.npz``); a spec that does not parse is "unnamed data"."""
    try:
        kind, arg = parse_spec(spec)
    except DataError:
        return "unnamed data"
    if kind in ("synthetic", "medmnist"):
        return spec.strip()
    return f"{kind} {Path(arg.rstrip('/')).name or arg}"


def load_dataset(
    spec: str,
    split: str,
    image_size: Optional[int],
    root: Optional[str | Path] = None,
    max_samples: Optional[int] = None,
    *,
    seed: int = 0,
    progress: bool = True,
    on_progress: Optional[OnProgress] = None,
) -> ImageDataset:
    """Load one split of a dataset as an :class:`ImageDataset`.

    ``split``: train, val or test. ``image_size``: square side in pixels that images are
    centre-cropped and resized to (None keeps an array source's own size). ``root``: where
    ``medmnist:`` files live (else ``$DPAAT_DATA_ROOT``, else ``./data``). ``max_samples``:
    keep at most this many items (a seeded random draw, for quick runs). ``seed``: the split
    of sources that have none (``ham10000:``, ``folder:``). ``progress``: a bar while decoding;
    ``on_progress(done, total, what)``: called as image files (and then lesion masks) are decoded.
    """
    kind, arg = parse_spec(spec)
    if split not in SPLITS:
        raise DataError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 8 or image_size > 1024):
        raise DataError(f"image_size must be an integer from 8 to 1024 pixels, got {image_size!r}")
    if kind == "npz":
        dataset = load_npz(Path(arg).expanduser(), split, image_size, spec=spec)
    elif kind == "medmnist":
        dataset = load_medmnist(arg, split, image_size, root=root)
    elif kind == "ham10000":
        dataset = load_ham10000(arg, split, image_size, seed=seed, progress=progress, on_progress=on_progress)
    elif kind == "folder":
        dataset = load_folder(arg, split, image_size, seed=seed, progress=progress, on_progress=on_progress)
    else:
        dataset = load_synthetic(arg, split, image_size)
    return cap_samples(dataset, max_samples, seed=seed)
