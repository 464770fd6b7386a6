"""Atomic writes and safe loads: results and checkpoints are never left half-written.

Examples:
    >>> import tempfile, pathlib
    >>> from bmrs.io import write_json, read_json
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "metrics.json"
    >>> write_json(path, {"accuracy": 0.9})
    >>> read_json(path)
    {'accuracy': 0.9}
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .errors import CheckpointError, ConfigError, WriteError, first_line

__all__ = ["tensor_digest", "read_safetensors", "atomic_write", "remove_stale_temporaries", "write_json", "read_json", "save_checkpoint", "load_checkpoint",
           "save_state_dict", "load_state_dict_file", "check_writable", "write_bytes",
           "staged_outputs"]


#: the end of every temporary file bmrs writes (then renames): only these are ever removed as stale
TEMP_SUFFIX = ".bmrs-tmp"


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path`` (same folder, so the rename is atomic).

    A failed write (disk full, file too large, quota, I/O error) raises :class:`WriteError` naming ``path``; the
    temporary is removed and the previous ``path`` is left as it was."""
    path = Path(path)
    for folder in (path.parent, *path.parent.parents):
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"cannot write {path}: {folder} is a file, not a folder")
    if path.is_dir():
        raise ConfigError(f"cannot write {path}: it is a folder; name a file")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    except OSError as err:
        raise WriteError.of(path, err) from None
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:  # on disk before the rename, so a crash cannot leave an empty file
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp's 0600 → what open() would have given
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError) and not isinstance(err, WriteError):
            raise WriteError.of(path, err) from None
        raise
    _fsync_folder(path.parent)


def write_bytes(path: str | os.PathLike, data: bytes | memoryview) -> None:
    """Write ``data`` to ``path`` atomically (WriteError if the disk refuses it).

    Examples:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "blob"
        >>> write_bytes(path, b"abc"); path.read_bytes()
        b'abc'
    """
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
    atomic_write(path, write)


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # (read once: setting it to read it is not thread-safe)


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (where the platform can open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temporaries(folder: str | os.PathLike) -> list[str]:
    """Delete the temporary files that bmrs's atomic writes leave when their process is killed mid-write
    (named ``.NAME.XXXX.bmrs-tmp``; other programs' files are left alone).

    Call it only where no other process writes (a run's own folder, before the run goes on).

    Examples:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp()); _ = (d / ".checkpoint.pt.x1y2.bmrs-tmp").write_text("")
        >>> _ = (d / ".editor-swap.tmp").write_text("")
        >>> remove_stale_temporaries(d), sorted(p.name for p in d.iterdir())
        (['.checkpoint.pt.x1y2.bmrs-tmp'], ['.editor-swap.tmp'])
    """
    removed = []
    for tmp in sorted([*Path(folder).glob(f".*{TEMP_SUFFIX}"), *Path(folder).glob(f".*{TEMP_SUFFIX}.*")]):
        if tmp.is_file():
            tmp.unlink()
            removed.append(tmp.name)
        elif tmp.is_dir() and tmp.name.startswith(".stage."):  # a staged set of outputs (staged_outputs)
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp.name)
    return removed


@contextlib.contextmanager
def staged_outputs(folder: str | os.PathLike) -> Iterator[Path]:
    """Write a set of files as one: yields a staging folder inside ``folder``; when the block ends normally every
    file written there is moved into ``folder`` (Ctrl-C and SIGTERM held back meanwhile, so the set is never
    split), and when it fails the staging folder is removed and ``folder`` keeps its previous files.

    Examples:
        >>> import tempfile, pathlib
        >>> out = pathlib.Path(tempfile.mkdtemp())
        >>> with staged_outputs(out) as stage:
        ...     write_json(stage / "a.json", 1); write_json(stage / "b.json", 2)
        >>> sorted(p.name for p in out.iterdir())
        ['a.json', 'b.json']
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=".stage.", suffix=TEMP_SUFFIX, dir=folder))
    except OSError as err:
        raise WriteError.of(folder, err) from None
    try:
        try:
            yield stage
        except WriteError as err:  # name the file the user asked for, not its staged copy
            raise WriteError(str(err).replace(f"{stage}{os.sep}", f"{folder}{os.sep}")) from None
        files = sorted(p for p in stage.rglob("*") if p.is_file())
        with _signals_held():
            for file in files:
                target = folder / file.relative_to(stage)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(file, target)
        _fsync_folder(folder)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


@contextlib.contextmanager
def _signals_held():
    """Ctrl-C and SIGTERM wait until the block ends (then act), so that a few renames happen together.

    They are caught by Python handlers that only note them, then raised again under the handlers from before:
    a signal mask would hold them in this thread only, and the process's other threads (PyTorch's) would take
    them meanwhile, the handler then running inside the block."""
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {number: signal.getsignal(number) for number in held}
    if threading.current_thread() is not threading.main_thread() or None in previous.values():
        yield  # (handlers can be set in the main thread only, and one set outside Python cannot be put back)
        return
    caught: list[int] = []
    try:
        for number in held:
            signal.signal(number, lambda number, frame: caught.append(number))
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        if caught:
            signal.raise_signal(caught[0])


def write_json(path: str | os.PathLike, data: Any) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")
    atomic_write(path, write)


def read_json(path: str | os.PathLike) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}); delete it and rerun") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: not a UTF-8 text file, so not JSON; delete it and rerun") from None


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """torch.save of plain containers and tensors only (loadable with weights_only=True), atomically.

    Serialised in memory first: torch's own file writer turns a full disk into a C++ traceback."""
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_bytes(path, buffer.getbuffer())


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint safely (weights_only=True); a truncated or foreign file gives CheckpointError."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint; check the path or start without --resume") from None
    except pickle.UnpicklingError as err:
        if "Unsupported global" in str(err):  # (a garbled file fails as "Unsupported operand")
            raise CheckpointError(f"{path}: holds Python objects other than tensors and plain containers, which "
                                  "a safe (weights-only) load refuses to run; it was not written by bmrs") from None
        raise CheckpointError(f"{path}: cannot read the checkpoint (its pickle is garbled); it is truncated or "
                              "not a bmrs checkpoint — delete it to start over") from None
    except Exception as err:  # pickle/zip errors of a truncated or corrupt file
        raise CheckpointError(f"{path}: cannot read the checkpoint ({first_line(err)}); it is truncated or "
                              "not a bmrs checkpoint — delete it to start over") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a bmrs checkpoint (holds a {type(state).__name__})")
    return state


def tensor_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict's names, dtypes, shapes and bytes (recorded in every safetensors file bmrs writes)."""
    sha = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        sha.update(key.encode())
        sha.update(str(tensor.dtype).encode())
        sha.update(str(tuple(tensor.shape)).encode())
        sha.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return sha.hexdigest()


def save_state_dict(path: str | os.PathLike, state_dict: dict[str, torch.Tensor],
                    metadata: dict[str, str] | None = None) -> None:
    """Write a state dict as safetensors (no pickle), atomically, with optional string ``metadata`` and the
    tensors' sha256 (``metadata["sha256"]``, set here; :func:`read_safetensors` checks it)."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    metadata = dict(metadata or {})
    metadata["sha256"] = tensor_digest(tensors)
    data = save(tensors, metadata)  # bytes: safetensors' own save_file leaves a temporary of its own when killed

    write_bytes(path, data)


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a safetensors file; CheckpointError if it is missing, unreadable, or its tensors do
    not match the sha256 recorded when it was written (files of older versions have none)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as err:
        raise CheckpointError(f"{path}: cannot read safetensors file ({first_line(err)}); it is truncated "
                              "or corrupt") from None
    if "sha256" in metadata and tensor_digest(tensors) != metadata["sha256"]:
        raise CheckpointError(f"{path}: the weights do not match the checksum written with them; the file is "
                              "damaged (train the run again, or restore the file)")
    return metadata, tensors


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a safetensors (or weights_only torch) state dict; CheckpointError if unreadable or if its tensors do
    not match the sha256 recorded when it was written."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path)[1]
    state = load_checkpoint(path)
    return state.get("model", state)


def check_writable(folder: str | os.PathLike, need_bytes: int = 50 * 2**20) -> Path:
    """Create ``folder`` and make sure files can be written there, before any long work starts."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", suffix=TEMP_SUFFIX, dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ConfigError(f"cannot write to output folder {folder} ({err.strerror}); pass a writable --output") from None
    stat = os.statvfs(folder)
    free = stat.f_bavail * stat.f_frsize
    if free < need_bytes:
        raise ConfigError(f"output folder {folder} has only {free // 2**20} MiB free; need about "
                          f"{need_bytes // 2**20} MiB — free space or pass another --output")
    return folder


class FolderLock:
    """An exclusive advisory lock on a run folder (``.bmrs.lock`` holding the owner's pid), released when the
    owner exits or dies, so that two bmrs processes never write one folder at once.

    Examples:
        >>> import tempfile
        >>> with FolderLock(tempfile.mkdtemp(), "train"):
        ...     pass
    """

    def __init__(self, folder: str | os.PathLike, what: str):
        self.folder, self.what, self.handle = Path(folder), what, None

    def __enter__(self) -> "FolderLock":
        import fcntl

        self.folder.mkdir(parents=True, exist_ok=True)
        handle = open(self.folder / ".bmrs.lock", "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            handle.close()
            raise ConfigError(f"{self.folder} is in use by another bmrs process (pid {owner}); wait for it to finish, "
                              "or choose another folder") from None
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(str(os.getpid()))
            handle.flush()
        except OSError as err:  # a full disk: said in one line naming the lock file
            fcntl.flock(handle, fcntl.LOCK_UN)
            with contextlib.suppress(OSError):
                handle.close()
            raise WriteError.of(self.folder / ".bmrs.lock", err) from None
        self.handle = handle
        return self

    def __exit__(self, *exc) -> None:
        import fcntl

        if self.handle is not None:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None
