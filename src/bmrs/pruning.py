"""Apply a criterion's decisions to a model's noise masks and report what was pruned."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from .criteria import ModelReduction, Criterion
from .errors import ConfigError
from .nn.attach import noise_layers

__all__ = ["as_criterion", "prune", "PruneReport", "LayerReport", "PruningWarning", "structure_counts", "nothing_pruned_reason"]


@dataclass(frozen=True)
class LayerReport:
    name: str
    structures: int
    pruned: int

    @property
    def kept(self) -> int:
        return self.structures - self.pruned


@dataclass(frozen=True)
class PruneReport:
    """Per-layer and total structure counts after a pruning step."""

    layers: list[LayerReport] = field(default_factory=list)
    newly_pruned: int = 0

    @property
    def structures(self) -> int:
        return sum(layer.structures for layer in self.layers)

    @property
    def pruned(self) -> int:
        return sum(layer.pruned for layer in self.layers)

    @property
    def kept(self) -> int:
        return self.structures - self.pruned

    @property
    def pruned_pct(self) -> float:
        return 100.0 * self.pruned / self.structures if self.structures else 0.0

    def as_dict(self) -> dict:
        return {
            "structures": self.structures,
            "pruned": self.pruned,
            "kept": self.kept,
            "pruned_pct": self.pruned_pct,
            "newly_pruned": self.newly_pruned,
            "layers": [{"name": l.name, "structures": l.structures, "pruned": l.pruned, "kept": l.kept}
                       for l in self.layers],
        }

    def __str__(self) -> str:
        width = max([len(l.name) for l in self.layers] + [5])
        lines = [f"{'layer':<{width}}  structures  pruned    kept"]
        lines += [f"{l.name:<{width}}  {l.structures:>10}  {l.pruned:>6}  {l.kept:>6}" for l in self.layers]
        lines.append(f"{'total':<{width}}  {self.structures:>10}  {self.pruned:>6}  {self.kept:>6}"
                     f"  ({self.pruned_pct:.1f}% pruned)")
        return "\n".join(lines)


def structure_counts(model: nn.Module, newly_pruned: int = 0) -> PruneReport:
    """The current masks of a model as a report (no pruning)."""
    layers = [LayerReport(name, noise.full_features, noise.removed + int((noise.mask == 0).sum()))
              for name, noise in noise_layers(model)]
    return PruneReport(layers, newly_pruned)


@torch.no_grad()
def prune(model: nn.Module, criterion: Criterion, amount: int | float | None = None) -> PruneReport:
    """Set the noise masks by ``criterion`` (its own rule, or the global top ``amount``).

    Masks only ever go from 1 to 0: a structure pruned earlier stays pruned.

    Examples:
        >>> import torch, bmrs
        >>> m = bmrs.attach(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)))
        >>> report = bmrs.prune(m, bmrs.criteria.SNR(), amount=0.25)
        >>> report.pruned, report.structures
        (2, 8)
    """
    criterion = as_criterion(criterion)
    decisions = criterion.decide(model, amount)
    before = structure_counts(model).pruned
    for name, noise in noise_layers(model):
        prune_here = decisions[name].to(noise.mask.device)
        noise.mask.masked_fill_(prune_here, 0.0)
    report = structure_counts(model)
    if report.pruned == 0 and amount is None and isinstance(criterion, ModelReduction):
        warnings.warn(nothing_pruned_reason(model, repr(criterion)), PruningWarning, stacklevel=3)  # (past no_grad)
    return PruneReport(report.layers, report.pruned - before)


def as_criterion(criterion) -> Criterion:
    """A criterion instance; its command-line name is accepted too (``"bmrs-n"``), anything else is a ConfigError."""
    from .criteria import get_criterion

    if isinstance(criterion, Criterion):
        return criterion
    if isinstance(criterion, str):
        return get_criterion(criterion)
    if isinstance(criterion, type) and issubclass(criterion, Criterion):
        raise ConfigError(f"prune takes a criterion instance: {criterion.__name__}() (with its options), not the class")
    raise ConfigError(f"prune takes a criterion such as bmrs.criteria.BMRSN() or its name 'bmrs-n', got "
                      f"{type(criterion).__name__}")


class PruningWarning(UserWarning):
    """A pruning call that removed nothing, with the reason and what to change."""


def nothing_pruned_reason(model: nn.Module, label: str) -> str:
    """One line: why a BMRS rule pruned nothing (how far the posteriors are from prior-like) and what to change.

    Examples:
        >>> import torch, bmrs
        >>> m = bmrs.attach(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)))
        >>> nothing_pruned_reason(m, "BMRSN()")[:60]
        'BMRSN() pruned nothing: the widest posterior has σ = 0.0067 '
    """
    sigmas = torch.cat([noise.sigma.detach().reshape(-1).cpu() for _, noise in noise_layers(model)])
    widest = float(sigmas.max()) if sigmas.numel() else float("nan")
    return (f"{label} pruned nothing: the widest posterior has σ = {widest:.2g} (a structure the data does not "
            "need becomes prunable as its posterior widens towards the prior, σ of about 10); train longer, or "
            "train the noise parameters faster (bmrs.param_groups(model, lr), --noise-lr-scale)")
