"""Fused CPU kernels for the noise layers' training step, compiled once per machine on first use.

A training step's noise work is a few hundred structures' KL and a θ per (example, structure):
tiny tensors, so eager PyTorch spends its time in per-operation overhead (about 2 µs each, some
700 operations a step).  ``noise_kernels.cpp`` does the same sums element by element in one call
each — the KL with its closed-form gradient, and the truncated log-normal sampling with its
backward.  The KL and float64 sampling use PyTorch's own scalar special functions; float32 sampling
runs a vector of lanes at a time (``at::vec``: SLEEF's log, at::vec's inline exp) with a float32 Φ⁻¹ as accurate as
PyTorch's (Giles's erfinv centrally, Acklam's rational in the tail), and forms the backward's
per-sample factors in the same pass, so the backward is two column sums.  The PyTorch code in
:mod:`bmrs.distributions` stays the reference: it serves GPUs, ``torch.compile`` and any machine
where the kernels cannot be built, and ``tests/test_kernels.py`` checks the two against each other.

The kernels are built with ``torch.utils.cpp_extension`` (a C++ compiler and ninja; 30 s to a few
minutes, said on stderr) into ``$TORCH_EXTENSIONS_DIR/bmrs/<key>`` (default ``~/.cache/torch_extensions``),
the key hashing the sources, flags, torch, the interpreter and the CPU, so that checkouts, environments and
machines never share or rebuild each other's objects.  Builds of one key take a lock that the system
releases when its process dies, so a killed build never blocks later runs.  ``BMRS_KERNELS=0`` turns them
off; a failed build warns once and falls back to the reference code.

Examples:
    >>> from bmrs import _kernels
    >>> _kernels.set_enabled(False); _kernels.get() is None
    True
    >>> _kernels.set_enabled(True)
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
import threading
import warnings
from pathlib import Path
from types import ModuleType

import torch

from .constants import header_text

__all__ = ["get", "set_enabled", "enabled", "usable_for"]

_SOURCES = [Path(__file__).with_name(name) for name in ("noise_kernels.cpp", "delta_f_kernels.cpp", "conv_kernels.cpp")]
_state: dict = {"enabled": os.environ.get("BMRS_KERNELS", "1") != "0", "module": None, "failed": False}
_lock = threading.Lock()


def set_enabled(enabled: bool) -> None:
    """Use the fused kernels (True, the default) or the reference PyTorch code (False)."""
    _state["enabled"] = bool(enabled)


def enabled() -> bool:
    """Whether the fused kernels are switched on (``BMRS_KERNELS=0`` or ``set_enabled(False)`` turn them off).

    Examples:
        >>> from bmrs import _kernels
        >>> was = enabled(); _kernels.set_enabled(False); off = enabled(); _kernels.set_enabled(was)
        >>> off
        False
    """
    return _state["enabled"]


def get() -> ModuleType | None:
    """The compiled kernels, building them on first call; None when off or unbuildable."""
    if not _state["enabled"] or _state["failed"]:
        return None
    if _state["module"] is None:
        with _lock:
            if _state["module"] is None and not _state["failed"]:
                _state["module"] = _build()
    return _state["module"]


def usable_for(*tensors: torch.Tensor) -> ModuleType | None:
    """The kernels if they can serve these tensors (CPU, float32/float64, not being traced), else None.
    With no tensors: the kernels if on and not tracing (the caller's kernel checks its tensors itself)."""
    if not _state["enabled"] or _state["failed"]:
        return None
    for t in tensors:
        if t.device.type != "cpu" or t.dtype not in (torch.float32, torch.float64):
            return None
    if torch.compiler.is_compiling() or torch.jit.is_scripting() or torch.jit.is_tracing():
        return None
    return get()


def _header_version() -> str:
    """A define that changes with the shared headers, so that editing one rebuilds (only sources are hashed)."""
    digest = hashlib.sha1(b"".join(p.read_bytes() for p in sorted(_SOURCES[0].parent.glob("*.h")))).hexdigest()[:12]
    return f"-DBMRS_HEADER_VERSION={digest}"


_FLAGS = ["-O3", "-march=native", "-fopenmp"]
_LOCK_WAIT_S = 900  # another process building the same kernels: wait at most this long


def _cpu_identity() -> str:
    """What -march=native compiles for: objects built on one CPU must not be loaded on another."""
    try:
        info = Path("/proc/cpuinfo").read_text(errors="replace")
        lines = [line for line in info.splitlines() if line.startswith(("model name", "flags", "Features"))]
        return "\n".join(dict.fromkeys(lines))
    except OSError:
        import platform
        return platform.processor() or platform.machine()


def build_key() -> str:
    """The kernels' build folder and module name: one per source (its path and text), flags, torch, interpreter
    and CPU, so two checkouts, virtual environments or versions never rebuild over each other (ninja rebuilds
    whenever the sources' paths change, so checkouts with the same text need folders of their own too)."""
    import sys

    sha = hashlib.sha1()
    for path in sorted(_SOURCES) + sorted(_SOURCES[0].parent.glob("*.h")):
        sha.update(str(path.resolve()).encode() + path.read_bytes())
    sha.update(header_text().encode())  # the generated bmrs_constants.h
    # the environment by its prefix (a venv's own; python and python3 of one interpreter share it)
    for part in (*_FLAGS, torch.__version__, sys.version, sys.prefix, _cpu_identity()):
        sha.update(str(part).encode())
    return f"bmrs_kernels_{sha.hexdigest()[:16]}"


def _build_root() -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(Path.home(), ".cache", "torch_extensions")
    return Path(root) / "bmrs"


def _locked(folder: Path):
    """An exclusive lock on ``folder`` held by this process (released by the kernel if the process dies), so
    that torch's own lock file, which a killed build leaves behind, can be removed safely."""
    import contextlib
    import fcntl
    import time

    @contextlib.contextmanager
    def hold():
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "bmrs.lock", "a+") as handle:
            deadline = time.monotonic() + _LOCK_WAIT_S
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"another process has been building the kernels in {folder} for "
                                           f"over {_LOCK_WAIT_S} s") from None
                    time.sleep(0.5)
            try:
                stale = folder / "lock"  # torch's: only a killed build leaves it while we hold ours
                if stale.exists():
                    stale.unlink()
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
    return hold()


def _build() -> ModuleType | None:
    import sys
    import time

    from torch.utils import cpp_extension

    # ninja installed by pip lives next to this interpreter, which may not be on PATH
    scripts = sysconfig.get_path("scripts")
    path = os.environ.get("PATH", "")
    if scripts and scripts not in path.split(os.pathsep):
        os.environ["PATH"] = path + os.pathsep + scripts if path else scripts
    try:
        name = build_key()
        folder = _build_root() / name
        fresh = not (folder / f"{name}.so").exists()
        if fresh:
            print(f"bmrs: building the fused CPU kernels in {folder} (once per version and machine; 30 s to 4 "
                  "minutes)…", file=sys.stderr, flush=True)
        started = time.monotonic()
        with _locked(folder):
            generated = folder / "generated"
            generated.mkdir(exist_ok=True)
            header, text = generated / "bmrs_constants.h", header_text()
            # written once (under the lock; the folder is this text's): rewriting it would make it newer than the
            # objects, and ninja would rebuild the kernels in every process that loads them
            if not header.exists() or header.read_text() != text:
                header.write_text(text)
            module = cpp_extension.load(name=name, sources=[str(p) for p in _SOURCES], build_directory=str(folder),
                                        extra_cflags=[*_FLAGS, _header_version()], extra_ldflags=["-fopenmp"],
                                        extra_include_paths=[str(generated)], verbose=False)
        if fresh:
            print(f"bmrs: kernels built in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
        return module
    except Exception as error:  # no compiler, no ninja, read-only cache, a stuck build …: the reference code serves
        _state["failed"] = True
        reason = str(error).strip().splitlines()
        warnings.warn(f"bmrs: fused CPU kernels unavailable ({reason[-1] if reason else type(error).__name__}); "
                      "using the PyTorch reference code (slower training steps)", RuntimeWarning, stacklevel=3)
        return None
