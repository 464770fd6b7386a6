"""bmrs: Bayesian Model Reduction for Structured pruning of PyTorch networks.

The public names load their modules on first use (PEP 562), so that ``bmrs --help`` and
``import bmrs.defaults`` do not import torch.

Examples:
    >>> import bmrs
    >>> bmrs.attach.__module__
    'bmrs.nn.attach'
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("bmrs")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+local"

# public name → the module that defines it
_EXPORTS = {
    "TruncatedLogNormal": "bmrs.distributions", "TruncatedLogUniform": "bmrs.distributions",
    "BMRSError": "bmrs.errors", "CheckpointError": "bmrs.errors", "ConfigError": "bmrs.errors",
    "DataError": "bmrs.errors", "ModelError": "bmrs.errors",
    "delta_f": "bmrs.evidence", "spike_prior": "bmrs.evidence", "precision_prior": "bmrs.evidence",
    "MultiplicativeNoise": "bmrs.nn", "attach": "bmrs.nn", "kl_loss": "bmrs.nn", "noise_layers": "bmrs.nn",
    "param_groups": "bmrs.nn", "detach": "bmrs.nn.attach", "detach_noise": "bmrs.nn.attach",
    "frozen_noise": "bmrs.nn.frozen",
    "PruneReport": "bmrs.pruning", "prune": "bmrs.pruning",
    "compact": "bmrs.compaction", "count": "bmrs.compaction", "export": "bmrs.compaction.export",
    "save": "bmrs.saving", "load": "bmrs.saving",
}
_SUBMODULES = ("criteria", "compaction", "inference", "pruning", "models", "training", "data", "nn", "distributions",
               "evidence", "reduction", "saving", "defaults", "errors", "io", "experiments", "integrations", "extras",
               "_compile", "_kernels")

__all__ = ["__version__", *_EXPORTS, "criteria"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"bmrs.{name}")
    else:
        raise AttributeError(f"module 'bmrs' has no attribute {name!r}")
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBMODULES))
