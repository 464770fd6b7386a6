"""The README's own-loop recipe on a slice of real Fashion-MNIST: attach, KL in the loss, prune, compact."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import bmrs
from bmrs.data import load_dataset


@pytest.fixture(scope="module")
def fashion():
    return load_dataset("fashion-mnist", train_subset=8000, progress=False)


def _accuracy(model, dataset):
    model.eval()
    x, y = dataset.tensors
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def test_a_users_loop_with_bmrs_n_defaults_prunes_within_three_epochs(fashion):
    torch.manual_seed(0)
    model = bmrs.attach(nn.Sequential(nn.Flatten(), nn.Linear(32 * 32, 200), nn.ReLU(),
                                      nn.Linear(200, 200), nn.ReLU(), nn.Linear(200, 10)))
    optimizer = torch.optim.Adam(bmrs.param_groups(model, lr=2e-3))
    x, y = fashion.train.tensors
    generator = torch.Generator().manual_seed(0)
    reports = []
    for epoch in range(3):
        model.train()
        for batch in torch.randperm(len(y), generator=generator).split(32):
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch]) + bmrs.kl_loss(model)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", bmrs.pruning.PruningWarning)
            reports.append(bmrs.prune(model, bmrs.criteria.BMRSN()))
    assert reports[-1].pruned_pct > 50, [r.pruned for r in reports]  # prunes, with the default rule
    accuracy = _accuracy(model, fashion.test)
    assert accuracy > 0.7  # chance is 0.1
    small = bmrs.compact(model, x[:2])
    assert sum(p.numel() for p in small.parameters()) < 0.5 * sum(p.numel() for p in model.parameters())
    assert _accuracy(small, fashion.test) == pytest.approx(accuracy, abs=1e-3)
