"""Load a benchmark dataset as normalised train/validation/test tensors.

Preprocessing (as in the BMRS paper's experiments):

1. images are scaled to [0, 1] and resized to ``image_size`` x ``image_size`` with bilinear
   interpolation and antialiasing (``torch.nn.functional.interpolate``); 28 -> 32 for (Fashion-)MNIST;
2. the official training set is split 80/20 (``val_fraction``) into train and validation with a
   seeded random permutation (``torch.Generator().manual_seed(split_seed)``), so the split repeats;
3. every split is normalised per channel with the mean and standard deviation of the *train split*
   (after resizing, before ``train_subset``), so validation and test see no statistics of their own;
4. the official test set is the test split.

A ``data_dir`` given is the only folder looked in (a missing, empty or incomplete one is a DataError; with
``download`` the files are fetched into it).  Without one the files are looked for, in order: ``$BMRS_DATA_DIR``,
the system folders in
:data:`SYSTEM_DATA_DIRS` (Debian's ``dataset-fashion-mnist`` installs into
``/usr/share/datasets/fashion-mnist``), then the download cache (:func:`default_data_dir`). In each,
a dataset-named subfolder (e.g. ``fashion-mnist/``) is tried before the folder itself (flat layout;
note that MNIST and Fashion-MNIST use the same file names, so a flat folder cannot tell them apart).

Examples:
    splits = load_dataset("fashion-mnist")
    len(splits.train), len(splits.val), len(splits.test), splits.train[0][0].shape
    (48000, 12000, 10000, torch.Size([1, 32, 32]))
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from bmrs.data.cifar import CIFAR10_CLASSES, find_cifar10_folder, read_cifar10
from bmrs.data.download import SOURCES, download_dataset
from bmrs.data.idx import read_idx
from bmrs.data.imagefolder import read_image_folder
from bmrs.errors import ConfigError, DataError

__all__ = [
    "DATASET_NAMES",
    "DataSplits",
    "FASHION_MNIST_CLASSES",
    "SYSTEM_DATA_DIRS",
    "dataset_key",
    "default_data_dir",
    "find_dataset",
    "load_dataset",
]

DATASET_NAMES = ("mnist", "fashion-mnist", "cifar10", "tinyimagenet")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
#: Folders searched after data_dir and $BMRS_DATA_DIR (Debian's dataset-* packages install here).
SYSTEM_DATA_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets"),)
ENV_VAR = "BMRS_DATA_DIR"

_ALIASES = {
    "fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist",
    "cifar-10": "cifar10", "cifar_10": "cifar10",
    "tiny-imagenet": "tinyimagenet", "tiny_imagenet": "tinyimagenet", "tiny-imagenet-200": "tinyimagenet",
}
_SUBFOLDERS = {
    "mnist": ("mnist", "MNIST", "MNIST/raw"),
    "fashion-mnist": ("fashion-mnist", "fashion_mnist", "FashionMNIST", "FashionMNIST/raw"),
    "cifar10": ("cifar10", "cifar-10", "CIFAR10"),
    "tinyimagenet": ("tinyimagenet/tiny-imagenet-200", "tiny-imagenet-200", "tinyimagenet"),
}
_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_CHUNK = 4096


@dataclass
class DataSplits:
    """The three splits of a dataset plus what a model needs to know about it.

    ``train``/``val``/``test`` hold (float32 images N x C x S x S, normalised; int64 labels).
    ``mean``/``std`` are the per-channel statistics (of [0, 1] pixels) used for normalisation.
    """

    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    num_classes: int
    in_channels: int
    class_names: tuple[str, ...]
    name: str = ""
    mean: tuple[float, ...] = field(default=())
    std: tuple[float, ...] = field(default=())
    source: str = ""  #: the folder the files were read from


def default_data_dir() -> Path:
    """Where downloads go when no data_dir is given: ``$BMRS_DATA_DIR``, else ``$XDG_CACHE_HOME/bmrs/data``.

    Examples:
        default_data_dir()
        PosixPath('/home/me/.cache/bmrs/data')
    """
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "bmrs" / "data"


def dataset_key(name: str) -> str:
    """The dataset's canonical name (``"Fashion-MNIST"`` → ``"fashion-mnist"``); DataError if unknown.

    Examples:
        >>> dataset_key("MNIST")
        'mnist'
    """
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in DATASET_NAMES:
        raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASET_NAMES)}")
    return key


def _idx_file(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def _complete(name: str, folder: Path) -> Path | None:
    """Return the folder to read ``name`` from if ``folder`` holds it, else None."""
    if not folder.is_dir():
        return None
    if name in ("mnist", "fashion-mnist"):
        return folder if all(_idx_file(folder, s) for s in _IDX_FILES) else None
    if name == "cifar10":
        return find_cifar10_folder(folder)
    return folder if (folder / "train").is_dir() and (folder / "val").is_dir() else None


def _search_bases(data_dir: str | os.PathLike | None) -> list[Path]:
    if data_dir is not None:  # a folder given is the only one looked in
        return [Path(data_dir).expanduser()]
    bases = []
    if os.environ.get(ENV_VAR):
        bases.append(Path(os.environ[ENV_VAR]).expanduser())
    bases.extend(SYSTEM_DATA_DIRS)
    bases.append(default_data_dir())
    unique = []
    for base in bases:
        if base not in unique:
            unique.append(base)
    return unique


def find_dataset(name: str, data_dir: str | os.PathLike | None = None) -> Path | None:
    """Return the folder the files of dataset ``name`` are read from, or None if none is found.

    Examples:
        find_dataset("fashion-mnist")
        PosixPath('/usr/share/datasets/fashion-mnist')
    """
    name = dataset_key(name)
    twin = {"mnist": "fashion-mnist", "fashion-mnist": "mnist"}.get(name)
    twin_names = {s.split("/")[0].lower() for s in _SUBFOLDERS.get(twin, ())}
    for base in _search_bases(data_dir):
        for sub in _SUBFOLDERS[name] + ("",):
            if not sub and base.name.lower() in twin_names:
                continue  # same file names: a flat "fashion-mnist" folder is not MNIST (and vice versa)
            found = _complete(name, base / sub if sub else base)
            if found is not None:
                return found
    return None


def _not_in_given_folder(name: str, data_dir) -> DataError:
    """Why the folder the user named does not hold ``name`` (missing, a file, empty, some files only)."""
    folder = Path(data_dir).expanduser()
    apt = " (apt-get install dataset-fashion-mnist)" if name == "fashion-mnist" else ""
    advice = (f"drop --data-dir to search ${ENV_VAR} and the system copy{apt}, or add --download to fetch the "
              f"files into {folder}")
    if not folder.exists():
        why = "does not exist"
    elif not folder.is_dir():
        why, advice = "is a file, not a folder", f"name the folder holding the {name} files"
    elif not any(folder.iterdir()):
        why = "is empty"
    else:
        why = f"does not hold {_NEEDED[name]}"
        for sub in (("",) + _SUBFOLDERS[name]) if name in ("mnist", "fashion-mnist") else ():
            candidate = folder / sub if sub else folder
            have = [s for s in _IDX_FILES if candidate.is_dir() and _idx_file(candidate, s)]
            if have:
                missing = ", ".join(f"{m}(.gz)" for m in _IDX_FILES if m not in have)
                why = f"holds {len(have)} of the 4 files in {candidate}, missing {missing}"
                break
    return DataError(f"{name} not found: data folder {folder} (--data-dir) {why}; {advice}")


_NEEDED = {
    "mnist": "train-images-idx3-ubyte.gz and the 3 other MNIST files",
    "fashion-mnist": "train-images-idx3-ubyte.gz and the 3 other Fashion-MNIST files",
    "cifar10": "cifar-10-batches-py/",
    "tinyimagenet": "tiny-imagenet-200/ (with train/ and val/)",
}


def _not_found(name: str, data_dir) -> DataError:
    looked = ", ".join(str(b) for b in _search_bases(data_dir))
    need = _NEEDED[name]
    apt = "run `apt-get install dataset-fashion-mnist`, " if name == "fashion-mnist" else ""
    return DataError(
        f"{name} not found: looked in {looked} (and their {_SUBFOLDERS[name][0]}/ subfolders); "
        f"pass --data-dir DIR holding {need}, set {ENV_VAR}, {apt}or use --download"
    )


def _read_idx_pair(folder: Path, prefix: str, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    images_path = _idx_file(folder, f"{prefix}-images-idx3-ubyte")
    labels_path = _idx_file(folder, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.dtype != torch.uint8 or images.dim() != 3:
        raise DataError(
            f"{images_path}: expected N x H x W uint8 images, got {images.dtype} of shape {tuple(images.shape)}; "
            f"the file is not {name} images, download it again"
        )
    if labels.dim() != 1 or labels.dtype.is_floating_point:
        raise DataError(
            f"{labels_path}: expected a flat list of integer labels, got {labels.dtype} of shape "
            f"{tuple(labels.shape)}; the file is not {name} labels, download it again"
        )
    if len(images) != len(labels):
        raise DataError(
            f"{images_path.name} has {len(images)} images but {labels_path.name} has {len(labels)} labels "
            f"(files from different datasets, or one truncated); download both again"
        )
    return images.unsqueeze(1), labels.to(torch.int64)


def _load_raw(name: str, folder: Path):
    """Return (train images, train labels, test images, test labels, class names), images uint8 NCHW."""
    if name in ("mnist", "fashion-mnist"):
        x_train, y_train = _read_idx_pair(folder, "train", name)
        x_test, y_test = _read_idx_pair(folder, "t10k", name)
        classes = FASHION_MNIST_CLASSES if name == "fashion-mnist" else tuple(str(d) for d in range(10))
        return x_train, y_train, x_test, y_test, classes
    if name == "cifar10":
        x_train, y_train = read_cifar10(folder, train=True)
        x_test, y_test = read_cifar10(folder, train=False)
        return x_train, y_train, x_test, y_test, CIFAR10_CLASSES
    x_train, y_train, classes = read_image_folder(folder / "train")
    x_test, y_test, _ = read_image_folder(folder / "val", class_names=classes, size=tuple(x_train.shape[-2:]))
    return x_train, y_train, x_test, y_test, tuple(classes)


def _to_float(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 N x C x H x W -> float32 N x C x size x size in [0, 1], resized in chunks."""
    out = torch.empty((len(images), images.shape[1], size, size), dtype=torch.float32)
    for start in range(0, len(images), _CHUNK):
        x = images[start:start + _CHUNK].to(torch.float32).div_(255.0)
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[start:start + _CHUNK] = x.clamp_(0.0, 1.0)
    return out


def _check_labels(labels: torch.Tensor, num_classes: int, what: str, name: str) -> None:
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise DataError(
            f"{name} {what} labels must lie in 0..{num_classes - 1}, found {int(labels.min())}..{int(labels.max())}; "
            "the label file is corrupt or belongs to another dataset, download it again"
        )


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    val_fraction: float = 0.2,
    split_seed: int = 0,
    download: bool = False,
    image_size: int = 32,
    train_subset: int | None = None,
    mirror: str | None = None,
    progress: bool = True,
    verify: bool = True,
) -> DataSplits:
    """Load ``name`` ("mnist", "fashion-mnist", "cifar10" or "tinyimagenet") as train/val/test splits.

    Args:
        name: dataset name (case-insensitive; "fmnist", "cifar-10", "tiny-imagenet" also accepted).
        data_dir: folder searched first (see the module docstring for the search order).
        val_fraction: share of the official training set held out for validation (0 <= f < 1).
        split_seed: seed of the train/validation permutation.
        download: fetch the files into ``data_dir`` (or :func:`default_data_dir`) if not found.
        image_size: side of the square images after resizing.
        train_subset: keep only the first N images of the (shuffled) train split.
        mirror: base URL replacing the official download locations.
        progress: show a progress bar while downloading.
        verify: check SHA-256 of downloads (datasets without a known checksum need ``verify=False``).

    Raises:
        DataError: unknown name, files missing (with download=False), corrupt or inconsistent files.
        ConfigError: an out-of-range val_fraction, image_size or train_subset.

    Examples:
        s = load_dataset("fashion-mnist", val_fraction=0.2, split_seed=0)
        s.num_classes, s.in_channels, len(s.val)
        (10, 1, 12000)
    """
    name = dataset_key(name)
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ConfigError(f"val_fraction must lie in [0, 1), got {val_fraction}; pass e.g. 0.2")
    if not isinstance(image_size, int) or image_size < 1:
        raise ConfigError(f"image_size must be a positive integer, got {image_size!r}; pass e.g. 32")
    if train_subset is not None and (not isinstance(train_subset, int) or train_subset < 1):
        raise ConfigError(f"train_subset must be a positive integer, got {train_subset!r}; pass e.g. 1000")

    folder = find_dataset(name, data_dir)
    if folder is None:
        if data_dir is not None and (not download or Path(data_dir).expanduser().is_file()):
            raise _not_in_given_folder(name, data_dir)
        if not download:
            raise _not_found(name, data_dir)
        target = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
        download_dataset(name, target, mirror=mirror, progress=progress, verify=verify)
        folder = find_dataset(name, target)
        if folder is None:
            raise DataError(
                f"{name}: downloaded into {target / SOURCES[name].folder} but the expected files are not there; "
                "delete that folder and try again"
            )

    x_train_raw, y_train, x_test_raw, y_test, classes = _load_raw(name, folder)
    num_classes = len(classes)
    _check_labels(y_train, num_classes, "training", name)
    _check_labels(y_test, num_classes, "test", name)
    if x_train_raw.shape[1] != x_test_raw.shape[1]:
        raise DataError(
            f"{name}: training images have {x_train_raw.shape[1]} channels but test images {x_test_raw.shape[1]}; "
            "the files belong to different datasets, download them again"
        )

    n = len(x_train_raw)
    n_val = int(round(n * float(val_fraction)))
    if n - n_val < 1 or (float(val_fraction) > 0 and n_val < 1):
        raise DataError(f"{name}: only {n} training images, too few to split; check the dataset files")
    if len(x_test_raw) == 0:
        raise DataError(f"{name}: the test files hold no images; check the dataset files or download them again")
    generator = torch.Generator().manual_seed(int(split_seed))
    order = torch.randperm(n, generator=generator)
    train_idx, val_idx = order[: n - n_val], order[n - n_val:]

    x_train = _to_float(x_train_raw[train_idx], image_size)
    x_val = _to_float(x_train_raw[val_idx], image_size)
    x_test = _to_float(x_test_raw, image_size)
    del x_train_raw, x_test_raw

    var, mean = torch.var_mean(x_train, dim=(0, 2, 3), correction=0)
    std = var.sqrt().clamp_min(1e-6)
    for x in (x_train, x_val, x_test):
        x.sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))

    y_tr, y_val = y_train[train_idx], y_train[val_idx]
    if train_subset is not None:
        x_train, y_tr = x_train[:train_subset].clone(), y_tr[:train_subset].clone()

    return DataSplits(
        train=TensorDataset(x_train, y_tr),
        val=TensorDataset(x_val, y_val),
        test=TensorDataset(x_test, y_test),
        num_classes=num_classes,
        in_channels=int(x_train.shape[1]),
        class_names=tuple(classes),
        name=name,
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        source=str(folder),
    )

