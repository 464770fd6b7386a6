"""Read a folder of class subfolders of images (TinyImagenet style) into uint8 tensors.

Two layouts are understood:

* class folders: ``root/<class>/**/<image>`` (TinyImagenet's ``train/<wnid>/images/*.JPEG`` included);
  classes are the sorted subfolder names;
* annotation file: ``root/val_annotations.txt`` (lines ``<file>\\t<class>...``) with images in
  ``root/images/`` (TinyImagenet's ``val`` folder).

Images are decoded with Pillow and converted to RGB (16-bit grayscale scaled to 8 bits).

Examples:
    images, labels, classes = read_image_folder("tiny-imagenet-200/train")
    images.shape, len(classes)
    (torch.Size([100000, 3, 64, 64]), 200)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from bmrs.errors import DataError

__all__ = ["IMAGE_EXTENSIONS", "read_image_folder"]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp"})
_ANNOTATIONS = "val_annotations.txt"
# Pillow's modes of 16-bit grayscale images ("I" is how some versions open a 16-bit PNG)
_SIXTEEN_BIT = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".") and path.is_file()


def _from_class_folders(root: Path) -> tuple[list[tuple[Path, str]], list[str]]:
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    items = [(img, cls) for cls in folders for img in sorted(filter(_is_image, (root / cls).rglob("*")))]
    empty = sorted(set(folders) - {cls for _, cls in items})
    if items and empty:  # a class without images would be a label no example has
        raise DataError(f"{root}: class folder(s) {', '.join(empty[:5])} hold no images; add images or remove "
                        "the folder(s)")
    return items, folders


def _from_annotations(root: Path) -> tuple[list[tuple[Path, str]], list[str]]:
    ann = root / _ANNOTATIONS
    try:
        lines = ann.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{ann}: cannot read annotations ({type(err).__name__}); download TinyImagenet again") from None
    image_dir = root / "images" if (root / "images").is_dir() else root
    items = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        fields = line.split("\t") if "\t" in line else line.split()
        if len(fields) < 2:
            raise DataError(
                f"{ann}: line {number} should be '<image file><TAB><class>', got {line[:60]!r}; "
                "fix the line or download TinyImagenet again"
            )
        items.append((image_dir / fields[0], fields[1]))
    return items, sorted({cls for _, cls in items})


def _load(path: Path, size: tuple[int, int] | None) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as img:
            if img.mode in _SIXTEEN_BIT:  # convert("RGB") would clip them at 255: scale to 8 bits
                wide = np.asarray(img, dtype=np.float64)
                img = Image.fromarray(np.rint(np.clip(wide, 0, 65535) / 257.0).astype(np.uint8), mode="L")
            img = img.convert("RGB")
            if size is not None and img.size != (size[1], size[0]):
                img = img.resize((size[1], size[0]), Image.BILINEAR)
            return np.array(img, dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(f"{path}: image listed but missing; download the dataset again") from None
    except Exception as err:  # noqa: BLE001 - PIL raises many types for bad files
        raise DataError(
            f"{path}: cannot decode image ({type(err).__name__}); delete or replace the file"
        ) from None


def read_image_folder(
    root: str | os.PathLike,
    *,
    class_names: Sequence[str] | None = None,
    size: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Read every image under ``root``: returns (images uint8 N x 3 x H x W, labels int64 N, class names).

    Args:
        root: a folder of class subfolders, or a TinyImagenet ``val`` folder with ``val_annotations.txt``.
        class_names: fix the label order (e.g. the training classes when reading ``val``); default:
            the sorted class names found.
        size: (H, W) to resize every image to; needed when the images differ in size.

    Examples:
        x, y, classes = read_image_folder("tiny-imagenet-200/val",
                                              class_names=train_classes)
    """
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise DataError("reading image folders needs Pillow; run `pip install pillow`") from None
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found; check the path (expected <root>/<class>/<images>)")
    if (root / _ANNOTATIONS).is_file():
        items, found = _from_annotations(root)
    else:
        items, found = _from_class_folders(root)
    if not items:
        raise DataError(
            f"{root}: no images found (expected <root>/<class>/<image>.jpg|png or val_annotations.txt); "
            "check the path or download the dataset again"
        )
    names = list(class_names) if class_names is not None else found
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise DataError(f"class_names lists {', '.join(map(str, repeated[:5]))} more than once; each class once")
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted({cls for _, cls in items} - index.keys())
    if unknown:
        raise DataError(
            f"{root}: classes {', '.join(unknown[:5])} are not among the {len(names)} given class names; "
            "pass the class names of the matching training folder"
        )
    first = _load(items[0][0], size)
    height, width = first.shape[:2]
    images = torch.empty((len(items), 3, height, width), dtype=torch.uint8)
    labels = torch.empty(len(items), dtype=torch.int64)
    for i, (path, cls) in enumerate(items):
        arr = first if i == 0 else _load(path, size)
        if arr.shape[:2] != (height, width):
            raise DataError(
                f"{path}: image is {arr.shape[1]}x{arr.shape[0]} but the first is {width}x{height}; "
                "pass size=(H, W) to resize them all"
            )
        images[i] = torch.from_numpy(arr).permute(2, 0, 1)
        labels[i] = index[cls]
    return images, labels, names
