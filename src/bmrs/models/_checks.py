"""Small argument checks shared by the model builders (they raise :class:`bmrs.errors.ConfigError`)."""

from __future__ import annotations

from ..errors import ConfigError

__all__ = ["positive_int", "non_negative_int"]


def positive_int(name: str, value, builder: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{builder}: {name} must be a positive integer, got {value!r}")
    return value


def non_negative_int(name: str, value, builder: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{builder}: {name} must be a non-negative integer, got {value!r}")
    return value
