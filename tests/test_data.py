"""Tests for dpaat_core.data: every source behind load_dataset, on real HAM10000 files and tiny fakes.

Real data comes from ``../shared/data`` (the ``shared_data`` fixture, skipped when absent). Every
file the tests write goes to ``tmp_path``; nothing here touches the network.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import medmnist
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import dpaat_core.data as data
import dpaat_core.data.npz as npz_module
from dpaat_core.data import DataError, DataNotFoundError, DataWarning, load_dataset

SPLITS = ("train", "val", "test")
DX = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
README_SPLIT_SIZES = {"train": 2312, "val": 329, "test": 666}  # ham10000_sample.npz, README table


def need(shared_data: Path, *names: str) -> list[Path]:
    """Paths under the shared data folder; skip the test if any is missing."""
    paths = [shared_data / n for n in names]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        pytest.skip(f"shared data file(s) missing: {', '.join(missing)}")
    return paths


def medmnist_arrays(n: int, size: int, num_classes: int = 7, seed: int = 0, channels: int = 3) -> dict:
    """Small arrays in MedMNIST's npz format: uint8 [N, H, W, C] images and int64 [N, 1] labels."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, split in enumerate(SPLITS):
        m = n + k
        shape = (m, size, size) if channels == 1 else (m, size, size, channels)
        out[f"{split}_images"] = rng.integers(0, 256, size=shape, dtype=np.uint8)
        out[f"{split}_labels"] = (np.arange(m) % num_classes).reshape(-1, 1).astype(np.int64)
    return out


def write_npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


# --------------------------------------------------------------------------------------------
# 1. npz source on the shipped ham10000_sample.npz
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample_npz(shared_data) -> Path:
    return need(shared_data, "ham10000_sample.npz")[0]


@pytest.fixture(scope="module")
def sample_raw(sample_npz) -> dict:
    with np.load(sample_npz, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def sample_splits(sample_npz) -> dict:
    return {s: load_dataset(f"npz:{sample_npz}", s, None) for s in SPLITS}


def test_npz_items_are_float_chw_label_index(sample_splits):
    ds = sample_splits["val"]
    for i in (0, 1, len(ds) // 2, len(ds) - 1):
        image, label, index = ds[i]
        assert isinstance(image, torch.Tensor) and image.dtype == torch.float32
        assert image.shape == (3, 64, 64)
        assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
        assert float(image.max()) > 0.0  # real images, not blank
        assert type(label) is int and 0 <= label < 7
        assert type(index) is int and index == i
    assert ds.in_channels == 3 and ds.image_size == 64 and ds.num_classes == 7


@pytest.mark.parametrize("split", SPLITS)
def test_npz_split_sizes_match_readme(sample_splits, split):
    assert len(sample_splits[split]) == README_SPLIT_SIZES[split]


def test_npz_native_images_and_labels_equal_raw_arrays(sample_splits, sample_raw):
    for split in SPLITS:
        ds = sample_splits[split]
        raw = sample_raw[f"{split}_images"]
        assert torch.equal(ds.images, torch.from_numpy(raw).permute(0, 3, 1, 2))
        assert np.array_equal(ds.labels.numpy(), sample_raw[f"{split}_labels"].reshape(-1))
        image, label, _ = ds[7]
        assert torch.allclose(image, torch.from_numpy(raw[7]).permute(2, 0, 1).float() / 255)
        assert label == int(sample_raw[f"{split}_labels"][7, 0])


def test_npz_class_names_come_from_sidecar_csv(sample_splits, shared_data):
    need(shared_data, "ham10000_sample.csv")
    for ds in sample_splits.values():
        assert ds.classes == DX
    # and they agree with the label -> dx pairs of the CSV itself
    table = pd.read_csv(shared_data / "ham10000_sample.csv")
    pairs = dict(table[["label", "dx"]].drop_duplicates().itertuples(index=False))
    assert [pairs[i] for i in range(7)] == sample_splits["train"].classes


def test_npz_class_counts_equal_bincount_of_raw_labels(sample_splits, sample_raw):
    for split, ds in sample_splits.items():
        expected = np.bincount(sample_raw[f"{split}_labels"].reshape(-1), minlength=7)
        assert ds.class_counts.dtype == np.int64
        assert np.array_equal(ds.class_counts, expected)
        assert ds.class_counts.sum() == README_SPLIT_SIZES[split]


def test_npz_masks_present_and_aligned(sample_splits, shared_data):
    (mask_file,) = need(shared_data, "ham10000_sample_masks.npz")
    with np.load(mask_file, allow_pickle=False) as f:
        for split, ds in sample_splits.items():
            assert ds.masks is not None
            assert ds.masks.dtype == torch.uint8 and tuple(ds.masks.shape) == (README_SPLIT_SIZES[split], 64, 64)
            assert np.array_equal(ds.masks.numpy(), (f[f"{split}_masks"] > 0).astype(np.uint8))
            assert torch.equal(ds.mask(3), ds.masks[3])


def test_npz_image_size_32_resizes_images_and_masks(sample_npz, sample_splits):
    small = load_dataset(f"npz:{sample_npz}", "test", 32)
    full = sample_splits["test"]
    assert len(small) == len(full)
    assert small.image_size == 32 and tuple(small.images.shape[1:]) == (3, 32, 32)
    assert small[0][0].shape == (3, 32, 32)
    assert tuple(small.masks.shape) == (len(full), 32, 32)
    assert set(torch.unique(small.masks).tolist()) <= {0, 1}
    assert torch.equal(small.labels, full.labels)
    # a downsample keeps each image's average colour and its lesion area
    mean_small = small.images.float().mean(dim=(2, 3))
    mean_full = full.images.float().mean(dim=(2, 3))
    assert (mean_small - mean_full).abs().max() < 3.0
    area_small = small.masks.float().mean(dim=(1, 2))
    area_full = full.masks.float().mean(dim=(1, 2))
    assert (area_small - area_full).abs().mean() < 0.02


def test_npz_max_samples_caps_deterministically(sample_npz, sample_raw):
    spec = f"npz:{sample_npz}"
    a = load_dataset(spec, "train", None, max_samples=50)
    b = load_dataset(spec, "train", None, max_samples=50)
    c = load_dataset(spec, "train", None, max_samples=50, seed=1)
    assert len(a) == 50 and len(c) == 50
    assert a.source_ids == b.source_ids and torch.equal(a.images, b.images)
    assert a.source_ids != c.source_ids
    rows = [int(s.split(":")[1]) for s in a.source_ids]
    assert rows == sorted(rows) and len(set(rows)) == 50  # original order, no repeats
    assert np.array_equal(a.images.numpy(), sample_raw["train_images"][rows].transpose(0, 3, 1, 2))
    assert np.array_equal(a.labels.numpy(), sample_raw["train_labels"].reshape(-1)[rows])
    for i in range(len(a)):
        assert a[i][2] == i  # index is the position in the capped set, not the source row
    assert a.masks is not None and a.masks.shape[0] == 50


def test_npz_max_samples_bounds(sample_npz):
    spec = f"npz:{sample_npz}"
    assert len(load_dataset(spec, "val", None, max_samples=10_000)) == README_SPLIT_SIZES["val"]
    with pytest.raises(DataError, match="max_samples"):
        load_dataset(spec, "val", None, max_samples=0)


def test_index_equals_position(sample_splits):
    ds = sample_splits["val"]
    assert all(ds[i][2] == i for i in range(len(ds)))
    sub = ds.subset([5, 2, 9])
    assert [sub[i][2] for i in range(3)] == [0, 1, 2]
    assert sub.source_ids == ["val:5", "val:2", "val:9"]
    assert torch.equal(sub[1][0], ds[2][0])


# --------------------------------------------------------------------------------------------
# 2. image formats in a tiny npz
# --------------------------------------------------------------------------------------------


def test_npz_grayscale_hw_images(tmp_path):
    arrays = medmnist_arrays(6, 12, num_classes=3, channels=1)
    path = write_npz(tmp_path / "grey.npz", **arrays)
    ds = load_dataset(f"npz:{path}", "train", None)
    assert ds.in_channels == 1
    image, label, index = ds[2]
    assert image.shape == (1, 12, 12)
    assert torch.allclose(image[0], torch.from_numpy(arrays["train_images"][2]).float() / 255)
    assert label == 2 and index == 2
    assert ds.classes == ["class_0", "class_1", "class_2"]  # no names anywhere: numbered


def test_npz_float_images_in_unit_range_accepted(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.random((5, 10, 10, 3)).astype(np.float32)
    images[0, 0, 0] = [0.0, 1.0, 0.5]
    path = write_npz(tmp_path / "float.npz", train_images=images, train_labels=np.array([0, 1, 0, 1, 1]))
    ds = load_dataset(f"npz:{path}", "train", None)
    assert ds.images.dtype == torch.uint8
    assert np.array_equal(ds.images.numpy(), np.round(images * 255).astype(np.uint8).transpose(0, 3, 1, 2))
    item = ds[0][0].permute(1, 2, 0).numpy()
    assert np.abs(item - images[0]).max() <= 1 / 510 + 1e-6


def _float_images_with(value):
    images = np.full((3, 8, 8, 3), 0.5, dtype=np.float32)
    images[1, 2, 3, 0] = value
    return images


@pytest.mark.parametrize("images,pattern", [
    (_float_images_with(np.nan), "NaN"),
    (_float_images_with(2.0), r"\[0, 1\]"),
    (np.zeros((3, 8, 8, 4), dtype=np.uint8), "C = 1 or 3"),
], ids=["nan", "out-of-range", "rgba"])
def test_npz_bad_images_refused(tmp_path, images, pattern):
    path = write_npz(tmp_path / "images.npz", train_images=images, train_labels=np.zeros(3, dtype=np.int64))
    with pytest.raises(DataError, match=pattern) as err:
        load_dataset(f"npz:{path}", "train", None)
    assert str(path) in str(err.value)


def test_npz_non_square_images_are_center_cropped(tmp_path):
    """[N, 8, 14] images: the central 8x8 square is kept (images and sidecar masks alike)."""
    images = np.full((3, 8, 14, 3), 200, dtype=np.uint8)
    images[:, :, 3:11] = 50  # the central square
    masks = np.zeros((3, 8, 14), dtype=np.uint8)
    masks[:, 2:6, 3:11] = 1
    path = write_npz(tmp_path / "wide.npz", train_images=images, train_labels=np.array([0, 1, 1]))
    write_npz(tmp_path / "wide_masks.npz", train_masks=masks)
    ds = load_dataset(f"npz:{path}", "train", None)
    assert tuple(ds.images.shape) == (3, 3, 8, 8)
    assert (ds.images == 50).all()
    assert np.array_equal(ds.masks.numpy(), masks[:, :, 3:11])
    big = load_dataset(f"npz:{path}", "train", 16)
    assert tuple(big.images.shape) == (3, 3, 16, 16) and (big.images == 50).all()
    assert big.masks[0, 4:12].all() and not big.masks[0, :4].any() and not big.masks[0, 12:].any()


# --------------------------------------------------------------------------------------------
# 3. bad npz input
# --------------------------------------------------------------------------------------------


def test_npz_missing_file(tmp_path):
    path = tmp_path / "nope.npz"
    with pytest.raises(DataNotFoundError) as err:
        load_dataset(f"npz:{path}", "train", None)
    assert str(path) in str(err.value)
    assert isinstance(err.value, DataError) and isinstance(err.value, FileNotFoundError)


def test_npz_not_a_zip(tmp_path):
    path = tmp_path / "garbage.npz"
    path.write_bytes(b"this is not a zip archive at all\n" * 20)
    with pytest.raises(DataError, match="not a readable npz") as err:
        load_dataset(f"npz:{path}", "train", None)
    assert str(path) in str(err.value)


def test_npz_missing_keys_lists_what_the_file_has(tmp_path):
    path = write_npz(tmp_path / "keys.npz", x_train=np.zeros((2, 8, 8, 3), np.uint8), y_train=np.zeros(2, np.int64))
    with pytest.raises(DataError) as err:
        load_dataset(f"npz:{path}", "train", None)
    msg = str(err.value)
    assert str(path) in msg and "train_images" in msg
    assert "x_train" in msg and "y_train" in msg


@pytest.mark.parametrize("labels,pattern", [
    (np.zeros((3, 1), np.int64), "3 labels for 4 images"),
    (np.zeros((4, 3), np.int64), "multi-label"),
    (np.array([[0], [1], [-1], [1]]), r"negative labels \(\[-1\]\)"),
], ids=["length-mismatch", "multi-label", "negative"])
def test_npz_bad_labels_refused(tmp_path, labels, pattern):
    path = write_npz(tmp_path / "labels.npz", train_images=np.zeros((4, 8, 8, 3), np.uint8), train_labels=labels)
    with pytest.raises(DataError, match=pattern) as err:
        load_dataset(f"npz:{path}", "train", None)
    assert str(path) in str(err.value)


def test_npz_all_negative_labels_named_as_such(tmp_path):
    path = write_npz(tmp_path / "allneg.npz", train_images=np.zeros((2, 8, 8, 3), np.uint8),
                     train_labels=np.array([[-1], [-2]]))
    with pytest.raises(DataError, match="negative labels"):
        load_dataset(f"npz:{path}", "train", None)


def test_npz_non_integer_labels_refused(tmp_path):
    path = write_npz(tmp_path / "frac.npz", train_images=np.zeros((2, 8, 8, 3), np.uint8),
                     train_labels=np.array([0.0, 0.5]))
    with pytest.raises(DataError, match="integer class indices") as err:
        load_dataset(f"npz:{path}", "train", None)
    assert str(path) in str(err.value)


def test_npz_object_array_refused(tmp_path):
    images = np.empty(2, dtype=object)
    images[0], images[1] = np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.uint8)
    path = tmp_path / "pickled.npz"
    np.savez(path, train_images=images, train_labels=np.zeros(2, np.int64), allow_pickle=True)
    with pytest.raises(DataError, match="refused") as err:
        load_dataset(f"npz:{path}", "train", None)
    assert str(path) in str(err.value) and "train_images" in str(err.value)


def test_npz_empty_split(tmp_path):
    arrays = medmnist_arrays(4, 8, num_classes=2)
    arrays["test_images"] = np.zeros((0, 8, 8, 3), np.uint8)
    arrays["test_labels"] = np.zeros((0, 1), np.int64)
    path = write_npz(tmp_path / "empty.npz", **arrays)
    assert len(load_dataset(f"npz:{path}", "train", None)) == 4
    with pytest.raises(DataError, match="empty") as err:
        load_dataset(f"npz:{path}", "test", None)
    assert str(path) in str(err.value)


def test_npz_mask_sidecar_with_wrong_shape(tmp_path):
    path = write_npz(tmp_path / "m.npz", **medmnist_arrays(4, 8))
    mask_path = write_npz(tmp_path / "m_masks.npz", train_masks=np.ones((3, 8, 8), np.uint8))
    with pytest.raises(DataError, match="train_masks") as err:
        load_dataset(f"npz:{path}", "train", None)
    assert str(mask_path) in str(err.value)


def test_npz_that_is_really_npy_is_a_data_error(tmp_path):
    np.save(tmp_path / "plain.npy", np.zeros((2, 8, 8, 3), np.uint8))
    path = (tmp_path / "plain.npy").rename(tmp_path / "plain.npz")
    with pytest.raises(DataError, match="single .npy array") as err:
        load_dataset(f"npz:{path}", "train", None)
    assert str(path) in str(err.value)


def test_npz_all_splits_empty_is_a_data_error(tmp_path):
    path = write_npz(tmp_path / "allempty.npz", train_images=np.zeros((0, 8, 8, 3), np.uint8),
                     train_labels=np.zeros((0, 1), np.int64))
    with pytest.raises(DataError, match="empty"):
        load_dataset(f"npz:{path}", "train", None)


def test_npz_empty_float_split_is_a_data_error(tmp_path):
    path = write_npz(tmp_path / "emptyf.npz", train_images=np.zeros((0, 8, 8, 3), np.float32),
                     train_labels=np.zeros((0, 1), np.int64), val_images=np.zeros((2, 8, 8, 3), np.float32),
                     val_labels=np.zeros((2, 1), np.int64))
    with pytest.raises(DataError, match="empty"):
        load_dataset(f"npz:{path}", "train", None)


# --------------------------------------------------------------------------------------------
# 4. medmnist specs (no network: the download is patched to fail)
# --------------------------------------------------------------------------------------------

DERMA_NAMES = [medmnist.INFO["dermamnist"]["label"][str(i)] for i in range(len(medmnist.INFO["dermamnist"]["label"]))]


@pytest.fixture
def no_download(monkeypatch):
    calls = []

    def fail(flag, size, root):
        calls.append((flag, size, Path(root)))
        raise OSError("no network")

    monkeypatch.setattr(npz_module, "_download_medmnist", fail)
    return calls


def test_medmnist_prepared_file_at_64(tmp_path, no_download):
    arrays = medmnist_arrays(7, 64)
    write_npz(tmp_path / "dermamnist_64.npz", **arrays)
    ds = load_dataset("medmnist:dermamnist@64", "val", None, root=tmp_path)
    assert len(DERMA_NAMES) == 7 and ds.classes == DERMA_NAMES
    assert ds.num_classes == 7 and ds.image_size == 64 and len(ds) == 8
    assert np.array_equal(ds.images.numpy(), arrays["val_images"].transpose(0, 3, 1, 2))
    assert np.array_equal(ds.labels.numpy(), arrays["val_labels"].reshape(-1))
    assert ds.source.spec == "medmnist:dermamnist@64"
    assert no_download == []  # the file was there: no download attempted


def test_medmnist_default_size_uses_plain_file(tmp_path, no_download):
    arrays = medmnist_arrays(5, 28)
    write_npz(tmp_path / "dermamnist.npz", **arrays)
    ds = load_dataset("medmnist:dermamnist", "test", None, root=tmp_path)
    assert ds.image_size == 28 and len(ds) == 7 and ds.classes == DERMA_NAMES
    assert np.array_equal(ds.images.numpy(), arrays["test_images"].transpose(0, 3, 1, 2))
    # the @64 variant is a different file, which is not there
    with pytest.raises(DataNotFoundError, match="dermamnist_64.npz"):
        load_dataset("medmnist:dermamnist@64", "test", None, root=tmp_path)


def test_medmnist_image_size_resizes(tmp_path, no_download):
    write_npz(tmp_path / "dermamnist.npz", **medmnist_arrays(5, 28))
    ds = load_dataset("medmnist:dermamnist", "train", 16, root=tmp_path)
    assert ds[0][0].shape == (3, 16, 16)


def test_medmnist_data_root_env(tmp_path, monkeypatch, no_download):
    write_npz(tmp_path / "dermamnist.npz", **medmnist_arrays(4, 28))
    monkeypatch.setenv("DPAAT_DATA_ROOT", str(tmp_path))
    ds = load_dataset("medmnist:dermamnist", "train", None)
    assert len(ds) == 4 and ds.source.path == str(tmp_path / "dermamnist.npz")
    assert data.data_root(None) == tmp_path
    assert data.data_root(tmp_path / "x") == tmp_path / "x"  # an explicit root wins


@pytest.mark.parametrize("spec, pattern", [
    ("medmnist:notamnist", "unknown MedMNIST"),
    ("medmnist:organmnist3d", "unknown MedMNIST 2D"),
    ("medmnist:chestmnist", "multi-label"),
    ("medmnist:dermamnist@100", "size"),
    ("medmnist:dermamnist@big", "size"),
    ("medmnist:", "flag"),
])
def test_medmnist_bad_specs(tmp_path, no_download, spec, pattern):
    with pytest.raises(DataError, match=pattern):
        load_dataset(spec, "train", None, root=tmp_path)
    assert no_download == []


def test_medmnist_missing_file_and_failed_download(tmp_path, no_download):
    root = tmp_path / "nowhere"
    with pytest.raises(DataNotFoundError) as err:
        load_dataset("medmnist:dermamnist@64", "train", None, root=root)
    msg = str(err.value)
    expected = root / "dermamnist_64.npz"
    assert str(expected) in msg
    assert "no network" in msg
    assert f"put it at {expected}" in msg
    assert "DPAAT_DATA_ROOT" in msg
    assert no_download == [("dermamnist", 64, root)]


def test_medmnist_missing_file_under_env_root(tmp_path, monkeypatch, no_download):
    monkeypatch.setenv("DPAAT_DATA_ROOT", str(tmp_path))
    with pytest.raises(DataNotFoundError) as err:
        load_dataset("medmnist:dermamnist", "train", None)
    assert str(tmp_path / "dermamnist.npz") in str(err.value)
    assert no_download and no_download[0][2] == tmp_path


# --------------------------------------------------------------------------------------------
# 5. ham10000 source on the shipped JPEG folder and the 200x150 layout
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ham_dir(shared_data) -> Path:
    return need(shared_data, "ham10000_images/HAM10000_metadata.csv")[0].parent


@pytest.fixture(scope="module")
def ham_meta(ham_dir) -> pd.DataFrame:
    return pd.read_csv(ham_dir / "HAM10000_metadata.csv")


def _load_ham(directory, seed=0, size=32) -> dict:
    return {s: load_dataset(f"ham10000:{directory}", s, size, seed=seed, progress=False) for s in SPLITS}


@pytest.fixture(scope="module")
def ham_splits(ham_dir) -> dict:
    return _load_ham(ham_dir)


def test_ham_splits_partition_every_image(ham_splits, ham_meta, ham_dir):
    ids = [i for ds in ham_splits.values() for i in ds.source_ids]
    jpegs = sorted(p.stem for p in ham_dir.glob("*.jpg"))
    assert len(jpegs) == 56
    assert len(ids) == len(set(ids)) == 56
    assert sorted(ids) == jpegs == sorted(ham_meta["image_id"])


def test_ham_no_lesion_in_two_splits(ham_splits, ham_meta):
    lesions = {s: set(ds.metadata["lesion_id"]) for s, ds in ham_splits.items()}
    assert not lesions["train"] & lesions["val"]
    assert not lesions["train"] & lesions["test"]
    assert not lesions["val"] & lesions["test"]
    # metadata rows follow the items
    truth = ham_meta.set_index("image_id")["lesion_id"]
    for ds in ham_splits.values():
        assert list(ds.metadata["image_id"]) == ds.source_ids
        assert list(ds.metadata["lesion_id"]) == list(truth.loc[ds.source_ids])


def test_ham_every_class_in_every_split(ham_splits):
    for split, ds in ham_splits.items():
        assert ds.num_classes == 7
        assert ds.classes == DX
        assert (ds.class_counts > 0).all(), f"{split}: {ds.class_counts}"
    total = sum(ds.class_counts for ds in ham_splits.values())
    assert total.tolist() == [8] * 7
    # roughly 70/10/20, by lesion within each class (8 single-image lesions per class)
    assert [len(ham_splits[s]) for s in SPLITS] == [35, 7, 14]


def test_ham_labels_match_metadata_dx(ham_splits, ham_meta):
    dx = ham_meta.set_index("image_id")["dx"]
    for ds in ham_splits.values():
        assert [ds.classes[label] for label in ds.labels.tolist()] == list(dx.loc[ds.source_ids])
        assert ds.masks is None  # this folder ships no masks


def test_ham_images_are_center_cropped_lanczos(ham_splits, ham_dir):
    ds = ham_splits["test"]
    assert ds.image_size == 32 and ds.in_channels == 3
    for i in (0, len(ds) - 1):
        with Image.open(ham_dir / f"{ds.source_ids[i]}.jpg") as img:
            img = img.convert("RGB")
            w, h = img.size
            s = min(w, h)
            box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
            ref = np.asarray(img.crop(box).resize((32, 32), Image.LANCZOS)).transpose(2, 0, 1)
        assert np.array_equal(ds.images[i].numpy(), ref)


def test_ham_split_depends_on_seed_only(ham_dir, ham_splits):
    same = _load_ham(ham_dir, seed=0)
    other = _load_ham(ham_dir, seed=1)
    assert all(same[s].source_ids == ham_splits[s].source_ids for s in SPLITS)
    assert any(set(other[s].source_ids) != set(ham_splits[s].source_ids) for s in SPLITS)
    assert sorted(i for ds in other.values() for i in ds.source_ids) == sorted(
        i for ds in ham_splits.values() for i in ds.source_ids)


def test_ham_matches_shipped_28_arrays(shared_data, tmp_path):
    """JPEGs of the 200x150 layout, loaded at 28 px with ham10000_28.csv's split, equal ham10000_28.npz."""
    need(shared_data, "ham10000_28.npz", "ham10000_28.csv", "ham10000_28_masks.npz",
         "ham10000_200x150/HAM10000_metadata.csv", "ham10000_200x150/HAM10000_segmentations_lesion_tschandl")
    src = shared_data / "ham10000_200x150"
    index28 = pd.read_csv(shared_data / "ham10000_28.csv")
    pick = index28.sort_values("image_id").groupby(["split", "dx"]).head(2)  # 2 per class and split: 42 images
    meta = pd.read_csv(src / "HAM10000_metadata.csv")
    meta = meta[meta["image_id"].isin(pick["image_id"])].merge(pick[["image_id", "split"]], on="image_id")
    assert len(meta) == len(pick) == 42
    (tmp_path / "HAM10000_images_part_1").mkdir()
    (tmp_path / "HAM10000_segmentations_lesion_tschandl").mkdir()
    for image_id in meta["image_id"]:
        jpeg = [p for p in (src / "HAM10000_images_part_1" / f"{image_id}.jpg",
                            src / "HAM10000_images_part_2" / f"{image_id}.jpg") if p.is_file()]
        assert jpeg, f"{image_id}.jpg is in neither part folder"
        shutil.copy(jpeg[0], tmp_path / "HAM10000_images_part_1")
        shutil.copy(src / "HAM10000_segmentations_lesion_tschandl" / f"{image_id}_segmentation.png",
                    tmp_path / "HAM10000_segmentations_lesion_tschandl")
    meta.to_csv(tmp_path / "HAM10000_metadata.csv", index=False)

    with np.load(shared_data / "ham10000_28.npz", allow_pickle=False) as arrays, \
            np.load(shared_data / "ham10000_28_masks.npz", allow_pickle=False) as mask_arrays:
        for split in SPLITS:
            calls = []
            ds = load_dataset(f"ham10000:{tmp_path}", split, 28, progress=False,
                              on_progress=lambda *call: calls.append(call))
            # a page's bar: images, then masks, each counted up to its own stable total
            assert calls == [(n, 14, "images") for n in range(1, 15)] + [(n, 14, "lesion masks") for n in range(1, 15)]
            rows = index28[index28["split"] == split].set_index("image_id")["index"].loc[ds.source_ids].to_numpy()
            assert len(ds) == 14 and sorted(ds.source_ids) == sorted(pick.loc[pick["split"] == split, "image_id"])
            assert np.array_equal(ds.images.numpy(), arrays[f"{split}_images"][rows].transpose(0, 3, 1, 2))
            assert np.array_equal(ds.labels.numpy(), arrays[f"{split}_labels"][rows, 0])
            assert ds.masks is not None
            got = ds.masks.numpy().astype(bool)
            ref = mask_arrays[f"{split}_masks"][rows].astype(bool)
            iou = (got & ref).sum(axis=(1, 2)) / np.maximum((got | ref).sum(axis=(1, 2)), 1)
            assert iou.mean() > 0.9, f"{split}: mean IoU {iou.mean():.3f}"


# --------------------------------------------------------------------------------------------
# 6. ham10000 bad input
# --------------------------------------------------------------------------------------------


def copy_ham(ham_dir: Path, dest: Path, per_class: int = 2, split: str | None = "train") -> pd.DataFrame:
    """Copy ``per_class`` JPEGs per dx from the shipped folder into ``dest``; returns their metadata
    (with a ``split`` column when ``split`` is given), also written as dest/HAM10000_metadata.csv."""
    meta = pd.read_csv(ham_dir / "HAM10000_metadata.csv").sort_values("image_id")
    meta = meta.groupby("dx").head(per_class).reset_index(drop=True)
    dest.mkdir(parents=True, exist_ok=True)
    for image_id in meta["image_id"]:
        shutil.copy(ham_dir / f"{image_id}.jpg", dest / f"{image_id}.jpg")
    if split is not None:
        meta["split"] = split
    meta.to_csv(dest / "HAM10000_metadata.csv", index=False)
    return meta


def test_ham_copy_loads_cleanly(ham_dir, tmp_path, recwarn):
    meta = copy_ham(ham_dir, tmp_path)
    ds = load_dataset(f"ham10000:{tmp_path}", "train", 16, progress=False)
    assert len(ds) == 14 and sorted(ds.source_ids) == sorted(meta["image_id"])
    assert not [w for w in recwarn if issubclass(w.category, DataWarning)]


def test_ham_missing_lesion_id_column(ham_dir, tmp_path):
    meta = copy_ham(ham_dir, tmp_path)
    meta.drop(columns="lesion_id").to_csv(tmp_path / "HAM10000_metadata.csv", index=False)
    with pytest.raises(DataError, match="lesion_id") as err:
        load_dataset(f"ham10000:{tmp_path}", "train", 16, progress=False)
    assert str(tmp_path / "HAM10000_metadata.csv") in str(err.value)


def test_ham_unknown_dx(ham_dir, tmp_path):
    meta = copy_ham(ham_dir, tmp_path)
    meta.loc[3, "dx"] = "melanoma"
    meta.to_csv(tmp_path / "HAM10000_metadata.csv", index=False)
    with pytest.raises(DataError, match="melanoma") as err:
        load_dataset(f"ham10000:{tmp_path}", "train", 16, progress=False)
    assert str(tmp_path / "HAM10000_metadata.csv") in str(err.value)


def test_ham_duplicated_image_id(ham_dir, tmp_path):
    meta = copy_ham(ham_dir, tmp_path)
    pd.concat([meta, meta.iloc[[4]]]).to_csv(tmp_path / "HAM10000_metadata.csv", index=False)
    with pytest.raises(DataError, match=meta.loc[4, "image_id"]) as err:
        load_dataset(f"ham10000:{tmp_path}", "train", 16, progress=False)
    assert "more than once" in str(err.value)


def test_ham_bad_split_column(ham_dir, tmp_path):
    meta = copy_ham(ham_dir, tmp_path)
    meta.loc[0, "split"] = "holdout"
    meta.to_csv(tmp_path / "HAM10000_metadata.csv", index=False)
    with pytest.raises(DataError, match="holdout"):
        load_dataset(f"ham10000:{tmp_path}", "train", 16, progress=False)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_ham_bad_jpeg_is_skipped_with_warning(ham_dir, tmp_path, damage):
    meta = copy_ham(ham_dir, tmp_path)
    bad_id = meta.loc[5, "image_id"]
    bad = tmp_path / f"{bad_id}.jpg"
    if damage == "garbage":
        bad.write_bytes(b"\x00\x13garbage, not a JPEG" * 50)
    else:
        raw = bad.read_bytes()
        bad.write_bytes(raw[: len(raw) // 2])
    with pytest.warns(DataWarning, match=r"skipped 1 of 14") as record:
        ds = load_dataset(f"ham10000:{tmp_path}", "train", 16, progress=False)
    assert any(bad_id in str(w.message) for w in record)
    assert len(ds) == 13 and bad_id not in ds.source_ids
    # items, labels and metadata stay aligned after the skip
    assert list(ds.metadata["image_id"]) == ds.source_ids
    dx = meta.set_index("image_id")["dx"]
    assert [ds.classes[label] for label in ds.labels.tolist()] == list(dx.loc[ds.source_ids])


def test_ham_all_jpegs_corrupt(ham_dir, tmp_path):
    meta = copy_ham(ham_dir, tmp_path, per_class=1)
    for image_id in meta["image_id"]:
        (tmp_path / f"{image_id}.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError, match="could be decoded"):
        load_dataset(f"ham10000:{tmp_path}", "train", 16, progress=False)


def test_ham_metadata_row_without_file(ham_dir, tmp_path):
    meta = copy_ham(ham_dir, tmp_path)
    gone = meta.loc[2, "image_id"]
    (tmp_path / f"{gone}.jpg").unlink()
    with pytest.warns(DataWarning, match=r"1 of 14 listed images have no file") as record:
        ds = load_dataset(f"ham10000:{tmp_path}", "train", 16, progress=False)
    assert any(gone in str(w.message) for w in record)
    assert len(ds) == 13 and gone not in ds.source_ids


def test_ham_no_metadata(ham_dir, tmp_path):
    copy_ham(ham_dir, tmp_path)
    (tmp_path / "HAM10000_metadata.csv").unlink()
    with pytest.raises(DataNotFoundError, match="HAM10000_metadata.csv") as err:
        load_dataset(f"ham10000:{tmp_path}", "train", 16, progress=False)
    assert str(tmp_path) in str(err.value)


def test_ham_missing_folder(tmp_path):
    with pytest.raises(DataNotFoundError, match="no such folder"):
        load_dataset(f"ham10000:{tmp_path / 'absent'}", "train", 16, progress=False)


def test_ham_needs_image_size(ham_dir, tmp_path):
    copy_ham(ham_dir, tmp_path, per_class=1)
    with pytest.raises(DataError, match="image_size"):
        load_dataset(f"ham10000:{tmp_path}", "train", None, progress=False)


def test_ham_split_keeps_multi_image_lesions_whole(ham_dir, tmp_path):
    """Pairs of images of the same dx share a lesion_id: each pair must land in one split."""
    meta = copy_ham(ham_dir, tmp_path, per_class=8, split=None)
    meta["lesion_id"] = [f"L_{dx}_{k // 2}" for dx, k in zip(meta["dx"], meta.groupby("dx").cumcount())]
    meta.to_csv(tmp_path / "HAM10000_metadata.csv", index=False)
    for seed in range(4):
        splits = _load_ham(tmp_path, seed=seed, size=16)
        lesions = {s: list(ds.metadata["lesion_id"]) for s, ds in splits.items()}
        seen = {}
        for split, ids in lesions.items():
            for lesion in ids:
                assert seen.setdefault(lesion, split) == split, f"seed {seed}: {lesion} in two splits"
            assert all(ids.count(lesion) == 2 for lesion in ids), f"seed {seed}: a lesion was cut in {split}"
        assert [len(splits[s]) for s in SPLITS] == [28, 14, 14]  # per class: 2 lesions test, 1 val, rest train


def write_mask(path: Path, size: tuple[int, int], palette_white_lesion: bool) -> None:
    """A lesion covering the left half of the image's central square, as a 0/255 grey PNG or as a
    palette PNG whose index 0 is white (the lesion), like some of the HAM10000 masks."""
    w, h = size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    lesion = np.zeros((h, w), dtype=bool)
    lesion[top:top + s, left:left + s // 2] = True
    if palette_white_lesion:
        img = Image.fromarray(np.where(lesion, 0, 1).astype(np.uint8), mode="P")
        img.putpalette([255, 255, 255, 0, 0, 0] + [0, 0, 0] * 254)
    else:
        img = Image.fromarray(np.where(lesion, 255, 0).astype(np.uint8), mode="L")
    img.save(path)


def test_ham_masks_read_by_colour_and_cropped(ham_dir, tmp_path):
    meta = copy_ham(ham_dir, tmp_path)
    (tmp_path / "masks").mkdir()
    for k, image_id in enumerate(meta["image_id"]):
        with Image.open(tmp_path / f"{image_id}.jpg") as img:
            size = img.size
        write_mask(tmp_path / "masks" / f"{image_id}_segmentation.png", size, palette_white_lesion=k % 2 == 1)
    ds = load_dataset(f"ham10000:{tmp_path}", "train", 16, progress=False)
    assert ds.masks is not None and tuple(ds.masks.shape) == (14, 16, 16)
    expected = torch.zeros(16, 16, dtype=torch.uint8)
    expected[:, :8] = 1
    for i in range(len(ds)):
        assert torch.equal(ds.masks[i], expected), ds.source_ids[i]


def test_ham_some_masks_missing(ham_dir, tmp_path):
    meta = copy_ham(ham_dir, tmp_path)
    for image_id in meta["image_id"].iloc[1:]:
        write_mask(tmp_path / f"{image_id}_segmentation.png", (200, 150), palette_white_lesion=False)
    with pytest.warns(DataWarning, match="masks found for 13 of 14"):
        ds = load_dataset(f"ham10000:{tmp_path}", "train", 16, progress=False)
    assert ds.masks is None and len(ds) == 14


def test_stratified_group_split_unit():
    from dpaat_core.data.splits import stratified_group_split

    labels = np.repeat(["a", "b"], [40, 20])
    groups = np.array([f"g{i // 2}" for i in range(60)])  # 30 groups of 2, each within one class
    out = stratified_group_split(labels, groups, seed=5)
    assert out.dtype.kind == "U" and set(out) == {"train", "val", "test"}
    for g in np.unique(groups):
        assert len(set(out[groups == g])) == 1
    for cls, n in (("a", 40), ("b", 20)):
        part = out[labels == cls]
        assert (part == "test").sum() == int(np.ceil(0.2 * n / 2) * 2)
        assert (part == "val").sum() == int(np.ceil(0.1 * n / 2) * 2)
    assert np.array_equal(out, stratified_group_split(labels, groups, seed=5))
    assert not np.array_equal(out, stratified_group_split(labels, groups, seed=6))


@pytest.mark.parametrize("n_groups", [1, 2, 3])
def test_stratified_group_split_always_trains_on_a_small_class(n_groups):
    from dpaat_core.data.splits import stratified_group_split

    labels = ["big"] * 50 + ["rare"] * n_groups
    groups = [f"b{i}" for i in range(50)] + [f"r{i}" for i in range(n_groups)]
    out = stratified_group_split(labels, groups, seed=0)
    assert "train" in set(out[50:])


# --------------------------------------------------------------------------------------------
# 7. folder source (ImageFolder layout)
# --------------------------------------------------------------------------------------------

COLOURS = {"alpha": (220, 30, 30), "beta": (30, 200, 40), "gamma": (40, 50, 210)}
SIZES = [(40, 30), (30, 40), (50, 50), (64, 48), (33, 21)]


def make_png(path: Path, colour, size) -> None:
    """A PNG whose central square is ``colour`` and whose margins (outside it) are grey."""
    w, h = size
    img = Image.new("RGB", size, (128, 128, 128))
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    img.paste(Image.new("RGB", (s, s), colour), (left, top))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def make_folder(root: Path, classes=("alpha", "beta", "gamma"), n: int = 10) -> list[str]:
    files = []
    for c in classes:
        for i in range(n):
            make_png(root / c / f"{c}_{i:02d}.png", COLOURS[c], SIZES[i % len(SIZES)])
            files.append(f"{c}/{c}_{i:02d}.png")
    return files


def colour_class(image: torch.Tensor) -> str:
    """The class whose colour the (uint8 [3, H, W]) image has everywhere."""
    pixels = image.reshape(3, -1).T.int()
    for name, rgb in COLOURS.items():
        if (pixels - torch.tensor(rgb)).abs().max() <= 2:
            return name
    raise AssertionError(f"image is not one uniform class colour: {image.reshape(3, -1).float().mean(1)}")


def test_folder_without_split_dirs_is_stratified(tmp_path):
    files = make_folder(tmp_path)
    splits = {s: load_dataset(f"folder:{tmp_path}", s, 16, progress=False) for s in SPLITS}
    ids = [i for ds in splits.values() for i in ds.source_ids]
    assert sorted(ids) == sorted(files) and len(ids) == len(set(ids))
    for split, ds in splits.items():
        assert ds.classes == ["alpha", "beta", "gamma"]
        assert tuple(ds.images.shape[1:]) == (3, 16, 16)
        assert (ds.class_counts > 0).all(), split
        assert len(set(ds.class_counts.tolist())) == 1, f"{split} not stratified: {ds.class_counts}"
        for i in range(len(ds)):
            # centre-cropped (the grey margins are gone) and labelled by its folder
            assert colour_class(ds.images[i]) == ds.classes[ds.labels[i]] == ds.source_ids[i].split("/")[0]
    assert [len(splits[s]) for s in SPLITS] == [21, 3, 6]
    again = load_dataset(f"folder:{tmp_path}", "test", 16, progress=False)
    other = load_dataset(f"folder:{tmp_path}", "test", 16, seed=3, progress=False)
    assert again.source_ids == splits["test"].source_ids
    assert other.source_ids != splits["test"].source_ids


def test_folder_with_split_dirs(tmp_path):
    make_folder(tmp_path / "train", n=4)
    make_folder(tmp_path / "val", classes=("beta",), n=2)
    make_folder(tmp_path / "test", classes=("alpha", "gamma"), n=3)
    train = load_dataset(f"folder:{tmp_path}", "train", 16, progress=False)
    val = load_dataset(f"folder:{tmp_path}", "val", 16, progress=False)
    test = load_dataset(f"folder:{tmp_path}", "test", 16, progress=False)
    assert len(train) == 12 and len(val) == 2 and len(test) == 6
    for ds in (train, val, test):
        assert ds.classes == ["alpha", "beta", "gamma"]  # from train/, whatever the split holds
        for i in range(len(ds)):
            assert ds.classes[ds.labels[i]] == colour_class(ds.images[i])
    assert val.labels.tolist() == [1, 1]  # 'beta' keeps train's index
    assert test.class_counts.tolist() == [3, 0, 3]
    assert all(s.startswith("val/") for s in val.source_ids)


def test_folder_class_not_in_train(tmp_path):
    make_folder(tmp_path / "train", classes=("alpha", "beta"), n=2)
    make_folder(tmp_path / "val", classes=("alpha", "gamma"), n=2)
    with pytest.raises(DataError, match="gamma"):
        load_dataset(f"folder:{tmp_path}", "val", 16, progress=False)


def test_folder_missing_split_dir(tmp_path):
    make_folder(tmp_path / "train", n=2)
    make_folder(tmp_path / "test", n=2)
    with pytest.raises(DataNotFoundError, match="'val'"):
        load_dataset(f"folder:{tmp_path}", "val", 16, progress=False)


def test_folder_missing_or_not_imagefolder(tmp_path):
    with pytest.raises(DataNotFoundError):
        load_dataset(f"folder:{tmp_path / 'absent'}", "train", 16, progress=False)
    (tmp_path / "flat").mkdir()
    make_png(tmp_path / "flat" / "a.png", (1, 2, 3), (10, 10))
    with pytest.raises(DataError, match="ImageFolder"):
        load_dataset(f"folder:{tmp_path / 'flat'}", "train", 16, progress=False)


def test_folder_corrupt_png_skipped(tmp_path):
    make_folder(tmp_path / "train", classes=("alpha", "beta"), n=3)
    (tmp_path / "train" / "beta" / "beta_01.png").write_bytes(b"not a png")
    with pytest.warns(DataWarning, match=r"skipped 1 of 6"):
        ds = load_dataset(f"folder:{tmp_path}", "train", 16, progress=False)
    assert len(ds) == 5 and "train/beta/beta_01.png" not in ds.source_ids
    assert ds.class_counts.tolist() == [3, 2]


# --------------------------------------------------------------------------------------------
# 8. synthetic source
# --------------------------------------------------------------------------------------------


def test_synthetic_is_deterministic():
    a = load_dataset("synthetic:n=40,seed=3", "train", None)
    b = load_dataset("synthetic:n=40,seed=3", "train", None)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and torch.equal(a.masks, b.masks)
    c = load_dataset("synthetic:n=40,seed=4", "train", None)
    assert not torch.equal(a.images, c.images)
    val = load_dataset("synthetic:n=40,seed=3", "val", None)
    assert len(val) == 10 and not torch.equal(val.images, a.images[:10])  # splits differ


def test_synthetic_defaults_and_sizes():
    ds = load_dataset("synthetic", "train", None)
    assert len(ds) == 512 and ds.num_classes == 4 and ds.image_size == 64 and ds.in_channels == 3
    small = load_dataset("synthetic:n=8", "test", 32)
    assert small.image_size == 32 and small[0][0].shape == (3, 32, 32) and tuple(small.masks.shape[1:]) == (32, 32)


@pytest.mark.parametrize("classes", [2, 5, 7])
def test_synthetic_classes_option(classes):
    for split in SPLITS:
        ds = load_dataset(f"synthetic:n=60,classes={classes}", split, 32)
        assert ds.num_classes == classes and len(set(ds.classes)) == classes
        assert (ds.class_counts > 0).all(), f"{split}: {ds.class_counts}"
        assert int(ds.labels.max()) == classes - 1


def test_synthetic_masks_and_lesion_contrast():
    ds = load_dataset("synthetic:n=64,classes=7", "train", None)
    masks = ds.masks
    assert masks is not None and masks.dtype == torch.uint8
    assert set(torch.unique(masks).tolist()) == {0, 1}
    assert (masks.flatten(1).sum(1) > 0).all()  # every image has a lesion
    assert (masks.flatten(1).float().mean(1) < 1).all()  # and some background
    x = ds.images.float() / 255
    inside, outside = [], []
    for i in range(len(ds)):
        m = masks[i].bool()
        background = x[i][:, ~m].median(dim=1).values[:, None, None]
        diff = (x[i] - background).abs().mean(0)
        inside.append(float(diff[m].mean()))
        outside.append(float(diff[~m].mean()))
    inside, outside = np.array(inside), np.array(outside)
    assert inside.mean() > 2 * outside.mean()
    assert (inside > outside).mean() >= 0.9


def test_synthetic_lesion_colour_depends_on_class():
    ds = load_dataset("synthetic:n=140,classes=7", "train", 32)
    x = ds.images.float() / 255
    m = ds.masks.bool()
    means = torch.stack([
        torch.stack([x[i][:, m[i]].mean(1) for i in range(len(ds)) if ds.labels[i] == c]).mean(0)
        for c in range(7)
    ])  # [7 classes, RGB]: average lesion colour per class
    distances = torch.cdist(means, means) + torch.eye(7)
    assert distances.min() > 0.02, means
    red = ds.classes.index("vascular-red")
    assert means[red, 0] - means[red, 1] > 0.2  # red lesions are red


@pytest.mark.parametrize("spec, pattern", [
    ("synthetic:classes=9", "classes"),
    ("synthetic:classes=1", "classes"),
    ("synthetic:foo=1", "foo"),
    ("synthetic:n=abc", "integer"),
    ("synthetic:n=2", "at least 4"),
    ("synthetic:n", "not understood"),
])
def test_synthetic_bad_options(spec, pattern):
    with pytest.raises(DataError, match=pattern):
        load_dataset(spec, "train", None)


def test_synthetic_small_n_keeps_every_class():
    with pytest.raises(DataError, match="at least the number of classes"):
        load_dataset("synthetic:n=4,classes=7", "train", None)
    for split in ("train", "val", "test"):
        assert (load_dataset("synthetic:n=7,classes=7", split, None).class_counts > 0).all()


# --------------------------------------------------------------------------------------------
# 9. load_dataset argument checks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["hdf5:/x", "NPZ:/x", "", "npz:", "ham10000:", 42])
def test_load_dataset_bad_spec(spec):
    with pytest.raises(DataError):
        load_dataset(spec, "train", None)


@pytest.mark.parametrize("split", ["training", "validation", "TEST", "", None])
def test_load_dataset_bad_split(split):
    with pytest.raises(DataError, match="split"):
        load_dataset("synthetic:n=8", split, None)


@pytest.mark.parametrize("size", [0, 7, 5000, "64", 32.0, -1])
def test_load_dataset_bad_image_size(size):
    with pytest.raises(DataError, match="image_size"):
        load_dataset("synthetic:n=8", "train", size)


def test_load_dataset_image_size_bounds_accepted():
    assert load_dataset("synthetic:n=4", "val", 8).image_size == 8


def test_unknown_source_message_lists_sources():
    with pytest.raises(DataError) as err:
        load_dataset("hdf5:/x", "train", None)
    for kind in data.SOURCES:
        assert f"{kind}:" in str(err.value)


# --- uploads (the dashboard's attribution explorer) ----------------------------------------

def _encoded(fmt: str, size=(40, 30), mode="RGB") -> bytes:
    import io
    from PIL import Image as PILImage
    buf = io.BytesIO()
    PILImage.new(mode, size, (200, 30, 10) if mode == "RGB" else 128).save(buf, format=fmt)
    return buf.getvalue()


def test_decode_upload_reads_jpeg_and_png_like_a_dataset_image():
    from dpaat_core.data.images import decode_upload
    for fmt in ("JPEG", "PNG"):
        arr = decode_upload(_encoded(fmt), 16)
        assert arr.shape == (3, 16, 16) and arr.dtype == np.uint8
        assert abs(int(arr[0].mean()) - 200) < 6 and int(arr[2].mean()) < 20
    assert decode_upload(_encoded("PNG", mode="L"), 8, channels=1).shape == (1, 8, 8)


@pytest.mark.parametrize("data, says", [
    (b"\x00" * 100, "not a readable image"),
    (None, "only JPEG or PNG"),
    (b"big", "the limit is"),
    ("bomb", "pixel limit"),
    ("truncated", "damaged"),
])
def test_decode_upload_refuses_bad_files_with_a_reason(data, says, monkeypatch):
    from dpaat_core.data import images
    max_bytes = 10 * 2**20
    if data is None:
        data = _encoded("BMP")
    elif data == b"big":
        max_bytes = 2
        data = _encoded("PNG")
    elif data == "bomb":
        monkeypatch.setattr(images, "MAX_PIXELS", 100)
        data = _encoded("PNG")
    elif data == "truncated":   # a noisy image: its header survives the cut, its pixels do not
        import io
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(buf, "JPEG")
        data = buf.getvalue()[: len(buf.getvalue()) // 2]
    with pytest.raises(DataError, match=says):
        images.decode_upload(data, 16, max_bytes=max_bytes)


def test_decoding_many_files_reports_about_a_hundred_times_and_always_the_end(tmp_path):
    from dpaat_core.data.images import load_image_files
    paths = []
    for i in range(250):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(np.full((10, 12, 3), i, np.uint8)).save(paths[-1])
    calls = []
    arrays, kept = load_image_files(paths, 8, progress=False, on_progress=lambda *call: calls.append(call))
    assert arrays.shape == (250, 3, 8, 8) and kept == list(range(250))
    assert [c[0] for c in calls] == list(range(2, 251, 2))          # every 250 // 100 files, the last one too
    assert {c[1:] for c in calls} == {(250, "images")}
