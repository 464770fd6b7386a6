"""Small argument checks shared by the model builders (they raise :class:`bmrs.errors.ConfigError`)."""

from __future__ import annotations

from ..errors import ConfigError

__all__ = ["positive_int", "non_negative_int", "noise_options"]

#: what a builder's ``noise`` may set besides True/False: bmrs.attach's noise-layer settings
NOISE_OPTIONS = ("low", "high", "granularity", "batch_dim")


def positive_int(name: str, value, builder: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{builder}: {name} must be a positive integer, got {value!r}")
    return value


def non_negative_int(name: str, value, builder: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{builder}: {name} must be a non-negative integer, got {value!r}")
    return value


def noise_options(noise, builder: str) -> dict | None:
    """A builder's ``noise`` argument as :func:`bmrs.attach` keyword arguments: None for False, {} for True, the
    dict itself for a dict of attach's noise-layer settings (``{"granularity": "element", "low": -15.0}``).

    Examples:
        >>> noise_options(True, "mlp"), noise_options({"low": -15.0}, "mlp"), noise_options(False, "mlp")
        ({}, {'low': -15.0}, None)
    """
    if isinstance(noise, bool):
        return {} if noise else None
    if isinstance(noise, dict) and set(noise) <= set(NOISE_OPTIONS):
        return dict(noise)
    raise ConfigError(f"{builder}: noise must be True, False or a dict of bmrs.attach settings "
                      f"({', '.join(NOISE_OPTIONS)}), got {noise!r}")
