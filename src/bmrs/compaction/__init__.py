"""Physical compaction: fold trained noise into the weights, remove pruned structures, count the savings.

Examples:
    >>> import torch, bmrs
    >>> from bmrs.compaction import compact, compression_report
    >>> mlp = bmrs.attach(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)))
    >>> bmrs.noise_layers(mlp)[0][1].mask[:6] = 0
    >>> x = torch.randn(2, 4)
    >>> small = compact(mlp, x)
    >>> compression_report(mlp, small, x)["params_after"]     # 4·2 + 2 + 2·3 + 3
    19
"""

from .compact import CompactionWarning, IncompleteCompactionWarning, compact
from .count import compression_report, count
from .export import export
from .fold import fold_noise
from .planning import CompactionPlan, apply, plan
from .shrink import restore_shrunk, shrink
from ..inference import AlignedLinear, FastTanh, NarrowConv2d, TiledMaxPool2d, use_fast_layers  # (their old home)

__all__ = ["compact", "plan", "apply", "CompactionPlan", "CompactionWarning", "IncompleteCompactionWarning", "count", "export", "compression_report", "fold_noise", "shrink", "restore_shrunk", "use_fast_layers",
           "NarrowConv2d", "TiledMaxPool2d", "AlignedLinear", "FastTanh"]
