"""Shrinking during training: the narrowed network computes and trains like the masked one."""

from __future__ import annotations

import copy

import pytest
import torch

import bmrs
from bmrs.compaction import restore_shrunk, shrink
from bmrs.compaction.count import count_params
from test_compaction import make


def _step(model, optimizer, x, seed):
    torch.manual_seed(seed)
    out = model(x)
    loss = out.square().mean() + bmrs.kl_loss(model)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return out.detach()


@pytest.mark.parametrize("family", ["mlp", "lenet", "resnet"])
def test_shrunk_network_trains_exactly_like_the_masked_one(family):
    case = make(family)
    masked = case.model.train()
    opt = torch.optim.Adam(masked.parameters(), lr=1e-2)
    for seed in range(2):  # Adam has state before the shrink
        _step(masked, opt, case.x, seed)
    before = bmrs.pruning.structure_counts(masked)

    twin = copy.deepcopy(masked)
    twin_opt = torch.optim.Adam(twin.parameters(), lr=1e-2)
    twin_opt.load_state_dict(opt.state_dict())
    small, small_opt = shrink(twin, case.x, twin_opt)
    assert count_params(small) < count_params(masked)
    after = bmrs.pruning.structure_counts(small)
    assert (after.pruned, after.structures) == (before.pruned, before.structures)

    for seed in range(2, 6):  # same θ stream, same KL weights, sliced Adam moments: same trajectory
        want = _step(masked, opt, case.x, seed)
        got = _step(small, small_opt, case.x, seed)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    masked.eval(), small.eval()
    with torch.no_grad():
        torch.testing.assert_close(small(case.x_other), masked(case.x_other), rtol=1e-4, atol=1e-5)


def test_restore_shrunk_rebuilds_the_saved_architecture():
    case = make("lenet")
    model = case.model.eval()
    small, _ = shrink(model, case.x)
    fresh = make("lenet").model  # the same family, other values
    rebuilt = restore_shrunk(fresh, small.state_dict(), case.x)
    rebuilt.load_state_dict(small.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(case.x_other), small(case.x_other))


def test_nothing_to_remove_returns_the_same_objects():
    model = bmrs.attach(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)))
    opt = torch.optim.Adam(model.parameters())
    assert shrink(model, torch.randn(2, 4), opt) == (model, opt)


def test_global_amount_counts_removed_structures():
    model = bmrs.attach(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)))
    bmrs.noise_layers(model)[0][1].mask[:3] = 0
    small, _ = shrink(model, torch.randn(2, 4))
    report = bmrs.prune(small, bmrs.criteria.SNR(), amount=5)  # 3 already gone: 2 more
    assert (report.pruned, report.newly_pruned, report.structures) == (5, 2, 8)
