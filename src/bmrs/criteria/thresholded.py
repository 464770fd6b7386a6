"""Baselines with a threshold rule: SNR and E[θ]."""

from __future__ import annotations

import math

from ..errors import ConfigError
from .base import Criterion

__all__ = ["SNR", "ExpectedValue"]


class _Thresholded(Criterion):
    default_threshold = 0.0

    def __init__(self, threshold: float | None = None):
        threshold = self.default_threshold if threshold is None else threshold
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
            raise ConfigError(f"{self.name}: threshold must be a finite number, got {threshold!r}")
        self.threshold = float(threshold)

    def rule(self, scores):
        return scores < self.threshold

    def __repr__(self):
        return f"{type(self).__name__}(threshold={self.threshold:g})"


class SNR(_Thresholded):
    """Signal-to-noise ratio E[θ]/√Var[θ]; prune below ``threshold`` (1.0)."""

    name = "snr"
    default_threshold = 1.0

    def layer_scores(self, name, noise, model):
        return noise.posterior().snr


class ExpectedValue(_Thresholded):
    """E[θ]; prune below ``threshold`` (0.1)."""

    name = "ev"
    default_threshold = 0.1

    def layer_scores(self, name, noise, model):
        return noise.posterior().mean
