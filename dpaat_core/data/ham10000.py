"""``ham10000:<dir>``: HAM10000 in its original layout.

JPEGs anywhere under ``<dir>`` (``HAM10000_images_part_1/``, ``..._part_2/`` or flat), a
``HAM10000_metadata.csv`` (columns ``lesion_id, image_id, dx``; others are kept), and
optionally lesion masks ``<image_id>_segmentation.png`` anywhere under ``<dir>``.

Split: by ``lesion_id`` so no lesion is in two splits, stratified by ``dx``, seeded
(70/10/20). A ``split`` column in the CSV (train/val/test) overrides it, so a published split
can be reproduced.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import pandas as pd
import torch

from dpaat_core.data.dataset import SPLITS, DataError, DataNotFoundError, ImageDataset, SourceInfo, warn
from dpaat_core.data.images import IMAGE_EXTENSIONS, OnProgress, image_folder, load_image_files, load_mask_files
from dpaat_core.data.splits import stratified_group_split

#: HAM10000 diagnoses in DermaMNIST's label order (alphabetical, as the MedMNIST arrays use).
HAM10000_CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
METADATA = "HAM10000_metadata.csv"
REQUIRED_COLUMNS = ("image_id", "lesion_id", "dx")
MASK_SUFFIX = "_segmentation"


def _find_metadata(root: Path) -> Path:
    direct = root / METADATA
    if direct.is_file():
        return direct
    found = sorted(root.rglob(METADATA), key=lambda p: len(p.parts))
    if not found:
        raise DataNotFoundError(f"{root}: no {METADATA} in this folder or below it (HAM10000's metadata file is needed)")
    return found[0]


def read_metadata(path: Path) -> pd.DataFrame:
    """The metadata table, checked: required columns present and filled, ids unique, dx known."""
    try:
        table = pd.read_csv(path, dtype=str)
    except Exception as exc:
        raise DataError(f"{path}: not a readable CSV ({exc.__class__.__name__}: {exc})") from exc
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {', '.join(missing)}; HAM10000 metadata needs {', '.join(REQUIRED_COLUMNS)} "
            f"(found: {', '.join(map(str, table.columns)) or 'none'})"
        )
    if table.empty:
        raise DataError(f"{path}: no rows")
    empty = table[list(REQUIRED_COLUMNS)].isna().any(axis=1)
    if empty.any():
        raise DataError(f"{path}: {int(empty.sum())} row(s) with an empty {'/'.join(REQUIRED_COLUMNS)} (first: line {int(empty.idxmax()) + 2})")
    table["dx"] = table["dx"].str.strip().str.lower()
    unknown = sorted(set(table["dx"]) - set(HAM10000_CLASSES))
    if unknown:
        raise DataError(f"{path}: unknown dx value(s) {unknown}; HAM10000 has {', '.join(HAM10000_CLASSES)}")
    dupes = table["image_id"][table["image_id"].duplicated()]
    if len(dupes):
        raise DataError(f"{path}: image_id listed more than once: {', '.join(dupes.unique()[:5])}")
    if "split" in table.columns:
        bad = sorted(set(table["split"].dropna()) - set(SPLITS))
        if bad or table["split"].isna().any():
            raise DataError(f"{path}: the 'split' column must be train, val or test on every row (found {bad or 'empty cells'})")
    return table


def _index_files(root: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    images, masks = {}, {}
    for p in sorted(root.rglob("*")):
        if p.suffix.lower() not in IMAGE_EXTENSIONS or not p.is_file():
            continue
        if p.stem.endswith(MASK_SUFFIX):
            masks.setdefault(p.stem[: -len(MASK_SUFFIX)], p)
        else:
            images.setdefault(p.stem, p)
    return images, masks


def load_ham10000(directory: str, split: str, image_size: Optional[int], seed: int = 0,
                  progress: bool = True, on_progress: Optional[OnProgress] = None) -> ImageDataset:
    root, spec = image_folder("ham10000", directory, image_size)
    meta_path = _find_metadata(root)
    table = read_metadata(meta_path)
    images, masks = _index_files(root)
    has_file = table["image_id"].isin(images.keys())
    if not has_file.any():
        raise DataError(f"{root}: none of the {len(table)} images in {meta_path.name} has a file under this folder")
    if not has_file.all():
        missing = table.loc[~has_file, "image_id"]
        warn(f"{meta_path}: {len(missing)} of {len(table)} listed images have no file under {root} and are skipped "
             f"(first: {', '.join(missing.iloc[:3])})")
        table = table[has_file].reset_index(drop=True)
    if "split" not in table.columns:
        table["split"] = stratified_group_split(table["dx"], table["lesion_id"], seed=seed)
    part = table[table["split"] == split].sort_values("image_id").reset_index(drop=True)
    if part.empty:
        raise DataError(f"{spec}: the {split} split is empty ({len(table)} images in all)")
    paths = [images[i] for i in part["image_id"]]
    arrays, kept = load_image_files(paths, image_size, progress=progress, what=f"{split} images under {root}",
                                    on_progress=on_progress)
    part = part.iloc[kept].reset_index(drop=True)
    mask_arr = load_mask_files([masks.get(i) for i in part["image_id"]], image_size, progress=progress,
                               on_progress=on_progress)
    return ImageDataset(
        torch.from_numpy(arrays),
        torch.tensor([HAM10000_CLASSES.index(d) for d in part["dx"]]),
        HAM10000_CLASSES,
        SourceInfo(spec=spec, split=split, path=str(root)),
        masks=None if mask_arr is None else torch.from_numpy(mask_arr),
        source_ids=list(part["image_id"]),
        metadata=part,
    )
