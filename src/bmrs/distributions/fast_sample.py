"""Cheap reparameterised θ samples for training: per-structure work in float64, per-sample in the
parameters' dtype, gradients written out by hand.

Training draws one θ per (example, structure), so the per-sample chain is what a step pays for.
:func:`sample_theta` evaluates everything that depends only on (μ, σ) once per structure in float64
(α, β and the normal tail masses), then per sample inverts the smaller tail with a single ``ndtri``
and stores nothing else; the backward pass forms the implicit-function gradients

    ∂x/∂μ = 1 − A_α − A_β,   ∂x/∂σ = z − αA_α − βA_β,   A_α = (1 − u)φ(α)/φ(z),  A_β = uφ(β)/φ(z)

and sums them over the samples directly, so autograd records one node instead of dozens.  The pruning
mask multiplies θ in the same pass, and an end that no live structure has within ``FAR_END``
standard deviations contributes nothing measurable, so its A terms are not formed.  Structures
whose whole interval lies more than ``FAST_TAIL`` standard deviations into a tail (their tail masses
would leave float32) are drawn by the exact float64 inverse CDF (:func:`_truncnorm.icdf_x`).
This PyTorch code is the reference: on the CPU the fused kernels (:mod:`bmrs._kernels`) do the same in
one call, and a model's noise bank draws all its layers at once (:mod:`bmrs.nn.fused_layers`).

Examples:
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

from .. import _kernels
from .._kernels.constants import FAR_END as _FAR_END
from . import _truncnorm as tn
from ._stable import ndtr

__all__ = ["sample_theta", "FAST_TAIL", "FAR_END"]

# float32 holds normal tail masses down to Φ(−13) ≈ 6e−39 as normal numbers: an interval that starts
# beyond 12σ in a tail is sampled in float64.
FAST_TAIL = 12.0


# A far end more than this many σ from every sample contributes exp(−(α² − z²)/2) < 1e−70 to the
# gradient (float32 uniforms keep |z| below 5.5, float64 below 8.3): its terms are skipped.
FAR_END = _FAR_END


def _end_weight(end: Tensor, z: Tensor, weight: Tensor) -> Tensor:
    """weight · φ(end)/φ(z) = weight · exp(−(end − z)(end + z)/2), the exponent capped where the factor
    is 0 or multiplied by a vanishing weight anyway."""
    return ((end - z) * (end + z)).mul_(-0.5).clamp_(-80.0, 80.0).exp_().mul_(weight)


class _TailInversion(torch.autograd.Function):
    """θ = mask · exp(μ + σz) with Φ(z) = (1 − u)Φ(α) + uΦ(β), per sample; see the module docstring."""

    @staticmethod
    def forward(ctx, mu, sigma, u, alpha, beta, cdf_alpha, cdf_gap, sf_beta, sf_gap, low, high, mask):
        p_low = torch.addcmul(cdf_alpha, u, cdf_gap)
        p_high = torch.addcmul(sf_beta, 1.0 - u, sf_gap)
        # invert the smaller tail probability: z = v below the median, −v above it
        v = torch.special.ndtri(torch.minimum(p_low, p_high))
        z = torch.copysign(v, p_low.sub_(p_high)).clamp_(alpha, beta)
        theta = torch.addcmul(mu, sigma, z).clamp_(low, high).exp_()
        near_alpha, near_beta = alpha > -FAR_END, beta < FAR_END
        if mask is not None:
            theta.mul_(mask)
            # only live structures carry a gradient (a masked one's θ is 0 whatever it draws)
            live = mask != 0
            near_alpha, near_beta = near_alpha & live, near_beta & live
        ctx.far_ends = (bool(near_alpha.any()), bool(near_beta.any()))
        ctx.save_for_backward(u, z, theta, alpha, beta)
        return theta

    @staticmethod
    def backward(ctx, grad):
        u, z, theta, alpha, beta = ctx.saved_tensors
        lead = tuple(range(z.dim() - 1))
        g = grad * theta  # ∂L/∂x
        grad_mu, grad_sigma = g.sum(lead), (g * z).sum(lead)
        for end, weight, near in zip((alpha, beta), (1.0 - u, u), ctx.far_ends):
            if near:
                g_end = (g * _end_weight(end, z, weight)).sum(lead)
                grad_mu = grad_mu - g_end
                grad_sigma = grad_sigma - end * g_end
        return grad_mu, grad_sigma, *([None] * 10)


def sample_theta(mu: Tensor, sigma: Tensor, low: float, high: float, u: Tensor, mask: Tensor | None = None) -> Tensor:
    """θ ~ exp(N(mu, σ²) truncated to [low, high]) for uniforms ``u`` of shape (…, len(mu)), times ``mask``.

    The result has ``u``'s shape and dtype and is differentiable in ``mu`` and ``sigma`` (1-d).
    On the CPU the fused kernel (:mod:`bmrs._kernels`) does the same in one call.
    """
    kernels = _kernels.usable_for(mu, sigma, u)
    if kernels is not None and u.dim() >= 1 and u.dtype == mu.dtype \
            and not kernels.any_deep_tail(mu.detach(), sigma.detach(), float(low), float(high), FAST_TAIL):
        mask = None if mask is None else mask.to(u.dtype)
        flat = _FusedTailInversion.apply(mu, sigma, u.reshape(-1, u.shape[-1]), mask, float(low), float(high))
        return flat.reshape(u.shape)
    with torch.no_grad():
        mu64, sigma64 = mu.detach().double(), sigma.detach().double()
        alpha, beta = (low - mu64) / sigma64, (high - mu64) / sigma64
        deep = (beta < -FAST_TAIL) | (alpha > FAST_TAIL)
    mask = None if mask is None else mask.to(u.dtype)
    if bool(deep.any()):
        fast = (~deep).nonzero().squeeze(1)
        slow = deep.nonzero().squeeze(1)
        exact = _exact(mu[slow], sigma[slow], low, high, u[..., slow])
        parts = [_fast(mu[fast], sigma[fast], alpha[fast], beta[fast], low, high, u[..., fast],
                       None if mask is None else mask[fast]),
                 exact if mask is None else exact * mask[slow]]
        order = torch.argsort(torch.cat([fast, slow]))
        return torch.cat(parts, dim=-1).index_select(-1, order)
    return _fast(mu, sigma, alpha, beta, low, high, u, mask)


class _FusedTailInversion(torch.autograd.Function):
    """:class:`_TailInversion` in the fused kernel: the forward also forms θ·∂x/∂μ and θ·∂x/∂σ per
    sample, so the backward is two weighted column sums."""

    @staticmethod
    def forward(ctx, mu, sigma, u, mask, low, high):
        theta, w_mu, w_sigma = _kernels.get().sample_forward(mu.detach(), sigma.detach(), u, mask, low, high)
        ctx.save_for_backward(w_mu, w_sigma)
        return theta

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            return (None,) * 6
        grad_mu, grad_sigma = _kernels.get().sample_backward(grad, *ctx.saved_tensors)
        return grad_mu, grad_sigma, None, None, None, None


def _fast(mu, sigma, alpha, beta, low, high, u, mask):
    dtype = u.dtype
    with torch.no_grad():  # one call per operation for all structures and both ends (ops cost more than flops here)
        ends = torch.stack([alpha, beta])
        cdf_alpha, cdf_beta, sf_alpha, sf_beta = ndtr(torch.cat([ends, -ends]))
        pieces = torch.stack([alpha, beta, cdf_alpha, cdf_beta - cdf_alpha, sf_beta, sf_alpha - sf_beta]).to(dtype)
    return _TailInversion.apply(mu.to(dtype), sigma.to(dtype), u, *pieces, float(low), float(high), mask)


def _exact(mu, sigma, low, high, u):
    bound = dict(dtype=torch.float64, device=mu.device)
    x = tn.icdf_x(mu.double(), sigma.double(), torch.tensor(float(low), **bound),
                  torch.tensor(float(high), **bound), u.double())
    return x.exp().to(u.dtype)
