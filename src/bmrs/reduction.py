"""The older name of :mod:`bmrs.evidence` (ΔF by Bayesian model reduction), kept so that existing imports work.

Examples:
    >>> import bmrs.reduction, bmrs.evidence
    >>> bmrs.reduction.delta_f is bmrs.evidence.delta_f
    True
"""

from .evidence import *  # noqa: F401,F403
from .evidence import __all__  # noqa: F401
