"""Physically remove the structures that the noise layers' masks prune.

``compact`` folds E[θ]·mask into the weights (:mod:`bmrs.compaction.fold`), then removes masked
channels with torch-pruning's dependency graph, which keeps coupled layers consistent (BatchNorm,
residual adds, concatenations, a Flatten into a Linear).  A channel is removed only when removing it
provably leaves the function unchanged:

  * every layer that reads the channel (a Conv/Linear input column) has zero weights for it, or reads
    a value that is exactly zero there — so a channel coupled through a residual add goes only when
    every branch writing to it is zeroed, i.e. when every noise layer on the coupled channels prunes it;
  * the channel does not reach a normalisation over channels (LayerNorm, GroupNorm: e.g. a transformer
    residual stream), attention, an embedding, an unwrapped parameter, the model's output, a reused
    module, a grouped convolution or an op torch-pruning cannot map channels through.

Channels that stay are already exactly zero where the mask says so.  A layer is never emptied: if every
channel of a group could go, one (all-zero) channel is kept.  The result is checked against the noisy
model on the example inputs.

Example:
    >>> import torch, bmrs
    >>> from bmrs.compaction import compact
    >>> mlp = bmrs.attach(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)))
    >>> bmrs.noise_layers(mlp)[0][1].mask[:5] = 0
    >>> small = compact(mlp, torch.randn(2, 4))
    >>> small[0].out_features, small[2].in_features
    (3, 3)
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from typing import Any

import torch
from torch import nn

from .fast_layers import use_fast_layers
from .fold import (
    OPTYPE, REL_TOL, Folded, IncompleteCompactionWarning, Trace, fold, op_name, reference_mismatch,
    restore_requires_grad,
)

__all__ = ["compact", "CompactionWarning", "IncompleteCompactionWarning"]

# Reaching one of these keeps the channel (torch-pruning would change what they compute).
_BLOCKING_TYPES = frozenset({
    OPTYPE.LN, OPTYPE.GN, OPTYPE.IN, OPTYPE.MHA, OPTYPE.EMBED, OPTYPE.LSTM, OPTYPE.PARAMETER,
    OPTYPE.CUSTOMIZED, OPTYPE.OUTPUT, OPTYPE.EXPAND, OPTYPE.UNBIND,
})
_PASS_TYPES = frozenset({OPTYPE.RESHAPE, OPTYPE.CONCAT, OPTYPE.SPLIT, OPTYPE.SLICE})
# Channel-wise autograd ops with op(0) = 0 (a zero channel stays zero through them).
_ZERO_PRESERVING_OPS = frozenset({
    "Add", "Sub", "Mul", "Neg", "Clone", "Relu", "LeakyRelu", "Gelu", "Tanh", "Elu", "Silu", "Mish",
    "Hardtanh", "Hardswish", "Abs", "Mean", "Sum", "Squeeze", "Unsqueeze", "MaxPool1DWithIndices",
    "MaxPool2DWithIndices", "MaxPool3DWithIndices", "AvgPool2D", "AvgPool3D", "AdaptiveAvgPool2D", "AdaptiveAvgPool3D",
    "AdaptiveMaxPool2D", "AdaptiveMaxPool3D",
})
# Channel-wise ops that map 0 to something else: a channel may pass them, but is not zero after them.
_CHANNELWISE_OPS = frozenset({
    "Sigmoid", "Softplus", "Hardsigmoid", "Exp", "Div", "Pow", "Sqrt", "Rsqrt", "Log", "LogSigmoid",
    "Sin", "Cos", "Erf",
})


def compact(model: nn.Module, example_inputs: Any, fast_layers: bool = True) -> nn.Module:
    """A smaller plain copy of ``model`` computing what ``model`` computes in eval mode.

    ``model`` carries trained noise layers (``bmrs.attach``) whose masks mark pruned structures;
    ``example_inputs`` (a tensor, a tuple of positional arguments or a dict of keyword arguments) are
    used to trace the model.  Returns a new ``nn.Module`` in eval mode without noise layers, masked
    channels physically removed where that is exact; ``model`` is not modified.  With ``fast_layers``
    (the default) the narrow convolutions and tiling max-pools left are swapped for their faster CPU
    inference forms (:func:`bmrs.compaction.use_fast_layers`; same parameters and outputs).  Raises
    :class:`bmrs.errors.ModelError` if the model has no noise layers.

    Example:
        >>> import torch, bmrs
        >>> from bmrs.compaction import compact
        >>> cnn = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        ...                           torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 2))
        >>> cnn = bmrs.attach(cnn)
        >>> bmrs.noise_layers(cnn)[0][1].mask[::2] = 0      # prune every other channel
        >>> x = torch.randn(3, 1, 6, 6)
        >>> small = compact(cnn, x)
        >>> small[0].out_channels, small[4].in_features
        (4, 64)
        >>> bool(torch.allclose(small(x), cnn.eval()(x), atol=1e-5))
        True
    """
    folded = fold(model, example_inputs, caller="compact")
    stayed = {}
    try:
        stayed = _remove_masked_channels(folded)
        mismatch = reference_mismatch(folded)
        problem = None if mismatch <= REL_TOL else f"changed the outputs (relative error {mismatch:.2e})"
    except Exception as err:  # torch-pruning could not handle this graph
        problem = f"failed ({type(err).__name__}: {err})"
    if problem is not None:  # never trade exactness for size: fall back to the folded model
        warnings.warn(f"compact: removing channels {problem}; returning the folded model with every "
                      "channel kept", IncompleteCompactionWarning, stacklevel=2)
        folded = fold(model, example_inputs, caller="compact")
    else:
        _warn_stayed(stayed)
    restore_requires_grad(folded)
    if fast_layers:
        use_fast_layers(folded.model)
    return folded.model.eval()


def _remove_masked_channels(folded: Folded) -> dict[str, tuple[int, str]]:
    """Prune, noise layer by noise layer, every masked channel whose removal is exact.

    Returns {noise layer: (pruned structures that stay, why)} for the layers where some stay."""
    trace = folded.trace
    records = [rec for rec in folded.records if rec.carrier is not None]
    # original channel number of each current position of every gated node (pruning shifts positions)
    kept = {rec.carrier: list(range(rec.theta.numel())) for rec in records}
    for rec in records:
        if rec.carrier.type in _BLOCKING_TYPES:
            continue
        masked = set((rec.theta == 0).nonzero().flatten().tolist())
        positions = [pos for pos, orig in enumerate(kept[rec.carrier]) if orig in masked]
        if positions:
            _prune(trace, rec.carrier, positions, kept)
    stayed = {}
    for rec in records:
        masked = set((rec.theta == 0).nonzero().flatten().tolist())
        left = len(masked & set(kept[rec.carrier]))
        if left:
            why = (f"they are read by a {rec.carrier.type.name}" if rec.carrier.type in _BLOCKING_TYPES else
                   "their channels also reach a residual sum an unpruned layer writes, a normalisation over "
                   "channels or the model's output, or removing them would empty a layer")
            stayed[rec.name or "<root>"] = (left, why)
    return stayed


class CompactionWarning(UserWarning):
    """Pruned structures that compaction kept (computing zeros), with where and why; ``stayed`` holds
    {noise layer: (count, reason)}."""

    def __init__(self, message: str, stayed: dict[str, tuple[int, str]]):
        super().__init__(message)
        self.stayed = stayed


def _warn_stayed(stayed: dict[str, tuple[int, str]]) -> None:
    if not stayed:
        return
    total = sum(count for count, _ in stayed.values())
    by_reason: dict[str, list[str]] = {}
    for name, (count, why) in stayed.items():
        by_reason.setdefault(why, []).append(f"{name} {count}")
    parts = "; ".join(f"{', '.join(places)} ({why})" for why, places in by_reason.items())
    warnings.warn(CompactionWarning(f"compact: {total} pruned structures stay in the model, computing zeros: "
                                    f"{parts}", stayed), stacklevel=3)
