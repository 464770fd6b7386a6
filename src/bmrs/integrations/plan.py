"""The pruning schedule the trainer callbacks follow, without any trainer library.

It is ``bmrs train``'s schedule (``bmrs.training.run``) and the README's own-loop recipe: noise layers
attached (``bmrs.attach``), ``kl_weight × kl_loss(model, kl_reduction)`` in the training loss, the
noise parameters at their own learning rate (``bmrs.param_groups``), a pruning step after every
``prune_every``-th epoch of the first ``total - finetune_epochs`` epochs, then ``finetune_epochs`` of
fine-tuning (by default deterministic: θ fixed at E[θ]·mask, no KL), and ``bmrs.compact`` at the end.
The callbacks only map their trainer's events onto it.

Examples:
    >>> import torch
    >>> plan = PruningPlan(finetune_epochs=1)
    >>> net = plan.prepare(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)))
    >>> [plan.prunes_after(epoch, total_epochs=3) for epoch in (1, 2, 3)], plan.frozen(3, total_epochs=3)
    ([True, True, False], True)
    >>> plan.kl(net).item() > 0
    True
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from ..defaults import FINETUNE, FINETUNE_MODES, KL_REDUCTION, KL_REDUCTIONS, KL_WEIGHT, NOISE_LR_SCALE
from ..errors import ConfigError
from ..nn.attach import attach, kl_loss, noise_layers
from ..nn.param_groups import noise_learning_rate
from ..pruning import PruneReport, PruningWarning, as_criterion, nothing_pruned_reason, prune

__all__ = ["PruningPlan", "PlanResults", "model_inputs", "LABEL_KEYS"]

#: keys of a dict batch that hold targets, not model inputs (left out of the example inputs)
LABEL_KEYS = ("labels", "label", "label_ids", "targets", "target")


def _count(value, name: str, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ConfigError(f"{name} must be an integer >= {least}, got {value!r}")
    return value


def model_inputs(batch: Any, rows: int = 2) -> Any:
    """The model's inputs in a training batch, cut to its first ``rows`` examples (detached copies).

    A tensor is the input; a tuple or list is ``(inputs, targets, …)``, so its first element is; a dict
    is keyword arguments, less the keys in :data:`LABEL_KEYS`.

    Examples:
        >>> import torch
        >>> model_inputs((torch.zeros(8, 3), torch.zeros(8))).shape
        torch.Size([2, 3])
        >>> sorted(model_inputs({"input_ids": torch.zeros(8, 5), "labels": torch.zeros(8)}))
        ['input_ids']
    """
    if isinstance(batch, Tensor):
        return batch[:rows].detach().clone()
    if isinstance(batch, Mapping):
        return {k: model_inputs(v, rows) if isinstance(v, Tensor) else v for k, v in batch.items()
                if k not in LABEL_KEYS}
    if isinstance(batch, (tuple, list)) and batch:
        return model_inputs(batch[0], rows)
    raise ConfigError(f"cannot tell the model's inputs in a training batch of type {type(batch).__name__}; "
                      "pass example_inputs= (what the model is called with, for compaction)")


class PruningPlan:
    """What to prune when, and how; shared by the Lightning and the Hugging Face callbacks.

    ``criterion``: a criterion (default ``bmrs.criteria.BMRSN()``) or its command-line name;
    ``amount``: prune the global top ``amount`` by the criterion's ranking instead of its own rule (needed
    by ``"l2"``).  ``targets``: what ``bmrs.attach`` gates when the model has no noise layers yet.
    Epochs are counted from 1.
    """

    def __init__(self, criterion=None, *, prune_every: int = 1, finetune_epochs: int = 0,
                 finetune: str = FINETUNE, kl_reduction: str = KL_REDUCTION, kl_weight: float = KL_WEIGHT,
                 noise_lr_scale: float = NOISE_LR_SCALE, amount: int | float | None = None,
                 targets: Iterable | None = None, example_inputs: Any = None) -> None:
        from ..criteria import BMRSN

        self.criterion = as_criterion(BMRSN() if criterion is None else criterion)
        self.prune_every = _count(prune_every, "prune_every", 1)
        self.finetune_epochs = _count(finetune_epochs, "finetune_epochs", 0)
        if finetune not in FINETUNE_MODES:
            raise ConfigError(f"finetune must be one of {', '.join(FINETUNE_MODES)}, got {finetune!r}")
        if kl_reduction not in KL_REDUCTIONS:
            raise ConfigError(f"kl_reduction must be one of {', '.join(KL_REDUCTIONS)}, got {kl_reduction!r}")
        if isinstance(kl_weight, bool) or not isinstance(kl_weight, (int, float)) or not 0 <= kl_weight < math.inf:
            raise ConfigError(f"kl_weight must be a finite number >= 0, got {kl_weight!r}")
        if isinstance(noise_lr_scale, bool) or not isinstance(noise_lr_scale, (int, float)) or \
                not 0 < noise_lr_scale < math.inf:
            raise ConfigError(f"noise_lr_scale must be a positive finite number, got {noise_lr_scale!r}")
        self.finetune, self.kl_reduction, self.kl_weight = finetune, kl_reduction, float(kl_weight)
        self.noise_lr_scale, self.amount, self.targets = float(noise_lr_scale), amount, targets
        self.example_inputs = example_inputs
        self.reports: list[PruneReport] = []
        self.compacted: nn.Module | None = None

    # -- the model -------------------------------------------------------------------------------
    def prepare(self, model: nn.Module) -> nn.Module:
        """``model`` with noise layers: attached (to ``targets``) unless it has them already."""
        return model if noise_layers(model) else attach(model, self.targets)

    def kl(self, model: nn.Module, num_train: int | None = None) -> Tensor:
        """The KL term of the training loss: ``kl_weight × kl_loss(model, kl_reduction, num_train)``."""
        return self.kl_weight * kl_loss(model, self.kl_reduction, num_train)

    def freeze(self, model: nn.Module) -> None:
        """Deterministic fine-tuning: the noise layers act as in evaluation (θ = E[θ]·mask, no gradient)."""
        for _, noise in noise_layers(model):
            if noise.training:
                noise.eval()

    def noise_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for _, noise in noise_layers(model) for p in noise.parameters(recurse=False)]

    # -- the schedule ----------------------------------------------------------------------------
    def pruning_epochs(self, total_epochs: int | None) -> int | None:
        """Epochs with pruning (the rest fine-tune); None when the run's length is open."""
        if total_epochs is None:
            if self.finetune_epochs:
                raise ConfigError("finetune_epochs needs a run of known length: set the trainer's number of epochs")
            return None
        if self.finetune_epochs >= total_epochs:
            raise ConfigError(f"finetune_epochs={self.finetune_epochs} leaves no epoch for pruning in a run of "
                              f"{total_epochs} epochs; train for more epochs than finetune_epochs")
        return total_epochs - self.finetune_epochs

    def prunes_after(self, epoch: int, total_epochs: int | None) -> bool:
        """Whether a pruning step follows ``epoch`` (counted from 1), as ``bmrs train`` does."""
        last = self.pruning_epochs(total_epochs)
        return (last is None or epoch <= last) and epoch % self.prune_every == 0

    def finetuning(self, epoch: int, total_epochs: int | None) -> bool:
        last = self.pruning_epochs(total_epochs)
        return last is not None and epoch > last

    def frozen(self, epoch: int, total_epochs: int | None) -> bool:
        """Whether ``epoch`` fine-tunes deterministically (noise layers in eval mode, no KL term)."""
        return self.finetune == "deterministic" and self.finetuning(epoch, total_epochs)

    def steps_per_prune(self, steps_per_epoch: int | float | None) -> int | None:
        """Optimizer steps between two pruning steps (``bmrs.param_groups`` raises the noise rate for few)."""
        if steps_per_epoch is None or not math.isfinite(steps_per_epoch) or steps_per_epoch < 1:
            return None
        return int(steps_per_epoch) * self.prune_every

    # -- pruning and compaction ------------------------------------------------------------------
    def prune(self, model: nn.Module) -> PruneReport:
        """One pruning step (warnings that nothing was pruned wait for :meth:`finish`)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PruningWarning)
            report = prune(model, self.criterion, self.amount)
        self.reports.append(report)
        return report

    @staticmethod
    def metrics(report: PruneReport) -> dict[str, float]:
        """A pruning step's counts as the callbacks log them."""
        return {"bmrs/structures_pruned": float(report.pruned), "bmrs/newly_pruned": float(report.newly_pruned),
                "bmrs/pruned_pct": report.pruned_pct}

    def observe(self, batch: Any) -> None:
        """Keep the first training batch's inputs as the example inputs of compaction (unless given)."""
        if self.example_inputs is None:
            self.example_inputs = model_inputs(batch)

    def finish(self, model: nn.Module, compact: bool = True) -> nn.Module | None:
        """End of training: say why nothing was pruned, if so; compact ``model`` into :attr:`compacted`."""
        from ..compaction import compact as compact_model
        from ..criteria import ModelReduction

        if self.reports and self.reports[-1].pruned == 0 and self.amount is None and \
                isinstance(self.criterion, ModelReduction):
            warnings.warn(nothing_pruned_reason(model, repr(self.criterion)), PruningWarning, stacklevel=2)
        if compact:
            if self.example_inputs is None:
                raise ConfigError("no example inputs for compaction: no training batch was seen; pass example_inputs=")
            was_training = model.training
            self.compacted = compact_model(model, self.example_inputs)
            model.train(was_training)
        return self.compacted

    # -- the optimizer ---------------------------------------------------------------------------
    def check_optimizer(self, model: nn.Module, optimizers: Iterable[torch.optim.Optimizer], fix: str) -> None:
        """ConfigError unless every noise parameter is trained, in a parameter group of its own kind (so it
        has its own learning rate and no weight decay pulls it); ``fix`` says how, for this trainer."""
        noise = {id(p) for p in self.noise_parameters(model)}
        trained, shared = set(), False
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                ids = {id(p) for p in group["params"]}
                trained |= ids & noise
                shared |= bool(ids & noise) and bool(ids - noise)
        if noise - trained:
            raise ConfigError(f"the optimizer does not train the noise parameters, so nothing would be pruned; {fix}")
        if shared:
            raise ConfigError(f"the noise parameters share a learning rate with the network's weights (they need "
                              f"about {self.noise_lr_scale:g}x; bmrs.defaults.NOISE_LR_SCALE); {fix}")

    def split_noise_group(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                          steps_per_prune: int | None = None) -> torch.optim.Optimizer:
        """Move the noise parameters of a freshly built optimizer into a group of their own at
        ``bmrs.param_groups``'s rate (``noise_lr_scale`` × the optimizer's lr, raised for few steps per
        pruning step) without weight decay.  Before the first step only (the optimizer holds no state)."""
        noise = self.noise_parameters(model)
        ids = {id(p) for p in noise}
        if any(id(p) in ids for p in optimizer.state):
            raise ConfigError("split_noise_group: the optimizer has taken steps already; split it before training")
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in ids]
        optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
        group = {"params": noise, "lr": noise_learning_rate(optimizer.defaults["lr"], self.noise_lr_scale,
                                                            steps_per_prune)}
        if "weight_decay" in optimizer.defaults:
            group["weight_decay"] = 0.0
        optimizer.add_param_group(group)
        return optimizer


class PlanResults:
    """What a callback running a :class:`PruningPlan` (its ``plan``) shows of it."""

    plan: PruningPlan

    @property
    def compacted(self) -> nn.Module | None:
        """The compacted network after training (None before, or with ``compact=False``)."""
        return self.plan.compacted

    @property
    def reports(self) -> list[PruneReport]:
        """The ``PruneReport`` of every pruning step so far."""
        return self.plan.reports
