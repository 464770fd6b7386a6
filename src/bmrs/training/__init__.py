"""The training engine: continuous pruning, fine-tuning, checkpoints, post-training sweeps.

``TrainConfig`` and ``bmrs train``'s options (``training.options``) import no torch; the engine's names load
their modules on first use (PEP 562), so that ``bmrs --help`` builds its options from ``TrainConfig`` fast.

Examples:
    >>> from bmrs.training import TrainConfig, train
    >>> train.__module__
    'bmrs.training.run'
"""

from __future__ import annotations

import importlib

from .config import CRITERION_NAMES, TrainConfig

# public name → the module (in this package) that defines it
_ENGINE = {"train": ".run", "train_epoch": ".loop", "evaluate": ".loop"}

__all__ = ["TrainConfig", "CRITERION_NAMES", "train", "train_epoch", "evaluate"]


def __getattr__(name: str):
    if name not in _ENGINE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_ENGINE[name], __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_ENGINE))
