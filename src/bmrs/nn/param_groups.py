"""Optimizer parameter groups that give the noise parameters their own learning rate."""

from __future__ import annotations

import torch

from ..defaults import NOISE_LR_MAX, NOISE_LR_SCALE, NOISE_TRAVERSE
from ..errors import ConfigError
from .attach import noise_layers

__all__ = ["param_groups", "noise_learning_rate", "NOISE_LR_SCALE", "NOISE_TRAVERSE", "NOISE_LR_MAX"]


def noise_learning_rate(lr: float, noise_lr_scale: float = NOISE_LR_SCALE, steps_per_prune: int | None = None) -> float:
    """The noise parameters' rate: ``lr × noise_lr_scale``, raised to ``NOISE_TRAVERSE / steps_per_prune``
    (at most ``NOISE_LR_MAX``) when fewer optimizer steps than that separate two pruning steps.

    Examples:
        >>> noise_learning_rate(1e-3), noise_learning_rate(1e-3, steps_per_prune=400), noise_learning_rate(1e-3, steps_per_prune=10)
        (0.01, 0.02, 0.1)
    """
    rate = lr * noise_lr_scale
    if steps_per_prune is not None and steps_per_prune > 0:
        rate = max(rate, min(NOISE_TRAVERSE / steps_per_prune, NOISE_LR_MAX))
    return rate


def param_groups(model: torch.nn.Module, lr: float, noise_lr_scale: float = NOISE_LR_SCALE,
                 noise_lr: float | None = None, steps_per_prune: int | None = None) -> list[dict]:
    """Optimizer parameter groups: the network's parameters at ``lr``, the noise parameters (μ, log σ of
    every noise layer) at :func:`noise_learning_rate` (``lr × noise_lr_scale``, raised when only
    ``steps_per_prune`` optimizer steps separate two calls of ``prune``), or at ``noise_lr`` when given
    (fine-tuning a pretrained network at a small ``lr``: the noise parameters still need about 1e-2).

    Examples:
        >>> import torch, bmrs
        >>> m = bmrs.attach(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)))
        >>> opt = torch.optim.Adam(bmrs.param_groups(m, lr=1e-3))
        >>> [(len(g["params"]), g["lr"]) for g in opt.param_groups]
        [(4, 0.001), (2, 0.01)]
    """
    if isinstance(noise_lr_scale, bool) or not isinstance(noise_lr_scale, (int, float)) or \
            not 0 < noise_lr_scale < float("inf"):
        raise ConfigError(f"noise_lr_scale must be a positive finite number, got {noise_lr_scale!r}")
    if noise_lr is not None and (isinstance(noise_lr, bool) or not isinstance(noise_lr, (int, float))
                                 or not 0 < noise_lr < float("inf")):
        raise ConfigError(f"noise_lr must be a positive finite number, got {noise_lr!r}")
    noise_ids = {id(p) for _, layer in noise_layers(model) for p in layer.parameters(recurse=False)}
    network = [p for p in model.parameters() if id(p) not in noise_ids]
    noise = [p for p in model.parameters() if id(p) in noise_ids]
    groups = [{"params": network, "lr": lr}]
    if noise:
        rate = noise_learning_rate(lr, noise_lr_scale, steps_per_prune) if noise_lr is None else noise_lr
        groups.append({"params": noise, "lr": rate})
    return [g for g in groups if g["params"]]
