"""MedMNIST-format npz files: ``npz:<path>`` and ``medmnist:<flag>[@<size>]``.

The format: ``{train,val,test}_images`` (uint8 ``[N, H, W]`` or ``[N, H, W, C]``) and
``{train,val,test}_labels`` (integers ``[N]`` or ``[N, 1]``). Optional extras that this
project reads when present:

* class names: a ``classes`` key (strings), else a CSV beside the file (``<stem>.csv``) with
  ``label`` and ``dx`` (or ``class``) columns, else the MedMNIST flag in the file name, else
  ``class_0, class_1, ...``;
* lesion masks: ``<stem>_masks.npz`` beside the file, with ``{split}_masks`` ``[N, H, W]``.
"""
from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import torch

from dpaat_core.data.dataset import SPLITS, DataError, DataNotFoundError, ImageDataset, SourceInfo, resize_images, resize_masks

MEDMNIST_SIZES = (28, 64, 128, 224)


def _open_npz(path: Path):
    try:
        npz = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise DataError(f"{path}: not a readable npz file ({exc.__class__.__name__}: {exc})") from exc
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise DataError(f"{path}: a single .npy array, not an npz archive of named arrays (MedMNIST format)")
    return npz


def _read_array(npz, path: Path, key: str) -> np.ndarray:
    if key not in npz.files:
        raise DataError(
            f"{path}: no '{key}' array. A MedMNIST-format npz has train_images, train_labels, val_images, "
            f"val_labels, test_images, test_labels; this file has: {', '.join(npz.files) or 'nothing'}"
        )
    shape, dtype = _header(npz, path, key)
    if dtype.hasobject:
        raise DataError(f"{path}: '{key}' holds Python objects, which cannot be read without unpickling; refused")
    size = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
    if size > MAX_ARRAY_BYTES:
        raise DataError(f"{path}: '{key}' declares {'x'.join(map(str, shape))} {dtype} = {size / 2**30:.1f} GiB, over "
                        f"the {MAX_ARRAY_BYTES / 2**30:.0f} GiB limit for one array")
    try:
        return npz[key]
    except (ValueError, zipfile.BadZipFile, OSError, EOFError, MemoryError) as exc:
        raise DataError(f"{path}: '{key}' is corrupt or truncated ({exc.__class__.__name__}: {exc})") from None


#: the largest array an npz may declare (a MedMNIST 224 px training split of 100,000 images is 15 GB)
MAX_ARRAY_BYTES = 16 * 2**30


def _header(npz, path: Path, key: str):
    """``(shape, dtype)`` from the array's .npy header, read before any of its data."""
    try:
        with npz.zip.open(f"{key}.npy") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
    except (ValueError, KeyError, zipfile.BadZipFile, OSError, EOFError, SyntaxError) as exc:
        raise DataError(f"{path}: '{key}' has no readable .npy header ({exc.__class__.__name__}: {exc})") from None
    return shape, dtype


def _images_to_uint8(arr: np.ndarray, path: Path, key: str) -> torch.Tensor:
    """``[N, H, W]`` or ``[N, H, W, C]`` (C = 1 or 3) to uint8 ``[N, C, H, W]``."""
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise DataError(f"{path}: '{key}' has shape {arr.shape}; expected [N, H, W] or [N, H, W, C] with C = 1 or 3")
    if arr.shape[0] == 0:
        raise DataError(f"{path}: '{key}' is empty: the split has no images")
    if arr.dtype == np.uint8:
        pass
    elif np.issubdtype(arr.dtype, np.floating):
        # Float images are accepted in [0, 1] and stored as uint8 (a rounding of at most 1/510).
        if not np.isfinite(arr).all():
            raise DataError(f"{path}: '{key}' contains NaN or infinite values")
        if arr.min() < 0 or arr.max() > 1:
            raise DataError(f"{path}: float '{key}' must be in [0, 1], found [{arr.min():g}, {arr.max():g}]")
        arr = np.round(arr * 255).astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_:
        if arr.min() < 0 or arr.max() > 255:
            raise DataError(f"{path}: '{key}' values must be in [0, 255], found [{arr.min()}, {arr.max()}]")
        arr = arr.astype(np.uint8)
    else:
        raise DataError(f"{path}: '{key}' has dtype {arr.dtype}; expected uint8 images")
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 1, 2)))


def _labels(arr: np.ndarray, path: Path, key: str, n: Optional[int] = None) -> np.ndarray:
    if arr.ndim == 2 and arr.shape[1] > 1:
        raise DataError(f"{path}: '{key}' has shape {arr.shape}: multi-label data is not supported (one class per image)")
    arr = arr.reshape(-1)
    if n is not None and len(arr) != n:
        raise DataError(f"{path}: '{key}' has {len(arr)} labels for {n} images")
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.issubdtype(arr.dtype, np.floating) or not np.isfinite(arr).all() or (arr != np.round(arr)).any():
            raise DataError(f"{path}: '{key}' must hold integer class indices, found dtype {arr.dtype}")
    if len(arr) and arr.min() < 0:
        raise DataError(f"{path}: '{key}' has negative labels ({sorted(set(arr[arr < 0].tolist()))[:5]}); classes are 0, 1, ...")
    return arr.astype(np.int64)


def _check_label_range(path: Path, classes: list[str], present: np.ndarray, declared: bool) -> None:
    """Labels past the class list are errors; so is (unless a ``classes`` array declares the classes) a label
    range mostly empty: one typo such as 99 in a 3-class file must not make a 100-class model."""
    if len(present) and present.max() >= len(classes):
        raise DataError(f"{path}: labels {sorted(present[present >= len(classes)].tolist())[:5]} are past the "
                        f"{len(classes)} classes ({', '.join(classes[:8])}{', ...' if len(classes) > 8 else ''})")
    missing = set(range(len(classes))) - set(present.tolist())
    if not declared and len(missing) > len(present):
        raise DataError(f"{path}: labels run from 0 to {len(classes) - 1}, which makes {len(classes)} classes, but only "
                        f"{len(present)} occur ({', '.join(map(str, present[:8].tolist()))}"
                        f"{', ...' if len(present) > 8 else ''}): is a label mistyped? Declare the classes with a "
                        "'classes' array to keep empty ones")


def _class_names(npz, path: Path, n_seen: int) -> list[str]:
    """Names for the classes; ``n_seen`` is one more than the largest label in any split."""
    if "classes" in npz.files:
        return [str(c) for c in _read_array(npz, path, "classes")]
    sidecar = path.with_suffix(".csv")
    if sidecar.exists():
        try:
            table = pd.read_csv(sidecar)
        except Exception as exc:
            raise DataError(f"{sidecar}: unreadable class-name CSV ({exc})") from exc
        name_col = next((c for c in ("dx", "class", "class_name") if c in table.columns), None)
        if "label" in table.columns and name_col:
            pairs = table[["label", name_col]].drop_duplicates()
            if pairs["label"].duplicated().any():
                raise DataError(f"{sidecar}: a label maps to several '{name_col}' names")
            names = dict(zip(pairs["label"].astype(int), pairs[name_col].astype(str)))
            return [names.get(i, f"class_{i}") for i in range(max(max(names) + 1, n_seen))]
    flag = re.sub(r"_\d+$", "", path.stem)
    info = _medmnist_info().get(flag)
    if info is not None:
        return [info["label"][str(i)] for i in range(len(info["label"]))]
    return [f"class_{i}" for i in range(n_seen)]


def _medmnist_info() -> dict:
    try:
        from medmnist import INFO
    except ImportError:  # medmnist is a runtime requirement; without it only names are lost
        return {}
    return INFO


def load_npz(path: Path | str, split: str, image_size: Optional[int], spec: Optional[str] = None,
             classes: Optional[Sequence[str]] = None) -> ImageDataset:
    """One split of a MedMNIST-format npz file (see the module docstring)."""
    path = Path(path)
    spec = spec or f"npz:{path}"
    if not path.is_file():
        raise DataNotFoundError(f"{path}: no such file (data spec {spec!r})")
    with _open_npz(path) as npz:
        images = _images_to_uint8(_read_array(npz, path, f"{split}_images"), path, f"{split}_images")
        labels = _labels(_read_array(npz, path, f"{split}_labels"), path, f"{split}_labels", len(images))
        if classes is None:
            others = [_labels(_read_array(npz, path, f"{s}_labels"), path, f"{s}_labels")
                      for s in SPLITS if s != split and f"{s}_labels" in npz.files]
            n_seen = max((int(a.max()) + 1 for a in (labels, *others) if len(a)), default=1)
            classes = _class_names(npz, path, n_seen)
            _check_label_range(path, classes, np.unique(np.concatenate([labels, *others])), "classes" in npz.files)
    masks = _load_sidecar_masks(path, split, len(images), images.shape[2:])
    return ImageDataset(
        resize_images(images, image_size),
        torch.from_numpy(labels),
        classes,
        SourceInfo(spec=spec, split=split, path=str(path)),
        masks=None if masks is None else resize_masks(masks, image_size),
        source_ids=[f"{split}:{i}" for i in range(len(images))],
    )


def _load_sidecar_masks(path: Path, split: str, n: int, hw) -> Optional[torch.Tensor]:
    mask_path = path.with_name(f"{path.stem}_masks.npz")
    if not mask_path.is_file():
        return None
    with _open_npz(mask_path) as npz:
        masks = _read_array(npz, mask_path, f"{split}_masks")
    if masks.shape != (n, *hw):
        raise DataError(f"{mask_path}: '{split}_masks' has shape {masks.shape}, expected {(n, *hw)} to match the images")
    return torch.from_numpy((masks > 0).astype(np.uint8))


def medmnist_file(flag: str, size: int, root: Path) -> Path:
    """Where the medmnist package keeps ``flag`` at ``size``: ``<flag>.npz`` (28) or ``<flag>_<size>.npz``."""
    return root / (f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz")


def parse_medmnist(arg: str) -> tuple[str, int]:
    flag, _, size_text = arg.partition("@")
    flag = flag.strip().lower()
    info = _medmnist_info()
    flags_2d = sorted(f for f in info if not f.endswith("3d"))
    if flag not in flags_2d:
        raise DataError(f"unknown MedMNIST 2D dataset {flag!r}; choose one of: {', '.join(flags_2d)}")
    if "multi-label" in info[flag]["task"]:
        raise DataError(f"medmnist:{flag} is a multi-label task ({info[flag]['task']}); only one-class-per-image sets are supported")
    try:
        size = int(size_text) if size_text else 28
    except ValueError:
        raise DataError(f"medmnist size must be a number, got {size_text!r}") from None
    if size not in MEDMNIST_SIZES:
        raise DataError(f"medmnist size must be one of {MEDMNIST_SIZES}, got {size}")
    return flag, size


def data_root(root: Optional[Path | str]) -> Path:
    """The folder for downloaded data: the argument, else ``$DPAAT_DATA_ROOT``, else ``./data``."""
    return Path(root or os.environ.get("DPAAT_DATA_ROOT") or "data")


def _download_medmnist(flag: str, size: int, root: Path) -> None:
    import medmnist

    info = medmnist.INFO[flag]
    root.mkdir(parents=True, exist_ok=True)
    getattr(medmnist, info["python_class"])(split="train", download=True, root=str(root), size=size)


def load_medmnist(arg: str, split: str, image_size: Optional[int], root=None) -> ImageDataset:
    """``medmnist:<flag>[@<size>]``: the npz from ``root``, downloaded through medmnist when missing."""
    flag, size = parse_medmnist(arg)
    root = data_root(root)
    path = medmnist_file(flag, size, root)
    if not path.is_file():
        try:
            _download_medmnist(flag, size, root)
        except Exception as exc:
            info = _medmnist_info()[flag]
            url = info.get("url" if size == 28 else f"url_{size}", "the MedMNIST Zenodo record")
            raise DataNotFoundError(
                f"{path} is missing and the download through medmnist failed ({exc.__class__.__name__}: "
                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else 'no detail'}).\n"
                f"Download {path.name} on a machine with internet access (from {url}), put it at {path}, "
                f"or point DPAAT_DATA_ROOT at the folder that holds it."
            ) from exc
        if not path.is_file():
            raise DataNotFoundError(f"{path}: medmnist reported a download but the file is not there")
    info = _medmnist_info()[flag]
    classes = [info["label"][str(i)] for i in range(len(info["label"]))]
    return load_npz(path, split, image_size, spec=f"medmnist:{arg}", classes=classes)
