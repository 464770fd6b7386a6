"""Dataset readers, downloads and the train/val/test loader used by bmrs.

Examples:
    from bmrs.data import load_dataset
    splits = load_dataset("fashion-mnist")
"""

from bmrs.data.cifar import CIFAR10_CLASSES, SafeUnpickler, read_cifar10, read_cifar_batch, safe_unpickle
from bmrs.data.datasets import (
    DATASET_NAMES,
    FASHION_MNIST_CLASSES,
    SYSTEM_DATA_DIRS,
    DataSplits,
    default_data_dir,
    find_dataset,
    load_dataset,
)
from bmrs.data.download import SOURCES, Source, download, download_dataset, sha256_of
from bmrs.data.idx import read_idx, write_idx
from bmrs.data.imagefolder import read_image_folder

__all__ = [
    "CIFAR10_CLASSES",
    "DATASET_NAMES",
    "FASHION_MNIST_CLASSES",
    "SOURCES",
    "SYSTEM_DATA_DIRS",
    "DataSplits",
    "SafeUnpickler",
    "Source",
    "default_data_dir",
    "download",
    "download_dataset",
    "find_dataset",
    "load_dataset",
    "read_cifar10",
    "read_cifar_batch",
    "read_idx",
    "read_image_folder",
    "safe_unpickle",
    "sha256_of",
    "write_idx",
]
