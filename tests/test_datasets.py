"""Dataset loaders on the real Fashion-MNIST / CIFAR-10 files and on small synthetic ones."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from modelpress.data import (
    DATASET_INFO,
    DatasetError,
    NormalizedImageDataset,
    load_cifar10,
    load_dataset,
    load_fashion_mnist,
    load_split,
)

from helpers import shared_data

pytestmark = pytest.mark.unit

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = list(DATASET_INFO["fashion-mnist"]["files"])

needs_fashion = pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="dataset-fashion-mnist not installed")


def write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    """Write ``array`` (uint8) as a gzipped IDX file with ``magic``."""
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def write_fashion(directory: Path, n_train: int = 6, n_test: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """Write a tiny synthetic Fashion-MNIST; return its raw arrays by file name."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte.gz": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte.gz": rng.integers(0, 10, n_test),
    }
    for name, array in arrays.items():
        write_idx(directory / name, array, 2051 if "images" in name else 2049)
    return arrays


def write_cifar(directory: Path, n_train: int = 5, n_test: int = 3, **overrides) -> dict[str, np.ndarray]:
    """Write tiny synthetic cifar10-{train,test}.npz; ``overrides`` replace arrays of the train split."""
    rng = np.random.default_rng(1)
    splits = {}
    for split, n in (("train", n_train), ("test", n_test)):
        arrays = {
            "x": rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
            "y": rng.integers(0, 10, n, dtype=np.uint8),
            "classes": np.array(DATASET_INFO["cifar10"]["classes"]),
        }
        if split == "train":
            arrays.update(overrides)
        np.savez_compressed(directory / f"cifar10-{split}.npz", **arrays)
        splits[split] = arrays
    return splits


# --- Fashion-MNIST -------------------------------------------------------------------


@needs_fashion
def test_real_fashion_mnist():
    train, test = load_dataset("fashion-mnist", FASHION_DIR)
    assert len(train) == 60000 and len(test) == 10000
    for split in (train, test):
        images, labels = split.tensors
        assert images.shape[1:] == (1, 28, 28) and images.dtype == torch.float32
        assert labels.dtype == torch.int64
        assert labels.min() == 0 and labels.max() == 9
        assert torch.bincount(labels).count_nonzero() == 10
    images = train.tensors[0]
    assert abs(images.mean().item()) < 0.01 and abs(images.std().item() - 1) < 0.01


@needs_fashion
def test_truncated_fashion_mnist_raises_naming_the_file(tmp_path):
    for name in FASHION_FILES:
        (tmp_path / name).symlink_to(FASHION_DIR / name)
    truncated = tmp_path / "t10k-images-idx3-ubyte.gz"
    truncated.unlink()
    truncated.write_bytes((FASHION_DIR / truncated.name).read_bytes()[:100_000])
    with pytest.raises(DatasetError, match=r"t10k-images-idx3-ubyte\.gz: truncated or corrupt archive"):
        load_fashion_mnist(tmp_path)


def test_synthetic_fashion_mnist_is_normalised_exactly(tmp_path):
    arrays = write_fashion(tmp_path)
    train, test = load_fashion_mnist(tmp_path)
    images, labels = test.tensors
    raw = torch.from_numpy(arrays["t10k-images-idx3-ubyte.gz"]).float().unsqueeze(1)
    torch.testing.assert_close(images, (raw / 255 - 0.2860) / 0.3530)
    assert labels.tolist() == arrays["t10k-labels-idx1-ubyte.gz"].tolist()
    assert len(train) == 6


def test_fashion_mnist_swapped_files_report_bad_magic(tmp_path):
    write_fashion(tmp_path)
    images, labels = tmp_path / "t10k-images-idx3-ubyte.gz", tmp_path / "t10k-labels-idx1-ubyte.gz"
    images.rename(tmp_path / "tmp")
    labels.rename(images)
    (tmp_path / "tmp").rename(labels)
    with pytest.raises(DatasetError, match=r"t10k-images-idx3-ubyte\.gz: bad IDX magic number 2049, expected 2051"):
        load_fashion_mnist(tmp_path)


def test_fashion_mnist_count_mismatch(tmp_path):
    write_fashion(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(5), 2049)
    with pytest.raises(DatasetError, match=r"train-labels-idx1-ubyte\.gz: 5 labels for 6 images"):
        load_fashion_mnist(tmp_path)


def test_fashion_mnist_labels_out_of_range(tmp_path):
    write_fashion(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([0, 1, 10, 2]), 2049)
    with pytest.raises(DatasetError, match=r"t10k-labels-idx1-ubyte\.gz: labels outside 0\.\.9"):
        load_fashion_mnist(tmp_path)


def test_fashion_mnist_payload_shorter_than_header(tmp_path):
    write_fashion(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-10]))
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte\.gz: truncated or corrupt archive \(payload"):
        load_fashion_mnist(tmp_path)


@pytest.mark.parametrize("content", [b"not a gzip file", b""])
def test_fashion_mnist_not_gzip(tmp_path, content):
    write_fashion(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(content)
    with pytest.raises(DatasetError, match=r"train-labels-idx1-ubyte\.gz: truncated or corrupt archive"):
        load_fashion_mnist(tmp_path)


def test_fashion_mnist_missing_file(tmp_path):
    write_fashion(tmp_path)
    (tmp_path / "train-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte\.gz: no such file"):
        load_fashion_mnist(tmp_path)


# --- CIFAR-10 ------------------------------------------------------------------------


def test_real_cifar10():
    train, test = load_dataset("cifar10", shared_data("cifar10"))
    assert len(train) == 50000 and len(test) == 10000
    for split in (train, test):
        assert split.images.shape[1:] == (3, 32, 32) and split.images.dtype == torch.uint8
        assert torch.bincount(split.labels).count_nonzero() == 10
    images, labels = next(iter(DataLoader(test, batch_size=256)))
    assert images.shape == (256, 3, 32, 32) and images.dtype == torch.float32
    assert labels.shape == (256,) and labels.dtype == torch.int64


def test_synthetic_cifar10_is_normalised_exactly(tmp_path):
    arrays = write_cifar(tmp_path)["test"]
    _, test = load_cifar10(tmp_path)
    assert isinstance(test, NormalizedImageDataset) and len(test) == 3
    mean = torch.tensor(DATASET_INFO["cifar10"]["mean"]).view(3, 1, 1)
    std = torch.tensor(DATASET_INFO["cifar10"]["std"]).view(3, 1, 1)
    expected = (torch.from_numpy(arrays["x"]).permute(0, 3, 1, 2).float() / 255 - mean) / std
    image, label = test[1]
    torch.testing.assert_close(image, expected[1])
    assert label.item() == arrays["y"][1]
    batch, labels = next(iter(DataLoader(test, batch_size=3)))  # goes through __getitems__
    torch.testing.assert_close(batch, expected)
    assert labels.tolist() == arrays["y"].tolist()


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"x": np.zeros((5, 3, 32, 32), np.uint8)}, r"x is uint8 \(5, 3, 32, 32\), expected uint8 \(N, 32, 32, 3\)"),
        ({"y": np.zeros(4, np.uint8)}, r"y has shape \(4,\), expected \(5,\)"),
        ({"y": np.full(5, 10, np.uint8)}, r"labels outside 0\.\.9"),
        ({"classes": np.array(list("abcdefghij"))}, r"classes \['a', .*\] differ"),
        ({"y": np.array([0, 1, 2, 3, None])}, r"corrupt or unsupported npz archive"),
    ],
)
def test_cifar10_malformed(tmp_path, overrides, expected):
    write_cifar(tmp_path, **overrides)
    with pytest.raises(DatasetError, match=r"cifar10-train\.npz: " + expected):
        load_cifar10(tmp_path)


def test_cifar10_truncated_or_missing(tmp_path):
    write_cifar(tmp_path)
    path = tmp_path / "cifar10-test.npz"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(DatasetError, match=r"cifar10-test\.npz: corrupt or unsupported npz archive"):
        load_cifar10(tmp_path)
    path.unlink()
    with pytest.raises(DatasetError, match=r"cifar10-test\.npz: no such file"):
        load_cifar10(tmp_path)


def test_unknown_dataset():
    with pytest.raises(DatasetError, match=r"unknown dataset 'mnist'; known: cifar10, fashion-mnist"):
        load_dataset("mnist", "/nonexistent")


@pytest.mark.parametrize("name, write", [("fashion-mnist", write_fashion), ("cifar10", write_cifar)])
def test_one_split_loads_without_the_other_files(tmp_path, name, write):
    """What an evaluation reads: the test split alone, the same as load_dataset's, the training
    files never opened (here: gone)."""
    write(tmp_path)
    _, both_test = load_dataset(name, tmp_path)
    for path in tmp_path.glob("train*"):
        path.unlink()
    for path in tmp_path.glob("cifar10-train*"):
        path.unlink()
    test = load_split(name, tmp_path, "test")
    assert len(test) == len(both_test)
    for i in range(len(test)):
        torch.testing.assert_close(test[i][0], both_test[i][0])
        assert int(test[i][1]) == int(both_test[i][1])
    with pytest.raises(DatasetError, match="train.*no such file"):
        load_split(name, tmp_path, "train")
    with pytest.raises(ValueError, match="unknown split 'validation'; known: train, test"):
        load_split(name, tmp_path, "validation")
