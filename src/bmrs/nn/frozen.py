"""``with bmrs.frozen_noise(model):``: evaluation that reuses each noise layer's E[θ]·mask without checking it.

Outside the block a noise layer in evaluation mode caches E[θ]·mask and checks, at every forward, that its
parameters, mask and bounds still hold the values it was computed from (a few microseconds per layer:
:meth:`bmrs.MultiplicativeNoise.expected_theta`).  Inside, the value is checked once on entry and then
reused as is, in the spirit of ``torch.nn.utils.parametrize.cached()``: change a noise layer's parameters,
mask or bounds inside the block and it keeps the old value until the block ends.

Examples:
    >>> import torch, bmrs
    >>> net = bmrs.attach(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))).eval()
    >>> with bmrs.frozen_noise(net):
    ...     y = net(torch.randn(5, 4))
    >>> y.shape
    torch.Size([5, 3])
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn

from .noise import MultiplicativeNoise

__all__ = ["frozen_noise"]


@contextmanager
def frozen_noise(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, the noise layers of ``model`` (or ``model`` itself, a noise layer) reuse their
    E[θ]·mask unchecked (see the module docstring).  Nested blocks are fine: the outermost one ends it."""
    layers = [m for m in model.modules() if isinstance(m, MultiplicativeNoise) and not m._frozen]
    try:  # (an interrupt while freezing still unfreezes what was frozen)
        for noise in layers:
            noise.expected_theta()  # checked (and computed if stale) once, here
            noise._frozen = True
        yield model
    finally:
        for noise in layers:
            noise._frozen = False
