"""Wall-clock latency: median over repeats after warm-up, and two functions timed side by side.

Examples:
    >>> import torch
    >>> from bmrs.experiments.timing import median_latency, alternating_times
    >>> seconds = median_latency(torch.nn.Linear(8, 8), torch.randn(4, 8), repeats=5)
    >>> seconds > 0
    True
    >>> a_ms, b_ms, ratio = alternating_times(lambda: sum(range(100)), lambda: sum(range(1000)), rounds=5)
    >>> ratio > 1
    True
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

__all__ = ["median_latency", "alternating_times"]


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


def alternating_times(first, second, rounds: int, block: int = 4, warmup: int = 5) -> tuple[float, float, float]:
    """(first ms, second ms, second ÷ first) for two zero-argument callables timed in alternating blocks
    of ``block`` calls, so that the host's drift (±30% over seconds on a shared VM) hits both alike:
    medians over ``rounds`` of the block means and of the per-round ratios."""
    for _ in range(warmup):
        first(), second()
    times: list[list[float]] = [[], []]
    for _ in range(rounds):
        for fn, out in zip((first, second), times):
            start = time.perf_counter()
            for _ in range(block):
                fn()
            out.append((time.perf_counter() - start) / block * 1000)
    ratio = statistics.median(b / a for a, b in zip(*times))
    return statistics.median(times[0]), statistics.median(times[1]), ratio
