"""Read and write IDX files, the format of MNIST and Fashion-MNIST.

An IDX file is a 4-byte magic number (two zero bytes, a dtype code, the number of dimensions),
one big-endian uint32 per dimension, then the values in C order, big-endian. The files are often
gzip-compressed; :func:`read_idx` detects that from the gzip magic bytes (1f 8b), not from the name.

Examples:
    >>> import tempfile, os, torch
    >>> path = os.path.join(tempfile.mkdtemp(), "labels-idx1-ubyte.gz")
    >>> write_idx(path, torch.tensor([3, 1, 4], dtype=torch.uint8))
    >>> read_idx(path).tolist()
    [3, 1, 4]
"""

from __future__ import annotations

import gzip
import os
import struct
import tempfile
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from bmrs.errors import DataError

__all__ = ["read_idx", "write_idx", "IDX_DTYPES", "MAX_IDX_ELEMENTS"]

#: IDX dtype code -> (big-endian numpy dtype on disk, torch dtype in memory).
IDX_DTYPES: dict[int, tuple[str, torch.dtype]] = {
    0x08: (">u1", torch.uint8),
    0x09: (">i1", torch.int8),
    0x0B: (">i2", torch.int16),
    0x0C: (">i4", torch.int32),
    0x0D: (">f4", torch.float32),
    0x0E: (">f8", torch.float64),
}

#: Largest number of values an IDX file may declare (guards against absurd headers).
MAX_IDX_ELEMENTS = 2**31

_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 22
_REDOWNLOAD = "delete it and download it again"


def _read_up_to(stream: BinaryIO, n: int) -> bytes:
    """Read at most ``n`` bytes, in bounded chunks so a lying header cannot force a huge allocation."""
    parts = []
    left = n
    while left > 0:
        chunk = stream.read(min(left, _CHUNK))
        if not chunk:
            break
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def _parse(stream: BinaryIO, name: str) -> torch.Tensor:
    head = _read_up_to(stream, 4)
    if len(head) < 4:
        raise DataError(f"{name}: file too short for an IDX header ({len(head)} bytes); {_REDOWNLOAD}")
    zero1, zero2, code, ndim = head
    if zero1 != 0 or zero2 != 0:
        raise DataError(
            f"{name}: not an IDX file (magic bytes {head.hex()} should start with 0000); "
            "check that the path points at an MNIST-style *-idx?-ubyte(.gz) file"
        )
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in IDX_DTYPES)
        raise DataError(
            f"{name}: unsupported IDX dtype code 0x{code:02X} (supported: {known}); "
            f"the file is corrupt or not an IDX file, {_REDOWNLOAD}"
        )
    if not 1 <= ndim <= 4:
        raise DataError(
            f"{name}: IDX header declares {ndim} dimensions, expected 1 to 4; the file is corrupt, {_REDOWNLOAD}"
        )
    raw_dims = _read_up_to(stream, 4 * ndim)
    if len(raw_dims) < 4 * ndim:
        raise DataError(f"{name}: IDX header is truncated (dimensions missing); {_REDOWNLOAD}")
    dims = struct.unpack(f">{ndim}I", raw_dims)
    count = 1
    for d in dims:
        count *= d
    if count > MAX_IDX_ELEMENTS:
        raise DataError(
            f"{name}: IDX header declares shape {tuple(dims)} ({count} values, more than {MAX_IDX_ELEMENTS}); "
            f"the file is corrupt, {_REDOWNLOAD}"
        )
    disk_dtype, torch_dtype = IDX_DTYPES[code]
    itemsize = np.dtype(disk_dtype).itemsize
    expected = count * itemsize
    payload = _read_up_to(stream, expected)
    if len(payload) < expected:
        raise DataError(
            f"{name}: payload is {len(payload)} bytes but shape {tuple(dims)} needs {expected} "
            f"(file truncated or partly downloaded); {_REDOWNLOAD}"
        )
    if stream.read(1):
        raise DataError(
            f"{name}: trailing bytes after the {expected}-byte payload of shape {tuple(dims)} "
            f"(header and data disagree); {_REDOWNLOAD}"
        )
    array = np.frombuffer(payload, dtype=disk_dtype).astype(np.dtype(disk_dtype).newbyteorder("="))
    return torch.from_numpy(array.reshape(dims))


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """Read an IDX file (raw or gzip-compressed) into a tensor of its own dtype and shape.

    Every problem with the file (missing, truncated, corrupt, inconsistent header) raises
    :class:`~bmrs.errors.DataError` with a one-line message saying how to fix it.

    Examples:
        images = read_idx("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
        images.shape, images.dtype
        (torch.Size([10000, 28, 28]), torch.uint8)
    """
    path = Path(path)
    name = path.name
    try:
        with open(path, "rb") as raw:
            is_gzip = raw.read(2) == _GZIP_MAGIC
            raw.seek(0)
            if not is_gzip:
                return _parse(raw, name)
            with gzip.GzipFile(fileobj=raw, mode="rb") as stream:
                return _parse(stream, name)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; check the path or download the dataset again") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, expected an IDX file; pass the file's path") from None
    except PermissionError:
        raise DataError(f"{path}: permission denied; make the file readable (chmod a+r)") from None
    except EOFError:
        raise DataError(
            f"{name}: truncated gzip stream (file is corrupt or partly downloaded); {_REDOWNLOAD}"
        ) from None
    except (zlib.error, gzip.BadGzipFile, OSError, struct.error, ValueError) as err:
        detail = " ".join(str(err).split())[:200] or type(err).__name__
        raise DataError(f"{name}: corrupt gzip/IDX data ({detail}); {_REDOWNLOAD}") from None


def write_idx(path: str | os.PathLike, array: torch.Tensor | np.ndarray) -> None:
    """Write ``array`` (1 to 4 dimensions, dtype uint8/int8/int16/int32/float32/float64) as an IDX file.

    The file is gzip-compressed when ``path`` ends in ``.gz``, and written atomically (a temporary
    file in the same folder, then renamed), so a crash never leaves a half-written file.

    Examples:
        >>> import numpy as np, tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "x-idx2-int")
        >>> write_idx(p, np.arange(6, dtype=np.int32).reshape(2, 3))
        >>> read_idx(p).shape
        torch.Size([2, 3])
    """
    path = Path(path)
    arr = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    code = next((c for c, (d, _) in IDX_DTYPES.items() if np.dtype(d).newbyteorder("=") == arr.dtype), None)
    if code is None:
        raise DataError(
            f"{path.name}: cannot write dtype {arr.dtype} as IDX; convert to uint8, int8, int16, int32, "
            "float32 or float64 first"
        )
    if not 1 <= arr.ndim <= 4:
        raise DataError(f"{path.name}: cannot write a {arr.ndim}-dimensional array as IDX; reshape to 1-4 dimensions")
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    payload = np.ascontiguousarray(arr, dtype=IDX_DTYPES[code][0]).tobytes()
    folder = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".bmrs-tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            if path.name.endswith(".gz"):
                with gzip.GzipFile(filename="", fileobj=out, mode="wb", mtime=0) as gz:
                    gz.write(header)
                    gz.write(payload)
            else:
                out.write(header)
                out.write(payload)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise

