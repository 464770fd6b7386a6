"""The model families every test of training, pruning and compaction runs on, listed once (``FAMILIES``).

Each family builds a small network with noise attached, random posteriors and random masks
(:class:`Case`): the built-in builders of :mod:`bmrs.models` and example networks built here from plain
``torch.nn`` (residual, concatenation, attention).  ``make(family)`` builds one, reproducibly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

import bmrs
from bmrs.models import build_model

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
    plain: Callable[[], nn.Module] | None = None  # builds the network without noise (for bmrs.load)
    builder: dict | None = None                # a built-in model: build_model's arguments (for bmrs.save)
    shrinks: bool = True                       # False: shrink keeps the whole network (its plan cuts attention
    #                                            heads, which shrink does not narrow)


# -- model families ---------------------------------------------------------------------------------
def tanh_mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 24), nn.Tanh(),
                         nn.Linear(24, 5))


def mlp_case(gen: torch.Generator) -> Case:
    model = bmrs.attach(tanh_mlp())  # noise after each Tanh → folded into the next Linear's input columns
    randomize(model, gen)
    set_mask(noise_of(model, "3"), range(32))  # an all-pruned layer
    w1, w2, w3 = kept(model, "1"), kept(model, "3"), kept(model, "5")
    expected = (20 * w1 + w1) + (w1 * w2 + w2) + (w2 * w3 + w3) + (w3 * 5 + 5)

    def check(small):
        assert [small[i].out_features for i in (0, 2, 4)] == [w1, 1, w3]

    return Case(model, torch.randn(8, 20, generator=gen), torch.randn(3, 20, generator=gen), expected, check, tanh_mlp)


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
    return Case(model, x, torch.randn(2, 1, 28, 28, generator=gen), expected, check, lambda: lenet(act))


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
    return Case(model, x, torch.randn(2, 3, 12, 12, generator=gen), None, check, ResNet)


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
    return Case(model, x, torch.randn(2, 3, 10, 10, generator=gen), None, check, ConcatNet)


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
    return Case(model, x, torch.randn(2, 7, 10, generator=gen), None, check, lambda: Transformer(mha), shrinks=not mha)


# -- the built-in models (bmrs.models), small -------------------------------------------------------
BUILTIN = {
    "builtin_mlp": dict(name="mlp", in_channels=1, num_classes=10, image_size=8, hidden=24),
    "builtin_lenet5": dict(name="lenet5", in_channels=1, num_classes=10, image_size=28),
    "builtin_resnet18": dict(name="resnet18", in_channels=3, num_classes=10, image_size=8),
    "builtin_resnet50": dict(name="resnet50", in_channels=3, num_classes=10, image_size=8),
    "builtin_vit": dict(name="vit", in_channels=3, num_classes=10, image_size=16, dim=32, depth=2, heads=2,
                        mlp_dim=48),
}


def builtin_case(gen: torch.Generator, family: str) -> Case:
    builder = BUILTIN[family]
    args = {k: v for k, v in builder.items() if k != "name"}
    model = build_model(builder["name"], **args)
    randomize(model, gen)
    shape = (builder["in_channels"], builder["image_size"], builder["image_size"])
    return Case(model, torch.randn(4, *shape, generator=gen), torch.randn(3, *shape, generator=gen),
                plain=lambda: build_model(builder["name"], noise=False, **args), builder=builder,
                shrinks=builder["name"] != "vit")


FAMILIES = {
    "mlp": mlp_case,
    "lenet": lenet_case,
    "lenet_tanh": lambda gen: lenet_case(gen, nn.Tanh),  # noise folded through max-pool and flatten
    "resnet": resnet_case,
    "concat": concat_case,
    "transformer": transformer_case,
    "transformer_mha": lambda gen: transformer_case(gen, mha=True),
    **{name: (lambda gen, name=name: builtin_case(gen, name)) for name in BUILTIN},
}
# (bmrs.models.MODEL_NAMES must all be here: tests/test_model_families.py checks it)


def make(family: str) -> Case:
    """A fresh ``Case`` of ``family`` (the same values on every call)."""
    torch.manual_seed(0)
    return FAMILIES[family](torch.Generator().manual_seed(1234))


