"""Read CIFAR-10 from its python pickle batches, without letting the pickles run code.

The official ``cifar-10-python.tar.gz`` holds ``cifar-10-batches-py/data_batch_1`` ... ``data_batch_5``
(training, 10000 images each) and ``test_batch``. Each is a pickled dict with ``data`` (N x 3072 uint8,
the red, green and blue 32x32 planes of each image) and ``labels`` (N ints in 0..9).

Pickles are loaded with :class:`SafeUnpickler`, which only resolves the handful of numpy
functions needed to rebuild arrays; anything else (``os.system``, ``eval``, ...) is refused.

Examples:
    images, labels = read_cifar10("data/cifar10", train=False)
    images.shape, labels.shape
    (torch.Size([10000, 3, 32, 32]), torch.Size([10000]))
"""

from __future__ import annotations

import codecs
import io
import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import torch

from bmrs.errors import DataError

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_TRAIN_BATCHES",
    "CIFAR10_TEST_BATCHES",
    "SafeUnpickler",
    "safe_unpickle",
    "read_cifar_batch",
    "read_cifar10",
    "find_cifar10_folder",
]

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_BATCHES = ("test_batch",)
_FOLDER = "cifar-10-batches-py"
_MAX_RECONSTRUCT_BYTES = 2**31  # numpy itself always passes shape (0,) here
# The pure-Python unpickler keeps its memo in a dict; the C one grows an array to the largest memo
# index, so a 9-byte pickle can make it allocate and zero 16 GB. CIFAR batches load fast either way.
_PyUnpickler = getattr(pickle, "_Unpickler", pickle.Unpickler)
_REDOWNLOAD = "delete the CIFAR-10 folder and download/extract cifar-10-python.tar.gz again"


def _multiarray():
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray
    return multiarray


def _numeric():
    try:
        from numpy._core import numeric  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import numeric
    return numeric


class _ArrayType:
    """Stand-in handed out for ``numpy.ndarray``: usable only as the first argument of _reconstruct."""


def _safe_reconstruct(subtype, shape, dtype):
    """numpy's ``_reconstruct`` restricted to plain ndarrays of bounded size."""
    if subtype is not _ArrayType:
        raise pickle.UnpicklingError("only plain numpy arrays may be rebuilt")
    dims = [int(d) for d in (shape if isinstance(shape, tuple) else (shape,))]
    nbytes = np.dtype(dtype).itemsize
    for d in dims:
        nbytes *= d
    if min(dims, default=0) < 0 or nbytes > _MAX_RECONSTRUCT_BYTES:
        raise pickle.UnpicklingError(f"refusing to allocate an array of shape {shape}")
    return _multiarray()._reconstruct(np.ndarray, shape, dtype)


def _safe_frombuffer(buf, dtype, shape, order):
    """numpy's pickle-5 ``_frombuffer`` (views existing bytes, allocates nothing)."""
    return _numeric()._frombuffer(buf, dtype, shape, order)


def _safe_dtype(*args):
    """numpy.dtype, refusing dtypes that hold Python objects: an array of them built from raw bytes holds
    arbitrary pointers (reading it crashed the process)."""
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise pickle.UnpicklingError("refusing a dtype of Python objects")
    return dtype


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _safe_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _safe_reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _safe_frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _safe_frombuffer,
    ("numpy", "ndarray"): _ArrayType,
    ("numpy", "dtype"): _safe_dtype,
    # Python 3 writes bytes as _codecs.encode(str, "latin1") in protocols 0-2 (a pure function).
    ("_codecs", "encode"): codecs.encode,
}


class SafeUnpickler(_PyUnpickler):
    """An unpickler that rebuilds dicts, lists, strings, bytes, numbers and numpy arrays, and nothing else.

    ``find_class`` refuses every global except numpy's array-rebuilding helpers, so a pickle cannot
    call ``os.system`` or any other function. Constructing ``numpy.ndarray`` directly is refused too;
    only numpy's own ``_reconstruct`` path (with a size bound) is allowed. It is based on the
    pure-Python unpickler, whose memo cannot be abused to allocate huge tables.

    Examples:
        >>> import io, pickle
        >>> SafeUnpickler(io.BytesIO(pickle.dumps({"a": [1, 2]}))).load()
        {'a': [1, 2]}
    """

    def load_build(self):
        """BUILD (``__setstate__``) only with a dtype free of Python objects, for arrays and dtypes alike."""
        state, target = self.stack[-1], self.stack[-2]
        if isinstance(target, np.ndarray):
            dtype = state[2] if isinstance(state, tuple) and len(state) >= 3 else None
            if not isinstance(dtype, np.dtype) or dtype.hasobject:
                raise pickle.UnpicklingError("refusing an array state without a plain numeric dtype")
        _PyUnpickler.load_build(self)
        if isinstance(target, np.dtype) and target.hasobject:
            raise pickle.UnpicklingError("refusing a dtype of Python objects")

    dispatch = {**_PyUnpickler.dispatch, pickle.BUILD[0]: load_build}

    def find_class(self, module: str, name: str):
        target = _ALLOWED.get((module, name))
        if target is None:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is forbidden")
        return target


def safe_unpickle(data: bytes, name: str = "<pickle>"):
    """Unpickle ``data`` with :class:`SafeUnpickler` (Python-2 strings become bytes).

    Any failure, including a forbidden global, raises :class:`~bmrs.errors.DataError`.

    Examples:
        >>> import pickle
        >>> safe_unpickle(pickle.dumps([1, b"x"]))
        [1, b'x']
    """
    try:
        with warnings.catch_warnings():  # malformed dtype arguments make numpy warn; we validate anyway
            warnings.simplefilter("ignore")
            return SafeUnpickler(io.BytesIO(data), encoding="bytes").load()
    except pickle.UnpicklingError as err:
        detail = _oneline(err)
        if "forbidden" in detail or "refusing" in detail:
            raise DataError(
                f"{name}: unsafe pickle refused ({detail}); this is not a genuine CIFAR-10 batch, {_REDOWNLOAD}"
            ) from None
        raise DataError(f"{name}: corrupt pickle ({detail}); {_REDOWNLOAD}") from None
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a bad file
        detail = _oneline(err)
        raise DataError(
            f"{name}: corrupt pickle ({type(err).__name__}{': ' + detail if detail else ''}); {_REDOWNLOAD}"
        ) from None


def _oneline(err: BaseException) -> str:
    """An exception's text squeezed onto one line (at most 200 characters)."""
    return " ".join(str(err).split())[:200]


def _get(batch: dict, key: str):
    for k in (key.encode(), key):
        if k in batch:
            return batch[k]
    return None


def read_cifar_batch(path: str | os.PathLike, num_classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one CIFAR batch file: returns (images uint8 N x 3 x 32 x 32, labels int64 N).

    Examples:
        x, y = read_cifar_batch("data/cifar-10-batches-py/test_batch")
        x.shape
        torch.Size([10000, 3, 32, 32])
    """
    path = Path(path)
    name = path.name
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: CIFAR batch not found; {_REDOWNLOAD}") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read CIFAR batch ({_oneline(err)}); check the path and permissions") from None
    batch = safe_unpickle(data, name)
    if not isinstance(batch, dict):
        raise DataError(f"{name}: CIFAR batch should be a dict, got {type(batch).__name__}; {_REDOWNLOAD}")
    images = _get(batch, "data")
    labels = _get(batch, "labels")
    if images is None or labels is None:
        raise DataError(f"{name}: CIFAR batch lacks a 'data' or 'labels' entry; {_REDOWNLOAD}")
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != 3072:
        desc = f"{images.dtype} array of shape {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
        raise DataError(f"{name}: CIFAR 'data' must be an N x 3072 uint8 array, got {desc}; {_REDOWNLOAD}")
    try:
        labels_arr = np.asarray(labels)
    except Exception:  # noqa: BLE001 - ragged or exotic objects
        labels_arr = np.asarray([], dtype=object)
    if labels_arr.ndim != 1 or labels_arr.dtype.kind not in "iu":
        raise DataError(f"{name}: CIFAR 'labels' must be a flat list of integers; {_REDOWNLOAD}")
    if len(labels_arr) != len(images):
        raise DataError(
            f"{name}: {len(images)} images but {len(labels_arr)} labels (file corrupt or truncated); {_REDOWNLOAD}"
        )
    if len(labels_arr) and (labels_arr.min() < 0 or labels_arr.max() >= num_classes):
        raise DataError(
            f"{name}: labels must lie in 0..{num_classes - 1}, found {labels_arr.min()}..{labels_arr.max()}; "
            f"{_REDOWNLOAD}"
        )
    x = torch.from_numpy(np.array(images, dtype=np.uint8, copy=True).reshape(-1, 3, 32, 32))
    y = torch.from_numpy(labels_arr.astype(np.int64))
    return x, y


def find_cifar10_folder(root: str | os.PathLike) -> Path | None:
    """Return the folder holding the CIFAR-10 batches (``root`` or ``root/cifar-10-batches-py``), or None.

    Examples:
        >>> find_cifar10_folder("/nonexistent") is None
        True
    """
    root = Path(root)
    for folder in (root / _FOLDER, root):
        if all((folder / f).is_file() for f in CIFAR10_TRAIN_BATCHES + CIFAR10_TEST_BATCHES):
            return folder
    return None


def read_cifar10(root: str | os.PathLike, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Read the CIFAR-10 training (50000) or test (10000) images and labels from ``root``.

    ``root`` is the extracted ``cifar-10-batches-py`` folder or its parent.
    Returns (images uint8 N x 3 x 32 x 32, labels int64 N).

    Examples:
        x, y = read_cifar10("data", train=True)
        x.shape, int(y.max())
        (torch.Size([50000, 3, 32, 32]), 9)
    """
    root = Path(root)
    files = CIFAR10_TRAIN_BATCHES if train else CIFAR10_TEST_BATCHES
    folder = next((f for f in (root / _FOLDER, root) if (f / files[0]).is_file()), None)
    missing = [f for f in files if folder is None or not (folder / f).is_file()]
    if missing:
        raise DataError(
            f"CIFAR-10 batches {', '.join(missing)} not found in {root} or {root / _FOLDER}; "
            "extract cifar-10-python.tar.gz there or use --download"
        )
    parts = [read_cifar_batch(folder / f) for f in files]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
