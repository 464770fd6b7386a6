"""Load pretrained weights (torchvision / timm-style state dicts) into bmrs models."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..errors import CheckpointError
from ..nn.attach import NOISE_ATTR

__all__ = ["load_pretrained", "read_state_dict", "is_noise_key"]

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module")


def is_noise_key(key: str) -> bool:
    """True for the keys of attached noise layers (``*.bmrs_noise.*``)."""
    return f".{NOISE_ATTR}." in f".{key}"


def _preview(keys, limit: int = 3) -> str:
    keys = list(keys)
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f", … ({len(keys)} in all)" if len(keys) > limit else "")


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a state dict from a ``torch.save`` file (``weights_only=True``) or a ``.safetensors`` file.

    Unwraps ``{"state_dict": …}`` / ``{"model": …}`` checkpoints and a DataParallel ``module.``
    prefix.  Raises :class:`bmrs.errors.CheckpointError` for a missing, truncated or corrupt file.

    Examples:
        >>> import tempfile, os, torch
        >>> from bmrs.models import read_state_dict
        >>> path = os.path.join(tempfile.mkdtemp(), "w.pt")
        >>> torch.save({"weight": torch.ones(2)}, path)
        >>> read_state_dict(path)["weight"].tolist()
        [1.0, 1.0]
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist or is not a file; check the path")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, bad pickle, disallowed globals, safetensors header errors …
        reason = " ".join(str(err).split()).split(". ")[0] or type(err).__name__
        reason = reason if len(reason) <= 160 else reason[:159] + "…"
        raise CheckpointError(
            f"cannot read checkpoint {path!r} ({type(err).__name__}: {reason}); the file is truncated, corrupt "
            "or not a weights-only state dict: download it again or re-save it with torch.save(model.state_dict(), path)"
        ) from None
    for key in _WRAPPER_KEYS:
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise CheckpointError(
            f"checkpoint {path!r} is not a state dict (a mapping of names to tensors, got {type(state).__name__}); "
            "save it with torch.save(model.state_dict(), path)"
        )
    state = dict(state)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _head_prefix(model: nn.Module) -> str | None:
    """Name of the classifier head: the last ``nn.Linear`` registered in the model."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and NOISE_ATTR not in name.split("."):
            last = name
    return last


def load_pretrained(
    model: nn.Module,
    path: str | os.PathLike,
    strict: bool = True,
    drop_head_if_mismatched: bool = False,
) -> nn.Module:
    """Load the weights in ``path`` into ``model`` (in place) and return the model.

    Keys of noise layers missing from the file (a plain torchvision/timm checkpoint loaded into a
    model after :func:`bmrs.attach`) are ignored and keep their initial values.  With
    ``drop_head_if_mismatched=True`` the classifier head (the last ``nn.Linear``) keeps its fresh
    initialisation when its shape in the file differs — e.g. ImageNet weights fine-tuned on CIFAR-10.
    ``strict=False`` skips missing and unexpected keys but never loads a tensor of the wrong shape.
    Raises :class:`bmrs.errors.CheckpointError` for unreadable files and mismatched keys or shapes.

    Examples:
        >>> import os, tempfile, torch
        >>> from bmrs.models import resnet18, load_pretrained
        >>> path = os.path.join(tempfile.mkdtemp(), "resnet18.pt")
        >>> torch.save(resnet18(num_classes=1000, noise=False).state_dict(), path)
        >>> model = load_pretrained(resnet18(num_classes=10), path, drop_head_if_mismatched=True)
        >>> model.fc.out_features
        10
    """
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"load_pretrained expects an nn.Module, got {type(model).__name__}")
    state = read_state_dict(path)
    own = model.state_dict()
    name = type(model).__name__

    dropped = []
    head = _head_prefix(model) if drop_head_if_mismatched else None
    if head is not None:
        for suffix in ("weight", "bias"):
            key = f"{head}.{suffix}" if head else suffix
            if key in state and key in own and state[key].shape != own[key].shape:
                dropped.append(key)
        for key in dropped:
            del state[key]

    missing = [k for k in own if k not in state and not is_noise_key(k) and k not in dropped]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in state if k in own and state[k].shape != own[k].shape]

    if mismatched:
        details = ", ".join(f"{k!r}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in mismatched[:3])
        more = f", … ({len(mismatched)} in all)" if len(mismatched) > 3 else ""
        hint = ("pass drop_head_if_mismatched=True to keep a fresh head for another number of classes, or "
                if head is None and any(k.startswith(f"{_head_prefix(model)}.") for k in mismatched) else "")
        raise CheckpointError(
            f"checkpoint {os.fspath(path)!r} does not fit {name}: shape mismatch for {details}{more}; "
            f"{hint}build the model with the architecture and sizes the checkpoint was saved from"
        )
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"{len(missing)} keys missing from the file ({_preview(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys in the file ({_preview(unexpected)})")
        noise_hint = ("; the file holds noise layers: call bmrs.attach(model) with the same targets first"
                      if any(is_noise_key(k) for k in unexpected) else "")
        raise CheckpointError(
            f"checkpoint {os.fspath(path)!r} does not match {name}: {'; '.join(parts)}{noise_hint}; it was saved "
            "from another model: build the matching architecture, or pass strict=False to load only matching keys"
        )
    loadable = {k: v for k, v in state.items() if k in own}
    if not loadable and not dropped:
        raise CheckpointError(
            f"checkpoint {os.fspath(path)!r} shares no keys with {name} (file keys: {_preview(state)}); "
            "it was saved from another model: build the matching architecture"
        )
    model.load_state_dict(loadable, strict=False)
    return model
