"""The in-memory dataset every source produces, and the errors data loading raises.

Images are kept as one uint8 tensor at the training size (a 64 px HAM10000 split is a few
tens of MB), so items are cheap to fetch and a GPU path can move the whole split at once.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """Data that cannot be used: the message names the file and what is wrong with it."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A file or folder a data spec points at does not exist."""


class DataWarning(UserWarning):
    """Data was usable, but something was skipped or guessed (the message says what)."""


@dataclass(frozen=True)
class SourceInfo:
    """Where a dataset came from, for provenance in run configs and the dashboard."""

    spec: str
    split: str
    path: Optional[str] = None


class ImageDataset(torch.utils.data.Dataset):
    """A labelled image split held in memory.

    Items are ``(image, label, index)``: ``image`` a float tensor ``[C, H, W]`` in [0, 1],
    ``label`` an int, ``index`` the item's position in this dataset (stable under shuffling,
    so per-sample state such as DPAAT's epsilon memory can be keyed on it).

    Attributes: ``images`` uint8 ``[N, C, H, W]``, ``labels`` int64 ``[N]``, ``classes`` (names),
    ``masks`` uint8 ``[N, H, W]`` with 1 = lesion (or None), ``source_ids`` (image id, file or
    source row of each item), ``source`` (:class:`SourceInfo`), ``metadata`` (a table row per
    item, e.g. HAM10000's age/sex/localization, or None).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        classes: Sequence[str],
        source: SourceInfo,
        masks: Optional[torch.Tensor] = None,
        source_ids: Optional[Sequence[str]] = None,
        metadata: Optional["pd.DataFrame"] = None,
    ):
        where = f"{source.spec} ({source.split})"
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise DataError(f"{where}: images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        if len(images) == 0:
            raise DataError(f"{where}: the split is empty")
        labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
        if len(labels) != len(images):
            raise DataError(f"{where}: {len(images)} images but {len(labels)} labels")
        if len(classes) < 1:
            raise DataError(f"{where}: no class names")
        bad = labels[(labels < 0) | (labels >= len(classes))]
        if len(bad):
            raise DataError(
                f"{where}: labels out of range [0, {len(classes) - 1}] for {len(classes)} classes: "
                f"{sorted(set(bad.tolist()))[:10]}"
            )
        if masks is not None and (masks.shape[0] != len(images) or masks.shape[1:] != images.shape[2:]):
            raise DataError(f"{where}: masks {tuple(masks.shape)} do not match images {tuple(images.shape)}")
        if source_ids is not None and len(source_ids) != len(images):
            raise DataError(f"{where}: {len(source_ids)} source ids for {len(images)} images")
        self.images = images.contiguous()
        self.labels = labels
        self.classes = list(classes)
        self.masks = masks
        self.source = source
        self.source_ids = list(source_ids) if source_ids is not None else [str(i) for i in range(len(images))]
        if metadata is not None and len(metadata) != len(images):
            raise DataError(f"{where}: {len(metadata)} metadata rows for {len(images)} images")
        self.metadata = None if metadata is None else metadata.reset_index(drop=True)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.images[index].float().div_(255.0), int(self.labels[index]), int(index)

    def batch(self, index, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Items ``index`` (indices, a range or a tensor) as float images ``[B, C, H, W]`` in [0, 1] and int64
        labels ``[B]``, on ``device`` (moved as uint8, converted there)."""
        index = torch.as_tensor(index if isinstance(index, torch.Tensor) else list(index), dtype=torch.int64)
        return self.images[index].to(device).float().div_(255.0), self.labels[index].to(device)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    @property
    def class_counts(self) -> np.ndarray:
        """Items per class, int64 ``[num_classes]`` (zeros for classes absent from this split)."""
        return np.bincount(self.labels.numpy(), minlength=self.num_classes).astype(np.int64)

    def mask(self, index: int) -> Optional[torch.Tensor]:
        return None if self.masks is None else self.masks[index]

    def subset(self, indices: Sequence[int]) -> "ImageDataset":
        """A new dataset of the given items, re-indexed 0..len-1 (source ids follow them)."""
        idx = torch.as_tensor(list(indices), dtype=torch.int64)
        return ImageDataset(
            self.images[idx],
            self.labels[idx],
            self.classes,
            self.source,
            masks=None if self.masks is None else self.masks[idx],
            source_ids=[self.source_ids[i] for i in idx.tolist()],
            metadata=None if self.metadata is None else self.metadata.iloc[idx.tolist()],
        )

    def __repr__(self) -> str:
        counts = ", ".join(f"{c}={n}" for c, n in zip(self.classes, self.class_counts))
        return (
            f"ImageDataset({self.source.spec!r}, split={self.source.split!r}, n={len(self)}, "
            f"size={self.in_channels}x{self.image_size}x{self.image_size}, masks={self.masks is not None}, {counts})"
        )


def cap_samples(dataset: ImageDataset, max_samples: Optional[int], seed: int = 0) -> ImageDataset:
    """At most ``max_samples`` items, drawn at random (seeded) and kept in their original order.

    A class-stratified draw would hide rare classes less, but a plain draw keeps the split's
    own class mix, which is what a quick run should see.
    """
    if max_samples is None or max_samples >= len(dataset):
        return dataset
    return dataset.subset(sample_indices(len(dataset), max_samples, seed).tolist())


def sample_indices(size: int, max_samples: Optional[int], seed: int = 0) -> torch.Tensor:
    """The positions :func:`cap_samples` keeps of ``size`` items: a seeded draw of ``max_samples``, sorted (all when
    ``max_samples`` is None or not smaller). Commands that pick images of a full split use it, so that ``certify
    --max-samples 128`` and ``evaluate --max-samples 128`` measure the same images."""
    if max_samples is None or max_samples >= size:
        return torch.arange(size)
    if max_samples < 1:
        raise DataError(f"max_samples must be at least 1, got {max_samples}")
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(size, generator=g)[:max_samples].sort().values


def center_crop_square(images: torch.Tensor) -> torch.Tensor:
    """Crop ``[..., H, W]`` to its central square, as the HAM10000 arrays were made."""
    h, w = images.shape[-2:]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return images[..., top : top + s, left : left + s]


def resize_images(images: torch.Tensor, size: Optional[int], chunk: int = 512) -> torch.Tensor:
    """Center-crop uint8 ``[N, C, H, W]`` images to a square and resize them (antialiased bilinear)."""
    images = center_crop_square(images)
    if size is None or images.shape[-1] == size:
        return images.contiguous()
    out = torch.empty((images.shape[0], images.shape[1], size, size), dtype=torch.uint8)
    for start in range(0, len(images), chunk):
        part = images[start : start + chunk].float()
        part = F.interpolate(part, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[start : start + chunk] = part.round_().clamp_(0, 255).to(torch.uint8)
    return out


def resize_masks(masks: torch.Tensor, size: Optional[int]) -> torch.Tensor:
    """Center-crop 0/1 uint8 masks ``[N, H, W]`` to a square and resize them (nearest)."""
    masks = center_crop_square(masks)
    if size is None or masks.shape[-1] == size:
        return masks.contiguous()
    return F.interpolate(masks[:, None].float(), size=(size, size), mode="nearest")[:, 0].to(torch.uint8)


def warn(message: str) -> None:
    warnings.warn(message, DataWarning, stacklevel=3)
