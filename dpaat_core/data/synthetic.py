"""``synthetic[:key=value,...]``: procedural lesion-like images with ground-truth masks.

Skin-toned background (tone, shading, noise and hair-like lines vary per image and carry no
class information) and one lesion whose colour, outline and border depend on the class;
position and size are random. Only the lesion tells the classes apart, so a model that
learned the task attends inside the mask: that makes the set a check for attribution maps.

Options: ``n`` (train images, default 512; val and test get n/4), ``classes`` (2-7, default
4), ``seed`` (default 0). Deterministic for a given (seed, split, image size).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from dpaat_core.data.dataset import SPLITS, DataError, ImageDataset, SourceInfo

# name: (lesion RGB, RGB jitter, outline irregularity, border softness, aspect ratio, dots, ring)
PROTOTYPES = {
    "round-brown": ((0.45, 0.28, 0.18), 0.05, 0.03, 0.04, 1.0, False, False),
    "irregular-dark": ((0.20, 0.13, 0.10), 0.04, 0.30, 0.03, 1.0, False, False),
    "vascular-red": ((0.62, 0.12, 0.25), 0.05, 0.05, 0.04, 1.3, False, False),
    "pale-blurry": ((0.72, 0.55, 0.42), 0.04, 0.05, 0.25, 1.0, False, False),
    "dotted": ((0.50, 0.33, 0.22), 0.05, 0.06, 0.04, 1.0, True, False),
    "elongated": ((0.40, 0.25, 0.20), 0.05, 0.04, 0.04, 2.4, False, False),
    "target": ((0.55, 0.36, 0.26), 0.05, 0.04, 0.04, 1.0, False, True),
}
DEFAULTS = {"n": 512, "classes": 4, "seed": 0}
NATIVE_SIZE = 64


#: the largest synthetic set: images are made in memory, about 16 bytes a pixel while they are drawn
MAX_N = 100_000
#: the most memory one synthetic split may take while it is drawn
MAX_BYTES = 4 * 2**30


def parse_options(arg: str) -> dict[str, int]:
    options = dict(DEFAULTS)
    for item in filter(None, (part.strip() for part in arg.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in DEFAULTS:
            raise DataError(f"synthetic option {item!r} not understood; use key=value with keys {', '.join(DEFAULTS)}")
        try:
            options[key] = int(value)
        except ValueError:
            raise DataError(f"synthetic option {key} must be an integer, got {value!r}") from None
    if not 2 <= options["classes"] <= len(PROTOTYPES):
        raise DataError(f"synthetic classes must be 2-{len(PROTOTYPES)}, got {options['classes']}")
    if options["n"] > MAX_N:
        raise DataError(f"synthetic n must be at most {MAX_N:,} (a demo set made in memory), got {options['n']:,}")
    if options["n"] < max(4, options["classes"]):
        raise DataError(f"synthetic n must be at least 4 and at least the number of classes ({options['classes']}), got {options['n']}")
    return options


def _uniform(g, n, lo, hi):
    return lo + (hi - lo) * torch.rand(n, generator=g)


def generate(n: int, num_classes: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` images: (uint8 ``[n, 3, size, size]``, labels ``[n]``, masks uint8 ``[n, size, size]``)."""
    g = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]
    protos = list(PROTOTYPES.values())[:num_classes]
    col = lambda i: torch.tensor([p[i] for p in protos], dtype=torch.float32)[labels]  # noqa: E731
    colour, jitter, irregular, soft, aspect = torch.stack([torch.tensor(p[0]) for p in protos])[labels], col(1), col(2), col(3), col(4)
    dots = torch.tensor([p[5] for p in protos])[labels]
    ring = torch.tensor([p[6] for p in protos])[labels]

    axis = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    v = lambda t: t.view(n, 1, 1)  # noqa: E731

    # Background: skin tone, a linear shading, pixel noise, and 0-2 dark hair lines.
    tone = _uniform(g, n, 0.0, 1.0)
    skin = torch.stack([0.93 - 0.35 * tone, 0.78 - 0.38 * tone, 0.68 - 0.38 * tone], 1)
    shade = 1 + 0.08 * (v(_uniform(g, n, -1, 1)) * xx + v(_uniform(g, n, -1, 1)) * yy)
    image = skin.view(n, 3, 1, 1) * shade[:, None]
    for _ in range(2):
        present = v(torch.rand(n, generator=g) < 0.5)
        theta, offset = v(_uniform(g, n, 0, math.pi)), v(_uniform(g, n, -0.9, 0.9))
        dist = (xx * torch.cos(theta) + yy * torch.sin(theta) - offset).abs()
        hair = (present & (dist < 0.012 + 1.0 / size)).float()[:, None]
        image = image * (1 - 0.6 * hair)

    # Lesion: a star-shaped region r(angle) around a random centre, rotated and stretched.
    cx, cy = v(_uniform(g, n, -0.3, 0.3)), v(_uniform(g, n, -0.3, 0.3))
    radius = v(_uniform(g, n, 0.28, 0.45))
    rot = v(_uniform(g, n, 0, math.pi))
    dx, dy = xx - cx, yy - cy
    u = (dx * torch.cos(rot) + dy * torch.sin(rot)) / v(aspect.sqrt())
    w = (-dx * torch.sin(rot) + dy * torch.cos(rot)) * v(aspect.sqrt())
    rho, angle = torch.sqrt(u**2 + w**2), torch.atan2(w, u)
    outline = torch.ones_like(rho)
    for k in (3, 5, 7):
        amp = v(irregular * _uniform(g, n, 0.4, 1.0) / math.sqrt(k))
        outline = outline + amp * torch.sin(k * angle + v(_uniform(g, n, 0, 2 * math.pi)))
    signed = (radius * outline - rho) / radius  # > 0 inside
    mask = signed > 0
    alpha = torch.sigmoid(signed / v(soft.clamp_min(1e-3)) * 4)

    lesion = (colour + jitter[:, None] * (2 * torch.rand(n, 3, generator=g) - 1)).view(n, 3, 1, 1).expand(n, 3, size, size).clone()
    dot_field = (torch.sin(u * 40) * torch.sin(w * 40) > 0.6) & v(dots)
    lesion = torch.where(dot_field[:, None], lesion * 0.45, lesion)
    ring_field = ((rho / radius) < 0.45) & v(ring)
    lesion = torch.where(ring_field[:, None], lesion * 0.55, lesion)

    image = image * (1 - alpha[:, None]) + lesion * alpha[:, None]
    image = image + 0.02 * torch.randn(image.shape, generator=g)
    images = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    return images, labels, mask.to(torch.uint8)


def load_synthetic(arg: str, split: str, image_size: Optional[int]) -> ImageDataset:
    options = parse_options(arg)
    size = image_size or NATIVE_SIZE
    n = options["n"] if split == "train" else max(options["classes"], options["n"] // 4)
    need = 16 * 3 * n * size * size
    if need > MAX_BYTES:
        fit = max(1, MAX_BYTES // (16 * 3 * size * size))
        raise DataError(f"synthetic n={n:,} at {size} px would take about {need / 2**30:.0f} GiB to draw; use n at "
                        f"most {fit:,} at this size")
    seed = options["seed"] * 1000 + SPLITS.index(split)
    images, labels, masks = generate(n, options["classes"], size, seed)
    spec = "synthetic" + (f":{arg}" if arg else "")
    return ImageDataset(
        images, labels, list(PROTOTYPES)[: options["classes"]], SourceInfo(spec=spec, split=split),
        masks=masks, source_ids=[f"{split}:{i}" for i in range(n)],
    )
