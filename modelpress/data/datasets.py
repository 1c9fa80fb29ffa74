"""Load the evaluation datasets from local files into torch datasets.

* Fashion-MNIST: the four gzipped IDX files, parsed here with gzip + numpy.
  Returned as :class:`~torch.utils.data.TensorDataset` of float32 images
  ``(N, 1, 28, 28)``, already normalised, and int64 labels.
* CIFAR-10: ``cifar10-train.npz`` / ``cifar10-test.npz`` (arrays ``x``:
  ``(N, 32, 32, 3)`` uint8 RGB, ``y``: ``(N,)``; optional ``classes``), read
  with ``allow_pickle=False``.  Returned as :class:`NormalizedImageDataset`,
  which keeps the images as uint8 NCHW (150 MB instead of 614 MB of float32
  for the training split) and normalises per item or, through
  ``__getitems__``, per DataLoader batch.  The pickled python batches of
  ``cifar-10-python.tar.gz`` are not supported: unpickling untrusted files can
  execute code.

Use :func:`modelpress.data.fetch.fetch_files` with ``DATASET_INFO[name]["files"]``
and ``["sources"]`` to obtain the Fashion-MNIST files first.
"""

from __future__ import annotations

import gzip
import os
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
SPLITS = ("train", "test")
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip

DATASET_INFO: dict[str, dict] = {
    "fashion-mnist": {
        "num_classes": 10,
        "input_shape": (1, 28, 28),
        "mean": (0.2860,),
        "std": (0.3530,),
        "classes": FASHION_MNIST_CLASSES,
        "files": {
            "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
            "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
            "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
            "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
        },
        "sources": [
            "/usr/share/datasets/fashion-mnist",
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com",
            "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion",
        ],
    },
    "cifar10": {
        "num_classes": 10,
        "input_shape": (3, 32, 32),
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "classes": CIFAR10_CLASSES,
    },
}

DATASET_FILES: dict[str, tuple[str, ...]] = {  # the files each loader reads
    "fashion-mnist": tuple(DATASET_INFO["fashion-mnist"]["files"]),
    "cifar10": ("cifar10-train.npz", "cifar10-test.npz"),
    "text-jsonl": ("train.jsonl", "test.jsonl"),  # modelpress.data.text: tokenized with the model's tokenizer
}

_IDX_IMAGES_MAGIC = 2051  # unsigned bytes, 3 dimensions
_IDX_LABELS_MAGIC = 2049  # unsigned bytes, 1 dimension


class DatasetError(ValueError):
    """A dataset file is missing or malformed; the message names the file."""


class NormalizedImageDataset(Dataset):
    """uint8 images ``(N, C, H, W)`` served as normalised float32, with int64 labels.

    ``dataset[i]`` returns ``(image, label)``; DataLoaders fetch whole batches
    through ``__getitems__`` so normalisation is one vectorised op per batch.
    The raw tensors are available as ``images`` and ``labels``.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean, std):
        if images.dtype != torch.uint8 or images.dim() != 4 or len(images) != len(labels):
            raise ValueError("images must be uint8 (N, C, H, W) with one label per image")
        self.images = images
        self.labels = labels
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index):
        return self._normalise(self.images[index]), self.labels[index]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        images = self._normalise(self.images[indices])
        return list(zip(images, self.labels[indices]))

    def _normalise(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() / 255 - self.mean) / self.std


def load_dataset(name: str, directory: str | os.PathLike) -> tuple[Dataset, Dataset]:
    """Load the (train, test) splits of dataset ``name`` from ``directory``."""
    return load_split(name, directory, "train"), load_split(name, directory, "test")


def load_split(name: str, directory: str | os.PathLike, split: str) -> Dataset:
    """Load one split (``"train"`` or ``"test"``) of dataset ``name`` from ``directory``, without
    reading the other (an evaluation needs the test images alone)."""
    loaders = {"fashion-mnist": _fashion_split, "cifar10": _cifar_split}
    if name not in loaders:
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(sorted(loaders))}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    return loaders[name](Path(directory), split)


# --- Fashion-MNIST -------------------------------------------------------------------


def load_fashion_mnist(directory: str | os.PathLike) -> tuple[TensorDataset, TensorDataset]:
    """Load (train, test) Fashion-MNIST from the four IDX ``.gz`` files in ``directory``."""
    return _fashion_split(Path(directory), "train"), _fashion_split(Path(directory), "test")


_FASHION_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                  "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def _fashion_split(directory: Path, split: str) -> TensorDataset:
    info = DATASET_INFO["fashion-mnist"]
    images_name, labels_name = _FASHION_FILES[split]
    images_path, labels_path = directory / images_name, directory / labels_name
    images = _read_idx(images_path, _IDX_IMAGES_MAGIC)
    labels = _read_idx(labels_path, _IDX_LABELS_MAGIC)
    if images.shape[1:] != info["input_shape"][1:]:
        raise DatasetError(f"{images_path}: images are {images.shape[1:]}, expected 28x28")
    if len(images) != len(labels):
        raise DatasetError(f"{labels_path}: {len(labels)} labels for {len(images)} images in {images_name}")
    _check_labels(labels_path, labels, info["num_classes"])
    pixels = images.reshape(-1, *info["input_shape"]).astype(np.float32)
    pixels *= np.float32(1 / 255)
    pixels -= np.float32(info["mean"][0])
    pixels /= np.float32(info["std"][0])
    return TensorDataset(torch.from_numpy(pixels), torch.from_numpy(labels.astype(np.int64)))


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """Read a gzipped IDX file of unsigned bytes whose header has ``magic``."""
    raw = _gunzip(path)
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) >= 4 and int.from_bytes(raw[:4], "big") != magic:
        raise DatasetError(f"{path}: bad IDX magic number {int.from_bytes(raw[:4], 'big')}, expected {magic}")
    if len(raw) < header:
        raise DatasetError(f"{path}: truncated or corrupt archive (IDX header cut short)")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    size = int(np.prod(dims))
    if len(raw) - header != size:
        raise DatasetError(
            f"{path}: truncated or corrupt archive (payload {len(raw) - header} bytes, header says {size})"
        )
    return np.frombuffer(raw, dtype=np.uint8, count=size, offset=header).reshape(dims)


def _gunzip(path: Path) -> bytes:
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file") from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise DatasetError(f"{path}: truncated or corrupt archive ({_one_line(exc)})") from None
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({_one_line(exc)})") from None


# --- CIFAR-10 ------------------------------------------------------------------------


def load_cifar10(directory: str | os.PathLike) -> tuple[NormalizedImageDataset, NormalizedImageDataset]:
    """Load (train, test) CIFAR-10 from ``cifar10-{train,test}.npz`` in ``directory``."""
    return _cifar_split(Path(directory), "train"), _cifar_split(Path(directory), "test")


def _cifar_split(directory: Path, split: str) -> NormalizedImageDataset:
    info = DATASET_INFO["cifar10"]
    path = directory / f"cifar10-{split}.npz"
    x, y, classes = _read_npz(path)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (32, 32, 3):
        raise DatasetError(f"{path}: x is {x.dtype} {x.shape}, expected uint8 (N, 32, 32, 3)")
    if y.shape != (len(x),):
        raise DatasetError(f"{path}: y has shape {y.shape}, expected ({len(x)},)")
    if classes is not None and tuple(classes.tolist()) != info["classes"]:
        raise DatasetError(f"{path}: classes {classes.tolist()} differ from {list(info['classes'])}")
    _check_labels(path, y, info["num_classes"])
    images = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    labels = torch.from_numpy(y.astype(np.int64))
    return NormalizedImageDataset(images, labels, info["mean"], info["std"])


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Return arrays (x, y, classes or None) of a CIFAR npz, without unpickling."""
    try:
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as npz:  # np.load(path) leaks on errors
            arrays = {name: npz[name] for name in ("x", "y", "classes") if name in npz.files}
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file") from None
    except (EOFError, zipfile.BadZipFile, zlib.error, ValueError, OSError) as exc:
        raise DatasetError(f"{path}: corrupt or unsupported npz archive ({_one_line(exc)})") from None
    missing = sorted({"x", "y"} - arrays.keys())
    if missing:
        raise DatasetError(f"{path}: missing array(s) {', '.join(missing)}")
    return arrays["x"], arrays["y"], arrays.get("classes")


# --- helpers -------------------------------------------------------------------------


def _check_labels(path: Path, labels: np.ndarray, num_classes: int) -> None:
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(f"{path}: labels outside 0..{num_classes - 1}")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
