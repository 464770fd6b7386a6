"""Distributions of the noise variable θ, parameterised on the log scale ln θ."""

from .truncated_log_normal import TruncatedLogNormal
from .truncated_log_uniform import TruncatedLogUniform
from .kl import kl_truncated_log_normal_log_uniform

__all__ = ["TruncatedLogNormal", "TruncatedLogUniform", "kl_truncated_log_normal_log_uniform"]
