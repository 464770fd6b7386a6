"""Optional dependencies: import one, or say in one line which extra installs it.

The core of bmrs (attach, train, prune, compact, save) needs torch, numpy, torch-pruning, tqdm and
safetensors only; plots, the paper's statistics, ONNX and the trainer integrations live in extras
(``pip install 'bmrs[plots]'`` …, see ``docs/dependencies.md``).

Examples:
    >>> require("math", "plots").__name__
    'math'
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import ConfigError

__all__ = ["require", "MissingExtraError"]


class MissingExtraError(ConfigError, ImportError):
    """An optional dependency is not installed (a ConfigError, and an ImportError for code that expects one)."""


def require(module: str, extra: str, purpose: str = "") -> ModuleType:
    """``module`` imported, or MissingExtraError naming the extra that installs it.

    Examples:
        plt = require("matplotlib.pyplot", "plots", "drawing curve.png")
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        top = module.split(".")[0]
        why = f" for {purpose}" if purpose else ""
        raise MissingExtraError(f"{top} is needed{why} but not installed: pip install 'bmrs[{extra}]' "
                                f"(or pip install {top})") from None
