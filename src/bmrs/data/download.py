"""Download dataset files with SHA-256 verification and atomic placement.

:func:`download` streams a URL to a temporary file next to the destination, checks its SHA-256
and only then renames it into place (``os.replace``), so the destination is either absent, the old
file, or the complete verified new file, never a partial one. :func:`download_dataset` fetches all
files of a dataset listed in :data:`SOURCES` and extracts archives safely.

Examples:
    from bmrs.data.download import download_dataset
    folder = download_dataset("mnist", "~/data")
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import socket
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from glob import escape as glob_escape
from pathlib import Path

from tqdm.auto import tqdm

from bmrs.errors import DataError

__all__ = ["Source", "SOURCES", "download", "download_dataset", "sha256_of"]

_CHUNK = 1 << 20
_STALL_BYTES = 4096  # fewer than this in a whole timeout counts as stalled (a socket timeout covers one read only)
_HEX64 = re.compile(r"[0-9a-f]{64}")


class _StallWatch:
    """Counts the bytes received in consecutive windows of ``seconds``."""

    def __init__(self, seconds: float):
        self.seconds, self.start, self.count = seconds, time.monotonic(), 0

    def stalled(self, received: int) -> bool:
        """Add ``received`` bytes; True when a window just closed with fewer than _STALL_BYTES in it."""
        self.count += received
        now = time.monotonic()
        if now - self.start < self.seconds:
            return False
        slow = self.count < _STALL_BYTES
        self.start, self.count = now, 0
        return slow


@dataclass(frozen=True)
class Source:
    """Where a dataset's files come from.

    Attributes:
        folder: subfolder of the data directory the files are stored in.
        mirrors: base URLs, tried in order; a file's URL is ``mirror + file name``.
        files: (file name, SHA-256 hex digest or None when no checksum is known).
        extract: archives among ``files`` that are unpacked into ``folder`` after download.
    """

    folder: str
    mirrors: tuple[str, ...]
    files: tuple[tuple[str, str | None], ...]
    extract: bool = False


# Checksums: MNIST, Fashion-MNIST and CIFAR-10 SHA-256 values are the ones published in
# tensorflow/datasets' url_checksums (mnist.txt, fashion_mnist.txt, cifar10.csv) and agree with
# Keras' and other projects' pinned values; sizes 9912422 / 26421880 / 170498071 bytes.
# Note: Debian's dataset-fashion-mnist package re-gzips the files, so its .gz bytes (and hashes)
# differ from the official downloads; load_dataset reads those local files without hashing them.
# TinyImagenet: UNVERIFIED, no checksum known with certainty -> sha256 None; download_dataset then
# requires verify=False.
SOURCES: dict[str, Source] = {
    "mnist": Source(
        folder="mnist",
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
        ),
        files=(
            ("train-images-idx3-ubyte.gz", "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
            ("train-labels-idx1-ubyte.gz", "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
            ("t10k-images-idx3-ubyte.gz", "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
            ("t10k-labels-idx1-ubyte.gz", "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
        ),
    ),
    "fashion-mnist": Source(
        folder="fashion-mnist",
        mirrors=(
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
            "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
        ),
        files=(
            ("train-images-idx3-ubyte.gz", "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"),
            ("train-labels-idx1-ubyte.gz", "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845"),
            ("t10k-images-idx3-ubyte.gz", "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073"),
            ("t10k-labels-idx1-ubyte.gz", "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"),
        ),
    ),
    "cifar10": Source(
        folder="cifar10",
        mirrors=("https://www.cs.toronto.edu/~kriz/",),
        files=(("cifar-10-python.tar.gz", "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"),),
        extract=True,
    ),
    "tinyimagenet": Source(
        folder="tinyimagenet",
        mirrors=("http://cs231n.stanford.edu/",),
        files=(("tiny-imagenet-200.zip", None),),  # UNVERIFIED: no known SHA-256
        extract=True,
    ),
}


def sha256_of(path: str | os.PathLike) -> str:
    """Return the SHA-256 hex digest of a file, read in chunks.

    Examples:
        sha256_of("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz")[:8]
        '8d3605d1'
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _describe(err: BaseException) -> str:
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    if isinstance(err, urllib.error.URLError):
        return str(err.reason)
    if isinstance(err, http.client.IncompleteRead):
        return f"connection closed after {len(err.partial)} bytes"
    text = " ".join(str(err).split())[:200]
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def download(url: str, dest: str | os.PathLike, sha256: str | None = None, progress: bool = True, *,
             verify: bool = True, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest``, verify its SHA-256 and move it into place atomically.

    If ``dest`` already exists with the expected hash, nothing is downloaded. Without a
    ``sha256`` the download is refused unless ``verify=False`` (which skips the check entirely and
    keeps any existing ``dest``). On any failure (network error,
    HTTP error, incomplete body, checksum mismatch) the temporary file is deleted, ``dest`` is left
    as it was, and :class:`~bmrs.errors.DataError` is raised.

    Examples:
        download("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "data/cifar.tar.gz",
                     "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce")
        PosixPath('data/cifar.tar.gz')
    """
    dest = Path(dest).expanduser()
    if sha256 is not None:
        sha256 = sha256.lower()
        if not _HEX64.fullmatch(sha256):
            raise DataError(f"sha256 for {dest.name} must be 64 hex digits, got {sha256!r}; pass the full digest")
    elif verify:
        raise DataError(
            f"no SHA-256 known for {url}; pass sha256=... or verify=False to download it unverified"
        )
    if not verify:
        sha256 = None
    try:
        if dest.is_file() and (sha256 is None or sha256_of(dest) == sha256):
            return dest
    except OSError as err:
        raise DataError(f"cannot read existing {dest} ({_describe(err)}); delete it or fix its permissions") from None
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        _remove_abandoned(dest.parent, f".{glob_escape(dest.name)}.*.part")
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    except OSError as err:
        raise DataError(f"cannot write to {dest.parent} ({_describe(err)}); pass a writable --data-dir") from None
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        received = 0
        try:
            request = urllib.request.Request(url, headers={"User-Agent": "bmrs-data/1"})
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(request, timeout=timeout) as response:
                length = response.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
                with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name,
                          disable=not progress) as bar:
                    stall = _StallWatch(timeout)
                    # read1: whatever one receive brings, so that a trickling server is noticed between reads
                    for chunk in iter(lambda: response.read1(_CHUNK), b""):
                        out.write(chunk)
                        digest.update(chunk)
                        received += len(chunk)
                        bar.update(len(chunk))
                        if stall.stalled(len(chunk)):
                            raise DataError(f"the download of {url} stalled (under {_STALL_BYTES} bytes in "
                                            f"{timeout:g} s); try again later or use another mirror")
                out.flush()
                os.fsync(out.fileno())
        except (urllib.error.URLError, http.client.HTTPException, socket.timeout, OSError, ValueError) as err:
            raise DataError(
                f"could not download {url} ({_describe(err)}); check the network connection and URL, "
                f"or put the file at {dest} yourself"
            ) from None
        if total is not None and received != total:
            raise DataError(
                f"incomplete download of {url} ({received} of {total} bytes); run the download again"
            )
        actual = digest.hexdigest()
        if sha256 is not None and actual != sha256:
            raise DataError(
                f"SHA-256 mismatch for {url} (got {actual[:16]}..., expected {sha256[:16]}...); the file is "
                "corrupt or the mirror changed it, download again or use another mirror"
            )
        try:
            os.chmod(tmp, 0o644)
            os.replace(tmp, dest)
        except OSError as err:
            raise DataError(f"cannot move the download to {dest} ({_describe(err)}); remove what is there") from None
        return dest
    finally:
        if tmp.exists():
            tmp.unlink()


_ABANDONED_AFTER = 24 * 3600.0  # seconds without a write after which a .part file's download is dead


def _remove_abandoned(folder: Path, pattern: str) -> None:
    """Delete what killed downloads or extractions left in ``folder`` under ``pattern`` (untouched for a day:
    a live one writes every few seconds, so another process's is never taken)."""
    now = time.time()
    for leftover in folder.glob(pattern):
        try:
            if now - leftover.stat().st_mtime <= _ABANDONED_AFTER:
                continue
            if leftover.is_dir():
                shutil.rmtree(leftover)
            else:
                leftover.unlink()
        except OSError:
            pass


def _extract_tar(archive: Path, target: Path) -> None:
    with tarfile.open(archive, "r:*") as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(target, filter="data")
            return
        for member in tar.getmembers():  # pragma: no cover - Python without extraction filters
            parts = Path(member.name).parts
            if member.name.startswith(("/", "\\")) or ".." in parts or not (member.isfile() or member.isdir()):
                raise tarfile.TarError(f"unsafe member {member.name!r}")
        tar.extractall(target)  # pragma: no cover


def _extract(archive: Path, folder: Path) -> None:
    """Unpack ``archive`` into ``folder`` via a temporary folder, refusing paths that escape it."""
    _remove_abandoned(folder, ".extract-*")
    staging = Path(tempfile.mkdtemp(dir=folder, prefix=".extract-"))
    try:
        try:
            if archive.name.endswith(".zip"):
                with zipfile.ZipFile(archive) as zf:
                    for info in zf.infolist():
                        parts = Path(info.filename.replace("\\", "/")).parts
                        if info.filename.startswith(("/", "\\")) or ".." in parts:
                            raise zipfile.BadZipFile(f"unsafe member {info.filename!r}")
                    zf.extractall(staging)
            else:
                _extract_tar(archive, staging)
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, OSError, ValueError) as err:
            raise DataError(
                f"{archive.name}: cannot extract ({_describe(err)}); delete it and download it again"
            ) from None
        for entry in staging.iterdir():
            final = folder / entry.name
            if final.is_dir() and not final.is_symlink():
                shutil.rmtree(final)
            elif final.exists() or final.is_symlink():
                final.unlink()
            os.replace(entry, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def download_dataset(name: str, data_dir: str | os.PathLike, *, mirror: str | None = None, progress: bool = True,
                     verify: bool = True, timeout: float = 60.0) -> Path:
    """Download (and extract) every file of dataset ``name`` into ``data_dir/<folder>``; return that folder.

    ``mirror`` replaces the base URLs of :data:`SOURCES` (e.g. a local server). Files already present
    with the right checksum are not fetched again.

    Examples:
        download_dataset("fashion-mnist", "~/data", progress=False)
        PosixPath('/home/me/data/fashion-mnist')
    """
    if name not in SOURCES:
        raise DataError(f"no download source for dataset {name!r}; choose one of {', '.join(SOURCES)}")
    source = SOURCES[name]
    folder = Path(data_dir).expanduser() / source.folder
    bases = (mirror,) if mirror else source.mirrors
    for file_name, sha256 in source.files:
        if sha256 is None and verify:
            raise DataError(
                f"{file_name} of {name} has no known SHA-256, so bmrs will not fetch it unverified by itself: "
                f"download {bases[0].rstrip('/')}/{file_name} and unpack it in {folder} (then run without "
                "--download), or from Python call download_dataset(..., verify=False)"
            )
        dest = folder / file_name
        reasons = []
        for base in bases:
            url = base.rstrip("/") + "/" + file_name
            try:
                download(url, dest, sha256, progress, verify=verify, timeout=timeout)
                break
            except DataError as err:
                reasons.append(str(err))
        else:
            raise DataError(reasons[-1] if len(reasons) == 1 else f"all mirrors failed; last: {reasons[-1]}")
        if source.extract:
            marker = folder / f".{file_name}.extracted"
            digest = sha256 or sha256_of(dest)
            if not (marker.is_file() and marker.read_text().strip() == digest):
                _extract(dest, folder)
                marker.write_text(digest + "\n")
    return folder
