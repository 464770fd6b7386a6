"""Numerically stable pieces shared by the truncated log-normal and the model-reduction formulas.

The central object is the log probability mass of a normal N(loc, scale²) on an interval [lo, hi],
L = ln(Φ(u) − Φ(l)) with l = (lo − loc)/scale and u = (hi − loc)/scale.  When the whole interval lies
in one tail (u ≤ 0 or l ≥ 0) this is of order −u²/2, which for a collapsed posterior reaches −1e18.
Differences of such numbers are meaningless in floating point, so L is kept in two parts,

    L = −(anchor − loc)² / (2 scale²) + rest,

where ``anchor`` is the interval end nearest the mean (or the mean itself when it lies inside) and
``rest`` is of order ln|u| at most.  Formulas that combine several masses subtract the quadratic
parts analytically, as products of exact differences, and only then add the moderate rests.
Everything here works in float64 and is written so that gradients stay finite in every branch.

Examples:
    >>> import torch
    >>> from bmrs.distributions._stable import interval_parts
    >>> loc, scale = torch.tensor([5.0]).double(), torch.tensor([1e-9]).double()
    >>> parts = interval_parts(torch.tensor(-20.0).double(), torch.tensor(0.0).double(), loc, scale)
    >>> float(parts.anchor), bool(parts.lower_tail)
    (0.0, True)
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from .._kernels.constants import FAR_NEGLIGIBLE, H_SERIES, SERIES_FROM

__all__ = [
    "LOG_2PI",
    "ndtr",
    "log1mexp",
    "log_erfcx",
    "inv_mills",
    "inv_mills_excess",
    "one_minus_t_excess",
    "half_sq_gap",
    "IntervalParts",
    "interval_parts",
]

SQRT2 = math.sqrt(2.0)
INV_SQRT2 = 1.0 / SQRT2  # multiplying is ~4x cheaper than dividing in float64
LOG_2PI = math.log(2.0 * math.pi)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
LN2 = math.log(2.0)

# Beyond this many standard deviations the inverse Mills ratio excess λ(t) − t is taken from its
# asymptotic series; below it the direct difference loses at most ~1e-13 absolutely.
_SERIES_FROM = SERIES_FROM
# Coefficients of h(t) = t(λ(t) − t) = Σ c_k t^(−2k), from inverting Laplace's series for Q/φ.
_H_SERIES = H_SERIES


def ndtr(x: Tensor) -> Tensor:
    """Φ(x) = erfc(−x/√2)/2, accurate to the last bit in the lower tail.

    ``torch.special.ndtr`` (2.13, CPU, float64) is 2% off at x = −8 and returns 0 below x ≈ −9,
    although Φ(−37) ≈ 6e−300 is representable; erfc keeps full relative precision there.
    """
    return 0.5 * torch.special.erfc(x * -INV_SQRT2)


def log1mexp(x: Tensor) -> Tensor:
    """ln(1 − eˣ) for x ≤ 0, accurate near 0 and for very negative x (Mächler's switch at −ln 2)."""
    near_zero = x > -LN2
    x_near = torch.where(near_zero, x, -1.0)
    x_far = torch.where(near_zero, -1.0, x)
    return torch.where(near_zero, torch.log(-torch.expm1(x_near)), torch.log1p(-torch.exp(x_far)))


def log_erfcx(z: Tensor) -> Tensor:
    """ln erfcx(z) = ln(erfc(z)) + z² for z ≥ 0 (bounded by 0 there, ≈ −ln(z√π) for large z).

    Its derivative is taken as −√2(λ(√2 z) − √2 z), never as autograd's own erfcx′(z) = 2z·erfcx(z) − 2/√π,
    which subtracts two numbers that agree to 1/(2z²): at z = 1e3 it keeps 10 digits, at z = 1e7 none, and
    E[θ]'s gradient for a collapsed posterior came out 1e10 times too large.
    """
    if z.requires_grad and torch.is_grad_enabled():
        return KnownDerivatives.apply(_log_erfcx_with_derivative, z)
    return torch.log(torch.special.erfcx(z))


def _log_erfcx_with_derivative(z: Tensor) -> tuple[Tensor, Tensor]:
    return torch.log(torch.special.erfcx(z)), -SQRT2 * inv_mills_excess(z * SQRT2)


def inv_mills(t: Tensor) -> Tensor:
    """λ(t) = φ(t) / (1 − Φ(t)) for t ≥ 0; λ(0) = √(2/π), λ(t) ≈ t + 1/t for large t.

    Differentiable with λ′(t) = λ(t)(λ(t) − t), the excess taken without cancellation.
    """
    if t.requires_grad and torch.is_grad_enabled():
        return KnownDerivatives.apply(_inv_mills_with_derivative, t)
    return _inv_mills_value(t)


def _inv_mills_value(t: Tensor) -> Tensor:
    return SQRT_2_OVER_PI / torch.special.erfcx(t * INV_SQRT2)


def _inv_mills_with_derivative(t: Tensor) -> tuple[Tensor, Tensor]:
    lam = _inv_mills_value(t)
    return lam, lam * inv_mills_excess(t)


class KnownDerivatives(torch.autograd.Function):
    """``KnownDerivatives.apply(compute, *inputs)``: the value ``compute(*inputs)[0]``, computed without
    autograd, whose elementwise derivatives with respect to ``inputs`` are the rest of what ``compute``
    returns: a stable form (or a fused kernel's) where autograd's own chain rule would cancel.

    Examples:
        >>> t = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> KnownDerivatives.apply(lambda x: (x * x, 2 * x), t).sum().backward()
        >>> t.grad
        tensor([2., 4.])
    """

    @staticmethod
    def forward(ctx, compute, *inputs):
        value, *derivatives = compute(*inputs)
        ctx.save_for_backward(*derivatives)
        return value

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        return (None, *(grad * derivative for derivative in ctx.saved_tensors))


def _direct_or_series(t: Tensor, direct, coefs: tuple[float, ...], big_factor) -> Tensor:
    """direct(t) up to ``_SERIES_FROM``, beyond it big_factor(t) · Σ coefs[k] t^(−2k) (Horner in 1/t²).
    Each branch sees a harmless placeholder where the other applies, so gradients stay finite."""
    big = t > _SERIES_FROM
    t_small = torch.where(big, 0.0, t)
    t_big = torch.where(big, t, 2.0 * _SERIES_FROM)
    s = 1.0 / (t_big * t_big)
    series = torch.zeros_like(t_big)
    for coef in reversed(coefs):
        series = series * s + coef
    return torch.where(big, series * big_factor(t_big), direct(t_small))


def inv_mills_excess(t: Tensor) -> Tensor:
    """λ(t) − t for t ≥ 0 without cancellation (≈ 1/t for large t)."""
    return _direct_or_series(t, lambda v: _inv_mills_value(v) - v, _H_SERIES, torch.reciprocal)


# G(t) = 1 − h(t) = −Σ_{k≥1} c_k t^(−2k)
_G_SERIES = tuple(-c for c in _H_SERIES[1:])


def one_minus_t_excess(t: Tensor) -> Tensor:
    """G(t) = 1 − t(λ(t) − t) for t ≥ 0 (1 at t = 0, ≈ 2/t² for large t): the variance of a standard
    normal truncated to [t, ∞), from its own series for large t so that 1 − (1 − 2/t²) is never formed."""
    return _direct_or_series(t, lambda v: 1.0 - v * (_inv_mills_value(v) - v), _G_SERIES, lambda v: 1.0 / (v * v))


def half_sq_gap(x1: Tensor, x0: Tensor, loc: Tensor, scale: Tensor) -> Tensor:
    """−[(x1 − loc)² − (x0 − loc)²] / (2 scale²), as an exact product (no huge squares subtracted)."""
    return -(x1 - x0) * (x1 + x0 - 2.0 * loc) / (2.0 * scale * scale)


class IntervalParts(NamedTuple):
    """ln(Φ(u) − Φ(l)) = −((anchor − loc)/scale)²/2 + rest, plus what the tail formulas reuse.

    lower_tail: the interval lies below the mean (u ≤ 0), anchored at hi.
    upper_tail: the interval lies above the mean (l ≥ 0), anchored at lo.
    Otherwise the mean is inside and anchor = loc.
    In a tail, ``t`` ≥ 0 is the distance of the near end from the mean in standard deviations,
    ``t_far`` ≥ t that of the far end, and ``log_ratio`` = ln(Φ(far)/Φ(near)) ≤ 0 in the mirrored frame.
    Outside a tail, t, t_far and log_ratio hold harmless placeholders.
    """

    anchor: Tensor
    rest: Tensor
    lower_tail: Tensor
    upper_tail: Tensor
    t: Tensor | None
    t_far: Tensor | None
    log_ratio: Tensor | None
    l: Tensor
    u: Tensor


def interval_parts(
    lo: Tensor, hi: Tensor, loc: Tensor, scale: Tensor, standardized: tuple[Tensor, Tensor] | None = None,
    fast: bool = False,
) -> IntervalParts:
    """Split ln P(lo ≤ X ≤ hi), X ~ N(loc, scale²), into quadratic and moderate parts (see module doc).

    ``standardized`` optionally supplies (lo − loc)/scale and (hi − loc)/scale computed more exactly
    than by subtracting a rounded ``loc`` (as for the product of two normals in BMRS_N).
    ``fast=True`` (for large batches without gradients, e.g. ΔF of millions of structures) picks
    each element's regime first and evaluates only its special functions, skipping the far end's
    erfcx where the ratio Φ(far)/Φ(near) is below e⁻⁵⁰ anyway; it fills only ``anchor``, ``rest``,
    the tail masks, ``l`` and ``u`` (``t``, ``t_far``, ``log_ratio`` are None).  The default evaluates
    every branch, so that gradients are defined.
    """
    lo, hi, loc, scale = torch.broadcast_tensors(lo, hi, loc, scale)
    inv_scale = scale.reciprocal()
    if standardized is None:
        l, u = (lo - loc) * inv_scale, (hi - loc) * inv_scale
    else:
        l, u = (v.expand_as(lo) for v in standardized)
    lower_tail = u <= 0
    upper_tail = (l >= 0) & ~lower_tail
    anchor = torch.where(lower_tail, hi, torch.where(upper_tail, lo, loc))
    if fast:
        rest = _rests_by_subset(lower_tail, upper_tail, (lo - hi) * inv_scale, l, u)
        return IntervalParts(anchor, rest, lower_tail, upper_tail, None, None, None, l, u)
    tail = lower_tail | upper_tail

    # Mirror the upper tail onto the lower one: near = the end closest to the mean, both ≤ 0.
    near = torch.where(upper_tail, -l, u)
    far = torch.where(upper_tail, -u, l)
    near = torch.where(tail, near, -1.0)
    far = torch.where(tail, far, -2.0)
    # far − near = (lo − hi)/scale in both tails; taking it from x-space keeps close ends exact.
    gap = torch.where(tail, (lo - hi) / scale, -1.0)
    rest, log_ratio = _rests_everywhere(tail, near, far, gap, l, u)
    return IntervalParts(anchor, rest, lower_tail, upper_tail, -near, -far, log_ratio, l, u)


def _tail_rest(near: Tensor, log_ratio: Tensor, log_erfcx_near: Tensor) -> Tensor:
    return log_erfcx_near - LN2 + log1mexp(log_ratio)


def _mid_rest(l: Tensor, u: Tensor) -> Tensor:
    """ln(Φ(u) − Φ(l)) for l ≤ 0 ≤ u.  erf(u/√2) ≥ 0 ≥ erf(l/√2), so their difference adds magnitudes
    without cancellation: full relative precision for any mass, 1e−16 absolute in ln near mass 1
    (erf costs half of erfc)."""
    return torch.log(0.5 * (torch.erf(u * INV_SQRT2) - torch.erf(l * INV_SQRT2)))


def _rests_everywhere(tail, near, far, gap, l, u):
    """Both branches for every element (placeholders keep the unused one finite, gradients too)."""
    log_erfcx_near = log_erfcx(-near / SQRT2)
    log_ratio = -gap * (far + near) / 2.0 + log_erfcx(-far / SQRT2) - log_erfcx_near
    tail_rest = _tail_rest(near, log_ratio, log_erfcx_near)
    mid_rest = _mid_rest(torch.where(tail, -1.0, l), torch.where(tail, 1.0, u))
    return torch.where(tail, tail_rest, mid_rest), log_ratio


_FAR_NEGLIGIBLE = FAR_NEGLIGIBLE


def _rests_by_subset(lower_tail, upper_tail, gap, l, u):
    """Each element's own branch only (indices gathered once per regime, no placeholders), and the
    far end's erfcx only where Φ(far)/Φ(near) can exceed e⁻⁵⁰ (the bound −gap(far+near)/2 holds
    because erfcx falls towards the far end)."""
    shape = l.shape
    l, u, gap = l.reshape(-1), u.reshape(-1), gap.reshape(-1)
    rest = torch.empty_like(l)
    for mask, sign in ((lower_tail, 1.0), (upper_tail, -1.0)):
        idx = mask.reshape(-1).nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        near = u.index_select(0, idx) if sign > 0 else -l.index_select(0, idx)
        far = l.index_select(0, idx) if sign > 0 else -u.index_select(0, idx)
        log_erfcx_near = log_erfcx(near * -INV_SQRT2)
        ratio = gap.index_select(0, idx) * (far + near) * -0.5
        close = (ratio > _FAR_NEGLIGIBLE).nonzero().squeeze(1)
        if close.numel():
            extra = log_erfcx(far.index_select(0, close) * -INV_SQRT2) - log_erfcx_near.index_select(0, close)
            ratio.index_add_(0, close, extra)
        rest.index_copy_(0, idx, _tail_rest(near, ratio, log_erfcx_near))
    idx = (~(lower_tail | upper_tail)).reshape(-1).nonzero().squeeze(1)
    if idx.numel():
        rest.index_copy_(0, idx, _mid_rest(l.index_select(0, idx), u.index_select(0, idx)))
    return rest.reshape(shape)
