"""Cheap reparameterised θ samples for training: per-structure work in float64, per-sample in the
parameters' dtype, gradients written out by hand.

Training draws one θ per (example, structure), so the per-sample chain is what a step pays for.
:func:`sample_theta` evaluates everything that depends only on (μ, σ) once per structure in float64
(α, β and the normal tail masses), then per sample inverts the smaller tail with a single ``ndtri``
and stores nothing else; the backward pass forms the implicit-function gradients

    ∂x/∂μ = 1 − A_α − A_β,   ∂x/∂σ = z − αA_α − βA_β,   A_α = (1 − u)φ(α)/φ(z),  A_β = uφ(β)/φ(z)

and sums them over the samples directly, so autograd records one node instead of dozens.  Structures
whose whole interval lies more than ``FAST_TAIL`` standard deviations into a tail (their tail masses
would leave float32) are drawn by the exact float64 inverse CDF (:func:`_truncnorm.icdf_x`).

Example:
    >>> import torch
    >>> from bmrs.distributions.fast_sample import sample_theta
    >>> mu, sigma = torch.zeros(3, requires_grad=True), torch.full((3,), 0.5)
    >>> theta = sample_theta(mu, sigma, -20.0, 0.0, torch.rand(4, 3))
    >>> theta.shape, bool(((theta > 0) & (theta <= 1)).all())
    (torch.Size([4, 3]), True)
    >>> theta.sum().backward(); mu.grad.shape
    torch.Size([3])
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _truncnorm as tn
from ._stable import ndtr

__all__ = ["sample_theta", "FAST_TAIL"]

# float32 holds normal tail masses down to Φ(−13) ≈ 6e−39 as normal numbers: an interval that starts
# beyond 12σ in a tail is sampled in float64.
FAST_TAIL = 12.0


class _TailInversion(torch.autograd.Function):
    """θ = exp(μ + σz) with Φ(z) = (1 − u)Φ(α) + uΦ(β), per sample; see the module docstring."""

    @staticmethod
    def forward(ctx, mu, sigma, u, alpha, beta, cdf_alpha, cdf_gap, sf_beta, sf_gap, low, high):
        p_low = torch.addcmul(cdf_alpha, u, cdf_gap)
        p_high = torch.addcmul(sf_beta, 1.0 - u, sf_gap)
        below = p_low < 0.5
        v = torch.special.ndtri(torch.where(below, p_low, p_high))
        z = torch.where(below, v, -v).clamp_(alpha, beta)
        theta = torch.addcmul(mu, sigma, z).clamp_(low, high).exp_()
        ctx.save_for_backward(u, z, theta, alpha, beta)
        return theta

    @staticmethod
    def backward(ctx, grad):
        u, z, theta, alpha, beta = ctx.saved_tensors
        lead = tuple(range(z.dim() - 1))
        g = grad * theta  # ∂L/∂x
        # A_α = (1 − u) exp(−(α − z)(α + z)/2); exponents are capped where the factor is 0 or
        # multiplied by a vanishing (1 − u) anyway.
        a_alpha = ((alpha - z) * (alpha + z)).mul_(-0.5).clamp_(-80.0, 80.0).exp_().mul_(1.0 - u)
        a_beta = ((beta - z) * (beta + z)).mul_(-0.5).clamp_(-80.0, 80.0).exp_().mul_(u)
        g_alpha = (g * a_alpha).sum(lead)
        g_beta = (g * a_beta).sum(lead)
        grad_mu = g.sum(lead) - g_alpha - g_beta
        grad_sigma = (g * z).sum(lead) - alpha * g_alpha - beta * g_beta
        return grad_mu, grad_sigma, *([None] * 9)


def sample_theta(mu: Tensor, sigma: Tensor, low: float, high: float, u: Tensor) -> Tensor:
    """θ ~ exp(N(mu, σ²) truncated to [low, high]) for uniforms ``u`` of shape (…, len(mu)).

    The result has ``u``'s shape and dtype and is differentiable in ``mu`` and ``sigma`` (1-d).
    """
    with torch.no_grad():
        mu64, sigma64 = mu.detach().double(), sigma.detach().double()
        alpha, beta = (low - mu64) / sigma64, (high - mu64) / sigma64
        deep = (beta < -FAST_TAIL) | (alpha > FAST_TAIL)
    if bool(deep.any()):
        fast = (~deep).nonzero().squeeze(1)
        slow = deep.nonzero().squeeze(1)
        parts = [_fast(mu[fast], sigma[fast], alpha[fast], beta[fast], low, high, u[..., fast]),
                 _exact(mu[slow], sigma[slow], low, high, u[..., slow])]
        order = torch.argsort(torch.cat([fast, slow]))
        return torch.cat(parts, dim=-1).index_select(-1, order)
    return _fast(mu, sigma, alpha, beta, low, high, u)


def _fast(mu, sigma, alpha, beta, low, high, u):
    dtype = u.dtype
    with torch.no_grad():
        cdf_alpha, cdf_beta, sf_alpha, sf_beta = ndtr(alpha), ndtr(beta), ndtr(-alpha), ndtr(-beta)
        pieces = [t.to(dtype) for t in (alpha, beta, cdf_alpha, cdf_beta - cdf_alpha, sf_beta, sf_alpha - sf_beta)]
    return _TailInversion.apply(mu.to(dtype), sigma.to(dtype), u, *pieces, float(low), float(high))


def _exact(mu, sigma, low, high, u):
    bound = dict(dtype=torch.float64, device=mu.device)
    x = tn.icdf_x(mu.double(), sigma.double(), torch.tensor(float(low), **bound),
                  torch.tensor(float(high), **bound), u.double())
    return x.exp().to(u.dtype)
