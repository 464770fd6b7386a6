"""BMRS_N and BMRS_U: exact ΔF against a reduced prior, decided by a stated rule (docs/decision-rule.md)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..defaults import EVIDENCE_MARGIN
from ..errors import ConfigError
from ..nn.noise import MultiplicativeNoise
from ..evidence import FLOAT32_MANTISSA_BITS, SPIKE_VARIANCE, delta_f, precision_prior, spike_prior
from .base import Criterion, Decisions, layers_of, plain_number

__all__ = ["ModelReduction", "BMRSN", "BMRSU", "PublishedBMRSN", "EVIDENCE_MARGIN", "SWITCHED_OFF_LOG_THETA",
           "check_margin"]


#: ln 2⁻²³: a structure whose E[θ] lies below float32's unit roundoff is switched off in the network
#: that is tested (θ = E[θ]), whatever ΔF says about the reduced prior it is compared with.
SWITCHED_OFF_LOG_THETA = -FLOAT32_MANTISSA_BITS * math.log(2.0)


def check_margin(margin) -> float:
    """The evidence margin (nats) as a float, or ConfigError: a finite number ≥ 0."""
    margin = plain_number(margin)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin < math.inf:
        raise ConfigError(f"evidence margin must be a finite number of nats >= 0 (0: the exact rule "
                          f"ΔF >= 0), got {margin!r}")
    return float(margin)


class ModelReduction(Criterion):
    """Criteria that score by ΔF against a reduced prior, with a stated decision rule.

    A structure is pruned when ΔF ≥ −margin (the evidence for keeping it is worth less than
    ``margin`` nats: a tie, which goes to the smaller model; ``margin=0`` is the exact rule ΔF ≥ 0),
    or when it is switched off: E[θ] < 2⁻²³, so that the tested network (θ = E[θ]) multiplies its
    output by less than float32's unit roundoff.  ``scores`` stay the exact ΔF.
    """

    higher_prunes = True

    def __init__(self, margin: float = EVIDENCE_MARGIN):
        self.margin = check_margin(margin)

    def reduced_prior(self, noise: MultiplicativeNoise):
        raise NotImplementedError

    def layer_scores(self, name, noise, model):
        return delta_f(noise.posterior(), noise.prior(), self.reduced_prior(noise))

    def rule(self, scores):
        return scores >= -self.margin

    @torch.no_grad()
    def switched_off(self, model: nn.Module) -> Decisions:
        """{layer: bool tensor}, True where E[θ] < 2⁻²³ (the structure's output is already gone)."""
        return {name: (noise.posterior().log_mean.double() < SWITCHED_OFF_LOG_THETA).cpu()
                for name, noise in layers_of(model)}

    def _margin_repr(self) -> str:
        return f"margin={self.margin:g}"


class BMRSN(ModelReduction):
    """BMRS_N: ΔF against a truncated log-normal spike at the lower bound (variance 1e−12).

    Prunes where ΔF ≥ −``margin`` (1 nat by default: evidence for keeping a structure that is not
    worth a mention is a tie, and a tie goes to the smaller model) or where E[θ] < 2⁻²³.
    ``BMRSN(margin=0)`` is the exact rule ΔF ≥ 0, which ties on posteriors the data leaves
    prior-like (see docs/decision-rule.md).

    Examples:
        >>> from bmrs.criteria import BMRSN
        >>> BMRSN(), BMRSN(margin=0)
        (BMRSN(margin=1, variance=1e-12), BMRSN(margin=0, variance=1e-12))
    """

    name = "bmrs-n"

    def __init__(self, margin: float = EVIDENCE_MARGIN, variance: float = SPIKE_VARIANCE):
        super().__init__(margin)
        spike_prior(variance=variance)  # validates
        self.variance = variance

    def reduced_prior(self, noise):
        return spike_prior(noise.low, noise.high, self.variance)

    def __repr__(self):
        return f"{type(self).__name__}({self._margin_repr()}, variance={self.variance:g})"


class PublishedBMRSN(BMRSN):
    """BMRS_N as the public reference code computes it: ΔF + ½ ln 2π, pruned where that is ≥ 0.

    The paper's code omits the 2π of the normaliser (its ``term2`` is −½ ln(σ² + s²) where the
    equation has −½ ln(2π(σ² + s²))): not the equation, kept to reproduce the published numbers.
    """

    name = "bmrs-n-published"
    OFFSET = 0.5 * math.log(2.0 * math.pi)

    def __init__(self, variance: float = SPIKE_VARIANCE):
        super().__init__(0.0, variance)

    def switched_off(self, model):  # the published rule is ΔF alone
        return {}

    def layer_scores(self, name, noise, model):
        return super().layer_scores(name, noise, model) + self.OFFSET

    def __repr__(self):
        return f"{type(self).__name__}(variance={self.variance:g})"


class BMRSU(ModelReduction):
    """BMRS_U: ΔF against a log-uniform over θ ∈ [2⁻²³, 2^(−p₁)]; larger p₁ prunes less.

    Same decision rule as :class:`BMRSN`: ΔF ≥ −``margin`` or E[θ] < 2⁻²³ (a posterior the data
    has pushed below the reduced prior's support is switched off, although its ΔF_U is very negative).

    Examples:
        >>> from bmrs.criteria import BMRSU
        >>> BMRSU(p1=4)
        BMRSU(p1=4, margin=1)
    """

    name = "bmrs-u"

    def __init__(self, p1: float = 8.0, margin: float = EVIDENCE_MARGIN):
        super().__init__(margin)
        precision_prior(p1)  # validates
        self.p1 = p1

    def reduced_prior(self, noise):
        return precision_prior(self.p1, noise.low, noise.high)

    def __repr__(self):
        return f"BMRSU(p1={self.p1:g}, {self._margin_repr()})"
