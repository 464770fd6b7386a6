"""Exceptions raised by bmrs.

Every error a user can cause derives from :class:`BMRSError`, so the command line can turn it into a
one-line message and a non-zero exit instead of a traceback.

Example:
    >>> from bmrs.errors import ConfigError
    >>> try:
    ...     raise ConfigError("p1 must lie in (0, 23), got 30; pass e.g. --p1 8")
    ... except ConfigError as err:
    ...     print(err)
    p1 must lie in (0, 23), got 30; pass e.g. --p1 8
"""

from __future__ import annotations

__all__ = ["BMRSError", "ConfigError", "DataError", "CheckpointError", "ModelError", "TrainingError",
           "first_line"]


class BMRSError(Exception):
    """Base class of every error bmrs raises for bad input; the message is one line saying the fix."""


class ConfigError(BMRSError, ValueError):
    """An invalid hyperparameter or option (exit code 2 on the command line)."""


class DataError(BMRSError, ValueError):
    """A dataset file or folder that is missing, corrupt or inconsistent."""


class CheckpointError(BMRSError, ValueError):
    """A checkpoint or saved model that is truncated, corrupt or belongs to another model."""


class ModelError(BMRSError, ValueError):
    """A model bmrs cannot work on (e.g. nothing to attach noise to, no noise layers to compact)."""


class TrainingError(BMRSError, RuntimeError):
    """Training cannot go on (e.g. the loss became NaN); the message names the layer at fault."""


def first_line(err: BaseException, limit: int = 120) -> str:
    """The first line of an exception's message, cut at ``limit`` characters (its type's name if empty), for
    quoting a library's error inside a one-line bmrs message.

    Example:
        >>> first_line(RuntimeError("size mismatch\\nmore detail")), first_line(KeyError())
        ('size mismatch', 'KeyError')
    """
    text = str(err).strip()
    return text.splitlines()[0][:limit] if text else type(err).__name__
