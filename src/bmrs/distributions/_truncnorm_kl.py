"""Float64 KL divergence of the truncated normal (on x = ln θ) from the log-uniform prior on [low, high], its
gradients, and E[ln θ], from the same tail and middle pieces (see :mod:`bmrs.distributions._truncnorm`).

Examples:
    >>> import torch
    >>> t = lambda v: torch.tensor(v, dtype=torch.float64)
    >>> float(kl_to_uniform(t(0.0), t(0.0067), t(-20.0), t(0.0))) > 0, float(mean_log(t(-10.0), t(1.0), t(-20.0), t(0.0)))
    (True, -10.0)
"""

from __future__ import annotations


import torch
from torch import Tensor

from .. import _kernels
from .._kernels.constants import FAR_NEGLIGIBLE_SQ
from .._compile import maybe_compiled
from ._stable import (
    LOG_2PI,
    KnownDerivatives,
    interval_parts,
    inv_mills,
    inv_mills_excess,
    log1mexp,
    one_minus_t_excess,
    _mid_rest,
)

__all__ = ["kl_to_uniform", "kl_to_uniform_with_grad", "kl_to_fixed_uniform", "mean_log"]


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
_FAR_NEGLIGIBLE_SQ = FAR_NEGLIGIBLE_SQ


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

    Examples:
        >>> import torch
        >>> from bmrs.distributions import _truncnorm as tn
        >>> kl = tn.kl_to_fixed_uniform(torch.zeros(2), torch.full((2,), 0.0067), -20.0, 0.0)
        >>> kl.dtype, round(float(kl[0]), 3)
        (torch.float32, 7.276)
    """
    if loc.dim() == 1 and scale.shape == loc.shape and _kernels.usable_for(loc, scale) is not None:
        low, high, fused = float(low), float(high), _kernels.get().kl_to_uniform_with_grad
        return _KLFused.apply(lambda loc, scale: fused(loc, scale, low, high), loc, scale)
    bound = dict(dtype=torch.float64, device=loc.device)
    kl = kl_to_uniform(loc.double(), scale.double(), torch.tensor(float(low), **bound),
                       torch.tensor(float(high), **bound))
    return kl.to(loc.dtype)


class _KLFused(KnownDerivatives):
    """The kernel's KL with its gradient (its own name in the autograd graph: ``_KLFusedBackward``)."""


def kl_to_uniform_with_grad(loc: Tensor, scale: Tensor, low: Tensor, high: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(KL, ∂KL/∂loc, ∂KL/∂scale) of :func:`kl_to_uniform`, the gradient in closed form (no autograd).

    With A = φ(α)/Z, B = φ(β)/Z and D = αA − βB, the entropy H = ln W − KL has
        σ ∂H/∂μ = ½[(A − B)(1 − D) + α²A − β²B],   σ ∂H/∂σ = 1 + ½[D(1 − D) + α³A − β³B].
    In a tail (mirrored frame: near end t, far end t', B = λ(1 + ρ), A = λ'ρ) the one-sided parts
    cancel analytically to G(t) = 1 − t(λ(t) − t) ≈ 2/t², leaving
        σ ∂H/∂μ = ∓½[λ(1 + ρ)(G − tλρ) − λ'ρ(1 + t'² + t'λ'ρ) + (t + t')λλ'ρ(1 + ρ)],
        σ ∂H/∂σ = 1 + ½tλG + ½[δ(1 − 2tλ − δ) + ρ(t³λ − t'³λ')],   δ = ρ(tλ − t'λ'),
    with − for the lower tail (the interval below the mean) and + for the upper one.

    Examples:
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
