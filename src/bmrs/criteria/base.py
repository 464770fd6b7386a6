"""The criterion base class: scores, a decision rule, and global ranking by an amount."""

from __future__ import annotations

import math
import numbers
from typing import Callable

import torch
from torch import Tensor, nn

from ..errors import ConfigError, ModelError
from ..nn.attach import noise_layers
from ..nn.noise import MultiplicativeNoise

__all__ = ["Criterion", "Decisions", "layers_of", "plain_number", "global_top"]

Decisions = dict[str, Tensor]


def layers_of(model: nn.Module) -> list[tuple[str, MultiplicativeNoise]]:
    layers = noise_layers(model)
    if not layers:
        raise ModelError("the model has no noise layers; call bmrs.attach(model) and train it first")
    return layers


class Criterion:
    """Base class: subclasses define ``scores`` and either a threshold rule or only ranking."""

    name = "criterion"
    #: whether a larger score means "prune first" (ΔF) or "keep first" (SNR, E[θ], norms)
    higher_prunes = False
    #: whether ``decide`` without an amount is defined (threshold-free or thresholded rule)
    has_rule = True

    @torch.no_grad()
    def scores(self, model: nn.Module) -> dict[str, Tensor]:
        """Raw per-structure scores, {noise layer name: float64 tensor}."""
        return {name: self.layer_scores(name, noise, model).double() for name, noise in layers_of(model)}

    def layer_scores(self, name: str, noise: MultiplicativeNoise, model: nn.Module) -> Tensor:
        raise NotImplementedError

    def rule(self, scores: Tensor) -> Tensor:
        """The criterion's own decision (True = prune) from its scores."""
        raise ConfigError(f"{self.name} has no threshold rule: pass amount= (a count or a fraction)")

    def prunability(self, scores: Tensor) -> Tensor:
        return scores if self.higher_prunes else -scores

    def switched_off(self, model: nn.Module) -> Decisions:
        """{layer: bool tensor} of structures pruned whatever their scores (none by default)."""
        return {}

    def decide(self, model: nn.Module, amount: int | float | None = None) -> Decisions:
        """{layer: bool tensor (True = prune)}; by the rule, or the global top ``amount`` if given.

        Switched-off structures are pruned by the rule and ranked first (after those already pruned)."""
        scores, off = self.scores(model), self.switched_off(model)
        masks = {name: noise.mask.detach().cpu() == 0 for name, noise in layers_of(model)}
        if amount is None:
            return {name: self.rule(s).cpu() | off.get(name, False) | masks[name] for name, s in scores.items()}
        first = math.inf if self.higher_prunes else -math.inf
        ranked = {name: torch.where(off[name], torch.full_like(s.cpu(), first), s.cpu()) if name in off else s
                  for name, s in scores.items()}
        removed = sum(noise.removed for _, noise in layers_of(model))
        return global_top(ranked, masks, self.prunability, amount, removed)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def plain_number(value):
    """A NumPy or 0-d torch number as the Python int or float it holds (other values unchanged)."""
    if isinstance(value, Tensor) and value.dim() == 0 and not value.dtype.is_complex and value.dtype != torch.bool:
        return value.item()
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, int, float)):
        return float(value)
    return value


def global_top(scores: dict[str, Tensor], masks: Decisions, prunability: Callable, amount,
                removed: int = 0) -> Decisions:
    """``removed``: structures already taken out by ``shrink``; ``amount`` counts them as pruned."""
    total = sum(s.numel() for s in scores.values())
    amount = plain_number(amount)
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount < 0 or \
            (isinstance(amount, float) and (amount > 1.0 or math.isnan(amount))) or \
            (isinstance(amount, int) and amount > total + removed):
        raise ConfigError(f"amount must be a count in [0, {total + removed}] or a fraction in [0, 1], got {amount!r}")
    k = int(round(amount * (total + removed))) if isinstance(amount, float) else int(amount)
    k = max(k - removed, 0)
    names = list(scores)
    flat = torch.cat([prunability(scores[n]).cpu().double() for n in names])
    already = torch.cat([masks[n] for n in names])
    flat = torch.where(already, torch.full_like(flat, math.inf), torch.nan_to_num(flat, nan=-math.inf))
    k = max(k, int(already.sum()))
    chosen = torch.zeros(total, dtype=torch.bool)
    if k > 0:
        # stable tie-break: earlier layers/structures first
        order = torch.argsort(-flat, stable=True)
        chosen[order[:k]] = True
    out, start = {}, 0
    for n in names:
        size = scores[n].numel()
        out[n] = chosen[start:start + size]
        start += size
    return out
