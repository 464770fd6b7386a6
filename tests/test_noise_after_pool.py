"""Structure noise applied after the pooling that follows its host: same function, gradients, scores.

The reference ("old placement") is the same model with every noise hook moved back onto its host;
with the same seed the noise bank draws the same θ before the forward, so both must agree to
float rounding in train mode, and exactly up to rounding in eval mode.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import bmrs
from bmrs import criteria
from bmrs.compaction import compact, shrink
from bmrs.models import lenet5
from bmrs.nn.attach import _apply_noise, _NoiseAfterPool, detach_noise

TOL = dict(rtol=1e-5, atol=1e-6)


def host_placed(model: nn.Module) -> nn.Module:
    """A copy with every noise layer applied on its host, as before pooling-placement existed."""
    model = copy.deepcopy(model)
    for module in model.modules():
        for key, hook in list(module._forward_hooks.items()):
            if isinstance(hook, _NoiseAfterPool):
                del module._forward_hooks[key]
                module._forward_hooks_with_kwargs.pop(key, None)
                hook.host.register_forward_hook(_apply_noise, with_kwargs=True)
    return model


def hook_sites(model: nn.Module) -> dict[str, str]:
    """Module name → where its noise hook sits ('host', or the pooling module's name)."""
    names = {id(m): n for n, m in model.named_modules()}
    sites = {}
    for name, module in model.named_modules():
        for hook in module._forward_hooks.values():
            if hook is _apply_noise:
                sites[name] = "host"
            elif isinstance(hook, _NoiseAfterPool):
                sites[names[id(hook.host)]] = name
    return sites


def trained_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """Spread posteriors (θ from ≈0 to 1) and prune a few structures, so that θ matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, noise in bmrs.noise_layers(model):
            noise.mu.copy_(torch.empty(noise.num_features).uniform_(-4, 0, generator=g))
            noise.log_sigma.copy_(torch.empty(noise.num_features).uniform_(-3, 0, generator=g))
            noise.mask[::3] = 0
    return model


def outputs_and_grads(model: nn.Module, x: torch.Tensor, seed: int = 0):
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    out = model(x)
    (out.square().mean() + bmrs.kl_loss(model)).backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same_function(model: nn.Module, x: torch.Tensor) -> None:
    """Train-mode outputs and every gradient (weights, mu, log_sigma), and eval outputs, as on the host."""
    reference = host_placed(model)
    for seed in range(2):
        out, grads = outputs_and_grads(model.train(), x, seed)
        want, want_grads = outputs_and_grads(reference.train(), x, seed)
        torch.testing.assert_close(out, want, **TOL)
        assert grads.keys() == want_grads.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], want_grads[name], **TOL, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), reference.eval()(x), **TOL)


def lenet() -> nn.Module:
    torch.manual_seed(0)
    return trained_like(lenet5(image_size=28))


# -- LeNet5 -----------------------------------------------------------------------------------------
def test_lenet5_noise_runs_after_the_pool_and_computes_what_it_did_on_the_relu():
    model = lenet()
    assert hook_sites(model) == {"1": "2", "4": "5", "8": "host", "10": "host"}
    assert [name for name, _ in bmrs.noise_layers(model)] == ["1", "4", "8", "10"]
    assert bmrs.noise_layers(model)[0][1].producer == "0"
    assert_same_function(model, torch.randn(8, 1, 28, 28))


def test_lenet5_eval_by_hand():
    model = lenet().eval()
    x = torch.randn(4, 1, 28, 28)
    theta = [noise.expected_theta() for _, noise in bmrs.noise_layers(model)]
    h = nn.functional.max_pool2d(torch.relu(model[0](x)) * theta[0].view(1, -1, 1, 1), 2)
    h = nn.functional.max_pool2d(torch.relu(model[3](h)) * theta[1].view(1, -1, 1, 1), 2)
    h = torch.relu(model[7](h.flatten(1))) * theta[2]
    h = model[11](torch.relu(model[9](h)) * theta[3])
    with torch.no_grad():
        torch.testing.assert_close(model(x), h, **TOL)


def test_state_dict_unchanged_and_an_old_one_loads():
    model = lenet()
    old = host_placed(model)
    assert list(model.state_dict()) == list(old.state_dict())
    assert "1.bmrs_noise.mu" in model.state_dict()
    fresh = lenet5(image_size=28)
    fresh.load_state_dict(old.state_dict())
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), old.eval()(x), **TOL)


def test_copies_and_pickles_keep_the_hook_on_their_own_noise():
    model = lenet().eval()
    x = torch.randn(3, 1, 28, 28)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for twin in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        hook = next(iter(twin[2]._forward_hooks.values()))
        assert hook.host is twin[1]
        with torch.no_grad():
            twin[1].bmrs_noise.mask.zero_()
            assert twin(x).shape == (3, 10)
            assert torch.equal(twin[2](torch.relu(twin[0](x))), torch.zeros(3, 6, 12, 12))


def test_detach_noise_leaves_no_hooks():
    model = detach_noise(lenet())
    assert bmrs.noise_layers(model) == []
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_host_called_alone_returns_its_output_without_noise():
    model = lenet().eval()
    h = torch.randn(2, 6, 24, 24)
    with torch.no_grad():
        assert torch.equal(model[1](h), torch.relu(h))  # the noise runs with the pool after it
        theta = model[1].bmrs_noise.expected_theta().view(1, -1, 1, 1)
        torch.testing.assert_close(model[2](h.relu()), nn.functional.max_pool2d(h.relu(), 2) * theta)


def test_compact_and_shrink_equal_the_masked_model():
    model = lenet().eval()
    x, other = torch.randn(4, 1, 28, 28), torch.randn(5, 1, 28, 28)
    small = compact(model, x)
    assert small[0].out_channels == 4 and small[3].out_channels == 10  # every third channel pruned
    with torch.no_grad():
        torch.testing.assert_close(small(other), model(other), **TOL)
    shrunk, _ = shrink(model, x)
    assert hook_sites(shrunk) == hook_sites(model)
    with torch.no_grad():
        torch.testing.assert_close(shrunk.eval()(other), model(other), **TOL)


# -- pooling variants -------------------------------------------------------------------------------
POOLED = {
    "max_pad_ceil": (nn.Conv2d, [nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)]),
    "max_dilated": (nn.Conv2d, [nn.MaxPool2d(2, stride=1, dilation=2)]),
    "avg_pad_ceil": (nn.Conv2d, [nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True)]),
    "avg_no_pad_count": (nn.Conv2d, [nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)]),
    "avg_divisor": (nn.Conv2d, [nn.AvgPool2d(2, divisor_override=3)]),
    "adaptive_avg": (nn.Conv2d, [nn.AdaptiveAvgPool2d(3)]),
    "adaptive_max": (nn.Conv2d, [nn.AdaptiveMaxPool2d((2, 3))]),
    "chain": (nn.Conv2d, [nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(2)]),
    "max1d": (nn.Conv1d, [nn.MaxPool1d(3, stride=2, padding=1)]),
    "avg1d_adaptive": (nn.Conv1d, [nn.AdaptiveAvgPool1d(4)]),
    "max3d": (nn.Conv3d, [nn.MaxPool3d(2)]),
    "avg3d": (nn.Conv3d, [nn.AvgPool3d(2, padding=1)]),
}
SIDES = {nn.Conv1d: (9,), nn.Conv2d: (9, 9), nn.Conv3d: (6, 6, 6)}


def pooled_net(conv, pools, middle=(nn.ReLU,), granularity="structure"):
    torch.manual_seed(0)
    model = nn.Sequential(conv(3, 8, 3, padding=1), *[m(8) if m is nn.BatchNorm2d else m() for m in middle],
                          *pools, nn.Flatten(), nn.LazyLinear(5))
    x = torch.randn(6, 3, *SIDES[conv])
    model(x)  # materialise the LazyLinear
    return trained_like(bmrs.attach(model, granularity=granularity)), x


@pytest.mark.parametrize("case", POOLED)
def test_pooling_variants_give_the_same_function(case):
    conv, pools = POOLED[case]
    model, x = pooled_net(conv, copy.deepcopy(pools))
    assert hook_sites(model) == {"1": str(1 + len(pools))}
    assert_same_function(model, x)


@pytest.mark.parametrize("middle", [(), (nn.BatchNorm2d,), (nn.Tanh,)], ids=["conv", "bn", "tanh"])
def test_negative_host_outputs_before_max_pooling(middle):
    model, x = pooled_net(nn.Conv2d, [nn.MaxPool2d(2)], middle=middle)
    host = str(len(middle))
    assert hook_sites(model) == {host: str(len(middle) + 1)}
    assert_same_function(model, x)


class Stage(nn.Sequential):
    def forward(self, x):  # runs its children in another order
        return self[2](self[0](x))


def test_placements_kept_on_the_host():
    model, _ = pooled_net(nn.Conv2d, [nn.MaxPool2d(2)], granularity="element")
    assert hook_sites(model) == {"1": "host"}  # θ differs per position: not exact after a pool
    pool = nn.MaxPool2d(2)  # one pooling module used twice
    torch.manual_seed(0)
    shared = bmrs.attach(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), pool, nn.Conv2d(4, 4, 3), nn.ReLU(), pool,
                                       nn.Flatten(), nn.Linear(4, 2)))
    assert hook_sites(shared) == {"1": "host", "4": "host"}
    indices = bmrs.attach(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2, return_indices=True)),
                          targets=[nn.ReLU])
    assert hook_sites(indices) == {"1": "host"}
    mismatched = bmrs.attach(nn.Sequential(nn.Conv1d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2)), targets=[nn.ReLU])
    assert hook_sites(mismatched) == {"1": "host"}  # MaxPool2d of an (N, C, L) tensor pools channels
    tokens = bmrs.attach(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.MaxPool1d(2), nn.Linear(2, 2)))
    assert hook_sites(tokens) == {"1": "host"}  # noise along the last dim, which MaxPool1d pools
    custom = bmrs.attach(Stage(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2), nn.ReLU()), targets=["0"])
    assert hook_sites(custom) == {"0": "host"}


# -- Taylor criterion -------------------------------------------------------------------------------
@pytest.mark.parametrize("pool", [nn.MaxPool2d(3, stride=2, padding=1), nn.AvgPool2d(3, stride=2, padding=1)],
                         ids=["max_overlapping", "avg_overlapping"])
def test_taylor_scores_unchanged(pool):
    model, x = pooled_net(nn.Conv2d, [pool])
    batches = [(x[:3], torch.randint(0, 5, (3,))), (x[3:], torch.randint(0, 5, (3,)))]
    got, want = criteria.Gradient(), criteria.Gradient()
    got.accumulate(model, batches)
    want.accumulate(host_placed(model), batches)
    torch.testing.assert_close(got.scores(model)["1"], want.scores(model)["1"], rtol=1e-5, atol=1e-8)


def test_lenet5_taylor_scores_unchanged():
    model = lenet()
    batches = [(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))) for _ in range(2)]
    got, want = criteria.Gradient(), criteria.Gradient()
    got.accumulate(model, batches)
    want.accumulate(host_placed(model), batches)
    for name, score in got.scores(model).items():
        torch.testing.assert_close(score, want.scores(model)[name], rtol=1e-5, atol=1e-8, msg=name)
