"""Pruning criteria: per-structure scores and keep/prune decisions.

Every criterion scores each structure of every noise layer of a model and decides which to prune:

* ``BMRSN()`` — ΔF against a near-Dirac spike at θ ≈ 0; prune where ΔF ≥ −1 nat (evidence for
  keeping a structure that is not worth a mention is a tie, which goes to the smaller model) or
  where E[θ] < 2⁻²³ (switched off); ``BMRSN(margin=0)`` is the exact ΔF ≥ 0.
* ``BMRSU(p1=8)`` — ΔF against a log-uniform over low-precision θ; the same rule.
* ``SNR(threshold=1.0)`` — prune where E[θ]/√Var[θ] < threshold.
* ``ExpectedValue(threshold=0.1)`` — prune where E[θ] < threshold.
* ``L2Norm()`` — norm of each structure's incoming weights; needs an amount to prune.
* ``Gradient()`` — |activation × gradient| accumulated over batches; needs an amount.

``decide(model, amount=k)`` instead ranks all structures globally and prunes the ``k`` most
prunable (``k`` an int count or a float fraction of all structures); structures already masked
always count among them.  ``prunability`` orders structures for that ranking: higher = pruned first.

Examples:
    >>> import torch, bmrs
    >>> from bmrs import criteria
    >>> m = bmrs.attach(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)))
    >>> decisions = criteria.BMRSN().decide(m)              # {layer name: bool tensor, True = prune}
    >>> sorted(decisions), int(decisions["1"].sum())        # nothing is prunable at initialisation
    (['1'], 0)
"""

from __future__ import annotations

from typing import Callable

from ..errors import ConfigError
from .base import Criterion
from .ranking import Gradient, L2Norm
from .reduction import BMRSN, BMRSU, EVIDENCE_MARGIN, ModelReduction, PublishedBMRSN, check_margin
from .thresholded import SNR, ExpectedValue

__all__ = [
    "Criterion",
    "ModelReduction",
    "BMRSN",
    "BMRSU",
    "PublishedBMRSN",
    "SNR",
    "ExpectedValue",
    "L2Norm",
    "Gradient",
    "CRITERIA",
    "EVIDENCE_MARGIN",
    "get_criterion",
    "check_margin",
]


# the classes of the names registered in bmrs.defaults.CRITERION_RULES, by their ``name``
CRITERIA: dict[str, Callable[..., Criterion]] = {
    cls.name: cls for cls in (BMRSN, PublishedBMRSN, BMRSU, SNR, ExpectedValue, L2Norm, Gradient)
}


def get_criterion(name: str, **kwargs) -> Criterion:
    """Build a criterion by its command-line name (``bmrs-n``, ``bmrs-u``, ``snr``, ``ev``, ``l2``, ``grad``).

    Examples:
        >>> from bmrs.criteria import get_criterion
        >>> get_criterion("bmrs-u", p1=4)
        BMRSU(p1=4, margin=1)
    """
    if name not in CRITERIA:
        raise ConfigError(f"unknown criterion {name!r}; choose one of {', '.join(CRITERIA)}")
    try:
        return CRITERIA[name](**kwargs)
    except TypeError as err:  # an option this criterion does not take
        raise ConfigError(f"criterion {name!r}: {err}") from None
