"""The old name of :mod:`bmrs.nn.fused_draw` (the fused θ draw), kept for imports that still use it.

Examples:
    >>> from bmrs.nn import fused_draw, fused_layers
    >>> fused_layers.sample_layers is fused_draw.sample_layers
    True
"""

from .fused_draw import kl_layers, sample_layers

__all__ = ["sample_layers", "kl_layers"]
