"""bmrs.nn.uniforms: the counter-based uniform stream of the noise layers.  The kernel and the PyTorch
reference agree bit for bit; the stream passes distribution and independence checks (SciPy)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

import bmrs
from bmrs.nn.uniforms import counter_uniforms, draw_key, reference_uniforms

KEYS = [(0, 0, 0, 0), (0xFFFFFFFF,) * 4, (0x12345678, 0x9ABCDEF0, 0x0F1E2D3C, 0x4B5A6978)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("key", KEYS)
def test_kernel_and_reference_are_the_same_stream(kernels, key, dtype):
    codes = torch.tensor([0, 1, 2, 7, 1000, 65535, 65536, 2**31, 2**32 - 1])
    fast = counter_uniforms(key, 2**32 - 300, 300, codes, dtype)
    assert fast.dtype == dtype and fast.shape == (300, 9)
    want = reference_uniforms(key, torch.arange(2**32 - 300, 2**32), codes, dtype)
    assert torch.equal(fast, want)
    with kernels(False):
        assert torch.equal(counter_uniforms(key, 2**32 - 300, 300, codes, dtype), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_uniform_and_strictly_inside_the_unit_interval(dtype):
    u = counter_uniforms(KEYS[2], 0, 1000, torch.arange(400), dtype)
    assert bool(((u > 0) & (u < 1)).all())
    assert stats.kstest(u.double().flatten().numpy(), "uniform").pvalue > 1e-3
    # the float64 stream carries 52 bits, not one 32-bit hash scaled
    if dtype == torch.float64:
        low_bits = np.unique((u.flatten()[:1000].numpy() * 2.0**52).astype(np.int64) % (1 << 20))
        assert low_bits.size > 990


def test_neighbouring_rows_columns_and_keys_are_independent():
    n = 200_000
    u = counter_uniforms(KEYS[2], 0, n, torch.arange(2), torch.float64).numpy()
    below = counter_uniforms(KEYS[2], 1, n, torch.arange(1), torch.float64).numpy()[:, 0]
    other = counter_uniforms(KEYS[1], 0, n, torch.arange(1), torch.float64).numpy()[:, 0]
    # a correlation of independent uniforms has standard deviation 1/√n ≈ 0.0022
    for a, b in ((u[:, 0], u[:, 1]), (u[:, 0], below), (u[:, 0], other)):
        assert abs(np.corrcoef(a, b)[0, 1]) < 0.0112
    # joint uniformity of pairs: a 16 × 16 contingency table of (column 0, column 1)
    table = np.histogram2d(u[:, 0], u[:, 1], bins=16, range=[[0, 1], [0, 1]])[0]
    assert stats.chisquare(table.flatten()).pvalue > 1e-3


def test_keys_come_from_torchs_generator():
    torch.manual_seed(5)
    first = draw_key()
    torch.manual_seed(5)
    assert draw_key() == first
    assert all(0 <= word < 2**32 for word in first)


def test_rows_outside_the_counter_range_are_refused():
    with pytest.raises(ValueError, match="leave"):
        counter_uniforms(KEYS[0], 2**32 - 1, 2, torch.arange(3), torch.float32)


def test_model_draws_are_reproducible_and_fresh_each_step():
    net = bmrs.attach(torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2)))
    x = torch.randn(4, 3)
    torch.manual_seed(0)
    a, b = net(x), net(x)
    torch.manual_seed(0)
    assert torch.equal(net(x), a) and not torch.equal(a, b)
