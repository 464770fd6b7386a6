"""Attach noise layers to an existing model, find them again, and collect their KL.

A noise layer is registered as a child ``bmrs_noise`` of the module whose output it multiplies
(its host), and applied by a forward hook.  The model's own parameter names are untouched, so weights
saved before attaching (e.g. torchvision-style ResNet checkpoints) still load, and ``print(model)``
shows each noise layer under its host.

Where the host is directly followed in an ``nn.Sequential`` by max/avg pooling (adaptive or not) and
the noise draws one θ ≥ 0 per (example, channel) (``granularity="structure"``), the hook sits on the
last of those pooling modules instead: pool(θ·x) = θ·pool(x), so the function, the gradients and
the Taylor scores are the same, and the multiply runs on the smaller pooled tensor (LeNet5: 4×).
The noise is then applied when that pooling module runs: calling the host on its own returns its
output without noise.

Default policy (``targets=None``):
  * after every BatchNorm that directly follows a Conv or Linear (ResNet: bn1, bn2, bn3, downsample BN);
  * else after every Conv / Linear, or after the activation *module* that directly follows it in
    the same ``nn.Sequential`` (Linear → Tanh → noise, Conv → ReLU → noise; with pooling after
    it, Conv → ReLU (noise registered here) → MaxPool → noise applied here, as above);
  * never on the layers that produce the model's output (every head of a model with several);
  * "follows" and "produces" are read from the data flow where ``torch.fx`` can trace the model (see
    :mod:`bmrs.nn.flow`), so that a head registered before the body, or norms registered after all the
    convolutions, are placed right; else from registration order (the next module registered follows, the
    last Conv/Linear registered is the output layer), as also when a residual sum or concatenation lies
    between the layers and the output;
  * in a model with attention modules bmrs knows (:mod:`bmrs.nn.heads`, ``nn.MultiheadAttention`` included):
    one θ per attention head, and none inside the attention modules nor on layers that write into the
    residual stream (:func:`~bmrs.nn.heads.transformer_placement`); naming an attention module as a target
    also gates its heads;
  * a module used in several places (shared weights) gets one noise layer and one hook, which gates its
    output wherever it runs.

Examples:
    >>> import torch, bmrs
    >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    >>> mlp = bmrs.attach(mlp)
    >>> [name for name, _ in bmrs.noise_layers(mlp)]
    ['1']
    >>> bmrs.kl_loss(mlp).shape
    torch.Size([])
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ..defaults import KL_REDUCTIONS
from ..errors import ConfigError, ModelError
from .bank import _NoiseBank, _bank_clear, _bank_draw, noise_layers
from .heads import HeadGate, head_layout, ready_for_gate
from .hooks import NOISE_ATTR, _apply_noise, _gate_heads, _hook_target, _NoiseAfterPool
from .loss import kl_loss
from .mha import make_plain
from .noise import MultiplicativeNoise
from .placement import default_targets, explicit_targets, sequence_first_axis

__all__ = ["attach", "noise_layers", "kl_loss", "detach", "detach_noise", "install_noise", "NOISE_ATTR", "KL_REDUCTIONS"]


def attach(
    model: nn.Module,
    targets: Iterable | None = None,
    *,
    low: float = -20.0,
    high: float = 0.0,
    granularity: str = "structure",
    batch_dim: int | None = None,
) -> nn.Module:
    """Insert a noise layer after each target (see the module docstring for the default policy).

    ``targets``: module names (``"layer1.0.bn1"``) or nn.Module types (``nn.Linear``).
    ``batch_dim``: the axis of the layers' (three- or more-dimensional) inputs that indexes examples, each
    of which draws its own θ: 0 for batch-first tensors, 1 for sequence-first (tokens, examples, features)
    ones.  Default: 1 inside a module built with ``batch_first=False`` (``nn.MultiheadAttention`` and the
    ``nn.Transformer`` layers' default), else 0; pass 1 for a model that is sequence-first throughout.
    Returns the same model, modified in place.

    Examples:
        >>> import torch, bmrs
        >>> cnn = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        ...                           torch.nn.Flatten(), torch.nn.LazyLinear(10))
        >>> [name for name, _ in bmrs.noise_layers(bmrs.attach(cnn))]
        ['1']
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"attach expects an nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise ConfigError("attach needs the Python model, not a TorchScript one (torch.jit.script or trace): attach "
                          "noise and train first, then compact and script the small model")
    if noise_layers(model):
        raise ModelError("attach: the model already has noise layers; attach once (or compact it first)")
    chosen = default_targets(model) if targets is None else explicit_targets(model, targets)
    # a module used in several places (shared weights) is one target: one noise layer, one hook
    modules_seen: set[int] = set()
    chosen = [entry for entry in chosen if not (id(entry[1]) in modules_seen or modules_seen.add(id(entry[1])))]
    if not chosen:
        raise ModelError(
            f"attach: found nothing to attach noise to in {type(model).__name__} (no Conv/Linear/BatchNorm "
            "layer other than the output layer); pass targets=[...] naming the layers to gate"
        )
    modules = dict(model.named_modules())  # (MultiplicativeNoise checks batch_dim)
    entries = []
    for name, module, features, dim, producer in chosen:
        examples_at = sequence_first_axis(modules, name) if batch_dim is None else batch_dim
        layout = head_layout(module) if dim == -2 else None
        noise = MultiplicativeNoise(features, dim=dim, low=low, high=high, granularity=granularity,
                                    batch_dim=examples_at, head_dim=layout.head_dim if layout else None,
                                    producer=producer)  # the Conv/Linear whose output structures it gates
        param = next(module.parameters(), None)
        if param is not None:
            noise = noise.to(device=param.device)
        entries.append((module, noise))
    install_noise(model, entries)
    return model

def install_noise(model: nn.Module, entries: list[tuple[nn.Module, MultiplicativeNoise]]) -> None:
    """Register each noise layer under its module, its forward hook (on that module or on the
    pooling after it: see the module docstring), and the model's noise bank."""
    modules, places = dict(model.named_modules()), {}
    for parent in model.modules():
        for position, child in enumerate(parent._modules.values()):
            places.setdefault(id(child), []).append((parent, position))
    for module, noise in entries:
        module.add_module(NOISE_ATTR, noise)
        if noise.head_dim is not None:  # gates the heads at the input of the output projection
            ready_for_gate(module).out.register_forward_pre_hook(HeadGate(module, noise.head_dim, _gate_heads))
            continue
        target = _hook_target(module, noise, modules, places)
        target.register_forward_hook(_apply_noise if target is module else _NoiseAfterPool(module), with_kwargs=True)
    model._bmrs_bank = _NoiseBank([noise for _, noise in noise_layers(model)])
    model.register_forward_pre_hook(_bank_draw)
    model.register_forward_hook(_bank_clear)


def detach(model: nn.Module) -> nn.Module:
    """Undo :func:`attach`: remove every noise layer, its hook and the noise bank, in place (no folding:
    ``bmrs.compact`` keeps the function).  ``detach_noise`` is the same function under its older name.

    Examples:
        >>> import torch, bmrs
        >>> net = bmrs.attach(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)))
        >>> bmrs.noise_layers(bmrs.detach(net))
        []
    """
    for _, module in model.named_modules():
        if NOISE_ATTR in getattr(module, "_modules", {}):
            del module._modules[NOISE_ATTR]
            make_plain(module)
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            for key, hook in list(hooks.items()):
                if hook in (_apply_noise, _bank_draw, _bank_clear) or isinstance(hook, (_NoiseAfterPool, HeadGate)):
                    del hooks[key]
                    module._forward_hooks_with_kwargs.pop(key, None)
        if "_bmrs_bank" in module.__dict__:
            del module.__dict__["_bmrs_bank"]
    return model


detach_noise = detach  # (the older name)
