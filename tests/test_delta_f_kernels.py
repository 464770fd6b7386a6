"""ΔF in the fused CPU kernel (bmrs._kernels.delta_f_*) against the PyTorch closed forms (kernels off),
which tests/test_reduction.py checks against mpmath; those tests run through the kernel too."""

from __future__ import annotations

import pytest
import torch

import bmrs
from bmrs import _kernels

# the kernels themselves, compared with the reference: on in a BMRS_KERNELS=0 session too
pytestmark = pytest.mark.usefixtures("kernels_on")

LOW, HIGH = -20.0, 0.0


def _posteriors(n: int, seed: int = 0) -> bmrs.TruncatedLogNormal:
    g = torch.Generator().manual_seed(seed)
    mu = torch.empty(n, dtype=torch.float64).uniform_(-45, 25, generator=g)
    log_sigma = torch.empty(n, dtype=torch.float64).uniform_(-21, 5, generator=g)
    # every regime: means at the bounds and at the reduced prior's ends, collapsed and wide posteriors
    special = torch.tensor([-20.0, 0.0, -15.942385152878742, -5.545177444479562, -20.000001, 1e-9, -1e3, 1e3])
    mu[: special.numel() * 7] = special.repeat(7)
    log_sigma[: special.numel() * 7] = torch.tensor([-20.0, -13.8, -5.0, 0.0, 2.0, 5.0, -1.0]).repeat_interleave(
        special.numel())
    return bmrs.TruncatedLogNormal(mu, log_sigma.exp(), LOW, HIGH)


REDUCED = {
    "bmrs_n": lambda: bmrs.spike_prior(),
    "bmrs_n_wide": lambda: bmrs.spike_prior(variance=0.5),
    "bmrs_u8": lambda: bmrs.precision_prior(8),
    "bmrs_u4": lambda: bmrs.precision_prior(4),
    "uniform_upper": lambda: bmrs.TruncatedLogUniform(-3.0, 0.0),
}


@pytest.mark.parametrize("name", sorted(REDUCED))
def test_kernel_matches_the_pytorch_closed_form(kernels, name):
    q, p, r = _posteriors(40_003), bmrs.TruncatedLogUniform(LOW, HIGH), REDUCED[name]()  # 40003: a partial vector
    got = bmrs.delta_f(q, p, r)
    with kernels(False):
        want = bmrs.delta_f(q, p, r)
    assert torch.equal(torch.isfinite(got), torch.isfinite(want))
    finite = torch.isfinite(want)
    # ΔF spans 1e-3 … 1e18: relative precision at large values, absolute near 0
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-12, atol=1e-11)
    assert torch.equal(got >= 0, want >= 0)  # the same pruning decisions


def test_kernel_serves_batches_of_any_shape_and_size():
    q = _posteriors(3 * 5 * 7)
    shaped = bmrs.TruncatedLogNormal(q.loc.reshape(3, 5, 7), q.scale.reshape(3, 5, 7), LOW, HIGH)
    p, r = bmrs.TruncatedLogUniform(LOW, HIGH), bmrs.spike_prior()
    flat = bmrs.delta_f(q, p, r)
    assert torch.equal(bmrs.delta_f(shaped, p, r), flat.reshape(3, 5, 7))
    single = bmrs.TruncatedLogNormal(q.loc[4], q.scale[4], LOW, HIGH)
    assert bmrs.delta_f(single, p, r).shape == torch.Size([])
    assert float(bmrs.delta_f(single, p, r)) == float(flat[4])


def test_disjoint_reduced_prior_gives_minus_infinity():
    k = _kernels.get()
    mu, sigma = torch.zeros(9, dtype=torch.float64), torch.ones(9, dtype=torch.float64)
    assert bool(k.delta_f_uniform(mu, sigma, LOW, HIGH, 1.0, 2.0).eq(-float("inf")).all())
    assert bool(k.delta_f_normal(mu, sigma, LOW, HIGH, 1.0, 1e-3, 1.0, 2.0).eq(-float("inf")).all())


def test_gradients_and_per_element_bounds_take_the_pytorch_path():
    from bmrs.evidence import _fused

    q = _posteriors(60)
    loc = q.loc.clone().requires_grad_()
    with_grad = bmrs.TruncatedLogNormal(loc, q.scale, LOW, HIGH)
    value = bmrs.delta_f(with_grad, bmrs.TruncatedLogUniform(LOW, HIGH), bmrs.spike_prior())
    assert value.requires_grad
    value.sum().backward()
    assert torch.isfinite(loc.grad).all()
    p = bmrs.TruncatedLogUniform(LOW, HIGH)
    assert _fused(q, p, bmrs.spike_prior()) is not None  # broadcast scalar bounds: the kernel
    lows = torch.full((60,), LOW, dtype=torch.float64)
    lows[0] = -19.0  # one posterior with its own support
    assert _fused(bmrs.TruncatedLogNormal(q.loc, q.scale, lows, HIGH), p, bmrs.spike_prior()) is None
