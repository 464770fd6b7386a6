"""The truncated log-uniform: the prior of each noise variable, and BMRS_U's reduced prior."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.distributions import constraints
from torch.distributions.utils import broadcast_all

from ._log_interval import LogIntervalDistribution, check_bounds, check_probability, support_ends

__all__ = ["TruncatedLogUniform"]


def _exact_bounds(low, high):
    """Python numbers that float32 cannot hold exactly (e.g. −23 ln 2) become float64 tensors, so that the bounds
    keep their value (rounded to float32, −23 ln 2 moves by 5e−7 and a ΔF at σ = e⁻⁸ by 0.2 nats)."""
    numbers = [v for v in (low, high) if not isinstance(v, Tensor)]
    if len(numbers) == 2 and any(isinstance(v, float) and float(torch.tensor(v, dtype=torch.float32)) != v
                                 for v in numbers):
        return torch.tensor(float(low), dtype=torch.float64), torch.tensor(float(high), dtype=torch.float64)
    return low, high


class TruncatedLogUniform(LogIntervalDistribution):
    """θ with ln θ ~ Uniform[low, high] (density 1/(θ (high − low)) on [e^low, e^high]).

    Examples:
        >>> import bmrs
        >>> p = bmrs.TruncatedLogUniform(-20.0, 0.0)
        >>> round(float(p.mean), 4), round(float(p.log_mass(-10.0, 0.0).exp()), 2)
        (0.05, 0.5)
        >>> bmrs.TruncatedLogUniform(-23 * math.log(2), 0.0).low.dtype   # (float32 would round the bound)
        torch.float64
    """

    arg_constraints = {"low": constraints.real, "high": constraints.real}
    has_rsample = True

    def __init__(self, low=-20.0, high=0.0, validate_args=None):
        self.low, self.high = broadcast_all(*_exact_bounds(low, high))
        check_bounds(self.low, self.high)
        super().__init__(batch_shape=self.low.shape, validate_args=validate_args)

    @property
    def width(self) -> Tensor:
        """high − low, the width of the support of ln θ."""
        return self.high - self.low

    def _moment(self, k: int) -> Tensor:
        # E[θᵏ] = (e^{k high} − e^{k low}) / (k (high − low)), written with expm1 for narrow supports (and from
        # the upper end, so that a wide one does not overflow).
        high, width = self.high.double(), self.width.double()
        return torch.exp(k * high) * -torch.expm1(-k * width) / (k * width)

    @property
    def mean(self) -> Tensor:
        return self._moment(1).to(self.low.dtype)

    def _var_ratio(self) -> Tensor:
        # Var/E² = E[θ²]/E[θ]² − 1 = (w/2)·coth(w/2) − 1 for w = high − low: its series below w = 0.1, where the
        # difference of moments cancels (13 of 16 digits at w = 1e-6)
        w = self.width.double()
        w2 = w * w
        series = w2 / 12 * (1 - w2 / 60 * (1 - w2 / 42 * (1 - w2 / 40)))
        half = w / 2
        return torch.where(w.abs() < 0.1, series, half / torch.tanh(half.clamp(min=0.05)) - 1)

    @property
    def variance(self) -> Tensor:
        return (self._moment(1).square() * self._var_ratio()).to(self.low.dtype)

    @property
    def snr(self) -> Tensor:
        return self._var_ratio().clamp(min=torch.finfo(torch.float64).tiny).rsqrt().to(self.low.dtype)

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        lo_end, hi_end = support_ends(self.low, self.high)
        value64 = torch.as_tensor(value).double()
        inside = (value64 >= lo_end) & (value64 <= hi_end)
        value = torch.as_tensor(value, dtype=self.low.dtype)
        density = -torch.log(self.width) - torch.log(value)
        return torch.where(inside, density, torch.full_like(density, -math.inf))

    def log_mass(self, lo, hi) -> Tensor:
        """ln P(lo ≤ ln θ ≤ hi) = ln(|[lo, hi] ∩ [low, high]| / (high − low))."""
        lo = torch.maximum(torch.as_tensor(lo, dtype=self.low.dtype), self.low)
        hi = torch.minimum(torch.as_tensor(hi, dtype=self.low.dtype), self.high)
        return torch.log((hi - lo).clamp(min=0.0)) - torch.log(self.width)

    def cdf(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        x = torch.log(torch.as_tensor(value, dtype=self.low.dtype))
        return ((x - self.low) / self.width).clamp(0.0, 1.0)

    def icdf(self, value: Tensor) -> Tensor:
        if self._validate_args:
            check_probability(value)
        return torch.exp(self.low + torch.as_tensor(value, dtype=self.low.dtype) * self.width)

    def rsample(self, sample_shape=torch.Size()) -> Tensor:
        shape = self._extended_shape(sample_shape)
        u = torch.rand(shape, dtype=self.low.dtype, device=self.low.device)
        theta = self.icdf(u)
        return torch.minimum(torch.maximum(theta, self.low.exp()), self.high.exp())

    def entropy(self) -> Tensor:
        """H(θ) = ln(high − low) + E[ln θ]."""
        return torch.log(self.width) + 0.5 * (self.low + self.high)

    def __repr__(self) -> str:
        return f"TruncatedLogUniform(low={self.low.min().item():g}, high={self.high.max().item():g})"
