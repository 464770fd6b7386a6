"""Bayesian model reduction: ΔF, the change in log evidence when a structure's prior is reduced.

    ΔF = ln ∫ q(x) p̃(x) / p(x) dx        (x = ln θ)

ΔF ≥ 0 says the reduced model (structure switched off) is at least as probable as the full one:
prune it.  Closed forms exist for a reduced truncated log-normal (BMRS_N) and a reduced truncated
log-uniform (BMRS_U); any other reduced prior goes through Gauss–Legendre quadrature in the
posterior's quantile space, which is also the reference the closed forms are checked against.

Examples:
    >>> import torch, bmrs
    >>> q = bmrs.TruncatedLogNormal(torch.tensor([0.0, -30.0]), torch.tensor([0.1, 0.1]))
    >>> p = bmrs.TruncatedLogUniform(-20.0, 0.0)
    >>> (bmrs.delta_f(q, p, bmrs.spike_prior()) >= 0).tolist()    # keep the first, prune the second
    [False, True]
"""

from __future__ import annotations

import math
import numbers
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor
from torch.distributions import Distribution

from . import _kernels
from .distributions import TruncatedLogNormal, TruncatedLogUniform
from .distributions import _truncnorm as tn
from .distributions._stable import LOG_2PI, interval_parts
from .distributions._log_interval import check_bounds
from .errors import ConfigError

__all__ = ["delta_f", "spike_prior", "precision_prior", "delta_f_quadrature", "FLOAT32_MANTISSA_BITS"]

FLOAT32_MANTISSA_BITS = 23
SPIKE_VARIANCE = 1e-12


def _check_bounds_args(low, high) -> None:
    """The prior's bounds of ln θ: numbers, finite, low < high (max/min would drop a NaN silently)."""
    for name, value in (("low", low), ("high", high)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ConfigError(f"{name} must be a number (a bound of ln θ), got {value!r}")
    check_bounds(torch.tensor(float(low)), torch.tensor(float(high)))


def spike_prior(low: float = -20.0, high: float = 0.0, variance: float = SPIKE_VARIANCE) -> TruncatedLogNormal:
    """BMRS_N's reduced prior: a near-Dirac log-normal at the lower bound (θ ≈ 0), variance 1e−12.

    Examples:
        >>> import bmrs
        >>> float(bmrs.spike_prior().scale)
        1e-06
    """
    if isinstance(variance, bool) or not isinstance(variance, numbers.Real) or not 0 < variance < math.inf:
        raise ConfigError(f"spike variance must be a positive finite number, got {variance!r}")
    _check_bounds_args(low, high)
    f64 = dict(dtype=torch.float64)
    return TruncatedLogNormal(
        torch.tensor(low, **f64), torch.tensor(math.sqrt(variance), **f64),
        torch.tensor(low, **f64), torch.tensor(high, **f64),
    )


def precision_prior(p1: float = 8.0, low: float = -20.0, high: float = 0.0) -> TruncatedLogUniform:
    """BMRS_U's reduced prior: log-uniform over θ ∈ [2⁻²³, 2^(−p₁)], clipped to [e^low, e^high].

    ``p1`` is the precision in bits (8 or 4 in the paper); it must lie in (0, 23).

    Examples:
        >>> import bmrs
        >>> r = bmrs.precision_prior(8)
        >>> round(float(r.low), 3), round(float(r.high), 3)
        (-15.942, -5.545)
    """
    if isinstance(p1, bool) or not isinstance(p1, (int, float)) or not 0 < p1 < FLOAT32_MANTISSA_BITS:
        raise ConfigError(f"p1 must be a number in (0, {FLOAT32_MANTISSA_BITS}), got {p1!r}; the paper uses 8 or 4")
    _check_bounds_args(low, high)
    ln2 = math.log(2.0)
    lo = max(-FLOAT32_MANTISSA_BITS * ln2, low)
    hi = min(-p1 * ln2, high)
    if not lo < hi:
        raise ConfigError(f"precision interval [2^-23, 2^-{p1}] does not meet the prior's [e^{low}, e^{high}]")
    return TruncatedLogUniform(torch.tensor(lo, dtype=torch.float64), torch.tensor(hi, dtype=torch.float64))


def _check_supports(q: Distribution, p: Distribution, reduced: Distribution) -> None:
    if not isinstance(p, TruncatedLogUniform):
        raise ConfigError(f"the prior must be a TruncatedLogUniform, got {type(p).__name__}")
    if not isinstance(q, TruncatedLogNormal):
        raise ConfigError(f"the posterior must be a TruncatedLogNormal, got {type(q).__name__}")
    tol = 1e-9
    if bool((q.low.double() < p.low.double() - tol).any() | (q.high.double() > p.high.double() + tol).any()):
        raise ConfigError("the posterior's support must lie inside the prior's (same low/high)")
    r_low, r_high = getattr(reduced, "low", None), getattr(reduced, "high", None)
    if r_low is not None and r_high is not None:
        if bool((r_low.double() < p.low.double() - tol).any() | (r_high.double() > p.high.double() + tol).any()):
            raise ConfigError(
                "the reduced prior's support must lie inside the prior's: it may only remove possibilities"
            )


def delta_f(posterior: TruncatedLogNormal, prior: TruncatedLogUniform, reduced: Distribution) -> Tensor:
    """ΔF for every element, broadcasting like the distributions; computed in float64 and returned
    in the posterior's dtype.

    Closed forms for ``TruncatedLogNormal`` (BMRS_N) and ``TruncatedLogUniform`` (BMRS_U) reduced
    priors; quadrature for anything else with a ``log_prob`` over θ.

    Examples:
        >>> import torch, bmrs
        >>> q = bmrs.TruncatedLogNormal(torch.tensor(-12.0), torch.tensor(2.0))
        >>> p = bmrs.TruncatedLogUniform(-20.0, 0.0)
        >>> float(bmrs.delta_f(q, p, p))     # reducing to the prior itself changes nothing
        0.0
    """
    _check_supports(posterior, prior, reduced)
    if isinstance(reduced, TruncatedLogNormal):
        closed_form = _delta_f_normal
    elif isinstance(reduced, TruncatedLogUniform):
        closed_form = _delta_f_uniform
    elif isinstance(reduced, Distribution):
        return posterior._out(delta_f_quadrature(posterior, prior, reduced))
    else:
        raise ConfigError(f"the reduced prior must be a torch Distribution (e.g. bmrs.spike_prior() or "
                          f"bmrs.precision_prior(8)), got {type(reduced).__name__}")
    scalar_priors = reduced.batch_shape.numel() == 1 and prior.batch_shape.numel() == 1
    if posterior.batch_shape.numel() == 0:  # no structures: nothing to score (the kernels index element 0)
        return posterior._out(closed_form(posterior, prior, reduced))
    if _no_gradients(posterior) and scalar_priors:
        fused = _fused(posterior, prior, reduced)
        if fused is not None:
            return posterior._out(fused)
        if posterior.batch_shape.numel() > _CHUNK:
            return posterior._out(_in_chunks(closed_form, posterior, prior, reduced))
    return posterior._out(closed_form(posterior, prior, reduced))


_CHUNK = 2**16  # elements per pass: keeps the ~100 elementwise passes inside the CPU caches


def _in_chunks(closed_form, q: TruncatedLogNormal, p, r) -> Tensor:
    """Evaluate a closed form over a large batch in cache-sized chunks (no gradients)."""
    shape = q.batch_shape
    # full-size parameters are flattened (a view when contiguous); scalar ones stay scalars
    params = [t.reshape(-1) if t.numel() == 1 else t.broadcast_to(shape).reshape(-1) for t in q._x64]
    out = torch.empty(shape.numel(), dtype=torch.float64)
    for start in range(0, out.numel(), _CHUNK):
        part = TruncatedLogNormal(*(t if t.numel() == 1 else t[start:start + _CHUNK] for t in params),
                                  validate_args=False)
        out[start:start + _CHUNK] = closed_form(part, p, r)
    return out.reshape(shape)


def _fused(q: TruncatedLogNormal, p: TruncatedLogUniform, r: Distribution) -> Tensor | None:
    """The closed form in the fused CPU kernel (:mod:`bmrs._kernels`, the same formulas a vector of
    lanes at a time on all threads), for scalar prior, reduced prior and posterior bounds; None where
    it cannot serve."""
    loc, scale, low, high = q._x64
    kernels = _kernels.usable_for(loc, scale)
    if kernels is None:
        return None
    low, high = _constant(low), _constant(high)
    if low is None or high is None or low != float(p.low) or high != float(p.high):
        return None
    shape = q.batch_shape
    loc, scale = (t.broadcast_to(shape).reshape(-1) for t in (loc, scale))
    if isinstance(r, TruncatedLogNormal):
        m, s, r_low, r_high = (float(t) for t in r._x64)
        out = kernels.delta_f_normal(loc, scale, low, high, m, s, r_low, r_high)
    else:
        out = kernels.delta_f_uniform(loc, scale, low, high, float(r.low), float(r.high))
    return out.reshape(shape)


def _constant(t: Tensor) -> float | None:
    """The value of a tensor whose elements are all equal (a broadcast scalar), else None."""
    first = t.reshape(-1)[0]
    if t.numel() == 1 or all(stride == 0 for stride in t.stride()) or bool((t == first).all()):
        return float(first)
    return None


def _no_gradients(q: TruncatedLogNormal) -> bool:
    """Whether ΔF may take the fast regime-first path (it has no gradients)."""
    return not (torch.is_grad_enabled() and (q.loc.requires_grad or q.scale.requires_grad))


def _delta_f_uniform(q: TruncatedLogNormal, p: TruncatedLogUniform, r: TruncatedLogUniform) -> Tensor:
    """ΔF_U = ln q(a′ ≤ x ≤ b′) + ln(b − a) − ln(b′ − a′)."""
    loc, scale, low, high = q._x64
    r_low, r_high = r.low.double(), r.high.double()
    log_mass = tn.log_mass(loc, scale, low, high, r_low, r_high, fast=_no_gradients(q))
    return log_mass + torch.log(p.width.double()) - torch.log(r_high - r_low)


def _delta_f_normal(q: TruncatedLogNormal, p: TruncatedLogUniform, r: TruncatedLogNormal) -> Tensor:
    """ΔF_N = ln(b − a) − ln Z − ln Z_p̃ + ln Z_q̃ + ln N(μ; m, σ² + s²), with the huge terms cancelled.

    Each normaliser is split as −(anchor − mean)²/(2 sd²) + rest (see ``_stable``).  The identity
    (x−μ)²/σ² + (x−m)²/s² = (μ−m)²/v + (x−μ̃)²/σ̃², taken at the anchor ẽ of Z_q̃, turns the sum of
    all quadratic parts into [(e−μ)² − (ẽ−μ)²]/(2σ²) − [(ẽ−m)² − (e_p−m)²]/(2s²): two products of
    exact differences.  (e, ẽ, e_p are the anchors of Z, Z_q̃, Z_p̃; a mean inside gives anchor = mean.)
    """
    mu, sigma, low, high = q._x64
    m, s, r_low, r_high = r._x64
    var_q, var_r = sigma * sigma, s * s
    v = var_q + var_r
    inv_v = v.reciprocal()
    mu_t = (mu * var_r + m * var_q) * inv_v
    sigma_t = sigma * s * inv_v.sqrt()
    inv_vs = (v * sigma_t).reciprocal()
    lo_t, hi_t = torch.maximum(low, r_low), torch.minimum(high, r_high)

    fast = _no_gradients(q)
    z_q = interval_parts(low, high, mu, sigma, fast=fast)
    # x − μ̃ = [(x − μ)s² + (x − m)σ²]/v keeps an end that equals m exact (a rounded μ̃ would not).
    def standardize(x):
        return ((x - mu) * var_r + (x - m) * var_q) * inv_vs

    z_t = interval_parts(lo_t, hi_t, mu_t, sigma_t, standardized=(standardize(lo_t), standardize(hi_t)), fast=fast)
    z_p = interval_parts(r_low, r_high, m, s, fast=fast)

    t_mid = ~(z_t.lower_tail | z_t.upper_tail)
    d_e = z_q.anchor - mu
    d_p = z_p.anchor - m
    delta_mu = torch.where(t_mid, (m - mu) * var_q * inv_v, z_t.anchor - mu)
    delta_m = torch.where(t_mid, (mu - m) * var_r * inv_v, z_t.anchor - m)
    quad = (d_e - delta_mu) * (d_e + delta_mu) / (2.0 * var_q) - (delta_m - d_p) * (delta_m + d_p) / (2.0 * var_r)

    log_width = torch.log(p.width.double())
    value = log_width - 0.5 * (LOG_2PI + torch.log(v)) + quad + z_t.rest - z_q.rest - z_p.rest
    return torch.where(hi_t > lo_t, value, torch.full_like(value, -math.inf))


@contextmanager
def _unvalidated(*dists: Distribution):
    """Evaluate ``log_prob`` without torch's support check (restored afterwards)."""
    saved = [d._validate_args for d in dists]
    try:
        for d in dists:
            d._validate_args = False
        yield
    finally:
        for d, flag in zip(dists, saved):
            d._validate_args = flag


_TAIL_HALVINGS = 40


def delta_f_quadrature(
    posterior: TruncatedLogNormal,
    prior: Distribution,
    reduced: Distribution,
    panels: int = 48,
    order: int = 16,
) -> Tensor:
    """ΔF by composite Gauss–Legendre quadrature of ∫ q(x) p̃(x)/p(x) dx over [low, high].

    Panel edges are the union of ``panels`` posterior quantiles (resolving a narrow posterior), their outer
    two halved 40 times towards the bounds (the mass of a narrow posterior's outer panels sits at their
    inner ends), and ``panels`` equal steps of x (resolving structure in p̃/p); ``order`` nodes per panel.
    Works for any reduced prior with ``log_prob`` over θ; a spike or a step narrower than
    (high − low)/panels needs more panels (use the closed forms for those), and a posterior whose mass
    lies within 1e-8 of a bound far from 0 is resolved only as finely as float64 spaces x there.  Memory:
    (2·panels + 80)·order per element.

    Examples:
        >>> import torch, bmrs
        >>> from bmrs.evidence import delta_f_quadrature
        >>> q = bmrs.TruncatedLogNormal(torch.tensor(-12.0).double(), torch.tensor(2.0).double())
        >>> p = bmrs.TruncatedLogUniform(-20.0, 0.0)
        >>> r = bmrs.TruncatedLogNormal(torch.tensor(-15.0).double(), torch.tensor(3.0).double())
        >>> abs(float(delta_f_quadrature(q, p, r) - bmrs.delta_f(q, p, r))) < 1e-8
        True
    """
    loc, scale, low, high = posterior._x64
    extra = (1,) * loc.dim()
    steps = torch.linspace(0.0, 1.0, panels + 1, dtype=torch.float64)
    # the outer quantile panels hold 1/panels of the mass each, within a few σ of their inner ends, however
    # wide they are: halve them towards the bounds (mass 2^-_TAIL_HALVINGS/panels left beyond)
    tail = torch.exp2(-torch.arange(1, _TAIL_HALVINGS + 1, dtype=torch.float64)) / panels
    probabilities = torch.cat([steps, tail, 1.0 - tail]).reshape((-1,) + extra)
    with torch.no_grad():
        quantiles = tn.icdf_x(loc, scale, low, high, probabilities)
    uniform = low + steps.reshape((-1,) + extra) * (high - low)
    shape = torch.broadcast_shapes(quantiles.shape[1:], uniform.shape[1:])
    edges, _ = torch.sort(torch.cat([t.expand((t.shape[0],) + shape) for t in (quantiles, uniform)]), dim=0)
    left, width = edges[:-1], edges[1:] - edges[:-1]

    nodes, weights = (torch.from_numpy(v) for v in np.polynomial.legendre.leggauss(order))
    nodes = nodes.reshape((-1, 1) + extra)
    x = (left + (nodes + 1.0) * width / 2.0).clamp(min=low, max=high)        # (order, panels', ...)
    log_w = torch.log(weights.reshape(nodes.shape) * width / 2.0)
    theta = torch.exp(x).clamp(min=low.exp(), max=high.exp())
    log_q = tn.log_prob_x(loc, scale, low, high, x)
    with _unvalidated(prior, reduced):  # nodes sit on the bounds, which differ by rounding per dtype
        if isinstance(prior, TruncatedLogUniform):  # exact in float64 whatever the prior's dtype
            log_prior = -torch.log(prior.width.double()) - x
        else:
            log_prior = prior.log_prob(theta).double()
        log_ratio = reduced.log_prob(theta).double() - log_prior
    return torch.logsumexp((log_w + log_q + log_ratio).flatten(0, 1), dim=0)
