"""Float64 inverse CDF of the truncated normal on x = ln θ, with implicit reparameterisation gradients,
deep in either tail too (see :mod:`bmrs.distributions._truncnorm`).

Examples:
    >>> import torch
    >>> t = lambda v: torch.tensor(v, dtype=torch.float64)
    >>> x = icdf_x(t(-10.0), t(1.0), t(-20.0), t(0.0), t(0.5))
    >>> round(float(x), 6)
    -10.0
"""

from __future__ import annotations


import torch
from torch import Tensor

from .._compile import maybe_compiled
from ._stable import (
    interval_parts,
    inv_mills,
    log_erfcx,
    ndtr,
    SQRT2,
)

__all__ = ["icdf_x"]

_DEEP = 30.0  # beyond this many σ the normal CDF of the near end is no longer safely representable
_NEWTON_STEPS = 8


def _deep_tail_offset(t: Tensor, gap: Tensor, log_r: Tensor, u: Tensor) -> Tensor:
    """Solve ln Φ(−t − y) − ln Φ(−t) = ln(u + r(1 − u)) for y ∈ [0, gap] (mirrored lower tail).

    Newton from the quadratic-only guess, which lies on the far side of the root; the target is
    concave and decreasing, so the iterates fall monotonically onto the root.
    """
    w = torch.log(u + torch.exp(log_r) * (1.0 - u))
    y = -2.0 * w / (t + torch.sqrt(t * t - 2.0 * w))
    y = torch.where(torch.isfinite(y), y, gap).clamp(min=0.0)
    y = torch.minimum(y, gap)
    base = log_erfcx(t / SQRT2)
    for _ in range(_NEWTON_STEPS):
        s = t + y
        g = -0.5 * y * (y + 2.0 * t) + log_erfcx(s / SQRT2) - base - w
        y = torch.minimum((y + g / inv_mills(s)).clamp(min=0.0), gap)
    return y


def _gradient_factors(alpha, beta, z, alpha_gap, beta_gap, u):
    """∂x/∂μ and ∂x/∂σ at x = μ + σz from A_α = (1 − u)φ(α)/φ(z) and A_β = uφ(β)/φ(z).

    Exponents below −700 only round a vanishing factor up to 1e−304, and keep exp off its slow
    underflow path (5x slower for results that are 0 or denormal).
    """
    a_alpha = (1.0 - u) * torch.exp((-0.5 * alpha_gap * (alpha + z)).clamp(min=-700.0))
    a_beta = u * torch.exp((-0.5 * beta_gap * (beta + z)).clamp(min=-700.0))
    return 1.0 - a_alpha - a_beta, z - alpha * a_alpha - beta * a_beta


@maybe_compiled
def _sample_chain(alpha, beta, cdf_alpha, cdf_gap, sf_beta, sf_gap, mu, sigma, low, high, u):
    """The per-sample work, elementwise only: z with Φ(z) = (1 − u)Φ(α) + uΦ(β), x, ∂x/∂μ, ∂x/∂σ.

    The smaller of the two tail probabilities is inverted (one ndtri call: it dominates the cost),
    each formed as a sum of non-negative terms.
    """
    p_low = cdf_alpha + u * cdf_gap
    p_high = sf_beta + (1.0 - u) * sf_gap
    below = p_low < 0.5
    v = torch.special.ndtri(torch.where(below, p_low, p_high))
    z = torch.minimum(torch.maximum(torch.where(below, v, -v), alpha), beta)
    x = torch.minimum(torch.maximum(mu + sigma * z, low), high)
    d_loc, d_scale = _gradient_factors(alpha, beta, z, alpha - z, beta - z, u)
    return z, x, d_loc, d_scale


def _deep_tail_icdf(z, alpha_gap, beta_gap, x, alpha, beta, u, parts, gap, sigma, low, high):
    """Replace the samples of structures more than 30σ into a tail by a Newton solve from the near end.

    There Φ of the near end underflows, and μ + σz would lose every digit of the distance y from
    the end, so x is formed as the end ∓ σy directly.
    """
    deep_low = parts.lower_tail & (parts.t > _DEEP)
    deep_high = parts.upper_tail & (parts.t > _DEEP)
    deep = deep_low | deep_high
    t = torch.where(deep, parts.t, 1.0)
    log_r = torch.where(deep, parts.log_ratio, -1.0)
    u_frame = torch.where(deep_high, 1.0 - u, u)  # the mirrored frame runs u the other way
    y = _deep_tail_offset(t, gap, log_r, u_frame)
    z = torch.where(deep_low, beta - y, torch.where(deep_high, alpha + y, z))
    alpha_gap = torch.where(deep_low, y - gap, torch.where(deep_high, -y, alpha_gap))
    beta_gap = torch.where(deep_low, y, torch.where(deep_high, gap - y, beta_gap))
    x_deep = torch.where(deep_low, high - sigma * y, low + sigma * y)
    return z, alpha_gap, beta_gap, torch.where(deep, x_deep, x)


def icdf_x(loc: Tensor, scale: Tensor, low: Tensor, high: Tensor, u: Tensor) -> Tensor:
    """x = F⁻¹(u) in float64, always inside [low, high], differentiable in loc and scale.

    The value is found without autograd (including a Newton solve in the deep tails); gradients
    come from the implicit function theorem: with A_α = (1 − u)φ(α)/φ(z), A_β = uφ(β)/φ(z),
    ∂x/∂μ = 1 − A_α − A_β and ∂x/∂σ = z − αA_α − βA_β.
    """
    # Per-structure pieces are computed once at the parameters' shape; only the last steps
    # broadcast against u (e.g. one u per example and structure).
    loc_b, scale_b, low_b, high_b = torch.broadcast_tensors(loc, scale, low, high)
    with torch.no_grad():
        mu, sigma, a, b = loc_b.detach(), scale_b.detach(), low_b.detach(), high_b.detach()
        alpha, beta = (a - mu) / sigma, (b - mu) / sigma
        cdf_alpha, cdf_beta, sf_alpha, sf_beta = ndtr(alpha), ndtr(beta), ndtr(-alpha), ndtr(-beta)
        z, x, d_loc, d_scale = _sample_chain(alpha, beta, cdf_alpha, cdf_beta - cdf_alpha, sf_beta,
                                             sf_alpha - sf_beta, mu, sigma, a, b, u)
        if bool(((beta < -_DEEP) | (alpha > _DEEP)).any()):
            parts = interval_parts(a, b, mu, sigma)
            z, alpha_gap, beta_gap, x = _deep_tail_icdf(z, alpha - z, beta - z, x, alpha, beta, u, parts,
                                                        (b - a) / sigma, sigma, a, b)
            x = torch.minimum(torch.maximum(x, a), b)
            d_loc, d_scale = _gradient_factors(alpha, beta, z, alpha_gap, beta_gap, u)
    if not (loc_b.requires_grad or scale_b.requires_grad):
        return x
    return x + d_loc * (loc_b - mu) + d_scale * (scale_b - sigma)
