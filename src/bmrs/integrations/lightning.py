"""PyTorch Lightning: :class:`BMRSPruning`, continuous BMRS pruning as a ``Callback``.

Needs ``pip install 'bmrs[lightning]'`` (``lightning``; ``pytorch_lightning`` is used when only it is
installed).  Two lines go into the LightningModule, since a callback cannot change the loss that
``training_step`` returns nor build the optimizer:

* ``training_step`` adds the KL term: ``loss = loss + kl_term(self)`` (it enters the gradient like any
  term of the loss, scaled with it under gradient accumulation and mixed precision);
* ``configure_optimizers`` builds the optimizer from ``param_groups(self, lr)``, which gives the noise
  parameters their own rate (``bmrs.param_groups``, raised when an epoch has few steps).

Forgetting either stops training at its first step with a ``ConfigError`` saying the fix, rather than
training a network that never prunes.

Examples:
    >>> import torch
    >>> from torch import nn
    >>> import lightning.pytorch as pl
    >>> from bmrs.integrations.lightning import BMRSPruning, kl_term, param_groups
    >>> class Classifier(pl.LightningModule):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    ...     def training_step(self, batch, batch_idx):
    ...         x, y = batch
    ...         return nn.functional.cross_entropy(self.net(x), y) + kl_term(self)
    ...     def configure_optimizers(self):
    ...         return torch.optim.Adam(param_groups(self, lr=1e-3))
    >>> data = torch.utils.data.TensorDataset(torch.randn(64, 16), torch.randint(0, 4, (64,)))
    >>> pruning = BMRSPruning(module="net", finetune_epochs=1)
    >>> trainer = pl.Trainer(max_epochs=3, callbacks=[pruning], logger=False, enable_checkpointing=False,
    ...                      enable_progress_bar=False, enable_model_summary=False)
    >>> trainer.fit(Classifier(), torch.utils.data.DataLoader(data, batch_size=16))  # doctest: +ELLIPSIS
    >>> len(pruning.reports), pruning.compacted[0].in_features   # two pruning steps, then the small network
    (2, 16)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..defaults import FINETUNE, KL_REDUCTION, KL_WEIGHT, NOISE_LR_SCALE
from ..errors import ConfigError
from ..nn.attach import noise_layers
from ..nn.param_groups import param_groups as _param_groups
from .plan import PlanResults, PruningPlan

try:
    from lightning.pytorch import Callback
except ImportError:  # the older package name
    try:
        from pytorch_lightning import Callback
    except ImportError:
        raise ImportError("bmrs.integrations.lightning needs PyTorch Lightning: pip install 'bmrs[lightning]'") from None

__all__ = ["BMRSPruning", "kl_term", "param_groups", "find_callback"]

_FIX_OPTIMIZER = ("build it in configure_optimizers from param_groups(self, lr) "
                  "(from bmrs.integrations.lightning import param_groups)")


class BMRSPruning(PlanResults, Callback):
    """Attach noise layers, prune on a schedule, fine-tune and compact, inside ``Trainer.fit``.

    ``module``: the attribute path of the network inside the LightningModule (``"net"``); None prunes the
    LightningModule itself.  A network with noise layers already (``bmrs.attach``) is used as it is;
    otherwise noise is attached at ``setup`` (to ``targets``, default ``bmrs.attach``'s policy).
    ``criterion`` (default ``bmrs.criteria.BMRSN()``, or a name such as ``"bmrs-u"``) prunes after every
    ``prune_every``-th epoch of the first ``max_epochs - finetune_epochs``; the last ``finetune_epochs``
    fine-tune (``finetune="deterministic"``: θ fixed at E[θ]·mask, no KL; ``"noisy"``: as before, without
    pruning).  ``shrink=True`` removes pruned structures after each pruning step (needs ``module``, one
    process and one optimizer over that module's parameters only); checkpoints of a shrunk network no
    longer fit the original class.  At the end of ``fit`` :attr:`compacted` holds ``bmrs.compact`` of the
    network (``compact=False`` skips it), traced on ``example_inputs``, by default two rows of the first
    training batch (a tensor, a tuple's first element, a dict less its label keys).  Each pruning step
    logs ``bmrs/structures_pruned``, ``bmrs/newly_pruned`` and ``bmrs/pruned_pct`` through
    ``LightningModule.log_dict``; :attr:`reports` keeps the ``PruneReport``s.  See the module docstring
    for the two lines the LightningModule needs.
    """

    def __init__(self, criterion=None, *, module: str | None = None, prune_every: int = 1, finetune_epochs: int = 0,
                 shrink: bool = False, compact: bool = True, finetune: str = FINETUNE,
                 kl_reduction: str = KL_REDUCTION, kl_weight: float = KL_WEIGHT,
                 noise_lr_scale: float = NOISE_LR_SCALE, amount: int | float | None = None, targets=None,
                 example_inputs: Any = None) -> None:
        super().__init__()
        self.plan = PruningPlan(criterion, prune_every=prune_every, finetune_epochs=finetune_epochs,
                                finetune=finetune, kl_reduction=kl_reduction, kl_weight=kl_weight,
                                noise_lr_scale=noise_lr_scale, amount=amount, targets=targets,
                                example_inputs=example_inputs)
        if module is not None and (not isinstance(module, str) or not module):
            raise ConfigError(f"module must be the attribute path of the network (e.g. 'net'), got {module!r}")
        if shrink and module is None:
            raise ConfigError("shrink=True replaces the network by a smaller one: name it with module= (e.g. 'net')")
        self.module, self.shrink, self.compact = module, bool(shrink), bool(compact)
        self._kl_added = False
        self._num_train: int | None = None

    def network(self, pl_module) -> nn.Module:
        """The network this callback prunes: ``pl_module`` or its submodule ``module``."""
        if self.module is None:
            return pl_module
        try:
            return pl_module.get_submodule(self.module)
        except AttributeError:
            raise ConfigError(f"BMRSPruning(module={self.module!r}): {type(pl_module).__name__} has no submodule "
                              f"{self.module!r}") from None

    # -- what the LightningModule calls ----------------------------------------------------------
    def kl_term(self, pl_module) -> Tensor:
        """The KL term to add to ``training_step``'s loss (zero while fine-tuning deterministically)."""
        trainer = pl_module.trainer
        if not pl_module.training or self.plan.frozen(trainer.current_epoch + 1, _max_epochs(trainer)):
            return torch.zeros((), device=pl_module.device)
        self._kl_added = True
        return self.plan.kl(self.network(pl_module), self._train_size(trainer))

    def param_groups(self, pl_module, lr: float, **kwargs) -> list[dict]:
        """``bmrs.param_groups(pl_module, lr, …)`` with the steps between two pruning steps taken from the
        trainer (``kwargs`` go to it: ``noise_lr=``)."""
        steps = None
        trainer = pl_module.trainer
        if _max_epochs(trainer) is not None:
            trainer.estimated_stepping_batches  # (sets up the training data: num_training_batches)
            steps = trainer.num_training_batches / max(trainer.accumulate_grad_batches, 1)
        return _param_groups(pl_module, lr, self.plan.noise_lr_scale,
                             steps_per_prune=self.plan.steps_per_prune(steps), **kwargs)

    # -- Lightning's hooks -----------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            self.plan.prepare(self.network(pl_module))

    def on_train_start(self, trainer, pl_module) -> None:
        self.plan.pruning_epochs(_max_epochs(trainer))  # (checks finetune_epochs against the run's length)
        network = self.network(pl_module)
        self.plan.check_optimizer(network, trainer.optimizers, _FIX_OPTIMIZER)
        if self.shrink:
            _check_shrinkable(trainer, network)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self.plan.observe(batch)
        if self.plan.frozen(trainer.current_epoch + 1, _max_epochs(trainer)):
            self.plan.freeze(self.network(pl_module))  # (after Lightning's own train() calls)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self._kl_added and not self.plan.frozen(trainer.current_epoch + 1, _max_epochs(trainer)):
            raise ConfigError("BMRSPruning: the training loss has no KL term, so nothing would be pruned; add it in "
                              "training_step: loss = loss + kl_term(self) (from bmrs.integrations.lightning "
                              "import kl_term)")
        self._kl_added = False

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not self.plan.prunes_after(trainer.current_epoch + 1, _max_epochs(trainer)):
            return
        network = self.network(pl_module)
        report = self.plan.prune(network)
        if trainer.world_size > 1:  # every process keeps rank 0's masks (they agree unless sums differ)
            masks = trainer.strategy.broadcast([noise.mask.detach().cpu() for _, noise in noise_layers(network)])
            with torch.no_grad():
                for (_, noise), mask in zip(noise_layers(network), masks):
                    noise.mask.copy_(mask)
        pl_module.log_dict(self.plan.metrics(report), on_step=False, on_epoch=True)
        if self.shrink:
            self._shrink(trainer, pl_module, network)

    def on_train_end(self, trainer, pl_module) -> None:
        self.plan.finish(self.network(pl_module), compact=self.compact)

    # -- shrinking -------------------------------------------------------------------------------
    def _shrink(self, trainer, pl_module, network: nn.Module) -> None:
        from ..compaction.shrink import shrink

        small, optimizer = shrink(network, self.plan.example_inputs, trainer.optimizers[0])
        if small is network:
            return
        parent, _, attribute = self.module.rpartition(".")
        setattr(pl_module.get_submodule(parent) if parent else pl_module, attribute, small)
        trainer.optimizers = [optimizer]
        for config in trainer.lr_scheduler_configs:
            config.scheduler.optimizer = optimizer

    def _train_size(self, trainer) -> int | None:
        if self.plan.kl_reduction != "elbo":
            return None
        if self._num_train is None:
            try:
                self._num_train = len(trainer.train_dataloader.dataset)
            except (AttributeError, TypeError):
                raise ConfigError("kl_reduction='elbo' needs the training-set size, and the training data loader "
                                  "has no sized dataset; use kl_reduction='structure-mean'") from None
        return self._num_train


def _max_epochs(trainer) -> int | None:
    epochs = trainer.max_epochs
    return None if epochs is None or epochs < 0 else int(epochs)


def _check_shrinkable(trainer, network: nn.Module) -> None:
    if trainer.world_size > 1:
        raise ConfigError("shrink=True works in one process only (each process would rebuild its network alone)")
    if len(trainer.optimizers) != 1:
        raise ConfigError(f"shrink=True needs exactly one optimizer, got {len(trainer.optimizers)}")
    inside = {id(p) for p in network.parameters()}
    if any(id(p) not in inside for group in trainer.optimizers[0].param_groups for p in group["params"]):
        raise ConfigError("shrink=True needs an optimizer over the pruned module's parameters only")


def find_callback(pl_module) -> BMRSPruning:
    """The one :class:`BMRSPruning` among the trainer's callbacks; ConfigError if none or several."""
    try:
        callbacks = pl_module.trainer.callbacks
    except RuntimeError:
        raise ConfigError(f"{type(pl_module).__name__} is not attached to a Trainer: call this inside "
                          "training_step or configure_optimizers, during Trainer.fit") from None
    found = [c for c in callbacks if isinstance(c, BMRSPruning)]
    if len(found) != 1:
        raise ConfigError(f"the Trainer has {len(found)} BMRSPruning callbacks; pass exactly one: "
                          "Trainer(callbacks=[BMRSPruning(...)])")
    return found[0]


def kl_term(pl_module) -> Tensor:
    """``training_step``'s KL term: ``loss = loss + kl_term(self)`` (see :meth:`BMRSPruning.kl_term`)."""
    return find_callback(pl_module).kl_term(pl_module)


def param_groups(pl_module, lr: float, **kwargs) -> list[dict]:
    """``configure_optimizers``' parameter groups: ``torch.optim.Adam(param_groups(self, lr=1e-3))``
    (see :meth:`BMRSPruning.param_groups`)."""
    return find_callback(pl_module).param_groups(pl_module, lr, **kwargs)
