"""The compacted network's fast inference layers: NarrowConv2d and TiledMaxPool2d against torch's own.

The convolution is checked against ``F.conv2d`` in float64 (oneDNN / ATen's implementation, computed
at twice the precision), the pooling bit for bit against ``F.max_pool2d``; every configuration the fast
paths do not serve must fall back to the torch layer exactly, gradients included.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bmrs
from bmrs import _kernels
from bmrs.compaction import AlignedLinear, FastTanh, NarrowConv2d, TiledMaxPool2d, compact, count, use_fast_layers
from bmrs.inference.layers import aligned_width

# the kernels themselves, compared with the reference: on in a BMRS_KERNELS=0 session too
pytestmark = pytest.mark.usefixtures("kernels_on")



def _buildable() -> bool:
    """Whether the kernels build here (a C++ compiler), whatever BMRS_KERNELS says."""
    was = _kernels.enabled()
    _kernels.set_enabled(True)
    try:
        return _kernels.get() is not None
    finally:
        _kernels.set_enabled(was)


needs_kernels = pytest.mark.skipif(not _buildable(), reason="no C++ compiler: the fallback is tested below")


def conv_reference(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    bias = None if conv.bias is None else conv.bias.double()
    return F.conv2d(x.double(), conv.weight.double(), bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


CONV_CASES = [  # (in, out, kernel, padding, height, width, bias)
    (1, 1, 5, 0, 32, 32, True),
    (1, 2, 5, 2, 28, 28, True),
    (1, 9, 3, 1, 7, 13, True),      # a block of 8 output channels and a block of 1
    (2, 6, 5, 0, 14, 14, False),
    (3, 4, (3, 5), (1, 2), 9, 6, True),
    (1, 12, 1, 0, 5, 31, True),
    (2, 3, (5, 1), (0, 3), 6, 17, True),
    (1, 7, 4, "valid", 4, 4, True),  # one output pixel
]


@needs_kernels
@pytest.mark.parametrize("case", CONV_CASES, ids=str)
@pytest.mark.parametrize("batch", [1, 5])
def test_narrow_conv_matches_float64_conv2d(case, batch, monkeypatch):
    cin, cout, kernel, padding, h, w, bias = case
    torch.manual_seed(0)
    conv = NarrowConv2d(cin, cout, kernel, padding=padding, bias=bias)
    x = torch.randn(batch, cin, h, w)
    want = conv_reference(conv, x)

    def torch_path(*args):
        raise AssertionError("nn.Conv2d's forward ran instead of the direct kernel")

    monkeypatch.setattr(nn.Conv2d, "_conv_forward", torch_path)
    with torch.no_grad():
        out = conv(x)
    assert out.shape == want.shape and out.dtype == torch.float32
    assert rel_err(out, want) < 1e-5


@needs_kernels
def test_narrow_conv_is_used_in_inference_and_stays_in_float32_rounding():
    conv = NarrowConv2d(1, 2, 5, padding=2)
    x = torch.randn(64, 1, 28, 28)
    with torch.inference_mode():
        out = conv(x)
    assert not out.requires_grad
    assert rel_err(out, conv_reference(conv, x)) < 1e-5
    # non-contiguous and channels-last inputs give the same values
    wide = torch.randn(64, 1, 28, 40)[..., 3:31]
    with torch.no_grad():
        assert rel_err(conv(wide), conv_reference(conv, wide)) < 1e-5
        cl = x.contiguous(memory_format=torch.channels_last)
        assert torch.equal(conv(cl), conv(x))


@pytest.mark.parametrize("kw", [
    {"stride": 2}, {"dilation": 2}, {"padding": "same"}, {"padding": 1, "padding_mode": "reflect"},
    {"padding": 1, "padding_mode": "circular"},
])
def test_narrow_conv_falls_back_exactly_where_it_does_not_apply(kw):
    torch.manual_seed(1)
    plain = nn.Conv2d(2, 3, 3, **kw)
    fast = NarrowConv2d.from_conv(plain)
    x = torch.randn(2, 2, 9, 11)
    with torch.no_grad():
        assert torch.equal(fast(x), plain(x))


def test_narrow_conv_grouped_and_float64_fall_back():
    torch.manual_seed(2)
    grouped = nn.Conv2d(2, 4, 3, groups=2)
    x = torch.randn(2, 2, 6, 6)
    with torch.no_grad():
        assert torch.equal(NarrowConv2d.from_conv(grouped)(x), grouped(x))
        double = nn.Conv2d(1, 2, 3).double()
        xd = torch.randn(2, 1, 6, 6, dtype=torch.float64)
        assert torch.equal(NarrowConv2d.from_conv(double)(xd), double(xd))


def test_narrow_conv_trains_like_conv2d():
    torch.manual_seed(3)
    plain = nn.Conv2d(1, 2, 5, padding=2)
    fast = NarrowConv2d.from_conv(plain)
    assert fast.weight is plain.weight and fast.bias is plain.bias
    x = torch.randn(3, 1, 10, 10, requires_grad=True)
    out = fast(x)
    assert out.requires_grad
    (grad_w, grad_x) = torch.autograd.grad(out.square().sum(), (fast.weight, x))
    (want_w, want_x) = torch.autograd.grad(plain(x).square().sum(), (plain.weight, x))
    assert torch.equal(grad_w, want_w) and torch.equal(grad_x, want_x)


def test_narrow_conv_without_kernels_is_conv2d(kernels):
    torch.manual_seed(4)
    plain = nn.Conv2d(1, 3, 5)
    fast = NarrowConv2d.from_conv(plain)
    x = torch.randn(2, 1, 12, 12)
    with kernels(False), torch.no_grad():
        assert torch.equal(fast(x), plain(x))


def test_narrow_conv_keeps_state_dict_and_repr():
    plain = nn.Conv2d(2, 3, 5, padding=1, bias=False)
    fast = NarrowConv2d.from_conv(plain)
    assert fast.state_dict().keys() == plain.state_dict().keys()
    assert repr(fast) == repr(plain).replace("Conv2d", "NarrowConv2d")
    assert isinstance(fast, nn.Conv2d) and fast.bias is None


POOL_CASES = [  # (kernel, shape)
    (2, (3, 2, 28, 28)), (2, (2, 3, 7, 9)), (3, (2, 1, 10, 8)), ((2, 3), (1, 4, 9, 10)),
    (2, (3, 11, 6)), (1, (2, 2, 3, 3)), (4, (1, 1, 4, 4)),
]


@pytest.mark.parametrize("kernel,shape", POOL_CASES, ids=str)
def test_tiled_max_pool_is_max_pool2d_bit_for_bit(kernel, shape):
    torch.manual_seed(5)
    x = torch.randn(shape).mul(2).round()  # many ties
    pool = TiledMaxPool2d(kernel)
    assert pool.tiles()
    with torch.no_grad():
        assert torch.equal(pool(x), F.max_pool2d(x, kernel))


def test_tiled_max_pool_propagates_nan_and_infinities():
    x = torch.randn(1, 2, 6, 6)
    x[0, 0, 0, 1] = float("nan")
    x[0, 1, 2:4, 2:4] = float("-inf")
    x[0, 1, 4, 5] = float("inf")
    with torch.no_grad():
        out, want = TiledMaxPool2d(2)(x), F.max_pool2d(x, 2)
    assert torch.equal(out.isnan(), want.isnan())
    assert torch.equal(out.nan_to_num(), want.nan_to_num())


@pytest.mark.parametrize("kw", [
    {"kernel_size": 3, "stride": 2}, {"kernel_size": 2, "padding": 1}, {"kernel_size": 2, "ceil_mode": True},
    {"kernel_size": 2, "dilation": 2}, {"kernel_size": 2, "return_indices": True},
])
def test_tiled_max_pool_falls_back_for_other_windows(kw):
    pool = TiledMaxPool2d(**kw)
    assert not pool.tiles()
    x = torch.randn(2, 3, 9, 9)
    out, want = pool(x), nn.MaxPool2d(**kw)(x)
    if kw.get("return_indices"):
        assert torch.equal(out[0], want[0]) and torch.equal(out[1], want[1])
    else:
        assert torch.equal(out, want)


def test_tiled_max_pool_gradient_is_max_pool2d_gradient():
    x = torch.randn(2, 2, 6, 6, requires_grad=True)
    x.data[0, 0, 0, :2] = 1.0  # a tie: max_pool2d's gradient goes to one element, not half to each
    (grad,) = torch.autograd.grad(TiledMaxPool2d(2)(x).sum(), x)
    (want,) = torch.autograd.grad(F.max_pool2d(x, 2).sum(), x)
    assert torch.equal(grad, want)


def lenet() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 2, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Sequential(nn.Conv2d(2, 6, 5), nn.ReLU(), nn.MaxPool2d(2)), nn.Flatten(),
        nn.Linear(150, 10),
    )


def test_use_fast_layers_swaps_narrow_convs_and_tiling_pools_in_place():
    torch.manual_seed(6)
    model = lenet().eval()
    wide = nn.Conv2d(4, 8, 3)  # 32 channel pairs: oneDNN's
    holder = nn.ModuleDict({"net": model, "wide": wide})
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        before = model(x)
    macs = count(model, x)["macs"]
    assert use_fast_layers(holder) == 5
    assert type(model[0]) is NarrowConv2d and type(model[3][0]) is NarrowConv2d
    assert type(model[2]) is TiledMaxPool2d and type(model[3][2]) is TiledMaxPool2d
    assert type(model[5]) is AlignedLinear  # 10 outputs: computed at 16
    assert holder.wide is wide
    with torch.no_grad():
        assert rel_err(model(x), before) < 1e-5
    assert count(model, x)["macs"] == macs  # the counter sees the subclasses as the torch layers
    assert use_fast_layers(model) == 0      # already swapped
    assert use_fast_layers(lenet(), max_channel_product=1) == 3  # the pools and the linear layer only
    with pytest.raises(ValueError, match="max_channel_product"):
        use_fast_layers(model, max_channel_product=-1)


def test_counting_fast_layers_leaves_torch_prunings_counter_table_as_it_was():
    from torch_pruning.utils import op_counter

    model = lenet().eval()
    use_fast_layers(model)
    x = torch.randn(2, 1, 28, 28)
    theirs = {nn.Identity: op_counter.MODULES_MAPPING[nn.ReLU]}  # a table someone else set
    op_counter.CUSTOM_MODULES_MAPPING = theirs
    try:
        assert count(model, x)["macs"] > 0
        assert op_counter.CUSTOM_MODULES_MAPPING is theirs
        with pytest.raises(RuntimeError):  # a count that fails puts the table back too
            count(model, torch.randn(2, 3, 28, 28))
        assert op_counter.CUSTOM_MODULES_MAPPING is theirs
    finally:
        op_counter.CUSTOM_MODULES_MAPPING = {}


def test_fast_layers_trace_and_script_through_the_torch_layers():
    model = lenet().eval()
    use_fast_layers(model)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        traced = torch.jit.trace(model, x)
        assert rel_err(traced(x), model(x)) < 1e-5
    nodes = {node.kind() for node in traced.inlined_graph.nodes()}
    assert "aten::_convolution" in nodes and "aten::max_pool2d" in nodes


def test_compact_returns_plain_layers_unless_asked_for_fast_ones():
    torch.manual_seed(7)
    model = bmrs.attach(nn.Sequential(nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                                      nn.Linear(6 * 12 * 12, 10)))
    bmrs.noise_layers(model)[0][1].mask[2:] = 0
    x = torch.randn(3, 1, 28, 28)
    small = compact(model, x, fast_layers=True)
    plain = compact(model, x)
    assert all(type(m).__module__.startswith("torch.") for m in plain.modules())
    assert type(small[0]) is NarrowConv2d and small[0].out_channels == 2
    assert type(small[2]) is TiledMaxPool2d
    assert type(plain[0]) is nn.Conv2d and type(plain[2]) is nn.MaxPool2d
    with torch.no_grad():
        assert rel_err(small(x), model.eval()(x)) < 1e-5
        assert rel_err(small(x), plain(x)) < 1e-5


@pytest.mark.parametrize("out_features", [1, 10, 29, 45])
@pytest.mark.parametrize("bias", [True, False])
def test_aligned_linear_matches_linear_and_defers_when_it_should(out_features, bias):
    torch.manual_seed(out_features)
    plain = nn.Linear(160, out_features, bias=bias)
    fast = AlignedLinear.from_linear(plain)
    assert fast.weight is plain.weight and aligned_width(out_features) % 16 == 0
    assert fast.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(64, 160)
    with torch.no_grad():
        y = fast(x)
        assert y.shape == (64, out_features) and y.is_contiguous()
        assert rel_err(y, plain(x)) < 1e-6
        assert rel_err(fast(x.view(8, 8, 160)), plain(x.view(8, 8, 160))) < 1e-6  # extra leading dimensions
        assert torch.equal(fast(x[:4]), plain(x[:4]))  # a few rows: nn.Linear's own product
        plain.weight.mul_(2.0)  # a parameter changed in place: the padded product sees it
        assert rel_err(fast(x), plain(x)) < 1e-6
        plain.weight.data.mul_(0.5)  # written past the version counter, as fused Adam does, no mode switch
        assert rel_err(fast(x), plain(x)) < 1e-6
        assert fast.weight is plain.weight  # the same parameter objects, now views of the padded buffers
    # with gradients, nn.Linear's path: the same graph and gradients
    xg = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(fast(xg).square().sum(), xg)
    (want,) = torch.autograd.grad(plain(xg).square().sum(), xg)
    assert torch.equal(grad, want)
    double = nn.Linear(160, out_features, bias=bias).double()  # float64: nn.Linear's own product
    with torch.no_grad():
        assert torch.equal(AlignedLinear.from_linear(double)(x.double()), double(x.double()))


def test_aligned_linear_fine_tuned_in_eval_mode_by_fused_adam_is_not_stale():
    # compact() → evaluate → fine-tune with fused Adam (which bumps no version) → evaluate, all in eval mode
    torch.manual_seed(5)
    fast = AlignedLinear.from_linear(nn.Linear(100, 29)).eval()
    x = torch.randn(64, 100)
    with torch.inference_mode():
        before = fast(x)  # the first padded call, under inference mode: the parameters stay trainable
    opt = torch.optim.Adam(fast.parameters(), lr=1e-2, fused=True)
    for _ in range(3):
        opt.zero_grad()
        fast(x).square().mean().backward()
        opt.step()
    with torch.no_grad():
        after = fast(x)
        want = nn.functional.linear(x, fast.weight.detach().clone(), fast.bias.detach().clone())
    assert rel_err(after, want) < 1e-6 and not torch.allclose(after, before)
    fast.weight = nn.Parameter(torch.randn(29, 100))  # a replaced parameter moves into new padded buffers
    with torch.no_grad():
        assert rel_err(fast(x), nn.functional.linear(x, fast.weight, fast.bias)) < 1e-6
    copy = __import__("copy").deepcopy(fast)  # a copy's parameters are its own: padded afresh, not shared
    with torch.no_grad():
        copy.weight.mul_(3.0)
        assert rel_err(copy(x), nn.functional.linear(x, copy.weight, copy.bias)) < 1e-6
        assert rel_err(fast(x), nn.functional.linear(x, fast.weight, fast.bias)) < 1e-6


def test_linear_layers_with_few_inputs_are_left_to_torch():
    # with few inputs the product is too small to gain from whole vectors: no swap and no padding, unless the
    # layer has fewer than 16 outputs (padded to 16, which paid at every input count)
    small, narrow, wide = nn.Linear(48, 29), nn.Linear(25, 10), nn.Linear(64, 29)
    net = nn.Sequential(small, nn.ReLU(), narrow, nn.ReLU(), wide)
    assert use_fast_layers(net) == 2 and net[0] is small
    assert type(net[2]) is AlignedLinear and type(net[4]) is AlignedLinear
    fast_small = AlignedLinear.from_linear(small)
    x = torch.randn(64, 48)
    with torch.no_grad():
        assert torch.equal(fast_small(x), small(x))  # nn.Linear's own product, bit for bit
    assert "_aligned" not in fast_small.__dict__   # no padded copy was made


def test_aligned_linear_without_kernels_pads_only_from_128_inputs(kernels):
    # the Python slice and copy that keep the columns without the kernels cost 2-3 µs more: padding pays later
    torch.manual_seed(11)
    mid, wide = nn.Linear(64, 29), nn.Linear(128, 29)
    x_mid, x_wide = torch.randn(64, 64), torch.randn(64, 128)
    fast_mid, fast_wide = AlignedLinear.from_linear(mid), AlignedLinear.from_linear(wide)
    with kernels(False), torch.no_grad():
        assert torch.equal(fast_mid(x_mid), mid(x_mid)) and "_aligned" not in fast_mid.__dict__
        y = fast_wide(x_wide)
        assert "_aligned" in fast_wide.__dict__ and y.is_contiguous() and rel_err(y, wide(x_wide)) < 1e-6


@pytest.mark.parametrize("bias", [True, False])
def test_aligned_linear_kernel_keeps_the_columns_of_the_padded_product_bit_for_bit(bias):
    compiled = _kernels.get()
    torch.manual_seed(12)
    weight = torch.randn(32, 40)
    weight[29:] = 0
    b = torch.randn(32) if bias else None
    for x in (torch.randn(50, 40), torch.randn(5, 10, 40), torch.randn(40, 50).t()):  # 2-D, 3-D, strided
        got = compiled.aligned_linear_f32(x, weight, b, 29)
        assert got.shape == (*x.shape[:-1], 29) and got.is_contiguous()
        assert torch.equal(got, F.linear(x, weight, b)[..., :29])
    with pytest.raises(RuntimeError, match="out_features"):
        compiled.aligned_linear_f32(torch.randn(4, 40), weight, b, 33)


def test_aligned_width_pads_only_the_widths_that_run_faster():
    assert [aligned_width(n) for n in (1, 8, 15, 16, 17, 31, 32)] == [16, 16, 16, 16, 32, 32, 32]
    assert [aligned_width(n) for n in (33, 34, 35, 40, 47, 48, 56, 66, 67)] == [33, 34, 48, 40, 48, 48, 56, 66, 80]


def test_fast_tanh_is_within_four_ulps_of_tanh_and_defers_when_it_should():
    g = torch.Generator().manual_seed(9)
    x = torch.cat([torch.randn(4099, generator=g) * 4, torch.tensor([0.0, -0.0, 1e-30, -1e-8, 0.3, 9.0, -20.0,
                                                                      float("inf"), -float("inf")])])
    with torch.no_grad():
        got = FastTanh()(x.view(-1, 1))
    assert got.shape == (x.numel(), 1)
    want = torch.tanh(x.double()).view(-1, 1)
    ulp = torch.finfo(torch.float32).eps * want.abs().clamp_min(torch.finfo(torch.float32).tiny)
    assert bool(((got.double() - want).abs() <= 4 * ulp).all())  # SLEEF's 3.5-ulp tanh
    assert torch.equal(FastTanh()(x.double()), torch.tanh(x.double()))  # float64: torch's own
    xg = x.clone().requires_grad_()
    assert torch.equal(FastTanh()(xg), torch.tanh(xg)) and FastTanh()(xg).grad_fn is not None
    nan = FastTanh()(torch.tensor([float("nan")] * 17))
    assert bool(nan.isnan().all())
