"""Compaction as a plan, then apply: the plan's kept indices are what compact and shrink remove."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch_pruning as tp
from torch import nn

import bmrs
from bmrs.compaction import CompactionPlan, CompactionWarning, apply, compact, plan, shrink
from bmrs.compaction.surgery import take
from bmrs.errors import ModelError
from families import make


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.state_dict().items()}


def _cnn(pruned: list[int]) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = bmrs.attach(nn.Sequential(nn.Conv2d(1, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(),
                                      nn.Linear(6 * 4 * 4, 3)))
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        bmrs.noise_layers(model)[0][1].mask[pruned] = 0
    return model.eval(), torch.randn(2, 1, 6, 6)


def test_plan_names_the_kept_indices_of_every_tensor_that_shrinks():
    model, x = _cnn([0, 3, 4])
    p = plan(model, x)
    assert isinstance(p, CompactionPlan) and p.incomplete is None and p.stayed == {}
    keep = [1, 2, 5]
    for name in ("0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var"):
        assert p.kept[name][0].tolist() == keep
    assert p.kept["0.weight"][1:] == [None, None, None]
    columns = [c * 16 + i for c in keep for i in range(16)]  # the Linear reads each channel's 4×4 block
    assert p.kept["4.weight"][0] is None and p.kept["4.weight"][1].tolist() == columns
    assert "4.bias" not in p.kept
    assert p.shapes["4.weight"] == (3, 48)
    noise = bmrs.noise_layers(model)[0][1]
    torch.testing.assert_close(p.scales["1"], noise.expected_theta().detach(), rtol=0, atol=0)
    assert noise.mask.sum() == 3  # the model is not modified


@pytest.mark.parametrize("family", ["mlp", "lenet", "resnet", "concat", "transformer"])
def test_apply_of_the_plan_is_compact(family):
    case = make(family)
    model = case.model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CompactionWarning)
        p = plan(model, case.x)
        small = apply(p, model)
        want = compact(model, case.x, fast_layers=False)
    assert p.kept  # something is removed
    got, expected = _state(small), _state(want)
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)
    assert {k: tuple(v.shape) for k, v in small.named_parameters()} == \
        {k: s for k, s in p.shapes.items() if k in dict(small.named_parameters())}
    with torch.no_grad():
        torch.testing.assert_close(small(case.x_other), want(case.x_other), rtol=0, atol=0)


def test_plan_records_what_stays_as_compact_warns():
    case = make("resnet")
    model = case.model.eval()
    with pytest.warns(CompactionWarning) as caught:
        compact(model, case.x)
    stayed = [w.message.stayed for w in caught if isinstance(w.message, CompactionWarning)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompactionWarning)  # plan itself does not warn
        assert plan(model, case.x).stayed == stayed[0] != {}


def test_apply_refuses_a_plan_made_for_other_masks():
    model, x = _cnn([0, 3])
    p = plan(model, x)
    bmrs.noise_layers(model)[0][1].mask[4] = 0
    with pytest.raises(ModelError, match="not those the plan was made for"):
        apply(p, model)
    with pytest.raises(ModelError, match="expected a CompactionPlan"):
        apply({"kept": {}}, model)


def test_a_torch_pruning_failure_is_an_error_naming_the_layer(monkeypatch):
    model, x = _cnn([0, 3])

    def broken(*args, **kwargs):
        raise RuntimeError("the API changed")

    monkeypatch.setattr(tp.DependencyGraph, "get_pruning_group", broken)
    with pytest.raises(ModelError, match=r"noise layer '1'.*the API changed"):
        compact(model, x)


def test_shrink_keeps_what_the_plan_keeps():
    case = make("lenet")
    model = case.model.eval()
    p = plan(model, case.x)
    small, _ = shrink(model, case.x)
    originals = dict(model.named_parameters())
    for name, tensor in small.named_parameters():
        if name in p.kept:
            torch.testing.assert_close(tensor, take(originals[name], p.kept[name]), rtol=0, atol=0)
    for name, noise in bmrs.noise_layers(small):
        producer = dict(bmrs.noise_layers(model))[name].producer
        assert noise.kept_index.tolist() == p.kept[f"{producer}.weight"][0].tolist()

