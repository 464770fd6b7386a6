"""Closed-form KL divergences, registered with ``torch.distributions.kl_divergence``."""

from __future__ import annotations

import math

import torch
from torch.distributions import register_kl

from .truncated_log_normal import TruncatedLogNormal
from .truncated_log_uniform import TruncatedLogUniform

__all__ = ["kl_truncated_log_normal_log_uniform"]


@register_kl(TruncatedLogNormal, TruncatedLogUniform)
def kl_truncated_log_normal_log_uniform(q: TruncatedLogNormal, p: TruncatedLogUniform):
    """KL(q ‖ p) = ln(p.high − p.low) − H(ln θ under q); +inf where q's support leaves p's.

    The change of variables cancels, so it is the same in θ and in ln θ.

    Examples:
        >>> import torch, bmrs
        >>> q = bmrs.TruncatedLogNormal(torch.tensor(-10.0), torch.tensor(100.0))   # nearly flat
        >>> p = bmrs.TruncatedLogUniform(-20.0, 0.0)
        >>> float(torch.distributions.kl_divergence(q, p)) < 1e-3
        True
    """
    loc, scale, low, high = q._x64
    kl = q.kl_to_uniform64() - torch.log(high - low) + torch.log(p.width.double())
    inside = (low >= p.low.double()) & (high <= p.high.double())
    kl = torch.where(inside, kl, torch.full_like(kl, math.inf))
    return q._out(kl)
