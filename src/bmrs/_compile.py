"""Optional torch.compile for the per-structure and per-sample kernels (off by default).

The noise layers' work is many tiny elementwise operations, so eager PyTorch spends its time in
per-operation overhead; compiled, the KL of all structures runs ~5x faster.  Compiling costs
~10–20 s once per process (cached on disk by inductor afterwards), so it pays for long runs only:
turn it on with ``set_compile(True)``, ``BMRS_COMPILE=1`` or ``bmrs train --compile``.  Any
failure to compile falls back to eager execution with one warning.

Examples:
    >>> from bmrs._compile import maybe_compiled, compile_enabled
    >>> double = maybe_compiled(lambda t: 2 * t)
    >>> compile_enabled()
    False
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Callable

import torch
from torch.distributions import Distribution

__all__ = ["set_compile", "compile_enabled", "maybe_compiled"]

_state = {"enabled": os.environ.get("BMRS_COMPILE", "0") == "1"}


def set_compile(enabled: bool) -> None:
    """Compile the noise kernels from now on (True) or run them eagerly (False)."""
    _state["enabled"] = bool(enabled)


def compile_enabled() -> bool:
    return _state["enabled"]


def maybe_compiled(fn: Callable) -> Callable:
    """``fn`` itself while compilation is off; its torch.compile'd form (built lazily) while on."""
    cache: dict[str, Callable | None] = {}

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not _state["enabled"]:
            return fn(*args, **kwargs)
        # dynamo switches torch.distributions' default argument validation off for good when it is
        # first used; put the user's setting back so that enabling compilation changes nothing else
        validate = Distribution._validate_args
        if "compiled" not in cache:
            cache["compiled"] = torch.compile(fn, dynamic=True)
        compiled = cache["compiled"]
        if compiled is None:
            return fn(*args, **kwargs)
        try:
            return compiled(*args, **kwargs)
        except Exception as err:  # a missing compiler, an unsupported op: stay correct, just slower
            cache["compiled"] = None
            warnings.warn(f"torch.compile of {fn.__name__} failed ({type(err).__name__}); running eagerly",
                          RuntimeWarning, stacklevel=2)
            return fn(*args, **kwargs)
        finally:
            Distribution.set_default_validate_args(validate)

    return wrapper
