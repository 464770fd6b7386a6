"""Save a compacted (or any) model and load it back without pickle: safetensors plus its shapes.

A pruned model no longer fits its class's default sizes, so its state dict alone cannot be loaded
("size mismatch for …").  :func:`save` writes the state dict as safetensors and, in the file's
metadata, every submodule's size attributes (``in_features``, ``out_channels``, ``num_heads``, …) and
optionally how to build the original network.  :func:`load` builds the original network (your
constructor, or a built-in builder named in the file), gives each submodule the saved sizes and
tensor shapes, then loads the weights strictly.  No code is unpickled; the file also carries a SHA-256
of the tensors, checked at load.

Examples:
    >>> import torch, bmrs, tempfile, os
    >>> net = lambda: torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> model = bmrs.attach(net())
    >>> bmrs.noise_layers(model)[0][1].mask[:5] = 0
    >>> small = bmrs.compact(model, torch.randn(2, 4))
    >>> path = os.path.join(tempfile.mkdtemp(), "small.safetensors")
    >>> bmrs.save(small, path)
    >>> again = bmrs.load(path, net)
    >>> again[0].out_features, bool(torch.equal(again(torch.ones(1, 4)), small(torch.ones(1, 4))))
    (3, True)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .errors import CheckpointError, ConfigError, ModelError, first_line

__all__ = ["save", "load", "read_description"]

FORMAT = "bmrs-model/1"
_SIMPLE = (bool, int, float, str, type(None))


def _size_attributes(module: nn.Module) -> dict[str, Any]:
    """The module's public attributes that describe its sizes: numbers, strings and tuples of numbers."""
    out = {}
    for key, value in vars(module).items():
        if key.startswith("_") or key == "training":
            continue
        if isinstance(value, _SIMPLE) or (isinstance(value, (tuple, list)) and all(isinstance(v, _SIMPLE) for v in value)):
            out[key] = list(value) if isinstance(value, (tuple, list)) else value
    return out


def _recorded_type(module: nn.Module) -> str:
    """The module's class as the file records it: a fast inference layer (:mod:`bmrs.inference.layers`) as the
    torch layer it stands for, so that a model saved after :func:`bmrs.inference.optimize` is the plain one."""
    from .inference import AlignedLinear, FastTanh, NarrowConv2d, TiledMaxPool2d

    cls = type(module)
    if cls in (AlignedLinear, FastTanh, NarrowConv2d, TiledMaxPool2d):
        cls = cls.__bases__[0]
    return f"{cls.__module__}.{cls.__qualname__}"


def save(model: nn.Module, path: str | Path, builder: dict | None = None) -> None:
    """Write ``model``'s weights and sizes to ``path`` (safetensors; atomic).

    ``builder``: how to build the original network without your code, e.g. ``{"name": "lenet5",
    "in_channels": 1, "num_classes": 10, "image_size": 32}`` for :func:`bmrs.models.build_model`; then
    :func:`load` needs only the path.  A model with fast inference layers (:func:`bmrs.inference.optimize`) is
    written as the plain one (the same weights; :func:`load` returns plain torch layers unless asked).

    Examples:
        bmrs.save(small, "lenet5-pruned.safetensors", builder={"name": "lenet5"})
    """
    from .io import save_state_dict

    if not isinstance(model, nn.Module):
        raise ConfigError(f"save expects an nn.Module, got {type(model).__name__}")
    if builder is not None and (not isinstance(builder, dict) or not isinstance(builder.get("name"), str)):
        raise ConfigError("builder must be a dict with the built-in model's 'name' and its keyword arguments")
    modules = {name: {"type": _recorded_type(m), "sizes": _size_attributes(m)} for name, m in model.named_modules()}
    metadata = {"format": FORMAT, "modules": json.dumps(modules), "builder": json.dumps(builder)}
    save_state_dict(path, model.state_dict(), metadata)  # (adds the weights' sha256)


def read_description(path: str | Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a file written by :func:`save`; CheckpointError if it is not one or is damaged."""
    from .io import read_safetensors

    path = Path(path)
    metadata, tensors = read_safetensors(path)
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a model written by bmrs.save (a bare state dict has no sizes); load it "
                              "with safetensors into a model of the right sizes")
    if "sha256" not in metadata:
        raise CheckpointError(f"{path}: the file has no checksum of its weights; it is damaged")
    return metadata, tensors


def _original(metadata: dict[str, str], model, path: Path) -> nn.Module:
    if isinstance(model, nn.Module):
        return model
    if callable(model):
        built = model()
        if not isinstance(built, nn.Module):
            raise ConfigError(f"load: the model factory returned {type(built).__name__}, not an nn.Module")
        return built
    if model is not None:
        raise ConfigError(f"load: model must be an nn.Module or a function building one, got {type(model).__name__}")
    builder = json.loads(metadata.get("builder") or "null")
    if builder is None:
        raise ConfigError(f"{path} was saved without a builder: pass the network as your code builds it, "
                          "bmrs.load(path, MyNet) (a class or function) or bmrs.load(path, MyNet(...))")
    from .models import build_model

    kwargs = {k: v for k, v in builder.items() if k != "name"}
    return build_model(builder["name"], noise=False, **kwargs)


def _resize(model: nn.Module, modules: dict, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Give every submodule of ``model`` the saved size attributes and tensor shapes."""
    own = dict(model.named_modules())
    missing = sorted(set(modules) - set(own))
    if missing:
        raise ModelError(f"{path}: the network given has no submodule {missing[0]!r} (and {len(missing) - 1} more); "
                         "pass the network the saved model was compacted from")
    from .nn.mha import make_headed

    adopt = {"bmrs.nn.mha.HeadedMultiheadAttention": make_headed}  # classes compaction turns modules into
    for name, entry in modules.items():
        module = own[name]
        if entry["type"] in adopt and isinstance(module, nn.MultiheadAttention):
            adopt[entry["type"]](module)
        for key, value in entry["sizes"].items():
            current = getattr(module, key, None)
            if key in vars(module) and isinstance(current, (int, float, tuple, list)) and not isinstance(current, bool):
                setattr(module, key, type(current)(value) if isinstance(current, (tuple, list)) else value)
        prefix = f"{name}." if name else ""
        for kind in ("_parameters", "_buffers"):
            for key, tensor in list(getattr(module, kind).items()):
                saved = tensors.get(prefix + key)
                if tensor is None or saved is None or saved.shape == tensor.shape:
                    continue
                fresh = torch.empty(saved.shape, dtype=tensor.dtype, device=tensor.device)
                if kind == "_parameters":
                    fresh = nn.Parameter(fresh, requires_grad=tensor.requires_grad)
                getattr(module, kind)[key] = fresh


def load(path: str | Path, model: nn.Module | Callable[[], nn.Module] | None = None,
         fast_layers: bool = False) -> nn.Module:
    """The model saved at ``path``, rebuilt without pickle, in eval mode.

    ``model``: the original (unpruned) network, or a function or class that builds it; not needed when the
    file names a built-in builder.  The network is made of plain torch layers; ``fast_layers=True`` is the same
    as calling :func:`bmrs.inference.optimize` on it (fast CPU inference layers).

    Examples:
        small = bmrs.load("lenet5-pruned.safetensors")             # saved with a builder
        small = bmrs.load("my-pruned.safetensors", MyNet)           # your own class
    """
    path = Path(path)
    metadata, tensors = read_description(path)
    network = _original(metadata, model, path)
    _resize(network, json.loads(metadata["modules"]), tensors, path)
    try:
        network.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise ModelError(f"{path}: the saved weights do not fit the network given ({first_line(err, 160)}); pass "
                         "the network the saved model was compacted from") from None
    if fast_layers:
        from .inference import optimize
        optimize(network)
    return network.eval()
