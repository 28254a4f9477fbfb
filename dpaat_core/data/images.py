"""Decoding image and mask files into uint8 arrays at the training size.

Preprocessing matches the HAM10000 arrays this project ships with: centre-crop to a square,
then resize with PIL's LANCZOS (masks: read by colour, threshold at >127, NEAREST).

Policy for bad files: a file that does not decode (corrupt, truncated, not an image, larger
than ``MAX_PIXELS``) is **skipped**, and one :class:`DataWarning` counts the skipped files and
names the first few. A split in which every file is bad is an error.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from dpaat_core.data.dataset import DataError, DataNotFoundError, warn

#: Images above this many pixels are refused before decoding (decompression-bomb guard).
MAX_PIXELS = 64_000_000
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def image_folder(kind: str, directory: str, image_size: Optional[int]) -> tuple[Path, str]:
    """The folder of a ``<kind>:<dir>`` spec, checked, and the spec text for messages."""
    root, spec = Path(directory).expanduser(), f"{kind}:{directory}"
    if not root.is_dir():
        raise DataNotFoundError(f"{root}: no such folder (data spec {spec!r})")
    if image_size is None:
        raise DataError(f"{spec}: an image_size is needed to load image files")
    return root, spec


def _open_checked(path: Path | str) -> Image.Image:
    img = Image.open(path)
    w, h = img.size
    if w * h > MAX_PIXELS:
        raise DataError(f"{w}x{h} pixels is over the {MAX_PIXELS:,} pixel limit")
    return img


def _square_resized(img: Image.Image, size: int, resample: int) -> Image.Image:
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    img = img.crop((left, top, left + s, top + s))
    return img if s == size else img.resize((size, size), resample=resample)


#: PIL modes of more than 8 bits per pixel: ``convert`` would clip them (a 16-bit PNG turns all white)
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def _to_8bit(img: Image.Image) -> Image.Image:
    """A 16-bit (or 32-bit integer / float) grey image scaled to 8 bits: 65535 -> 255. A 32-bit image whose values
    all fit in 8 bits is taken as 8-bit data already."""
    arr = np.asarray(img, dtype=np.float64)
    top = 65535.0 if img.mode.startswith("I;16") or (arr.size and np.nanmax(arr) > 255) else 255.0
    return Image.fromarray(np.clip(np.rint(np.nan_to_num(arr) * (255.0 / top)), 0, 255).astype(np.uint8), "L")


def _flatten_alpha(img: Image.Image) -> Image.Image:
    """An image with transparency composited on white (dermoscopy backgrounds are light; black would read as a
    dark lesion border)."""
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def preprocess_image(img: Image.Image, size: int, channels: int = 3) -> np.ndarray:
    """A PIL image as uint8 ``[C, size, size]``: EXIF-rotated, 16-bit scaled to 8 bits, transparency composited
    on white, centre-cropped, LANCZOS-resized."""
    img = ImageOps.exif_transpose(img)
    if img.mode in _WIDE_MODES:
        img = _to_8bit(img)
    elif img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = _flatten_alpha(img)
    img = img.convert("RGB" if channels == 3 else "L")
    arr = np.asarray(_square_resized(img, size, Image.LANCZOS), dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def load_image(path: Path | str, size: int, channels: int = 3) -> np.ndarray:
    """Decode one image file to uint8 ``[C, size, size]``; raises on any decoding problem."""
    with _open_checked(path) as img:
        img.load()
        return preprocess_image(img, size, channels)


def load_mask(path: Path | str, size: int) -> np.ndarray:
    """Decode one lesion mask to uint8 ``[size, size]`` with 1 = lesion (grey level > 127)."""
    with _open_checked(path) as img:
        grey = img.convert("L")  # by colour: palette masks may have white at index 0
        binary = grey.point(lambda v: 255 if v > 127 else 0)
        return (np.asarray(_square_resized(binary, size, Image.NEAREST)) > 127).astype(np.uint8)


#: ``on_progress(done, total, what)``: after every few files decoded, ``what`` being "images" or "lesion masks"
OnProgress = Callable[[int, int, str], None]


def _decode_all(paths: Sequence[Path], decode, what: str, progress: bool, on_progress: Optional[OnProgress] = None,
                kind: str = "images"):
    def safe(path):
        try:
            return decode(path), None
        except Exception as exc:  # any decoding failure: counted and reported below
            return None, f"{path}: {exc.__class__.__name__}: {exc}"

    workers = max(1, min(8, os.cpu_count() or 1))
    total, step = len(paths), max(1, len(paths) // 100)
    results = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for result in tqdm(pool.map(safe, paths), total=total, desc=f"decoding {what}", unit="img",
                           disable=not progress, leave=False):
            results.append(result)
            if on_progress is not None and (len(results) % step == 0 or len(results) == total):
                on_progress(len(results), total, kind)
    return results


def load_image_files(
    paths: Sequence[Path], size: int, channels: int = 3, progress: bool = True, what: str = "images",
    on_progress: Optional[OnProgress] = None,
) -> tuple[np.ndarray, list[int]]:
    """Decode many files in parallel. Returns ``(uint8 [N, C, size, size], kept positions)``.

    Bad files are skipped with one warning (see the module docstring); all bad is an error. ``progress``: a
    terminal bar; ``on_progress``: a callback with the count (a page's bar).
    """
    results = _decode_all(paths, lambda p: load_image(p, size, channels), what, progress, on_progress)
    kept = [i for i, (arr, _) in enumerate(results) if arr is not None]
    errors = [err for _, err in results if err is not None]
    if errors:
        shown = "\n  ".join(errors[:5])
        more = f"\n  ... and {len(errors) - 5} more" if len(errors) > 5 else ""
        if not kept:
            raise DataError(f"none of the {len(paths)} {what} could be decoded:\n  {shown}{more}")
        warn(f"skipped {len(errors)} of {len(paths)} {what} that could not be decoded:\n  {shown}{more}")
    if not kept:
        raise DataError(f"no {what} to load")
    return np.stack([results[i][0] for i in kept]), kept


def load_mask_files(paths: Sequence[Optional[Path]], size: int, progress: bool = True,
                    on_progress: Optional[OnProgress] = None) -> Optional[np.ndarray]:
    """Masks for every image, or None (with a warning) when any is missing or unreadable."""
    present = [p for p in paths if p is not None]
    if not present:
        return None
    if len(present) < len(paths):
        warn(f"lesion masks found for {len(present)} of {len(paths)} images; masks are not used for this split")
        return None
    results = _decode_all(present, lambda p: load_mask(p, size), "masks", progress, on_progress, "lesion masks")
    bad = [err for _, err in results if err is not None]
    if bad:
        warn(f"{len(bad)} lesion masks could not be decoded (first: {bad[0]}); masks are not used for this split")
        return None
    return np.stack([arr for arr, _ in results])


#: what an upload may be (the dashboard's attribution explorer).
UPLOAD_FORMATS = ("JPEG", "PNG")


def decode_upload(data: bytes, size: int, channels: int = 3, max_bytes: int = 10 * 2**20) -> np.ndarray:
    """Uploaded bytes to uint8 ``[C, size, size]``, like a dataset image; read in memory, never saved.

    Only JPEG (a camera's MPO JPEG too: its first frame) and PNG are accepted; transparency is composited on
    white and 16-bit images are scaled to 8 bits, as in datasets. Files over ``max_bytes`` or ``MAX_PIXELS`` (a decompression
    bomb) are refused before decoding. Every refusal is a :class:`DataError` that says why.
    """
    if len(data) > max_bytes:
        raise DataError(f"the file is {len(data) / 2**20:.1f} MiB; the limit is {max_bytes / 2**20:.0f} MiB")
    import io
    try:
        img = Image.open(io.BytesIO(data))
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for junk
        raise DataError(f"not a readable image ({type(exc).__name__})") from None
    if img.format == "MPO":   # a camera's multi-picture JPEG: its first frame is the photograph
        img.seek(0)
    elif img.format not in UPLOAD_FORMATS:
        raise DataError(f"only JPEG or PNG images are accepted, this is {img.format or 'an unknown format'}")
    w, h = img.size
    if w * h > MAX_PIXELS:
        raise DataError(f"{w}x{h} pixels is over the {MAX_PIXELS:,} pixel limit")
    try:
        img.load()
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt data
        raise DataError(f"the image data is damaged ({exc})") from None
    return preprocess_image(img, size, channels)
