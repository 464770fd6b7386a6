"""Float64 kernels for a normal N(loc, scale²) truncated to [low, high], on the log scale x = ln θ.

These are the formulas behind :class:`bmrs.TruncatedLogNormal`; each works for a posterior
collapsed far outside [low, high] (see ``_stable`` for how the huge quadratic terms are handled).
All functions take broadcastable float64 tensors and are differentiable with finite gradients.
The KL and E[ln θ] are in ``_truncnorm_kl``, the inverse CDF in ``_truncnorm_icdf``; all are importable from here.

Examples:
    >>> import torch
    >>> from bmrs.distributions import _truncnorm as tn
    >>> x = dict(loc=torch.tensor(0.0).double(), scale=torch.tensor(0.0067).double(),
    ...          low=torch.tensor(-20.0).double(), high=torch.tensor(0.0).double())
    >>> round(float(tn.log_moment(**x, k=1).exp()), 4)   # E[θ] at the default initialisation
    0.9947
"""

from __future__ import annotations

import math

import numpy as np

import torch
from torch import Tensor

from ._stable import (
    LOG_2PI,
    half_sq_gap,
    interval_parts,
    inv_mills,
    inv_mills_excess,
    one_minus_t_excess,
)

__all__ = [
    "log_moment",
    "log_var_ratio",
    "kl_to_uniform",
    "kl_to_uniform_with_grad",
    "kl_to_fixed_uniform",
    "mean_log",
    "log_mass",
    "log_prob_x",
    "icdf_x",
]


def _moment_terms(loc, scale, low, high, k: int, parts0=None):
    """For E[θᵏ] = exp(kμ + k²σ²/2) Z(μ + kσ²)/Z(μ): (same_anchor, anchor, excess, rest gap), where
    ln E[θᵏ] = k·anchor + rest gap when both normalisers sit in the same tail, else kμ + excess + rest gap."""
    parts0 = interval_parts(low, high, loc, scale) if parts0 is None else parts0
    var = scale * scale
    loc_k = loc + k * var
    # the shifted ends α − kσ, β − kσ directly: μ + kσ² rounds (by up to 2e-15 at |μ| = 20), which moves the
    # ends by that over σ, and ln E[θ] for μ on a bound with σ ≤ 1e-6 by about 1e-9
    parts_k = interval_parts(low, high, loc_k, scale, standardized=(parts0.l - k * scale, parts0.u - k * scale))
    same = (parts0.lower_tail & parts_k.lower_tail) | (parts0.upper_tail & parts_k.upper_tail)
    # excess = k²σ²/2 − (d_k − d0)(d_k + d0)/(2σ²), d = anchor − mean of each normal: exact as written where
    # the shifted mean μ + kσ² lies inside the interval (it is its own anchor, d_k = 0).  Where it lies
    # outside, d_k ≈ −kσ² can be huge and the k²σ²/2 terms cancel in floating point (ln E[θ] was 2e-5 off
    # at σ = 1e6 with μ inside the interval): there the same quantity as k·e − (e − d0)(e + d0)/(2σ²),
    # e = a_k − μ from the bound a_k.  kμ stays apart, so that ln E[θ²] − 2 ln E[θ] cancels it exactly
    # (below σ ≈ 1e-8 the σ² of the variance is lost against μ otherwise).
    d0 = parts0.anchor - loc
    dk = parts_k.anchor - loc_k
    as_written = 0.5 * k * k * var - (dk - d0) * (dk + d0) / (2.0 * var)
    e = parts_k.anchor - loc
    at_bound = k * e - (e - d0) * (e + d0) / (2.0 * var)
    excess = torch.where(parts_k.lower_tail | parts_k.upper_tail, at_bound, as_written)
    return same, parts0.anchor, excess, parts_k.rest - parts0.rest, parts0


def log_moment(loc: Tensor, scale: Tensor, low: Tensor, high: Tensor, k: int = 1) -> Tensor:
    """ln E[θᵏ].  When both normalisers sit in the same tail the quadratic parts cancel to k·anchor."""
    same, anchor, excess, rest_gap, _ = _moment_terms(loc, scale, low, high, k)
    return torch.where(same, k * anchor, k * loc + excess) + rest_gap


def log_var_ratio(loc: Tensor, scale: Tensor, low: Tensor, high: Tensor) -> Tensor:
    """ln E[θ²] − 2 ln E[θ] = ln(1 + Var/E²), with the σ² and anchor terms cancelled analytically; for
    narrow posteriors (σ ≤ 0.25, the interval ≥ 80σ wide) as σ² times a mean of the tilted variance
    (``_narrow_log_var_ratio``), which the difference of log normalisers loses to rounding near a bound."""
    same1, _, excess1, rest1, parts0 = _moment_terms(loc, scale, low, high, 1)
    same2, _, excess2, rest2, _ = _moment_terms(loc, scale, low, high, 2, parts0)
    quad = torch.where(same1 & same2, 0.0, excess2 - 2.0 * excess1)  # (2μ − 2μ: cancelled)
    general = quad + (rest2 - 2.0 * rest1)
    narrow = (scale <= _NARROW_SCALE) & (high - low >= _ONE_SIDED_WIDTH * scale)
    if not bool(narrow.any()):
        return general
    return torch.where(narrow, _narrow_log_var_ratio(loc, torch.where(narrow, scale, 1.0), low, high), general)


# log_var_ratio's narrow regime: σ ≤ _NARROW_SCALE and an interval ≥ _ONE_SIDED_WIDTH σ wide, so that at most
# one end is within 40σ of the mean (the other moves the normaliser by less than e^-800)
_NARROW_SCALE = 0.25
_ONE_SIDED_WIDTH = 80.0
# Gauss–Legendre on [0, 1] (8 nodes): ∫₀¹ (1 − v) f(v) dv ≈ Σ w_i (1 − v_i) f(v_i), exact for degree ≤ 14
_GL_X, _GL_W = np.polynomial.legendre.leggauss(8)  # on [−1, 1]
_GL_NODES, _GL_WEIGHTS = ((_GL_X + 1.0) / 2.0).tolist(), (_GL_W / 2.0).tolist()


def upper_tail_variance(x: Tensor) -> Tensor:
    """Var(Y | Y ≥ x) for a standard normal Y and any real x: 1 − λ(λ − x) with λ = φ(x)/(1 − Φ(x)) below 0,
    and E[(Y − x)²] − (λ − x)² from their cancellation-free forms above (≈ 1/x² for large x)."""
    above = x.clamp(min=0.0)
    excess = inv_mills_excess(above)
    below = x.clamp(max=0.0)
    lam = inv_mills(below)  # (→ 0 as x → −∞: erfcx overflows to inf)
    return torch.where(x >= 0.0, one_minus_t_excess(above) - excess * excess, 1.0 - lam * (lam - below))


def _narrow_log_var_ratio(loc: Tensor, scale: Tensor, low: Tensor, high: Tensor) -> Tensor:
    """ln E[θ²] − 2 ln E[θ] = K(2σ) − 2K(σ) for K the cumulant generating function of the standardised
    truncated normal Y, = σ² ∫₋₁¹ (1 − |v|) K″(σ(1 + v)) dv exactly, where K″(s) is the variance of a standard
    normal truncated to the interval shifted by −s: with one end in reach, ``upper_tail_variance`` at the
    near end (mirrored for the upper one).  K″ is smooth on the scale of 1 ≫ 2σ, so 8 nodes a side are exact
    to rounding, and no difference of large terms is formed."""
    alpha, beta = (low - loc) / scale, (high - loc) / scale
    lower_near = alpha.abs() <= beta.abs()
    start, sign = torch.where(lower_near, alpha, -beta), torch.where(lower_near, -1.0, 1.0)
    total = torch.zeros_like(start)
    for v, w in zip(_GL_NODES, _GL_WEIGHTS):  # v ∈ (0, 1): the kernel's two halves, s = σ(1 ± v)
        for s in (1.0 - v, 1.0 + v):
            total = total + w * (1.0 - v) * upper_tail_variance(start + sign * (scale * s))
    return scale * scale * total


def log_mass(loc: Tensor, scale: Tensor, low: Tensor, high: Tensor, lo: Tensor, hi: Tensor,
             fast: bool = False) -> Tensor:
    """ln q(lo ≤ x ≤ hi); the interval is clipped to [low, high] and an empty one gives −inf.

    ``fast``: evaluate each element's regime only (no gradients needed; see ``interval_parts``).
    """
    lo = torch.maximum(torch.as_tensor(lo, dtype=loc.dtype), low)
    hi = torch.minimum(torch.as_tensor(hi, dtype=loc.dtype), high)
    lo, hi, loc, scale, low, high = torch.broadcast_tensors(lo, hi, loc, scale, low, high)
    empty = hi <= lo
    hi_safe = torch.where(empty, high, hi)
    lo_safe = torch.where(empty, low, lo)
    whole = interval_parts(low, high, loc, scale, fast=fast)
    sub = interval_parts(lo_safe, hi_safe, loc, scale, fast=fast)
    value = half_sq_gap(sub.anchor, whole.anchor, loc, scale) + sub.rest - whole.rest
    return torch.where(empty, -math.inf, value)


def log_prob_x(loc: Tensor, scale: Tensor, low: Tensor, high: Tensor, x: Tensor) -> Tensor:
    """ln q(x), the density of x = ln θ; −inf outside [low, high]."""
    x, loc, scale, low, high = torch.broadcast_tensors(x, loc, scale, low, high)
    outside = (x < low) | (x > high)
    x_safe = torch.where(outside, low, x)
    parts = interval_parts(low, high, loc, scale)
    value = half_sq_gap(x_safe, parts.anchor, loc, scale) - torch.log(scale) - 0.5 * LOG_2PI - parts.rest
    return torch.where(outside, -math.inf, value)


# ---------------------------------------------------------------------------------------------
# Inverse CDF with implicit reparameterisation gradients.


# the KL, E[ln θ] and the inverse CDF have modules of their own (at the end: they import nothing from here)
from ._truncnorm_kl import (  # noqa: E402
    kl_to_fixed_uniform, kl_to_uniform, kl_to_uniform_with_grad, mean_log,
)
from ._truncnorm_icdf import icdf_x  # noqa: E402
