"""Physical compaction: folding E[θ]·mask, removing masked structures, counting.

(Every model family's shared check, exact, smaller and exported to ONNX, is in tests/test_model_families.py.)
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bmrs
from bmrs.compaction import compact, compression_report, count, fold_noise
from bmrs.errors import ModelError
from families import lenet, make, noise_of, rel_err, set_mask

REL = 1e-5


# -- other behaviour --------------------------------------------------------------------------------
def test_compact_without_noise_raises_model_error():
    with pytest.raises(ModelError, match="no noise layers; attach and train it first"):
        compact(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), torch.randn(2, 3))


def test_input_model_is_unchanged():
    case = make("resnet")
    model = case.model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = {name: dict(m._forward_hooks) for name, m in model.named_modules()}
    compact(model, case.x)
    assert all(m.training for m in model.modules())
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert {name: dict(m._forward_hooks) for name, m in model.named_modules()} == hooks
    assert len(bmrs.noise_layers(model)) == 6


def test_layernorm_fed_channels_are_kept_but_zero_folded():
    case = make("transformer")
    masked = noise_of(case.model, "block.attn.proj").mask == 0
    assert masked.any()
    small = compact(case.model, case.x)
    proj = small.block.attn.proj  # its outputs join the residual stream, which feeds LayerNorms
    assert proj.out_features == 16 and small.embed.out_features == 16
    assert torch.count_nonzero(proj.weight[masked]) == 0 and torch.count_nonzero(proj.bias[masked]) == 0
    assert torch.count_nonzero(proj.weight[~masked]) > 0


def test_masked_outputs_of_the_output_layer_are_kept_as_zeros():
    model = bmrs.attach(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)), targets=["0", "2"])
    set_mask(noise_of(model, "0"), [0, 1, 2])
    set_mask(noise_of(model, "2"), [1, 3])
    x = torch.randn(5, 6)
    small = compact(model, x)
    assert (small[0].out_features, small[2].out_features) == (5, 4)
    with torch.no_grad():
        out = small(x)
        assert rel_err(out, model.eval()(x)) <= REL
    assert torch.count_nonzero(out[:, [1, 3]]) == 0


def test_fold_noise_keeps_shapes_and_function():
    case = make("lenet_tanh")
    folded = fold_noise(case.model, case.x)
    assert bmrs.noise_layers(folded) == [] and bmrs.noise_layers(case.model) != []
    assert [p.shape for p in folded.parameters()] == [
        p.shape for n, p in case.model.named_parameters() if "bmrs_noise" not in n]
    with torch.no_grad():
        assert rel_err(folded(case.x_other), case.model.eval()(case.x_other)) <= REL


def test_count_excludes_noise_parameters_and_report_is_consistent():
    plain = lenet(nn.ReLU)
    x = torch.randn(2, 1, 28, 28)
    stats = count(plain, x)
    assert stats["params"] == sum(p.numel() for p in plain.parameters())
    assert stats["flops"] == 2 * stats["macs"] > 0
    attached = bmrs.attach(plain)
    assert count(attached, x)["params"] == stats["params"]

    case = make("lenet")
    small = compact(case.model, case.x)
    report = compression_report(case.model, small, case.x)
    assert report["params_after"] == case.expected_params == count(small, case.x)["params"]
    assert report["parameter_compression_pct"] == pytest.approx(
        100 * (1 - report["params_after"] / report["params_before"]))
    assert 0 < report["flops_removed_pct"] < 100 and report["flops_before"] == 2 * report["macs_before"]


class TwoHeads(nn.Module):
    """A second head the example inputs do not reach (``aux=False`` by default)."""

    def __init__(self, act: type = nn.ReLU):
        super().__init__()
        self.body, self.main = nn.Linear(4, 8), nn.Linear(8, 3)
        self.aux_hidden, self.aux_act, self.aux = nn.Linear(8, 6), act(), nn.Linear(6, 2)

    def forward(self, x, aux: bool = False):
        h = torch.relu(self.body(x))
        return self.aux(self.aux_act(self.aux_hidden(h))) if aux else self.main(h)


def test_noise_on_a_branch_the_example_inputs_miss_is_folded_not_dropped():
    model = bmrs.attach(TwoHeads(), targets=["body", "aux_hidden"])
    with torch.no_grad():
        noise = noise_of(model, "aux_hidden")
        set_mask(noise, [0, 1, 2])
        noise.mu.fill_(-0.5)  # E[θ] about 0.6 on the kept units
    x = torch.randn(5, 4)
    with pytest.warns(RuntimeWarning, match="never reach 'aux_hidden'"):
        small = compact(model, x)
    with torch.no_grad():
        want = model.eval()(x, aux=True)
        assert rel_err(small(x, aux=True), want) <= REL
        assert rel_err(small(x), model(x)) <= REL


def test_noise_after_an_activation_the_example_inputs_miss_is_an_error():
    model = bmrs.attach(TwoHeads(nn.Tanh), targets=["body", "aux_act"])
    with pytest.raises(ModelError, match="never reach 'aux_act'.*example_inputs that run every noise layer"):
        compact(model, torch.randn(5, 4))


@pytest.mark.parametrize("bad", [torch.randn(2, 5), None])
def test_example_inputs_the_model_cannot_run_are_a_model_error(bad):
    model = bmrs.attach(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)))
    with pytest.raises(ModelError, match="does not run on example_inputs .*; check example_inputs"):
        compact(model, bad)


@pytest.mark.parametrize("pool", [nn.MaxPool1d(2), nn.AvgPool1d(2), nn.AdaptiveMaxPool1d(4)])
def test_noise_after_a_non_homogeneous_activation_folds_through_1d_pooling(pool):
    # PyTorch runs 1-d pooling as the 2-d one on x.unsqueeze(-2), then squeezes
    torch.manual_seed(0)
    model = bmrs.attach(nn.Sequential(nn.Conv1d(2, 6, 3, padding=1), nn.GELU(), pool, nn.Flatten(), nn.Linear(24, 3)))
    with torch.no_grad():
        noise = noise_of(model, "1")
        set_mask(noise, [0, 1, 2])
        noise.mu.uniform_(-1.0, 0.0)
    x = torch.randn(4, 2, 8)
    small = compact(model, x)
    assert small[0].out_channels == 3 and small[4].in_features == 12
    with torch.no_grad():
        assert rel_err(small(x), model.eval()(x)) <= REL


def test_pruned_structures_that_stay_are_listed_with_the_reason():
    torch.manual_seed(0)
    model = bmrs.attach(nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 3)), targets=["0"]).eval()
    bmrs.noise_layers(model)[0][1].mask[:3] = 0
    x = torch.randn(5, 4)
    with pytest.warns(bmrs.compaction.CompactionWarning, match="3 pruned structures stay") as caught:
        small = compact(model, x)
    assert caught[0].message.stayed["0"][0] == 3  # (a LayerNorm reads them: removing them would change it)
    assert small[0].out_features == 8
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-6)
