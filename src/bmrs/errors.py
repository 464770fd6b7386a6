"""Exceptions raised by bmrs.

Every error a user can cause derives from :class:`BMRSError`, so the command line can turn it into a
one-line message and a non-zero exit instead of a traceback.

Examples:
    >>> from bmrs.errors import ConfigError
    >>> try:
    ...     raise ConfigError("p1 must lie in (0, 23), got 30; pass e.g. --p1 8")
    ... except ConfigError as err:
    ...     print(err)
    p1 must lie in (0, 23), got 30; pass e.g. --p1 8
"""

from __future__ import annotations

__all__ = ["BMRSError", "ConfigError", "DataError", "CheckpointError", "ModelError", "TrainingError",
           "WriteError", "first_line"]


class BMRSError(Exception):
    """Base class of every error bmrs raises for bad input; the message is one line saying the fix."""


class ConfigError(BMRSError, ValueError):
    """An invalid hyperparameter or option (exit code 2 on the command line).

    ``field``: the setting at fault (e.g. ``"image_size"``), so that the command line can name its option and a
    run folder's reader can name the file and field it came from.

    Examples:
        >>> ConfigError("image_size must be an integer in [1, 4096], got 0", field="image_size").field
        'image_size'
    """

    def __init__(self, message: str = "", field: str | None = None):
        super().__init__(message)
        self.field = field


class DataError(BMRSError, ValueError):
    """A dataset file or folder that is missing, corrupt or inconsistent."""


class CheckpointError(BMRSError, ValueError):
    """A checkpoint or saved model that is truncated, corrupt or belongs to another model."""


class ModelError(BMRSError, ValueError):
    """A model bmrs cannot work on (e.g. nothing to attach noise to, no noise layers to compact)."""


class TrainingError(BMRSError, RuntimeError):
    """Training cannot go on (e.g. the loss became NaN); the message names the layer at fault."""


class WriteError(BMRSError, OSError):
    """A file could not be written (disk full, file too large, quota, I/O error); the previous file is intact.

    Examples:
        >>> import errno
        >>> str(WriteError.of("runs/x/metrics.json", OSError(errno.ENOSPC, "No space left on device")))
        'could not write runs/x/metrics.json: No space left on device; free space or choose another --output'
    """

    @classmethod
    def of(cls, path, err: BaseException) -> "WriteError":
        reason = getattr(err, "strerror", None) or first_line(err)
        return cls(f"could not write {path}: {reason}; free space or choose another --output")


def first_line(err: BaseException, limit: int = 120) -> str:
    """The first line of an exception's message, cut at ``limit`` characters (its type's name if empty), for
    quoting a library's error inside a one-line bmrs message.

    Examples:
        >>> first_line(RuntimeError("size mismatch\\nmore detail")), first_line(KeyError())
        ('size mismatch', 'KeyError')
    """
    text = str(err).strip()
    return text.splitlines()[0][:limit] if text else type(err).__name__
