"""Dataset fetching (checksummed, multi-source, cached) and loading."""

from .datasets import (
    DATASET_INFO,
    DatasetError,
    NormalizedImageDataset,
    load_cifar10,
    load_dataset,
    load_fashion_mnist,
    load_split,
)
from .fetch import (
    ChecksumMismatch,
    FetchError,
    SourceUnavailable,
    fetch_files,
    sha256_file,
)

__all__ = [
    "DATASET_INFO",
    "ChecksumMismatch",
    "DatasetError",
    "FetchError",
    "NormalizedImageDataset",
    "SourceUnavailable",
    "fetch_files",
    "load_cifar10",
    "load_dataset",
    "load_fashion_mnist",
    "load_split",
    "sha256_file",
]
