"""Fast CPU inference: an explicit step after compaction that swaps in faster forms of narrow layers.

``bmrs.compact`` builds the smaller network from plain torch layers; :func:`optimize` then replaces, in
place, the layers that have a faster CPU inference form (:mod:`bmrs.inference.layers`: narrow
convolutions, tiling max-pools, ragged-width linear layers, tanh).  They are subclasses of the torch layers
they replace, with the same parameters, state dict and outputs; under autograd, on other devices, under
tracing and ONNX export they run the torch layer's code.  ``compact(..., fast_layers=True)`` and
``bmrs.load(..., fast_layers=True)`` are the same as calling :func:`optimize` on what they return.

Examples:
    >>> import torch, bmrs
    >>> net = bmrs.attach(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
    ...                                       torch.nn.Flatten(), torch.nn.Linear(16, 2)))
    >>> bmrs.noise_layers(net)[0][1].mask[1:] = 0     # keep one filter
    >>> small = bmrs.compact(net, torch.randn(1, 1, 6, 6))
    >>> type(small[0]).__name__
    'Conv2d'
    >>> fast = optimize(small)
    >>> fast is small, type(small[0]).__name__, type(small[2]).__name__
    (True, 'NarrowConv2d', 'TiledMaxPool2d')
"""

from __future__ import annotations

from torch import nn

from ..errors import ConfigError, ModelError
from ..nn import noise_layers
from .layers import (
    MAX_DIRECT_CHANNEL_PRODUCT, AlignedLinear, FastTanh, NarrowConv2d, TiledMaxPool2d, use_fast_layers,
)

__all__ = ["optimize", "NarrowConv2d", "TiledMaxPool2d", "AlignedLinear", "FastTanh", "use_fast_layers"]


def optimize(model: nn.Module, max_channel_product: int = MAX_DIRECT_CHANNEL_PRODUCT) -> nn.Module:
    """Swap, in place, the layers of ``model`` that have a faster CPU inference form; returns ``model``.

    ``max_channel_product``: the largest ``in_channels × out_channels`` of a ``Conv2d`` run by the direct
    convolution (see :func:`bmrs.inference.layers.use_fast_layers`).  Raises :class:`bmrs.errors.ModelError`
    for a model that is not an ``nn.Module`` or still has noise layers (compact it first), and
    :class:`bmrs.errors.ConfigError` for a negative ``max_channel_product``.

    Examples:
        >>> import torch
        >>> net = optimize(torch.nn.Sequential(torch.nn.Linear(64, 10), torch.nn.Tanh()))
        >>> [type(m).__name__ for m in net]
        ['AlignedLinear', 'FastTanh']
    """
    if not isinstance(model, nn.Module):
        raise ModelError(f"optimize: expected an nn.Module, got {type(model).__name__}")
    if isinstance(max_channel_product, bool) or not isinstance(max_channel_product, int) or max_channel_product < 0:
        raise ConfigError(f"optimize: max_channel_product must be an integer >= 0, got {max_channel_product!r}")
    if noise_layers(model):
        raise ModelError("optimize: the model still has noise layers; compact it first (bmrs.compact)")
    use_fast_layers(model, max_channel_product)
    return model
