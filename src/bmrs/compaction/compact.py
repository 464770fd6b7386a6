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
model on the example inputs.  What is removed is recorded as a plan (:func:`bmrs.compaction.plan`);
which channels can go is worked out in :mod:`bmrs.compaction.removal`.

Examples:
    >>> import torch, bmrs
    >>> from bmrs.compaction import compact
    >>> mlp = bmrs.attach(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)))
    >>> bmrs.noise_layers(mlp)[0][1].mask[:5] = 0
    >>> small = compact(mlp, torch.randn(2, 4))
    >>> small[0].out_features, small[2].in_features
    (3, 3)
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..inference import optimize
from .fold import IncompleteCompactionWarning
from .planning import CompactionWarning, announce, build

__all__ = ["compact", "CompactionWarning", "IncompleteCompactionWarning"]


def compact(model: nn.Module, example_inputs: Any, fast_layers: bool = False) -> nn.Module:
    """A smaller plain copy of ``model`` computing what ``model`` computes in eval mode.

    ``model`` carries trained noise layers (``bmrs.attach``) whose masks mark pruned structures;
    ``example_inputs`` (a tensor, a tuple of positional arguments or a dict of keyword arguments) are
    used to trace the model.  Returns a new ``nn.Module`` in eval mode without noise layers, masked
    channels physically removed where that is exact, built from plain torch layers; ``model`` is not
    modified.  ``fast_layers=True`` is the same as calling :func:`bmrs.inference.optimize` on the result
    (faster CPU inference forms of the narrow layers left; same parameters and outputs).  The same as
    ``apply(plan(model, example_inputs), model)`` (:mod:`bmrs.compaction.planning`), without tracing
    twice.  Raises :class:`bmrs.errors.ModelError` if the model has no noise layers or torch-pruning
    fails on it (naming the noise layer; ``fold_noise`` folds without removing channels).  If removing
    channels would change the outputs, warns (IncompleteCompactionWarning) and keeps every channel.

    Examples:
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
    the_plan, small = build(model, example_inputs, "compact")  # the plan, and its working copy compacted by it
    announce(the_plan, stacklevel=3)
    return optimize(small) if fast_layers else small
