"""``folder:<dir>``: torchvision's ImageFolder layout (``<dir>/<class>/<image>``).

If ``<dir>`` has ``train/`` (and ``val/``, ``test/``) subfolders, each split is read from its
own folder and the class list comes from ``train/``. Otherwise the whole folder is split,
stratified by class and seeded (70/10/20).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from dpaat_core.data.dataset import SPLITS, DataError, DataNotFoundError, ImageDataset, SourceInfo
from dpaat_core.data.images import IMAGE_EXTENSIONS, OnProgress, image_folder, load_image_files
from dpaat_core.data.splits import stratified_group_split


#: bounds of the walk under one folder: a spec such as ``folder:/`` fails fast instead of reading the whole disk
MAX_DEPTH = 8            # folder levels below <dir>/<class>/
MAX_ENTRIES = 1_000_000  # files and folders looked at
MAX_SECONDS = 60.0


def _images_under(class_dir: Path, budget: dict) -> list[str]:
    """Image files under ``class_dir``, sorted. Links are followed, but never into a folder already walked or one
    above (a loop such as ``mel/loop -> ..``), and a file reached twice counts once."""
    seen_dirs, seen_files, found = set(), set(), []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        depth = len(Path(dirpath).relative_to(class_dir).parts)
        budget["entries"] += len(dirnames) + len(filenames)
        if budget["entries"] > MAX_ENTRIES or time.monotonic() > budget["deadline"]:
            raise DataError(f"{budget['root']}: looked at {budget['entries']:,} files and folders in "
                            f"{time.monotonic() - budget['start']:.0f} s without finishing: point the spec at a "
                            "dataset folder (<dir>/<class>/<image>)")
        keep = []
        for d in dirnames:
            target = os.path.realpath(os.path.join(dirpath, d))
            up = real == target or real.startswith(target.rstrip(os.sep) + os.sep)
            if not up and target not in seen_dirs and depth < MAX_DEPTH:
                keep.append(d)
        dirnames[:] = sorted(keep)
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if name.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(path):
                target = os.path.realpath(path)
                if target not in seen_files:
                    seen_files.add(target)
                    found.append(path)
    return sorted(found)


def _listing(root: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """The class names (sub-folders of ``root``, sorted) and ``(path, class index)`` of every image below them."""
    try:
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    except OSError as exc:
        raise DataError(f"{root}: cannot list the folder ({exc})") from exc
    budget = {"root": root, "entries": 0, "start": time.monotonic(), "deadline": time.monotonic() + MAX_SECONDS}
    samples = [(p, k) for k, c in enumerate(classes) for p in _images_under(root / c, budget)]
    if not classes or not samples:
        raise DataError(f"{root}: not an ImageFolder layout (<dir>/<class>/<image>): "
                        + ("no class folders" if not classes else "no images in the class folders"))
    return classes, samples


def load_folder(directory: str, split: str, image_size: Optional[int], seed: int = 0,
                progress: bool = True, on_progress: Optional[OnProgress] = None) -> ImageDataset:
    root, spec = image_folder("folder", directory, image_size)
    if (root / "train").is_dir():
        classes, _ = _listing(root / "train")
        split_dir = root / split
        if not split_dir.is_dir():
            have = ", ".join(s for s in SPLITS if (root / s).is_dir())
            raise DataNotFoundError(f"{root}: no '{split}' folder (split folders here: {have})")
        split_classes, samples = _listing(split_dir)
        extra = sorted(set(split_classes) - set(classes))
        if extra:
            raise DataError(f"{split_dir}: class folder(s) {extra} are not in {root / 'train'}")
        samples = [(p, classes.index(split_classes[c])) for p, c in samples]
    else:
        classes, samples = _listing(root)
        labels = [c for _, c in samples]
        assignment = stratified_group_split(labels, np.arange(len(samples)), seed=seed)
        samples = [s for s, a in zip(samples, assignment) if a == split]
        if not samples:
            raise DataError(f"{spec}: the {split} split is empty (too few images per class to split)")
    paths = [Path(p) for p, _ in samples]
    arrays, kept = load_image_files(paths, image_size, progress=progress, what=f"{split} images under {root}",
                                    on_progress=on_progress)
    return ImageDataset(
        torch.from_numpy(arrays),
        torch.tensor([samples[i][1] for i in kept]),
        classes,
        SourceInfo(spec=spec, split=split, path=str(root)),
        source_ids=[str(paths[i].relative_to(root)) for i in kept],
    )
