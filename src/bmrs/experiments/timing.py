"""Wall-clock latency: median over repeats after warm-up.

Example:
    >>> import torch
    >>> from bmrs.experiments.timing import median_latency
    >>> seconds = median_latency(torch.nn.Linear(8, 8), torch.randn(4, 8), repeats=5)
    >>> seconds > 0
    True
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

__all__ = ["median_latency"]


@torch.no_grad()
def median_latency(model: nn.Module, inputs: torch.Tensor, repeats: int = 30, warmup: int = 5) -> float:
    """Median seconds of one eval forward pass of ``model`` on ``inputs``."""
    model.eval()
    for _ in range(warmup):
        model(inputs)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(inputs)
        times.append(time.perf_counter() - start)
    return statistics.median(times)
