"""Compaction as a plan, then apply: what ``compact`` removes, as data.

:func:`plan` works out, on a folded working copy of the model, which masked structures can be removed
exactly (:mod:`bmrs.compaction.removal`) and records it as a :class:`CompactionPlan`: per tensor the
kept indices along each axis that shrinks, the folded per-structure scales E[θ]·mask, what stays and
why.  :func:`apply` performs a plan on the model; ``compact`` is plan + apply; ``shrink`` cuts the
noisy model (and the optimizer's state) to the plan's kept indices.

Examples:
    >>> import torch, bmrs
    >>> from bmrs.compaction import apply, plan
    >>> mlp = bmrs.attach(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)))
    >>> bmrs.noise_layers(mlp)[0][1].mask[:5] = 0
    >>> p = plan(mlp, torch.randn(2, 4))
    >>> p.kept["0.weight"][0].tolist(), p.kept["2.weight"][1].tolist()
    ([5, 6, 7], [5, 6, 7])
    >>> apply(p, mlp)[2].in_features
    3
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError, ModelError
from ..nn.attach import noise_layers
from .fold import REL_TOL, IncompleteCompactionWarning, _never_ran, fold, reference_mismatch, restore_requires_grad
from .removal import remove_masked_channels
from .surgery import keep_indices

__all__ = ["CompactionPlan", "plan", "apply", "CompactionWarning"]


@dataclass
class CompactionPlan:
    """What compacting a model removes, and why the rest stays.

    ``kept``: {tensor name: per axis the original indices kept, or None where the axis is whole}, for
    every tensor that shrinks (names as in the model without its noise layers; the tensors of an
    attention module whose heads were removed are indexed after that removal, ``heads``).
    ``scales``: {noise layer: the E[θ]·mask folded into the weights}.  ``heads``: {noise layer gating
    attention heads: the heads kept}.  ``stayed``: {noise layer: (pruned structures that stay, why)}.
    ``unreached``: noise layers the example inputs never run (folded, nothing removed).
    ``incomplete``: why no channel is removed at all (None when the plan removes them).
    ``shapes``: the shape of every tensor of the compacted model.
    """

    kept: dict[str, list[Tensor | None]]
    scales: dict[str, Tensor]
    heads: dict[str, list[int]]
    stayed: dict[str, tuple[int, str]]
    unreached: list[str]
    incomplete: str | None
    shapes: dict[str, tuple[int, ...]]
    example_inputs: Any = field(repr=False)


def plan(model: nn.Module, example_inputs: Any) -> CompactionPlan:
    """The :class:`CompactionPlan` of ``model`` (with noise layers) traced on ``example_inputs``.

    ``model`` is not modified.  Raises :class:`bmrs.errors.ModelError` as ``compact`` does.

    Examples:
        >>> import torch, bmrs
        >>> mlp = bmrs.attach(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)))
        >>> bmrs.noise_layers(mlp)[0][1].mask[2:] = 0
        >>> p = plan(mlp, torch.randn(2, 4))
        >>> p.shapes["0.weight"], p.stayed, p.incomplete
        ((2, 4), {}, None)
    """
    return build(model, example_inputs, "plan")[0]


def build(model: nn.Module, example_inputs: Any, caller: str) -> tuple[CompactionPlan, nn.Module]:
    """(the plan, the model compacted by it): the working copy the plan was worked out on."""
    leaves = example_inputs.values() if isinstance(example_inputs, dict) else \
        example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if any(torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in leaves):
        raise ConfigError(f"{caller}: the example input holds NaN or infinite values; pass finite example inputs "
                          "(e.g. a batch of real data)")
    folded = fold(model, example_inputs, caller=caller)
    scales = _scales(model)
    unreached = [rec.name for rec in folded.records if _never_ran(rec, folded.trace)]
    stayed, kept = remove_masked_channels(folded)
    try:
        mismatch = reference_mismatch(folded)
    except Exception as err:
        raise ModelError(f"{caller}: the model no longer runs after torch-pruning removed its masked channels "
                         f"({type(err).__name__}: {err}); please report it; bmrs.compaction.fold_noise folds "
                         "the noise without removing channels") from err
    incomplete = None if mismatch <= REL_TOL else f"removing channels changed the outputs (relative error {mismatch:.2e})"
    if incomplete is not None:  # never trade exactness for size: every channel stays
        stayed, kept = {}, {}
        folded = fold(model, example_inputs, caller=caller)
    restore_requires_grad(folded)
    heads = {name: [h for h, v in enumerate(scales[name].tolist()) if v != 0.0] or [0]
             for name, noise in noise_layers(model) if noise.head_dim is not None}
    shapes = {name: tuple(t.shape) for name, t in [*folded.model.named_parameters(), *folded.model.named_buffers()]}
    result = CompactionPlan(kept, scales, heads, stayed, unreached, incomplete, shapes, folded.checks[0][0])
    return result, folded.model.eval()


@torch.no_grad()
def _scales(model: nn.Module) -> dict[str, Tensor]:
    return {name: noise.expected_theta().detach().clone() for name, noise in noise_layers(model)}


def apply(plan: CompactionPlan, model: nn.Module) -> nn.Module:
    """A plain copy of ``model`` compacted by ``plan`` (see ``compact``); ``model`` is not modified.

    Raises :class:`bmrs.errors.ModelError` if ``model``'s noise (masks, posteriors) is not the one the
    plan was made for, or the result does not compute what ``model`` computes.

    Examples:
        >>> import torch, bmrs
        >>> from bmrs.compaction import compact
        >>> mlp = bmrs.attach(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)))
        >>> bmrs.noise_layers(mlp)[0][1].mask[:4] = 0
        >>> x = torch.randn(2, 4)
        >>> small = apply(plan(mlp, x), mlp)
        >>> bool(torch.equal(small(x), compact(mlp, x)(x)))
        True
    """
    if not isinstance(plan, CompactionPlan):
        raise ModelError(f"apply: expected a CompactionPlan, got {type(plan).__name__}")
    if not isinstance(model, nn.Module):
        raise ModelError(f"apply: expected an nn.Module, got {type(model).__name__}")
    scales = _scales(model)
    if scales.keys() != plan.scales.keys() or any(
            not torch.equal(scales[k], plan.scales[k].to(scales[k])) for k in scales):
        raise ModelError("apply: the model's noise layers (masks or posteriors) are not those the plan was made "
                         "for; make a new plan with bmrs.compaction.plan")
    folded = fold(model, plan.example_inputs, caller="apply")
    keep_indices(folded.model, plan.kept)
    shapes = {name: tuple(t.shape) for name, t in [*folded.model.named_parameters(), *folded.model.named_buffers()]}
    if shapes != plan.shapes:
        raise ModelError("apply: the model's layers are not those the plan was made for; make a new plan with "
                         "bmrs.compaction.plan")
    mismatch = reference_mismatch(folded)
    if not mismatch <= REL_TOL:
        raise ModelError(f"apply: the compacted model does not compute what the model computes (relative error "
                         f"{mismatch:.2e}); make a new plan with bmrs.compaction.plan")
    restore_requires_grad(folded)
    announce(plan, stacklevel=3)
    return folded.model.eval()


class CompactionWarning(UserWarning):
    """Pruned structures that compaction kept (computing zeros), with where and why; ``stayed`` holds
    {noise layer: (count, reason)}."""

    def __init__(self, message: str, stayed: dict[str, tuple[int, str]]):
        super().__init__(message)
        self.stayed = stayed


def announce(plan: CompactionPlan, stacklevel: int) -> None:
    """Warn about what the plan leaves: every channel (IncompleteCompactionWarning) or some (CompactionWarning)."""
    if plan.incomplete is not None:
        warnings.warn(f"compact: {plan.incomplete}; returning the folded model with every channel kept",
                      IncompleteCompactionWarning, stacklevel=stacklevel)
        return
    if not plan.stayed:
        return
    total = sum(count for count, _ in plan.stayed.values())
    by_reason: dict[str, list[str]] = {}
    for name, (count, why) in plan.stayed.items():
        by_reason.setdefault(why, []).append(f"{name} {count}")
    parts = "; ".join(f"{', '.join(places)} ({why})" for why, places in by_reason.items())
    warnings.warn(CompactionWarning(f"compact: {total} pruned structures stay in the model, computing zeros: "
                                    f"{parts}", plan.stayed), stacklevel=stacklevel)
