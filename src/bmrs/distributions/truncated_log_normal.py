"""The truncated log-normal: the variational posterior of one multiplicative noise variable θ."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributions import constraints
from torch.distributions.utils import broadcast_all, lazy_property

from . import _truncnorm as tn
from ._log_interval import LogIntervalDistribution, check_bounds, check_probability, support_ends

__all__ = ["TruncatedLogNormal"]


class TruncatedLogNormal(LogIntervalDistribution):
    """θ with ln θ ~ Normal(loc, scale²) truncated to [low, high].

    Every quantity is computed in float64 with forms that stay exact for a posterior collapsed far
    outside [low, high], and returned in the dtype of ``loc``.

    Examples:
        >>> import torch, bmrs
        >>> q = bmrs.TruncatedLogNormal(torch.tensor([0.0, -30.0]), torch.tensor([0.0067, 0.1]))
        >>> q.mean                                     # E[θ]; the second has collapsed onto e^-20
        tensor([9.9468e-01, 2.0632e-09])
        >>> theta = q.rsample((4,))                     # reparameterised, shape (4, 2)
        >>> bool(((theta >= q.low.exp()) & (theta <= q.high.exp())).all())
        True
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    has_rsample = True
    expanded = ("loc", "scale", "low", "high")

    def __init__(self, loc, scale, low=-20.0, high=0.0, validate_args=None):
        self.loc, self.scale, self.low, self.high = broadcast_all(loc, scale, low, high)
        check_bounds(self.low, self.high)
        super().__init__(batch_shape=self.loc.shape, validate_args=validate_args)

    # -- float64 views of the parameters ------------------------------------------------------
    @lazy_property
    def _x64(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.loc.double(), self.scale.double(), self.low.double(), self.high.double()

    def _out(self, value: Tensor) -> Tensor:
        dtype = self.loc.dtype if self.loc.dtype.is_floating_point else torch.get_default_dtype()
        return value.to(dtype)

    # -- moments ------------------------------------------------------------------------------
    @lazy_property
    def _log_mean64(self) -> Tensor:
        return tn.log_moment(*self._x64, k=1)

    @lazy_property
    def _log_var_ratio64(self) -> Tensor:
        """ln(Var/E²), floored so that SNR and variance stay finite in the output dtype."""
        ratio = torch.expm1(tn.log_var_ratio(*self._x64))
        # SNR = (Var/E²)^(-1/2) stays below half the output dtype's largest value (float32: Var/E² down to
        # 3.5e-77, where the dtype's own tiny, 1.2e-38, capped a true SNR of 2e19 at 9.2e18)
        floor = max(torch.finfo(torch.float64).tiny, (2.0 / torch.finfo(self._out(ratio).dtype).max) ** 2)
        return torch.log(ratio.clamp(min=floor))

    @property
    def log_mean(self) -> Tensor:
        """ln E[θ]."""
        return self._out(self._log_mean64)

    @property
    def mean(self) -> Tensor:
        """E[θ] = exp(μ + σ²/2)(Φ(β − σ) − Φ(α − σ))/Z."""
        return self._out(self._log_mean64.exp())

    @property
    def variance(self) -> Tensor:
        """Var[θ] = E[θ]² · expm1(ln E[θ²] − 2 ln E[θ])."""
        return self._out(torch.exp(2.0 * self._log_mean64 + self._log_var_ratio64))

    @property
    def snr(self) -> Tensor:
        """Signal-to-noise ratio E[θ]/√Var[θ]; → 1/σ as σ → 0 with μ inside the bounds."""
        return self._out(torch.exp(-0.5 * self._log_var_ratio64))

    @property
    def mean_log(self) -> Tensor:
        """E[ln θ]."""
        return self._out(tn.mean_log(*self._x64))

    @property
    def mode(self) -> Tensor:
        loc, scale, low, high = self._x64
        # The density of θ is that of x times e^(−x): its mode in x is at μ − σ², clipped.
        return self._out(torch.exp(torch.clamp(loc - scale * scale, min=low, max=high)))

    # -- densities and probabilities ---------------------------------------------------------
    def log_prob(self, value: Tensor) -> Tensor:
        """Log density of θ (not of ln θ); −inf outside [e^low, e^high]."""
        if self._validate_args:
            self._validate_sample(value)
        value = torch.as_tensor(value).double()
        loc, scale, low, high = self._x64
        # Decide membership on θ (so e^low itself is inside, as either dtype rounds it), then evaluate at
        # ln θ clipped.
        lo_end, hi_end = support_ends(self.low, self.high)
        inside = (value >= lo_end) & (value <= hi_end)
        x = torch.minimum(torch.maximum(torch.log(value), low), high)
        density = tn.log_prob_x(loc, scale, low, high, x) - x
        return self._out(torch.where(inside, density, torch.full_like(density, -torch.inf)))

    def log_mass(self, lo, hi) -> Tensor:
        """ln P(lo ≤ ln θ ≤ hi), exact even when it is −1e18; −inf for an empty interval."""
        loc, scale, low, high = self._x64
        lo = torch.as_tensor(lo, dtype=torch.float64)
        hi = torch.as_tensor(hi, dtype=torch.float64)
        return self._out(tn.log_mass(loc, scale, low, high, lo, hi))

    def cdf(self, value: Tensor) -> Tensor:
        """P(θ ≤ value)."""
        if self._validate_args:
            self._validate_sample(value)
        value = torch.as_tensor(value).double()
        loc, scale, low, high = self._x64
        x = torch.log(value)
        return self._out(tn.log_mass(loc, scale, low, high, low, x).exp())

    def icdf(self, value: Tensor) -> Tensor:
        """θ with P(θ' ≤ θ) = value, differentiable in loc and scale."""
        if self._validate_args:
            check_probability(value)
        u = torch.as_tensor(value).double()
        theta = self._out(tn.icdf_x(*self._x64, u).exp())
        # the support's ends as this dtype computes them (float32 e^low may differ from rounded float64)
        return torch.minimum(torch.maximum(theta, self._out(self.low).exp()), self._out(self.high).exp())

    # -- sampling -----------------------------------------------------------------------------
    def rsample(self, sample_shape=torch.Size()) -> Tensor:
        """Reparameterised samples, always inside [e^low, e^high] (inverse-CDF, stable in the tails)."""
        shape = self._extended_shape(sample_shape)
        u = torch.rand(shape, dtype=torch.float64, device=self.loc.device)
        return self.icdf(u)

    def sample(self, sample_shape=torch.Size()) -> Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape)

    # -- information --------------------------------------------------------------------------
    def kl_to_uniform64(self) -> Tensor:
        """KL(q ‖ log-uniform on this distribution's own [low, high]), float64."""
        return tn.kl_to_uniform(*self._x64)

    def entropy(self) -> Tensor:
        """Differential entropy of θ: H(ln θ) + E[ln θ], with H(ln θ) = ln(high − low) − KL."""
        loc, scale, low, high = self._x64
        h_x = torch.log(high - low) - self.kl_to_uniform64()
        return self._out(h_x + tn.mean_log(loc, scale, low, high))

    def __repr__(self) -> str:
        return (
            f"TruncatedLogNormal(batch_shape={tuple(self.batch_shape)}, "
            f"low={self.low.min().item():g}, high={self.high.max().item():g})"
        )

