"""Random changes of training images, per sample, drawn from the epoch's generator.

Three policies (``train.augment``):

- ``none``: the images as they are.
- ``flips``: random horizontal and vertical flips (the default): a lesion has no orientation.
- ``dermoscopy``: flips, a random rotation by any angle, a zoom of 0.85-1.15 and a shift of up to 5% (reflected
  at the border), then brightness, contrast and saturation jittered by up to 20% (dermatoscopes and lighting
  differ). The usual recipe for skin-lesion images trained without pretrained weights. Hue is left alone: it
  costs three times the rest on a CPU.

Every draw comes from the training loop's per-epoch generator, so a resumed run sees the same images.
"""
from __future__ import annotations

import functools

import torch

from dpaat_core.config import AUGMENTATIONS


def _flips(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    flips = torch.rand((2, len(x)), generator=gen, device=gen.device).to(x.device) < 0.5
    x = torch.where(flips[0].view(-1, 1, 1, 1), x.flip(3), x)
    return torch.where(flips[1].view(-1, 1, 1, 1), x.flip(2), x)


@functools.cache
def _dermoscopy_pipeline():
    import kornia.augmentation as K   # here, not at the top: only this policy needs kornia
    return K.AugmentationSequential(
        K.RandomAffine(degrees=180.0, translate=(0.05, 0.05), scale=(0.85, 1.15), padding_mode="reflection", p=1.0),
        K.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.0, p=0.8),
    )


def augment_batch(x: torch.Tensor, policy: str, gen: torch.Generator) -> torch.Tensor:
    """``x`` float ``[B, C, H, W]`` in [0, 1], changed by ``policy`` (see the module's text) with draws from
    ``gen``; values stay in [0, 1]."""
    if policy == "none":
        return x
    if policy not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {policy!r}; known: {', '.join(AUGMENTATIONS)}")
    x = _flips(x, gen)
    if policy == "flips":
        return x
    # kornia draws its parameters from torch's global CPU generator: seed a private copy of it from ``gen``
    # so the draws are the run's own and leave the caller's global state untouched.
    seed = int(torch.randint(0, 2**62, (1,), generator=gen, device=gen.device))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _dermoscopy_pipeline()(x).clamp_(0, 1)
