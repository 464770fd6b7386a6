"""The KL term of the training loss: :func:`kl_loss` and its weightings ("mean", "structure-mean", "elbo").

Examples:
    >>> import torch, bmrs
    >>> m = bmrs.attach(torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 2)))
    >>> kl_loss(m).shape
    torch.Size([])
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..defaults import KL_REDUCTIONS
from ..errors import ConfigError, ModelError
from .bank import _bounds_groups, _concat_posteriors, _mean_weights, _NoiseBank, noise_modules
from .fused_layers import kl_layers
from .noise import MultiplicativeNoise

__all__ = ["kl_loss", "KL_REDUCTIONS"]


def kl_loss(model: nn.Module, reduction: str = "mean", num_train: int | None = None) -> Tensor:
    """The KL term of the training loss.

    ``"mean"`` (the paper's): the mean KL over each layer's structures, averaged over layers, added
    unscaled to the batch-mean cross-entropy (a layer of 6 filters weighs each of its structures 20 times
    as much as a layer of 120 units does).  ``"structure-mean"``: the mean KL over all the model's
    structures, the same weight on each (``bmrs train``'s default, with a weight of its own).  Neither
    changes with the training-set size.  ``"elbo"``: Σ KL / num_train, the proper evidence lower bound
    per example.

    Examples:
        >>> import torch, bmrs
        >>> m = bmrs.attach(torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 2)))
        >>> float(bmrs.kl_loss(m, "elbo", num_train=1000)) > 0
        True
    """
    if reduction not in KL_REDUCTIONS:
        raise ConfigError(f"kl_loss: reduction must be one of {', '.join(KL_REDUCTIONS)}, got {reduction!r}")
    if reduction == "elbo" and (isinstance(num_train, bool) or not isinstance(num_train, int) or num_train < 1):
        raise ConfigError(f"kl_loss(reduction='elbo') needs num_train, the training-set size; got {num_train!r}")
    layers = noise_modules(model)
    if not layers:
        raise ModelError("kl_loss: the model has no noise layers; call bmrs.attach(model) first")
    bank = model.__dict__.get("_bmrs_bank")
    if bank is not None:
        bank.sync(layers)  # (a model edited by hand since attach: the walk is the truth)
        if reduction == "mean":
            mean = bank.stashed_mean_kl(layers)  # formed by this step's draw
            if mean is not None:
                return mean
    # one batched KL per group of bounds: the work is per operation, so concatenating all layers
    # makes the KL of a deep network as cheap as that of one layer; the mean is a weighted sum over
    # each layer's original structures (removing pruned ones changes no weight)
    total = None
    for members in _bounds_groups(layers):
        coefs = _kl_weights(reduction, members, layers, num_train)
        part = _stashed_kl_sum(bank, members, coefs)
        if part is None:
            mus, log_sigmas, _, _ = zip(*map(MultiplicativeNoise.tensors, members))
            part = kl_layers(mus, log_sigmas, coefs, members[0].low, members[0].high)
        if part is None:  # the reference path
            kl = members[0].kl_of(*_concat_posteriors(members))
            weights = torch.cat([torch.full((n.num_features,), coef, dtype=kl.dtype, device=kl.device)
                                 for n, coef in zip(members, coefs)])
            part = (kl * weights).sum()
        total = part if total is None else total + part
    return total


def _kl_weights(reduction: str, members: list[MultiplicativeNoise], layers: list[MultiplicativeNoise],
                num_train: int | None) -> list[float]:
    """The weight of each member's summed KL under ``reduction`` (members: some of the model's ``layers``)."""
    if reduction == "mean":
        return _mean_weights(members, len(layers))
    if reduction == "structure-mean":  # over the original structures: removing pruned ones changes no weight
        return [1.0 / sum(n.full_features for n in layers)] * len(members)
    return [1.0 / num_train] * len(members)


def _stashed_kl_sum(bank: _NoiseBank | None, members: list[MultiplicativeNoise], coefs: list[float]) -> Tensor | None:
    """Σ_l coefs[l]·KL_l from the KL that this step's fused draw formed beside θ, when it is still valid."""
    kl = bank.stashed_kl(members) if bank is not None else None
    if kl is None:
        return None
    return torch.dot(kl, torch.tensor(coefs, dtype=kl.dtype))
