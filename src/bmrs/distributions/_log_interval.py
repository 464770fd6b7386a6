"""What the truncated log-normal and log-uniform share: θ on [e^low, e^high] (the bounds checked, the support,
``expand``)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributions import Distribution, constraints

from ..errors import ConfigError

__all__ = ["LogIntervalDistribution", "check_bounds", "check_probability", "support_ends"]


def check_bounds(low: Tensor, high: Tensor) -> None:
    """Raise a one-line ConfigError unless low < high everywhere (both finite)."""
    if not bool(torch.isfinite(low).all() & torch.isfinite(high).all()):
        raise ConfigError("low and high must be finite numbers (log-space bounds, e.g. -20 and 0)")
    if not bool((low < high).all()):
        raise ConfigError(
            f"low must be smaller than high, got low={low.max().item():g} >= high={high.min().item():g};"
            " pass e.g. low=-20.0, high=0.0"
        )


def check_probability(value) -> None:
    """ValueError (as torch's argument validation raises) unless every value lies in [0, 1]."""
    value = torch.as_tensor(value)
    if not bool(((value >= 0) & (value <= 1)).all()):
        raise ValueError(f"icdf expects probabilities in [0, 1], got values from {value.min().item():g} "
                         f"to {value.max().item():g}")


def support_ends(low: Tensor, high: Tensor) -> tuple[Tensor, Tensor]:
    """[e^low, e^high] in float64, widened to the ends as low's and high's own dtype rounds them: so a sample
    clamped to the float32 e^high and the exact float64 e^low both lie inside a float32 distribution's support.

    Examples:
        >>> import torch
        >>> lo, hi = support_ends(torch.tensor(-20.0), torch.tensor(-1.0))
        >>> lo.dtype, bool(hi >= torch.tensor(-1.0).exp().double()), bool(hi >= torch.tensor(-1.0).double().exp())
        (torch.float64, True, True)
    """
    return (torch.minimum(low.double().exp(), low.exp().double()),
            torch.maximum(high.double().exp(), high.exp().double()))


class LogIntervalDistribution(Distribution):
    """A distribution of θ with ln θ in [``low``, ``high``]: its support, and ``expand`` of the tensors named in
    ``expanded`` (a subclass's parameters, the bounds among them).

    Examples:
        >>> import bmrs
        >>> bmrs.TruncatedLogUniform(-20.0, 0.0).expand((3,)).low.shape
        torch.Size([3])
    """

    expanded: tuple[str, ...] = ("low", "high")

    @constraints.dependent_property(is_discrete=False, event_dim=0)
    def support(self):
        return constraints.interval(*support_ends(self.low, self.high))

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(type(self), _instance)
        batch_shape = torch.Size(batch_shape)
        for name in self.expanded:
            setattr(new, name, getattr(self, name).expand(batch_shape))
        super(LogIntervalDistribution, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new
