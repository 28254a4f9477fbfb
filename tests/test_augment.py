"""Training-image augmentation: the policies, their draws from the epoch's generator, and the setting."""
import pytest
import torch

from dpaat_core.__main__ import build_parser
from dpaat_core.cli.train import config_from_args
from dpaat_core.config import ConfigError, RunConfig, TrainConfig
from dpaat_core.train.augment import augment_batch
from dpaat_core.train.loop import make_batch


def _images(n=6, size=24, channels=3):
    return torch.rand((n, channels, size, size), generator=torch.Generator().manual_seed(7))


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_none_keeps_the_images_and_flips_only_flip_them():
    x = _images()
    assert torch.equal(augment_batch(x, "none", _gen(0)), x)
    out = augment_batch(x, "flips", _gen(0))
    for a, b in zip(x, out):
        assert any(torch.equal(b, f) for f in (a, a.flip(2), a.flip(1), a.flip(1).flip(2)))
    assert not torch.equal(out, x)      # 6 images, each left as it is with probability 1/4


def test_dermoscopy_is_the_generators_and_leaves_the_global_rng_alone():
    x = _images()
    before = torch.get_rng_state()
    a, b = augment_batch(x, "dermoscopy", _gen(1)), augment_batch(x, "dermoscopy", _gen(1))
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a, b)                                          # same generator state, same images
    assert not torch.equal(a, augment_batch(x, "dermoscopy", _gen(2)))
    assert a.shape == x.shape and a.dtype == x.dtype and 0 <= a.min() and a.max() <= 1
    for img, new in zip(x, a):                                       # each image moved: not a flip of itself
        assert not any(torch.allclose(new, f) for f in (img, img.flip(2), img.flip(1), img.flip(1).flip(2)))
    torch.manual_seed(123)
    c = augment_batch(x, "dermoscopy", _gen(1))
    torch.manual_seed(456)
    assert torch.equal(c, augment_batch(x, "dermoscopy", _gen(1)))  # the global seed plays no part


def test_dermoscopy_rotates_a_lesion_about_the_centre_and_keeps_grey_images_grey():
    disc = torch.zeros(1, 1, 33, 33)
    yy, xx = torch.meshgrid(torch.arange(33.0), torch.arange(33.0), indexing="ij")
    disc[0, 0][((yy - 16) ** 2 + (xx - 16) ** 2) < 36] = 1.0
    out = augment_batch(disc.repeat(8, 1, 1, 1), "dermoscopy", _gen(3))
    assert out.shape == (8, 1, 33, 33)
    mass = out[:, 0].sum((1, 2))
    cy = (out[:, 0] * yy).sum((1, 2)) / mass
    assert ((cy - 16).abs() < 33 * 0.05 * 1.15 + 1).all()        # a shift of at most 5%, not a crop elsewhere
    assert (mass > 0.5 * disc.sum()).all() and (mass < 2 * disc.sum()).all()   # zoom 0.85-1.15 and jitter


def test_make_batch_applies_the_policy():
    images = (_images(4) * 255).to(torch.uint8)
    labels, idx = torch.arange(4), torch.tensor([2, 0])
    plain, y, i = make_batch(images, labels, idx, "none", _gen(0), False)
    assert torch.equal(plain, images[idx].float() / 255) and y.tolist() == [2, 0] and i.tolist() == [2, 0]
    moved, _, _ = make_batch(images, labels, idx, "dermoscopy", _gen(0), False)
    assert torch.equal(moved, augment_batch(plain, "dermoscopy", _gen(0)))


def test_the_setting_reads_older_runs_and_refuses_unknown_policies():
    assert TrainConfig().augment == "flips"
    assert TrainConfig(augment=True).augment == "flips" and TrainConfig(augment=False).augment == "none"
    old = RunConfig().to_dict()
    old["train"]["augment"] = True                     # config.json of a run from before the policies
    assert RunConfig.from_dict(old).train.augment == "flips"
    with pytest.raises(ConfigError, match=r"train\.augment.*none, flips, dermoscopy"):
        TrainConfig(augment="rotate")
    with pytest.raises(ValueError, match="unknown augmentation 'rotate'"):
        augment_batch(_images(), "rotate", _gen(0))


@pytest.mark.parametrize("flag, value", [([], "flips"), (["--augment", "dermoscopy"], "dermoscopy"),
                                         (["--no-augment"], "none"), (["--augment", "none"], "none")])
def test_the_flag_reaches_the_config(flag, value):
    args = build_parser().parse_args(["train", "--data", "synthetic:n=24", "--model", "resnet8", "--method", "erm",
                                      "--epochs", "1", *flag])
    assert config_from_args(args).train.augment == value
