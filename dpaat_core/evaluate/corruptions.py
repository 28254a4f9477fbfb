"""Natural corruptions of dermoscopy images: MedMNIST-C's DermaMNIST set, batched on the images' device.

Di Salvo, Doerrich, Ledig: "MedMNIST-C: Comprehensive benchmark and improved classifier robustness by simulating
realistic image corruptions" (arXiv 2406.17536); the parameters below are those of its DermaMNIST table
(``medmnistc/corruptions/registry.py`` of the authors' ``medmnistc-api``), severities 1 to 5.

MedMNIST-C corrupts 224 x 224 images. Parameters that are fractions or factors (pixelate's resize factor, JPEG
quality, noise levels, zoom factors, brightness and contrast factors, the black corner's radius factor) apply at any
size unchanged. Parameters in pixels are scaled by ``size / 224``: the defocus disk's radius, the motion-blur length,
and the characters (drawn at 224 px, or the image's size when larger, then resized with area averaging, so at 28 px
they are the faint marks 4-px letters become). At small sizes neighbouring severities of the two blurs can round to
the same kernel (motion blur at 28 px is 3 px long at every severity); see :func:`describe`.

Images are float tensors in [0, 1] of shape (B, C, H, W), C 1 or 3. The random parts (noise, the motion-blur angle,
the characters) are drawn per image from a generator seeded by ``seed``, the image's index in its dataset, the
corruption and the severity, so an image is corrupted the same way in any batch, on any device and in any order.
Kornia does the blurs and the zoom, torchvision the colour operations, Pillow's libjpeg the JPEG codec (as in
MedMNIST-C; per image on the CPU); the dermatoscope's black corner and the characters on the skin are written here
(no library has them).
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

REFERENCE_SIZE = 224
SEVERITIES = (1, 2, 3, 4, 5)


@dataclass(frozen=True)
class Corruption:
    name: str
    family: str                      # MedMNIST-C's grouping: digital, noise, blur, color, task-specific
    params: tuple                    # the published parameter of each severity 1..5 (at 224 px)
    apply: Callable                  # (x, param, scale, generators) -> x
    what: str                        # what the parameter means, for people


# --- the corruptions -------------------------------------------------------------------------------------------

def _per_image(generators, draw: Callable[[torch.Generator], torch.Tensor]) -> torch.Tensor:
    """One draw per image, each from its own generator (so an image's draw is the same in any batch)."""
    return torch.stack([draw(g) for g in generators])


def _pixelate(x, factor, scale, gens):
    h, w = x.shape[-2:]
    small = F.interpolate(x, size=(max(1, int(h * factor)), max(1, int(w * factor))), mode="area")
    return F.interpolate(small, size=(h, w), mode="nearest-exact")


def _jpeg(x, quality, scale, gens):
    """Pillow's libjpeg at ``quality``, as MedMNIST-C (per image on the CPU: a codec, not a tensor operation)."""
    import io

    from PIL import Image
    as_bytes = x.mul(255).round_().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = []
    for img in as_bytes:
        buf = io.BytesIO()
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(buf, "JPEG", quality=int(quality))
        decoded = np.asarray(Image.open(buf), dtype=np.float32) / 255
        out.append(torch.from_numpy(decoded.reshape(img.shape)))
    return torch.stack(out).permute(0, 3, 1, 2).to(x.device, x.dtype)


def _gaussian_noise(x, c, scale, gens):
    noise = _per_image(gens, lambda g: torch.randn(x.shape[1:], generator=g)).to(x.device, x.dtype)
    return (x + c * noise).clamp_(0, 1)


def _speckle_noise(x, c, scale, gens):
    noise = _per_image(gens, lambda g: torch.randn(x.shape[1:], generator=g)).to(x.device, x.dtype)
    return (x + x * c * noise).clamp_(0, 1)


def _impulse_noise(x, amount, scale, gens):
    """Salt and pepper as scikit-image's ``random_noise(mode="s&p")``: each value flips with probability
    ``amount``, to 1 or 0 with equal odds."""
    u = _per_image(gens, lambda g: torch.rand((2, *x.shape[1:]), generator=g)).to(x.device, x.dtype)
    flipped, salt = u[:, 0] <= amount, u[:, 1] <= 0.5
    return torch.where(flipped, salt.to(x.dtype), x)


def _shot_noise(x, photons, scale, gens):
    rates = x.float().cpu() * photons
    counts = torch.stack([torch.poisson(r, generator=g) for r, g in zip(rates, gens)]).to(x.device, x.dtype)
    return (counts / photons).clamp_(0, 1)


def _disk_kernel(radius: float, device, dtype) -> torch.Tensor:
    """A disk of ``radius`` pixels, each tap weighted by the share of its pixel inside the circle (16 x 16
    subsamples), normalised: a sub-pixel radius still blurs a little instead of vanishing."""
    half = max(1, math.ceil(radius))
    sub = (torch.arange(16, dtype=torch.float64) + 0.5) / 16 - 0.5
    grid = torch.arange(-half, half + 1, dtype=torch.float64)
    pos = (grid[:, None] + sub[None, :]).reshape(-1)
    inside = (pos[:, None] ** 2 + pos[None, :] ** 2 <= radius ** 2).to(torch.float64)
    n = 2 * half + 1
    cover = inside.reshape(n, 16, n, 16).mean(dim=(1, 3))
    return (cover / cover.sum()).to(device=device, dtype=dtype)


def _defocus_blur(x, radius_alias, scale, gens):
    import kornia
    radius = radius_alias[0] * scale
    return kornia.filters.filter2d(x, _disk_kernel(radius, x.device, x.dtype)[None], border_type="reflect").clamp_(0, 1)


def _motion_length(radius: float, scale: float) -> int:
    return max(3, int(round(radius * scale)) | 1)


def _motion_blur(x, radius_sigma, scale, gens):
    """A straight blur of ImageMagick's length (its ``radius``) at an angle drawn per image from [-45, 45] degrees,
    as MedMNIST-C does; kornia's kernel is uniform along the line (ImageMagick weights it by a Gaussian of
    ``sigma``, here dropped: at the lengths these images get, 3 to 7 px, the two differ little)."""
    import kornia
    angle = _per_image(gens, lambda g: torch.rand((), generator=g)).float() * 90 - 45
    k = _motion_length(radius_sigma[0], scale)
    return kornia.filters.motion_blur(x, k, angle.to(x.device), torch.zeros_like(angle), border_type="reflect",
                                      mode="bilinear").clamp_(0, 1)


def _zoom_blur(x, zooms, scale, gens):
    """The mean of the image and its centre zoomed by each factor (bilinear), as MedMNIST-C's clipped zoom."""
    from kornia.geometry.transform import scale as zoom
    out = x.clone()
    for z in zooms:
        out += zoom(x, torch.full((x.shape[0], 2), float(z), device=x.device, dtype=x.dtype), align_corners=False)
    return (out / (len(zooms) + 1)).clamp_(0, 1)


def _brightness(x, factor, scale, gens):
    from torchvision.transforms.v2.functional import adjust_brightness
    return adjust_brightness(x, factor)


def _contrast(x, factor, scale, gens):
    """PIL's contrast enhancement (blend with the image's mean grey level), as torchvision computes it."""
    from torchvision.transforms.v2.functional import adjust_contrast
    if x.shape[1] == 1:        # torchvision's grey mean needs RGB: the same blend written out
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return (mean + factor * (x - mean)).clamp_(0, 1)
    return adjust_contrast(x, factor)


def _black_corner(x, factor, scale, gens):
    """The dermatoscope's round field of view: black outside a centred circle of ``factor`` times the half side."""
    h, w = x.shape[-2:]
    yy = torch.arange(h, device=x.device, dtype=torch.float32)[:, None] - h // 2
    xx = torch.arange(w, device=x.device, dtype=torch.float32)[None, :] - w // 2
    radius = int(min(h // 2, w // 2, w - w // 2, h - h // 2) * factor)
    return x * ((xx ** 2 + yy ** 2) <= radius ** 2).to(x.dtype)


_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _characters(x, words_letters_size, scale, gens):
    """Random lowercase words in random colours, as MedMNIST-C writes on the skin with OpenCV: up to ``words``
    words of 3 to ``letters`` letters, a font scale from 0.14 to ``size`` (capitals about 22 x scale px tall at
    224 px), drawn at 224 px (or the image's size when larger) and resized onto the image with area averaging."""
    from PIL import Image, ImageDraw, ImageFont
    max_words, max_letters, max_scale = words_letters_size
    h, w = x.shape[-2:]
    ref = max(REFERENCE_SIZE, h, w)
    k = ref / REFERENCE_SIZE
    alphas, colours = [], []
    for g in gens:
        rng = np.random.default_rng(int(torch.randint(0, 2**62, (), generator=g)))
        mask = Image.new("L", (ref, ref))
        colour = Image.new("RGB", (ref, ref))
        draw_mask, draw_colour = ImageDraw.Draw(mask), ImageDraw.Draw(colour)
        for _ in range(rng.integers(1, max_words, endpoint=True)):
            n = int(rng.integers(3, max_letters, endpoint=True))
            font_scale = rng.integers(14, int(max_scale * 100), endpoint=True) / 100
            text = "".join(rng.choice(list(_LETTERS), n))
            org = (int(rng.integers(10 * k, max(10 * k + 1, ref - 8 * n * k), endpoint=True)),
                   int(rng.integers(10 * k, ref - 10 * k, endpoint=True)))
            font = ImageFont.load_default(size=max(1, round(31 * font_scale * k)))
            rgb = tuple(int(v) for v in rng.integers(0, 255, 3, endpoint=True))
            draw_mask.text(org, text, fill=255, font=font, anchor="ls")
            draw_colour.text(org, text, fill=rgb, font=font, anchor="ls")
        alphas.append(torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255)[None])
        colours.append(torch.from_numpy(np.asarray(colour, dtype=np.float32) / 255).permute(2, 0, 1))
    alpha = F.interpolate(torch.stack(alphas), size=(h, w), mode="area").to(x.device, x.dtype)
    colour = F.interpolate(torch.stack(colours), size=(h, w), mode="area").to(x.device, x.dtype)
    colour = colour / alpha.clamp_min(1e-6)          # area averaging blends the colour with black: undo it
    if x.shape[1] == 1:
        colour = (colour * torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype)[:, None, None]).sum(
            1, keepdim=True)
    return (x * (1 - alpha) + colour.clamp(0, 1) * alpha).clamp_(0, 1)


def _c(name, family, params, apply, what):
    return Corruption(name, family, tuple(params), apply, what)


CORRUPTIONS: dict[str, Corruption] = {c.name: c for c in (
    _c("pixelate", "digital", (0.7, 0.5, 0.40, 0.30, 0.25), _pixelate, "resize factor (box down, nearest up)"),
    _c("jpeg_compression", "digital", (30, 20, 15, 10, 7), _jpeg, "JPEG quality"),
    _c("gaussian_noise", "noise", (0.04, 0.08, 0.12, 0.18, 0.26), _gaussian_noise, "noise std"),
    _c("speckle_noise", "noise", (0.05, 0.15, 0.2, 0.35, 0.45), _speckle_noise, "multiplicative noise std"),
    _c("impulse_noise", "noise", (0.01, 0.03, 0.06, 0.09, 0.17), _impulse_noise, "share of values flipped"),
    _c("shot_noise", "noise", (60, 25, 18, 10, 5), _shot_noise, "photons at full intensity"),
    _c("defocus_blur", "blur", ((4, 0.1), (5, 0.2), (6, 0.3), (7, 0.4), (8, 0.5)), _defocus_blur,
       "(disk radius px at 224, alias blur)"),
    _c("motion_blur", "blur", ((10, 5), (15, 5), (15, 8), (15, 12), (20, 15)), _motion_blur,
       "(length px at 224, sigma)"),
    _c("zoom_blur", "blur", tuple(tuple(round(v, 4) for v in np.arange(1, stop, step)) for stop, step in
                                  ((1.11, 0.01), (1.16, 0.01), (1.21, 0.02), (1.26, 0.02), (1.31, 0.03))),
       _zoom_blur, "zoom factors averaged"),
    _c("brightness_up", "color", (1.1, 1.2, 1.3, 1.4, 1.5), _brightness, "brightness factor"),
    _c("brightness_down", "color", (0.9, 0.8, 0.7, 0.6, 0.5), _brightness, "brightness factor"),
    _c("contrast_up", "color", (1.1, 1.2, 1.3, 1.4, 1.6), _contrast, "contrast factor"),
    _c("contrast_down", "color", (0.8, 0.7, 0.6, 0.5, 0.4), _contrast, "contrast factor"),
    # MedMNIST-C's table: severity 4 (0.90) cuts deeper than severity 5 (0.95); kept as published
    _c("black_corner", "task-specific", (1.10, 1.05, 1.00, 0.90, 0.95), _black_corner,
       "field-of-view radius / half side"),
    _c("characters", "task-specific", ((1, 6, 0.14), (2, 7, 0.15), (3, 8, 0.16), (4, 9, 0.17), (6, 10, 0.18)),
       _characters, "(max words, max letters, max font scale)"),
)}
NAMES = tuple(CORRUPTIONS)


def check(name: str, severity) -> Corruption:
    """The corruption ``name``; a :class:`ValueError` naming the allowed values for an unknown name or a severity
    outside 1-5."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; known: {', '.join(NAMES)}")
    _check_severity(severity)
    return CORRUPTIONS[name]


def _check_severity(severity) -> None:
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or severity not in SEVERITIES:
        raise ValueError(f"corruption severity must be an integer from 1 to 5, got {severity!r}")


def parse_names(text: str) -> list[str]:
    """``"all"`` or comma-separated names, in the order given, checked."""
    names = list(NAMES) if text.strip() == "all" else [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError(f"no corruption named; choose 'all' or from {', '.join(NAMES)}")
    for n in names:
        check(n, 1)
    return list(dict.fromkeys(names))


def parse_severities(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"corruption severities are integers from 1 to 5, comma-separated; got {text!r}") from None
    if not values:
        raise ValueError("no severity given; choose from 1, 2, 3, 4, 5")
    for s in values:
        _check_severity(s)
    return sorted(set(values))


def seed_of(seed: int, index: int, name: str, severity: int) -> int:
    """The generator seed of one image's corruption: the same for the same image in any batch or order."""
    return (int(seed) * 1_000_003 + int(index) * 7919 + zlib.crc32(name.encode()) * 31 + int(severity)) % (2**63)


def corrupt(x: torch.Tensor, name: str, severity: int, seed: int = 0,
            index: Optional[Sequence[int] | torch.Tensor] = None) -> torch.Tensor:
    """``x`` (B, C, H, W in [0, 1]) under corruption ``name`` at ``severity`` (1-5); ``index`` gives each image's
    index in its dataset (default 0..B-1), which with ``seed`` fixes its random draws. Returns a new tensor."""
    c = check(name, severity)
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"corrupt expects images of shape (B, 1 or 3, H, W), got {tuple(x.shape)}")
    index = range(x.shape[0]) if index is None else [int(i) for i in index]
    if len(index) != x.shape[0]:
        raise ValueError(f"index has {len(index)} entries for {x.shape[0]} images")
    if not len(index):   # no image: nothing to draw or blur
        return x.clone()
    # CPU generators on every device: CUDA's would draw other numbers from the same seed
    gens = [torch.Generator().manual_seed(seed_of(seed, i, name, severity)) for i in index]
    scale = min(x.shape[-2:]) / REFERENCE_SIZE
    with torch.no_grad():
        return c.apply(x.detach().float().clamp(0, 1), c.params[severity - 1], scale, gens).to(x.dtype)


def describe(name: str, severity: int, image_size: int) -> str:
    """What ``name`` at ``severity`` does at ``image_size`` px, in words, with the scaled pixel parameters."""
    c = check(name, severity)
    p, scale = c.params[severity - 1], image_size / REFERENCE_SIZE
    if name == "defocus_blur":
        return f"defocus blur, disk radius {p[0]} px at 224 = {p[0] * scale:.2f} px at {image_size}"
    if name == "motion_blur":
        return f"motion blur, {p[0]} px at 224 = {_motion_length(p[0], scale)} px long at {image_size}"
    if name == "zoom_blur":
        return f"zoom blur, factors 1 to {p[-1]:g} ({len(p)} zooms)"
    return f"{name.replace('_', ' ')}, {c.what} {p}"
