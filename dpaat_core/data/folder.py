"""``folder:<dir>``: torchvision's ImageFolder layout (``<dir>/<class>/<image>``).

If ``<dir>`` has ``train/`` (and ``val/``, ``test/``) subfolders, each split is read from its
own folder and the class list comes from ``train/``. Otherwise the whole folder is split,
stratified by class and seeded (70/10/20).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torchvision.datasets.folder import find_classes, make_dataset

from .dataset import SPLITS, DataError, DataNotFoundError, ImageDataset, SourceInfo
from .images import IMAGE_EXTENSIONS, image_folder, load_image_files
from .splits import stratified_group_split


def _listing(root: Path) -> tuple[list[str], list[tuple[str, int]]]:
    try:
        classes, class_to_idx = find_classes(str(root))
        return classes, make_dataset(str(root), class_to_idx, extensions=IMAGE_EXTENSIONS)
    except FileNotFoundError as exc:  # no class folders, or class folders without images
        raise DataError(f"{root}: not an ImageFolder layout (<dir>/<class>/<image>): {exc}") from exc


def load_folder(directory: str, split: str, image_size: Optional[int], seed: int = 0,
                progress: bool = True) -> ImageDataset:
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
    arrays, kept = load_image_files(paths, image_size, progress=progress, what=f"{split} images under {root}")
    return ImageDataset(
        torch.from_numpy(arrays),
        torch.tensor([samples[i][1] for i in kept]),
        classes,
        SourceInfo(spec=spec, split=split, path=str(root)),
        source_ids=[str(paths[i].relative_to(root)) for i in kept],
    )
