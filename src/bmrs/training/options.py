"""``bmrs train``'s options, made from TrainConfig's fields, and back: each setting, its default, its choices and its
help are stated once, on the field (its metadata); the command line and the reproduction's jobs read them here.
Torch-free, so that ``bmrs --help`` stays fast.

Examples:
    >>> import argparse
    >>> parser = argparse.ArgumentParser()
    >>> _ = add_train_arguments(parser)
    >>> settings = config_settings(parser.parse_args(["--model", "mlp", "--kl", "elbo", "--no-noise"]))
    >>> settings["model"], settings["kl_reduction"], settings["noise"], settings["epochs"]
    ('mlp', 'elbo', False, 5)
    >>> train_argv({"model": "mlp", "kl_reduction": "elbo", "noise": False, "epochs": 5})
    ['--model', 'mlp', '--kl', 'elbo', '--no-noise']
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from ..errors import ConfigError
from .config import TrainConfig

__all__ = ["GROUPS", "add_train_arguments", "config_settings", "train_argv", "option_name", "int_list"]

#: the groups of ``bmrs train --help``, in order
GROUPS = ("data", "network and pruning", "schedule", "running")


def int_list(text: str) -> list[int]:
    """``"3,0,2"`` → ``[3, 0, 2]``: non-negative integers, comma-separated (an argparse ``type``).

    Examples:
        >>> int_list("3, 0,2")
        [3, 0, 2]
    """
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError("counts must be non-negative")
    return values


# a field's annotation → how its option's value is read (bool fields are flags)
_TYPES = {"str": None, "str | None": None, "int": int, "int | None": int, "float": float, "float | None": float,
          "list[int] | None": int_list}


def _option_fields() -> list[dataclasses.Field]:
    """The fields of TrainConfig that are ``bmrs train`` options (those with a help group)."""
    return [f for f in dataclasses.fields(TrainConfig) if "group" in f.metadata]


def option_name(field: str) -> str:
    """The ``bmrs train`` option that sets TrainConfig's ``field`` (``--FIELD-NAME`` unless it says otherwise).

    Examples:
        >>> option_name("batch_size"), option_name("kl_reduction"), option_name("noise")
        ('--batch-size', '--kl', '--no-noise')
    """
    meta = next((f.metadata for f in _option_fields() if f.name == field), {})
    return meta.get("option", "--" + field.replace("_", "-"))


def add_train_arguments(parser: argparse.ArgumentParser, groups: dict | None = None) -> dict:
    """Add an option for every TrainConfig field that is one, in its help group (made here unless ``groups`` holds
    it); returns the groups by name, so that a caller can add its own options to them."""
    groups = dict(groups or {})
    for name in GROUPS:
        if name not in groups:
            groups[name] = parser.add_argument_group(name)
    for f in _option_fields():
        meta = dict(f.metadata)
        group = groups[meta.pop("group")]
        flag = meta.pop("option", "--" + f.name.replace("_", "-"))
        if f.type == "bool":  # a flag that turns the default over
            group.add_argument(flag, dest=f.name, action="store_false" if f.default else "store_true", **meta)
            continue
        if f.type not in _TYPES:
            raise TypeError(f"TrainConfig.{f.name}: no command-line type for {f.type!r}")  # (a programming error)
        if _TYPES[f.type] is not None:
            meta["type"] = _TYPES[f.type]
        group.add_argument(flag, dest=f.name, default=f.default, **meta)
    return groups


def config_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig keyword arguments in arguments parsed with ``add_train_arguments``'s options:
    ``TrainConfig(**config_settings(args))``."""
    return {f.name: getattr(args, f.name) for f in _option_fields()}


def train_argv(settings: dict[str, Any] | TrainConfig) -> list[str]:
    """The ``bmrs train`` options that give these TrainConfig settings (a dict of some of its keyword arguments, or a
    whole config): one per setting that differs from its default, in the fields' order.  ConfigError for a setting that
    is no option (``val_fraction``, ``extra``) unless it has its default."""
    if isinstance(settings, TrainConfig):
        settings = settings.to_dict()
    by_name = {f.name: f for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(settings) - set(by_name))
    if unknown:
        raise ConfigError(f"unknown config keys {unknown}; valid keys: {sorted(by_name)}")
    argv = []
    for name, f in by_name.items():
        if name not in settings or settings[name] == _default(f):
            continue
        value = settings[name]
        if "group" not in f.metadata or value is None:
            raise ConfigError(f"{name}={value!r} cannot be given to bmrs train (it has no option for it)", field=name)
        flag = option_name(name)
        if f.type == "bool":
            argv.append(flag)
        elif isinstance(value, list):
            argv += [flag, ",".join(str(v) for v in value)]
        else:
            argv += [flag, str(value)]
    return argv


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
