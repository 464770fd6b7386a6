"""Hugging Face ``Trainer``: :class:`BMRSCallback` prunes on a schedule, :class:`BMRSTrainer` puts the KL term
into the loss and the noise parameters into their own optimizer group.

Needs ``pip install 'bmrs[transformers]'``.  A ``TrainerCallback`` sees neither the loss nor the optimizer's
construction, so the one line to change is the trainer's class: ``BMRSTrainer`` (or, for a ``Trainer``
subclass of your own, ``class MyTrainer(BMRSTrainerMixin, YourTrainer)``) overrides ``compute_loss`` to
add ``kl_weight × kl_loss`` (divided by the gradient-accumulation steps when the ``Trainer`` does not
divide the loss itself) and ``create_optimizer`` to give the noise parameters ``bmrs.param_groups``'
rate without weight decay (the scheduler then scales it like every group's).  A plain ``Trainer`` with
the callback stops at its first step with a ``ConfigError`` saying so.  ``shrink`` is not offered here: the
``Trainer`` holds the model and optimizer in its training loop, where they cannot be replaced.

Examples:
    >>> import tempfile, torch
    >>> from torch import nn
    >>> from transformers import TrainingArguments
    >>> from bmrs.integrations.transformers import BMRSCallback, BMRSTrainer
    >>> class Classifier(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    ...     def forward(self, x, labels=None):
    ...         logits = self.net(x)
    ...         return {"logits": logits} if labels is None else \\
    ...             {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}
    >>> data = [{"x": torch.randn(16), "labels": i % 4} for i in range(64)]
    >>> args = TrainingArguments(tempfile.mkdtemp(), num_train_epochs=3, per_device_train_batch_size=16,
    ...                          report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True)
    >>> pruning = BMRSCallback(finetune_epochs=1)
    >>> trainer = BMRSTrainer(model=Classifier(), args=args, train_dataset=data, callbacks=[pruning])
    >>> _ = trainer.train()  # doctest: +ELLIPSIS
    {'bmrs/structures_pruned': ..., 'epoch': '1'}
    {'bmrs/structures_pruned': ..., 'epoch': '2'}
    {'train_runtime': ...}
    >>> len(pruning.reports), pruning.compacted.net[0].in_features   # two pruning steps, then the small model
    (2, 16)
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..defaults import FINETUNE, KL_REDUCTION, KL_WEIGHT, NOISE_LR_SCALE
from ..errors import ConfigError
from .plan import PlanResults, PruningPlan

try:
    from transformers import Trainer, TrainerCallback
except ImportError:
    raise ImportError("bmrs.integrations.transformers needs transformers: pip install 'bmrs[transformers]'") from None

__all__ = ["BMRSCallback", "BMRSTrainer", "BMRSTrainerMixin"]

_FIX_TRAINER = "train with bmrs.integrations.transformers.BMRSTrainer (or BMRSTrainerMixin on your Trainer class)"


class BMRSCallback(PlanResults, TrainerCallback):
    """Attach noise layers, prune on a schedule, fine-tune and compact, inside ``Trainer.train``.

    The model (the ``Trainer``'s, at its construction) gets noise layers unless it has them (``targets``:
    what ``bmrs.attach`` gates).  ``criterion`` (default ``bmrs.criteria.BMRSN()``, or a name such as
    ``"bmrs-u"``) prunes after every ``prune_every``-th epoch of the first ``num_train_epochs -
    finetune_epochs``; the last ``finetune_epochs`` fine-tune (``"deterministic"``: θ fixed at E[θ]·mask, no
    KL; ``"noisy"``: as before, without pruning).  After ``train`` :attr:`compacted` holds ``bmrs.compact`` of
    the model (``compact=False`` skips it), traced on ``example_inputs``, by default two rows of the first
    training batch less its label keys.  Each pruning step is logged (``Trainer.log``):
    ``bmrs/structures_pruned``, ``bmrs/newly_pruned``, ``bmrs/pruned_pct``; :attr:`reports` keeps the
    ``PruneReport``s.  Use it with :class:`BMRSTrainer` (see the module docstring).
    """

    def __init__(self, criterion=None, *, prune_every: int = 1, finetune_epochs: int = 0, compact: bool = True,
                 finetune: str = FINETUNE, kl_reduction: str = KL_REDUCTION, kl_weight: float = KL_WEIGHT,
                 noise_lr_scale: float = NOISE_LR_SCALE, amount: int | float | None = None, targets=None,
                 example_inputs: Any = None) -> None:
        self.plan = PruningPlan(criterion, prune_every=prune_every, finetune_epochs=finetune_epochs,
                                finetune=finetune, kl_reduction=kl_reduction, kl_weight=kl_weight,
                                noise_lr_scale=noise_lr_scale, amount=amount, targets=targets,
                                example_inputs=example_inputs)
        self.compact = bool(compact)
        self.trainer: Trainer | None = None  # set by BMRSTrainerMixin
        self._epoch, self._total = 0, None
        self._kl_added = False
        self._num_train: int | None = None

    def frozen(self) -> bool:
        return self.plan.frozen(self._epoch, self._total) if self._epoch else False

    # -- what the trainer calls ------------------------------------------------------------------
    def before_forward(self, model: nn.Module, inputs: Any) -> None:
        """Keep the first batch as example inputs; fix θ while fine-tuning (after ``Trainer``'s ``model.train()``)."""
        self.plan.observe(inputs)
        if model.training and self.frozen():
            self.plan.freeze(model)

    def kl_term(self, model: nn.Module) -> Tensor:
        """The KL term of a training step's loss (zero in evaluation and deterministic fine-tuning)."""
        if not model.training or self.frozen():
            return torch.zeros((), device=next(model.parameters()).device)
        self._kl_added = True
        return self.plan.kl(model, self._num_train)

    # -- the Trainer's events --------------------------------------------------------------------
    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.plan.prepare(model)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        self._total = math.ceil(state.num_train_epochs) if state.num_train_epochs else None
        self.plan.pruning_epochs(self._total)  # (checks finetune_epochs against the run's length)
        if self.plan.kl_reduction == "elbo":
            try:
                self._num_train = len(train_dataloader.dataset)
            except (AttributeError, TypeError):
                raise ConfigError("kl_reduction='elbo' needs the training-set size, and the training data has no "
                                  "length; use kl_reduction='structure-mean'") from None
        if optimizer is not None:
            self.plan.check_optimizer(model, [optimizer], _FIX_TRAINER)

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._epoch = round(state.epoch or 0) + 1

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if not self._kl_added and not self.frozen():
            raise ConfigError(f"BMRSCallback: the training loss has no KL term, so nothing would be pruned; {_FIX_TRAINER}")
        self._kl_added = False

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if not self.plan.prunes_after(self._epoch, self._total):
            return
        metrics = self.plan.metrics(self.plan.prune(model))
        if self.trainer is not None:
            self.trainer.log(metrics)
        else:
            state.log_history.append({**metrics, "epoch": state.epoch, "step": state.global_step})

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.plan.finish(model, compact=self.compact)


class BMRSTrainerMixin:
    """Put before a ``Trainer`` class: KL term in ``compute_loss``, noise parameters' group in
    ``create_optimizer``; uses the :class:`BMRSCallback` among ``callbacks`` (a default one when none is).

    Examples:
        class MySFTTrainer(BMRSTrainerMixin, SFTTrainer):
            pass
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        found = [c for c in self.callback_handler.callbacks if isinstance(c, BMRSCallback)]
        if len(found) > 1:
            raise ConfigError(f"the Trainer has {len(found)} BMRSCallbacks; pass one")
        if not found:
            found = [BMRSCallback()]
            self.add_callback(found[0])
            found[0].plan.prepare(self.model)
        self.bmrs = found[0]
        self.bmrs.trainer = self

    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        self.bmrs.plan.split_noise_group(self.model, optimizer, self.bmrs.plan.steps_per_prune(self._steps_per_epoch()))
        return optimizer

    def _steps_per_epoch(self) -> float | None:
        if self.train_dataset is None:
            return None
        try:
            batches = len(self.get_train_dataloader())
        except TypeError:  # an iterable dataset
            return None
        return batches / max(self.args.gradient_accumulation_steps, 1)

    def compute_loss(self, model, inputs, return_outputs: bool = False, **kwargs):
        self.bmrs.before_forward(model, inputs)
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, **kwargs)
        if model.training:
            kl = self.bmrs.kl_term(model)
            if self._loss_scaled_for_accumulation(kwargs.get("num_items_in_batch")):
                kl = kl / max(getattr(self, "current_gradient_accumulation_steps", None)
                              or self.args.gradient_accumulation_steps, 1)
            loss = loss + kl
        return (loss, outputs) if return_outputs else loss

    def _loss_scaled_for_accumulation(self, num_items_in_batch) -> bool:
        """Whether ``Trainer.training_step`` takes the loss as already divided over the accumulated batch (then
        it does not divide it by the accumulation steps, and the KL term must be divided here)."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = (getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None) or \
                getattr(self, "compute_loss_func", None) is not None
        return bool(scaled)


class BMRSTrainer(BMRSTrainerMixin, Trainer):
    """``transformers.Trainer`` with BMRS pruning: ``BMRSTrainer(model=…, args=…, callbacks=[BMRSCallback(…)])``
    (see the module docstring for a runnable example)."""
