"""Float64 kernels for a normal N(loc, scale²) truncated to [low, high], on the log scale x = ln θ.

These are the formulas behind :class:`bmrs.TruncatedLogNormal`; each works for a posterior
collapsed far outside [low, high] (see ``_stable`` for how the huge quadratic terms are handled).
All functions take broadcastable float64 tensors and are differentiable with finite gradients.

Example:
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

from .. import _kernels
from .._compile import maybe_compiled
from ._stable import (
    LOG_2PI,
    half_sq_gap,
    interval_parts,
    inv_mills,
    inv_mills_excess,
    log1mexp,
    log_erfcx,
    one_minus_t_excess,
    _mid_rest,
    ndtr,
    SQRT2,
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


def _tail_pieces(parts):
    """t, t_far, λ(t), λ(t_far), ρ = r/(1 − r) and ln(1 − r) for the mirrored tail frame."""
    t, t_far, log_r = parts.t, parts.t_far, parts.log_ratio
    log_one_minus_r = log1mexp(log_r)
    rho = torch.exp(log_r - log_one_minus_r)
    return t, t_far, inv_mills(t), inv_mills(t_far), rho, log_one_minus_r


def _mid_pieces(parts, tail):
    """α, β and ln Z in the middle regime, with placeholders where a tail formula applies."""
    alpha = torch.where(tail, -1.0, parts.l)
    beta = torch.where(tail, 1.0, parts.u)
    log_z = torch.where(tail, 0.0, parts.rest)
    return alpha, beta, log_z


def _log_phi(z: Tensor) -> Tensor:
    return -0.5 * z * z - 0.5 * LOG_2PI


def _mid_kl_terms(alpha, beta, log_z):
    """(KL − ln W + ln σ, σ ∂H/∂μ, σ ∂H/∂σ) by the textbook forms, for means inside their interval."""
    a = torch.exp(_log_phi(alpha) - log_z)  # A = φ(α)/Z
    b = torch.exp(_log_phi(beta) - log_z)  # B = φ(β)/Z
    d = alpha * a - beta * b
    a2, b2 = alpha * alpha * a, beta * beta * b
    kl = -0.5 * (LOG_2PI + 1.0) - log_z - 0.5 * d
    h_mu = 0.5 * ((a - b) * (1.0 - d) + a2 - b2)
    h_sigma = 1.0 + 0.5 * (d * (1.0 - d) + alpha * a2 - beta * b2)
    return kl, h_mu, h_sigma


def _tail_kl_terms(t, t_far, lam, lam_far, rho, log_one_minus_r, upper_tail):
    """The same three in the mirrored tail frame, with the one-sided cancellations done analytically
    (ρ = 0 and ln(1 − r) = 0 when the far end is negligible)."""
    kl = -0.5 + torch.log(lam) - 0.5 * t * inv_mills_excess(t) + 0.5 * rho * (t_far * lam_far - t * lam) - log_one_minus_r
    g = one_minus_t_excess(t)
    far_rho = lam_far * rho
    h_mu = 0.5 * (lam * (1.0 + rho) * (g - t * lam * rho) - far_rho * (1.0 + t_far * t_far + t_far * far_rho)
                  + (t + t_far) * lam * far_rho * (1.0 + rho))
    near_w, far_w = t * lam, t_far * lam_far
    delta = rho * (near_w - far_w)
    h_sigma = 1.0 + 0.5 * near_w * g + 0.5 * (delta * (1.0 - 2.0 * near_w - delta)
                                               + rho * (t * t * near_w - t_far * t_far * far_w))
    return kl, torch.where(upper_tail, h_mu, -h_mu), h_sigma


# Beyond this, Φ(far)/Φ(near) < exp(−(far² − near²)/2) < e⁻⁵⁰: the far end changes nothing in float64.
_FAR_NEGLIGIBLE_SQ = 100.0


def kl_to_uniform(loc: Tensor, scale: Tensor, low: Tensor, high: Tensor) -> Tensor:
    """KL(q ‖ U[low, high]) in x = ln θ, i.e. ln(high − low) − H(q), differentiable in all four.

    Middle regime: the textbook form.  Tails: after cancelling −ln Z against βφ(β)/Z,
    KL = ln W − ln σ − ½ + ln λ(t) − t(λ(t) − t)/2 + ρ[t'λ(t') − tλ(t)]/2 − ln(1 − r).
    The gradient is the closed form of :func:`kl_to_uniform_with_grad`, recorded as one autograd
    node: differentiating the stable forms op by op costs ~5x more, and is wrong far in a tail,
    where autograd's erfcx′(z) = 2z·erfcx(z) − 2/√π cancels (at σ = 1e−9 ∂KL/∂σ came out halved).
    """
    return _KLToUniform.apply(loc, scale, low, high)


class _KLToUniform(torch.autograd.Function):
    @staticmethod
    def forward(ctx, loc, scale, low, high):
        kl, d_loc, d_scale = kl_to_uniform_with_grad(loc, scale, low, high)
        ctx.save_for_backward(loc, scale, low, high, d_loc, d_scale)
        return kl

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        loc, scale, low, high, d_loc, d_scale = ctx.saved_tensors
        need = ctx.needs_input_grad
        grads = [grad * d_loc if need[0] else None, grad * d_scale if need[1] else None, None, None]
        if need[2] or need[3]:
            # KL is unchanged by shifting (loc, low, high) together and by scaling all four, so
            # ∂low + ∂high = −∂loc and low·∂low + high·∂high = −loc·∂loc − scale·∂scale.
            d_high = ((low - loc) * d_loc - scale * d_scale) / (high - low)
            grads[2] = grad * (-d_loc - d_high) if need[2] else None
            grads[3] = grad * d_high if need[3] else None
        return tuple(None if g is None else g.sum_to_size(x.shape)
                     for g, x in zip(grads, (loc, scale, low, high)))


def kl_to_fixed_uniform(loc: Tensor, scale: Tensor, low: float, high: float) -> Tensor:
    """:func:`kl_to_uniform` for fixed bounds, in loc's dtype (float64 inside), differentiable in loc and scale.

    On the CPU one fused kernel call (:mod:`bmrs._kernels`) gives the value and gradient; elsewhere
    the reference code does.

    Example:
        >>> import torch
        >>> from bmrs.distributions import _truncnorm as tn
        >>> kl = tn.kl_to_fixed_uniform(torch.zeros(2), torch.full((2,), 0.0067), -20.0, 0.0)
        >>> kl.dtype, round(float(kl[0]), 3)
        (torch.float32, 7.276)
    """
    if loc.dim() == 1 and scale.shape == loc.shape and _kernels.usable_for(loc, scale) is not None:
        return _KLToFixedUniformFused.apply(loc, scale, float(low), float(high))
    bound = dict(dtype=torch.float64, device=loc.device)
    kl = kl_to_uniform(loc.double(), scale.double(), torch.tensor(float(low), **bound),
                       torch.tensor(float(high), **bound))
    return kl.to(loc.dtype)


class _KLToFixedUniformFused(torch.autograd.Function):
    @staticmethod
    def forward(ctx, loc, scale, low, high):
        kl, d_loc, d_scale = _kernels.get().kl_to_uniform_with_grad(loc.detach(), scale.detach(), low, high)
        ctx.save_for_backward(d_loc, d_scale)
        return kl

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        d_loc, d_scale = ctx.saved_tensors
        return grad * d_loc, grad * d_scale, None, None


def kl_to_uniform_with_grad(loc: Tensor, scale: Tensor, low: Tensor, high: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(KL, ∂KL/∂loc, ∂KL/∂scale) of :func:`kl_to_uniform`, the gradient in closed form (no autograd).

    With A = φ(α)/Z, B = φ(β)/Z and D = αA − βB, the entropy H = ln W − KL has
        σ ∂H/∂μ = ½[(A − B)(1 − D) + α²A − β²B],   σ ∂H/∂σ = 1 + ½[D(1 − D) + α³A − β³B].
    In a tail (mirrored frame: near end t, far end t', B = λ(1 + ρ), A = λ'ρ) the one-sided parts
    cancel analytically to G(t) = 1 − t(λ(t) − t) ≈ 2/t², leaving
        σ ∂H/∂μ = ∓½[λ(1 + ρ)(G − tλρ) − λ'ρ(1 + t'² + t'λ'ρ) + (t + t')λλ'ρ(1 + ρ)],
        σ ∂H/∂σ = 1 + ½tλG + ½[δ(1 − 2tλ − δ) + ρ(t³λ − t'³λ')],   δ = ρ(tλ − t'λ'),
    with − for the lower tail (the interval below the mean) and + for the upper one.

    Example:
        >>> import torch
        >>> from bmrs.distributions import _truncnorm as tn
        >>> f = lambda v: torch.tensor(v, dtype=torch.float64)
        >>> kl, d_mu, d_sigma = tn.kl_to_uniform_with_grad(f([0.0]), f([0.0067]), f(-20.0), f(0.0))
        >>> round(float(d_sigma), 2)
        -149.25
    """
    inv_scale = scale.reciprocal()
    l, u = (low - loc) * inv_scale, (high - loc) * inv_scale
    lower, upper = u <= 0, l >= 0
    tail = lower | upper
    near = torch.where(lower, -u, l)  # distances of the ends from the mean, in σ, near end first
    far = torch.where(lower, -l, u)
    # decided eagerly, so that each path is one graph when compiled
    if bool((~tail | ((high - low) * inv_scale * (far + near) > _FAR_NEGLIGIBLE_SQ)).all()):
        return _kl_one_sided(l, u, near, upper, tail, inv_scale, scale, low, high)
    return _kl_general(loc, scale, low, high)


@maybe_compiled
def _kl_one_sided(l, u, near, upper, tail, inv_scale, scale, low, high):
    """The usual case: every tail posterior sees only its near end, so the tail frame needs no
    interval masses (about a quarter of the operations of the general path)."""
    t = torch.where(tail, near, 0.0)
    mid_l, mid_u = torch.where(tail, -1.0, l), torch.where(tail, 1.0, u)
    mid = _mid_kl_terms(mid_l, mid_u, _mid_rest(mid_l, mid_u))
    tails = _tail_kl_terms(t, 0.0, inv_mills(t), 0.0, 0.0, 0.0, upper)
    return _kl_assembled(tail, tails, mid, scale, low, high, inv_scale)


@maybe_compiled
def _kl_general(loc, scale, low, high):
    parts = interval_parts(low, high, loc, scale)
    tail = parts.lower_tail | parts.upper_tail
    mid = _mid_kl_terms(*_mid_pieces(parts, tail))
    tails = _tail_kl_terms(*_tail_pieces(parts), parts.upper_tail)
    return _kl_assembled(tail, tails, mid, scale, low, high, scale.reciprocal())


def _kl_assembled(tail, tails, mid, scale, low, high, inv_scale):
    kl, h_mu, h_sigma = (torch.where(tail, x, y) for x, y in zip(tails, mid))
    return kl + torch.log(high - low) - torch.log(scale), h_mu * -inv_scale, h_sigma * -inv_scale


def mean_log(loc: Tensor, scale: Tensor, low: Tensor, high: Tensor) -> Tensor:
    """E[ln θ] = E[x]; in a tail it is the near end moved inward by σ(λ(t) − t) and a far-end term."""
    parts = interval_parts(low, high, loc, scale)
    tail = parts.lower_tail | parts.upper_tail
    t, _, lam, lam_far, rho, _ = _tail_pieces(parts)
    inward = scale * (inv_mills_excess(t) - rho * (lam_far - lam))
    tail_mean = torch.where(parts.lower_tail, high - inward, low + inward)

    alpha, beta, log_z = _mid_pieces(parts, tail)
    shift = torch.exp(_log_phi(alpha) - log_z) - torch.exp(_log_phi(beta) - log_z)
    return torch.where(tail, tail_mean, loc + scale * shift)


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
