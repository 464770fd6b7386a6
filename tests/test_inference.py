"""bmrs.inference.optimize: fast inference layers as an explicit step after compaction."""

from __future__ import annotations

import pytest
import torch

import bmrs
from bmrs.errors import ConfigError, ModelError
from families import make


@pytest.mark.parametrize("family", ["lenet", "lenet_tanh", "mlp"])
def test_optimize_after_compact_is_compact_with_fast_layers(family):
    case = make(family)
    model = case.model.eval()
    plain = bmrs.compact(model, case.x)
    assert not any(type(m).__module__.startswith("bmrs.") for m in plain.modules())  # plain torch layers
    fast = bmrs.compact(model, case.x, fast_layers=True)
    assert bmrs.inference.optimize(plain) is plain
    assert [type(m) for m in plain.modules()] == [type(m) for m in fast.modules()]
    assert any(type(m).__module__ == "bmrs.inference.layers" for m in plain.modules())
    with torch.no_grad():
        torch.testing.assert_close(plain(case.x_other), fast(case.x_other))


def test_optimize_refuses_bad_input():
    with pytest.raises(ModelError, match="compact it first"):
        bmrs.inference.optimize(bmrs.attach(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),
                                                                torch.nn.Linear(8, 3))))
    with pytest.raises(ModelError, match="expected an nn.Module"):
        bmrs.inference.optimize("model")
    with pytest.raises(ConfigError, match="max_channel_product"):
        bmrs.inference.optimize(torch.nn.Linear(2, 2), max_channel_product=-1)
