"""bmrs: Bayesian Model Reduction for Structured pruning of PyTorch networks."""

from importlib.metadata import PackageNotFoundError, version as _version

from .distributions import TruncatedLogNormal, TruncatedLogUniform
from .errors import BMRSError, CheckpointError, ConfigError, DataError, ModelError
from .reduction import delta_f, spike_prior, precision_prior
from .nn import MultiplicativeNoise, attach, kl_loss, noise_layers, param_groups
from . import criteria, _compile
from .pruning import PruneReport, prune
from .compaction import compact, count
from .saving import load, save

try:
    __version__ = _version("bmrs")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+local"

__all__ = [
    "__version__",
    "TruncatedLogNormal",
    "TruncatedLogUniform",
    "delta_f",
    "spike_prior",
    "precision_prior",
    "MultiplicativeNoise",
    "attach",
    "kl_loss",
    "noise_layers",
    "param_groups",
    "criteria",
    "prune",
    "PruneReport",
    "compact",
    "count",
    "save",
    "load",
    "BMRSError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "ModelError",
]
