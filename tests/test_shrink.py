"""Shrinking during training: the narrowed network computes and trains like the masked one."""

from __future__ import annotations


import torch

import bmrs
from bmrs.compaction import restore_shrunk, shrink
from families import make


# (every family trains after shrinking exactly as the masked network: tests/test_model_families.py)
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
