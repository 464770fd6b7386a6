"""Physical compaction: folding E[θ]·mask, removing masked structures, counting, ONNX export.

Every model family (built here from plain torch.nn) goes through one shared check: the compacted model
matches the masked model in eval mode, is strictly smaller in parameters and MACs, holds no noise layer
and exports to ONNX with onnxruntime giving the same outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pytest
import torch
from torch import nn

import bmrs
from bmrs.compaction import compact, compression_report, count, fold_noise
from bmrs.errors import ModelError

REL = 1e-5


# -- helpers ----------------------------------------------------------------------------------------
def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = torch.as_tensor(got), torch.as_tensor(want)
    return float((got - want).abs().max() / want.abs().max())


def noise_of(model: nn.Module, name: str) -> bmrs.MultiplicativeNoise:
    return dict(bmrs.noise_layers(model))[name]


def set_mask(noise: bmrs.MultiplicativeNoise, pruned) -> None:
    mask = torch.ones(noise.num_features)
    mask[list(pruned)] = 0
    noise.mask.copy_(mask)


def randomize(model: nn.Module, gen: torch.Generator, frac: float = 0.4) -> None:
    """Random posteriors and masks pruning round(frac·n) structures of every noise layer; random BN stats."""
    with torch.no_grad():
        for _, noise in bmrs.noise_layers(model):
            noise.mu.copy_(torch.empty(noise.num_features).uniform_(-3.0, 0.5, generator=gen))
            noise.log_sigma.copy_(torch.empty(noise.num_features).uniform_(-6.0, 0.0, generator=gen))
            order = torch.randperm(noise.num_features, generator=gen)
            set_mask(noise, order[: round(frac * noise.num_features)].tolist())
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.3)


def kept(model: nn.Module, name: str) -> int:
    """Width a layer should have after compaction (at least one channel is always kept)."""
    return max(1, int(noise_of(model, name).mask.sum()))


@dataclass
class Case:
    model: nn.Module
    x: torch.Tensor
    x_other: torch.Tensor                       # inputs not used for tracing
    expected_params: int | None = None         # hand count from the pruned widths
    check: Callable[[nn.Module], None] = field(default=lambda small: None)


# -- model families ---------------------------------------------------------------------------------
def mlp_case(gen: torch.Generator) -> Case:
    model = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 24), nn.Tanh(),
                          nn.Linear(24, 5))
    bmrs.attach(model)  # noise after each Tanh → folded into the next Linear's input columns
    randomize(model, gen)
    set_mask(noise_of(model, "3"), range(32))  # an all-pruned layer
    w1, w2, w3 = kept(model, "1"), kept(model, "3"), kept(model, "5")
    expected = (20 * w1 + w1) + (w1 * w2 + w2) + (w2 * w3 + w3) + (w3 * 5 + 5)

    def check(small):
        assert [small[i].out_features for i in (0, 2, 4)] == [w1, 1, w3]

    return Case(model, torch.randn(8, 20, generator=gen), torch.randn(3, 20, generator=gen), expected, check)


def lenet(act: type[nn.Module]) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), act(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), act(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120), act(), nn.Linear(120, 84), act(), nn.Linear(84, 10),
    )


def lenet_case(gen: torch.Generator, act: type[nn.Module] = nn.ReLU) -> Case:
    model = bmrs.attach(lenet(act))  # noise after each activation
    randomize(model, gen)
    c1, c2, f1, f2 = (kept(model, n) for n in ("1", "4", "8", "10"))
    expected = (25 * c1 + c1) + (c1 * c2 * 25 + c2) + (c2 * 25 * f1 + f1) + (f1 * f2 + f2) + (f2 * 10 + 10)

    def check(small):
        assert (small[0].out_channels, small[3].out_channels) == (c1, c2)
        assert small[7].in_features == 25 * c2  # each channel owns a 5×5 block of the flattened columns

    x = torch.randn(4, 1, 28, 28, generator=gen)
    return Case(model, x, torch.randn(2, 1, 28, 28, generator=gen), expected, check)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(8, 8))
        self.layer2 = nn.Sequential(BasicBlock(8, 16, stride=2))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x)))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet_case(gen: torch.Generator) -> Case:
    model = bmrs.attach(ResNet())  # default policy: noise after every BatchNorm
    assert {n for n, _ in bmrs.noise_layers(model)} == {
        "bn1", "layer1.0.bn1", "layer1.0.bn2", "layer2.0.bn1", "layer2.0.bn2", "layer2.0.downsample.1"}
    randomize(model, gen)
    # residual streams: a channel goes only if every coupled noise layer prunes it
    set_mask(noise_of(model, "bn1"), [0, 1, 2, 3])             # channel 3: only the stem prunes it
    set_mask(noise_of(model, "layer1.0.bn2"), [0, 1, 2, 4])    # channel 4: only the block prunes it
    set_mask(noise_of(model, "layer2.0.bn2"), [0, 1, 2, 3, 4, 5, 6, 7])
    set_mask(noise_of(model, "layer2.0.downsample.1"), [0, 1, 2, 3, 4, 5, 8])
    inner1, inner2 = kept(model, "layer1.0.bn1"), kept(model, "layer2.0.bn1")

    def check(small):
        assert small.conv1.out_channels == 8 - 3 and small.layer1[0].conv2.out_channels == 5
        assert small.layer2[0].conv2.out_channels == 16 - 6 and small.fc.in_features == 10
        assert small.layer2[0].downsample[0].out_channels == 10
        assert (small.layer1[0].conv1.out_channels, small.layer2[0].conv1.out_channels) == (inner1, inner2)

    x = torch.randn(4, 3, 12, 12, generator=gen)
    return Case(model, x, torch.randn(2, 3, 12, 12, generator=gen), None, check)


def conv_bn_relu(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2), nn.BatchNorm2d(cout), nn.ReLU())


class ConcatNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn_relu(3, 8, 3)
        self.a = conv_bn_relu(8, 6, 3)
        self.b = conv_bn_relu(8, 10, 1)
        self.mix = conv_bn_relu(16, 12, 3)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 10))

    def forward(self, x):
        x = self.stem(x)
        return self.head(self.mix(torch.cat([self.a(x), self.b(x)], dim=1)))


def concat_case(gen: torch.Generator) -> Case:
    model = bmrs.attach(ConcatNet())
    randomize(model, gen)
    a, b, stem, mix = (kept(model, f"{n}.1") for n in ("a", "b", "stem", "mix"))

    def check(small):
        assert (small.stem[0].out_channels, small.a[0].in_channels, small.b[0].in_channels) == (stem, stem, stem)
        assert small.mix[0].in_channels == a + b and small.head[2].in_features == mix

    x = torch.randn(4, 3, 10, 10, generator=gen)
    return Case(model, x, torch.randn(2, 3, 10, 10, generator=gen), None, check)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5).softmax(dim=-1)
        return self.proj((att @ v).transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, dim: int = 16, heads: int = 2, hidden: int = 64, mha: bool = False):
        super().__init__()
        self.mha = mha
        self.ln1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True) if mha else Attention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x):
        h = self.ln1(x)
        x = x + (self.attn(h, h, h, need_weights=False)[0] if self.mha else self.attn(h))
        return x + self.mlp(self.ln2(x))


class Transformer(nn.Module):
    def __init__(self, mha: bool = False):
        super().__init__()
        self.embed = nn.Linear(10, 16)
        self.block = Block(mha=mha)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.norm(self.block(self.embed(x))).mean(dim=1))


def transformer_case(gen: torch.Generator, mha: bool = False) -> Case:
    model = bmrs.attach(Transformer(mha), targets=["block.mlp.0", "block.attn" if mha else "block.attn.proj"])
    # (naming nn.MultiheadAttention gates its heads: one θ per head, dim −2)
    assert all(noise.dim == (-2 if mha and name == "block.attn" else -1) for name, noise in bmrs.noise_layers(model))
    randomize(model, gen)
    hidden = kept(model, "block.mlp.0")
    heads = kept(model, "block.attn") if mha else None

    def check(small):
        assert small.block.mlp[0].out_features == hidden and small.block.mlp[2].in_features == hidden
        if mha:
            assert small.block.attn.num_heads == heads and small.block.attn.out_proj.in_features == heads * 8
        assert small.block.ln1.normalized_shape == (16,) and small.block.ln2.normalized_shape == (16,)

    x = torch.randn(4, 6, 10, generator=gen)
    return Case(model, x, torch.randn(2, 7, 10, generator=gen), None, check)


FAMILIES = {
    "mlp": mlp_case,
    "lenet": lenet_case,
    "lenet_tanh": lambda gen: lenet_case(gen, nn.Tanh),  # noise folded through max-pool and flatten
    "resnet": resnet_case,
    "concat": concat_case,
    "transformer": transformer_case,
    "transformer_mha": lambda gen: transformer_case(gen, mha=True),
}


def make(family: str) -> Case:
    torch.manual_seed(0)
    return FAMILIES[family](torch.Generator().manual_seed(1234))


def onnx_outputs(model: nn.Module, x: torch.Tensor, path) -> np.ndarray:
    import onnxruntime as ort

    try:
        torch.onnx.export(model, (x,), str(path), opset_version=17)
    except Exception:  # the dynamo exporter is missing (needs onnxscript) or fails: use TorchScript
        torch.onnx.export(model, (x,), str(path), opset_version=17, dynamo=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


# -- the shared check -------------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(FAMILIES))
def test_compaction_is_exact_smaller_and_exports(family, tmp_path):
    case = make(family)
    model = case.model.eval()
    small = compact(model, case.x)

    assert not small.training
    assert not any(isinstance(m, bmrs.MultiplicativeNoise) for m in small.modules())
    assert bmrs.noise_layers(small) == []
    with torch.no_grad():
        for x in (case.x, case.x_other):
            assert rel_err(small(x), model(x)) <= REL

    before, after = count(model, case.x), count(small, case.x)
    assert after["params"] < before["params"] and after["macs"] < before["macs"]
    if case.expected_params is not None:
        assert after["params"] == case.expected_params
    case.check(small)

    with torch.no_grad():
        want = model(case.x)
    assert rel_err(onnx_outputs(small, case.x, tmp_path / f"{family}.onnx"), want) <= REL


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
