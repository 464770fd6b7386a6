"""The fused θ draw of a model's noise bank: all its noise layers in one autograd node (θ for every layer,
and the weighted KL sum).

A training step's noise work on a small network is a few hundred structures, so eager PyTorch pays
per operation: concatenating the layers' parameters, clamping and exponentiating log σ, splitting θ
back per layer, weighting and summing the KL, and the autograd nodes of each.  With the fused CPU
kernels (:mod:`bmrs._kernels`) these functions do all of that in one call and one backward, straight
from each layer's ``mu`` and ``log_sigma``.  They return None where the kernels cannot serve (GPU,
tracing, other dtypes, no compiler, an interval deep in a tail): the caller then takes the
reference path, which ``tests/test_fused_draw.py`` checks them against.

Examples:
    >>> import torch
    >>> from bmrs.nn.fused_draw import sample_layers, kl_layers
    >>> mus = [torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True)]
    >>> log_sigmas = [torch.full((3,), -1.0, requires_grad=True), torch.full((2,), -1.0, requires_grad=True)]
    >>> masks, kept = [torch.ones(3), torch.ones(2)], [torch.arange(3), torch.arange(2)]
    >>> fused = sample_layers(mus, log_sigmas, masks, (1, 2, 3, 4), 0, 4, kept, [3, 2], -20.0, 0.0)
    >>> [tuple(t.shape) for t in fused[0]] if fused is not None else [(4, 3), (4, 2)]
    [(4, 3), (4, 2)]
    >>> kl = kl_layers(mus, log_sigmas, [1.0, 0.5], -20.0, 0.0)
    >>> kl is None or kl.shape == torch.Size([])
    True
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .. import _kernels
from ..distributions.fast_sample import FAST_TAIL
from .noise import LOG_SIGMA_RANGE

__all__ = ["sample_layers", "kl_layers"]


def _usable(params: Sequence[Tensor], *others: Tensor):
    kernels = _kernels.usable_for(*params, *others)
    if kernels is None or len({p.dtype for p in params}) != 1:
        return None
    return kernels


def sample_layers(mus: Sequence[Tensor], log_sigmas: Sequence[Tensor], masks: Sequence[Tensor],
                  key: tuple[int, int, int, int] | None, row_first: int, rows: int, kept: Sequence[Tensor],
                  full_widths: Sequence[int], low: float, high: float,
                  coefs: Sequence[float] | None = None) -> tuple[list[Tensor], Tensor, Tensor, Tensor] | None:
    """(θ·mask of shape (rows, len(mu_l)) for each layer, the layers' KL to the log-uniform prior on
    [low, high] summed per layer, shape (n,), Σ_l coefs[l]·KL_l (0-d; coefs default to 1), a 0-d bool
    flag), σ = exp(clamp(log σ, *LOG_SIGMA_RANGE)).

    The uniforms are those of :mod:`bmrs.nn.uniforms` for ``key``, rows ``row_first …`` and layer l's
    structure j at column code Σ_{l' < l} full_widths[l'] + kept[l][j] (formed inside the kernel, never
    stored); ``key=None`` draws it from PyTorch's default generator as ``draw_key()`` would, only when
    the kernels serve.  The KL shares the per-structure work and the autograd node (built in C++), so a
    loss that adds it costs no second pass; the node's backward sets the flag, after which the KL's graph
    is spent.  Differentiable in every mu and log_sigma.  None where the fused kernels cannot serve (not
    all on the CPU in one float32/float64 dtype, an interval deep in a tail, tracing): use the
    reference path then."""
    kernels = _kernels.usable_for()
    if kernels is None:
        return None
    # sequences go to the kernel as they are (pybind11 converts them, and rejects what is not a number)
    out = kernels.sample_layers_node(mus, log_sigmas, masks, () if key is None else key, row_first, rows, kept,
                                     full_widths, low, high, *LOG_SIGMA_RANGE, FAST_TAIL,
                                     (1.0,) * len(mus) if coefs is None else coefs)
    if not out:
        return None
    return out[:-3], out[-3], out[-2], out[-1]


class _KLLayers(torch.autograd.Function):
    @staticmethod
    def forward(ctx, coefs, low, high, n, *params):
        out = _kernels.get().kl_layers(list(params[:n]), list(params[n:]), list(coefs), low, high, *LOG_SIGMA_RANGE)
        ctx.save_for_backward(*out[1:])
        return out[0]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        return (None,) * 4 + tuple(torch._foreach_mul(ctx.saved_tensors, grad))


def kl_layers(mus: Sequence[Tensor], log_sigmas: Sequence[Tensor], coefs: Sequence[float], low: float,
              high: float) -> Tensor | None:
    """Σ_l coefs[l]·Σ_j KL(q_lj ‖ log-uniform prior on [low, high]), a 0-d tensor in the parameters' dtype,
    differentiable in every mu and log_sigma.  None where the fused kernels cannot serve."""
    if _usable(list(mus) + list(log_sigmas)) is None:
        return None
    return _KLLayers.apply(tuple(float(c) for c in coefs), float(low), float(high), len(mus), *mus, *log_sigmas)
