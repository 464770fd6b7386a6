"""Callbacks for the trainers people use; each needs its library, installed with an extra.

* :mod:`bmrs.integrations.lightning` — ``BMRSPruning``, a PyTorch Lightning callback
  (``pip install 'bmrs[lightning]'``).
* :mod:`bmrs.integrations.transformers` — ``BMRSCallback`` and ``BMRSTrainer`` for Hugging Face's
  ``Trainer`` (``pip install 'bmrs[transformers]'``).

Both run the schedule of :class:`bmrs.integrations.plan.PruningPlan` (the one ``bmrs train`` and the
README's own-loop recipe follow).  This package imports neither library until one of its modules is
imported.

Examples:
    >>> from bmrs.integrations.plan import PruningPlan
    >>> PruningPlan(prune_every=2, finetune_epochs=1).prunes_after(4, total_epochs=5)
    True
"""
