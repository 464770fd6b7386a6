"""The distribution tester (in the style of pyro's ``tests/distributions``): every fixture below, one
distribution with its parameters, batch shape and dtype, passes every law.

Laws: the support holds every sample and its shapes follow ``sample_shape + batch_shape``; the density
integrates to one and, piece by piece between quantiles, to the CDF's differences (so ``log_prob``, ``cdf``
and ``icdf`` agree); ``icdf`` inverts ``cdf``; mean, variance and entropy equal their integrals and the
Monte Carlo averages; samples follow the CDF (Kolmogorov–Smirnov); ``rsample`` has finite gradients equal
to finite differences; ``expand`` behaves as broadcasting; KL(q ‖ prior) equals its integral.

Integrals are Gauss–Legendre quadrature (SciPy's nodes, 48 per piece) over x = ln θ, between the
quantiles u = 0, 1e-13, 1e-9, 1e-5, 0.01, 0.1, …, 0.99, 1 − 1e-5, 1 − 1e-9, 1 − 1e-13, 1, so that every
piece holds a smooth part of the density however narrow or far in a tail the distribution is.
A new distribution is added as a ``Fixture``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pytest
import torch
from scipy import special, stats

import bmrs
from bmrs import TruncatedLogNormal as TLN
from bmrs import TruncatedLogUniform as TLU

LN2 = math.log(2)


@dataclass
class Fixture:
    name: str
    cls: type
    params: dict[str, object]          # constructor arguments: numbers or (nested) lists, broadcast together
    dtype: torch.dtype = torch.float64
    grad: tuple[str, ...] = ()         # parameters rsample is differentiable in
    kl_to: tuple[float, float] | None = None  # bounds of the log-uniform prior KL(q ‖ p) is registered for
    tol: dict[str, float] = field(default_factory=dict)

    def make(self, dtype: torch.dtype | None = None, **override) -> torch.distributions.Distribution:
        dtype = dtype or self.dtype
        args = {k: torch.tensor(v, dtype=dtype) for k, v in self.params.items()}
        args.update(override)
        return self.cls(**args)

    def rtol(self, law: str) -> float:
        return self.tol.get(law, 1e-8 if self.dtype == torch.float64 else 2e-5)


FIXTURES = [
    Fixture("log_normal_init", TLN, dict(loc=[0.0, 0.0, 1e-3], scale=[math.exp(-5)] * 3), grad=("loc", "scale"),
            kl_to=(-20.0, 0.0)),
    Fixture("log_normal_inside", TLN, dict(loc=[-10.0, -3.0, -17.0, -0.5], scale=[2.0, 0.5, 1.0, 0.3]),
            grad=("loc", "scale"), kl_to=(-20.0, 0.0)),
    Fixture("log_normal_beyond_bounds", TLN, dict(loc=[3.0, -24.0, 5.0, -25.0, -21.0], scale=[1.0, 0.5, 0.1, 0.1, 1.0]),
            grad=("loc", "scale"), kl_to=(-20.0, 0.0)),
    Fixture("log_normal_collapsed", TLN, dict(loc=[5.0, -25.0, -3.0, -20.0], scale=[1e-3, 1e-3, 1e-6, 1e-4]),
            grad=("loc", "scale"), kl_to=(-20.0, 0.0),
            # (θ within 2e-7 of e^−20 in ln θ: float64's θ holds u to 1e-8 there)
            tol=dict(grad=1e-3, mass=5e-8, icdf=5e-8)),
    Fixture("log_normal_wide", TLN, dict(loc=[-10.0, -20.0, 0.0], scale=[5.0, 1e3, 30.0]), grad=("loc", "scale"),
            kl_to=(-20.0, 0.0)),
    Fixture("log_normal_broadcast", TLN, dict(loc=[[-10.0], [0.0], [-22.0]], scale=[2.0, 0.5, 1.0, 1e-2]),
            grad=("loc", "scale"), kl_to=(-20.0, 0.0)),
    Fixture("log_normal_singleton_batch", TLN, dict(loc=[[-4.0]], scale=[[0.7]]), grad=("loc", "scale"),
            kl_to=(-20.0, 0.0)),
    Fixture("log_normal_scalar_other_bounds", TLN, dict(loc=-5.0, scale=1.5, low=-13.7, high=-0.3),
            grad=("loc", "scale"), kl_to=(-20.0, 0.0)),
    Fixture("log_normal_precision_bounds", TLN, dict(loc=[-6.0, -1.0], scale=[1.0, 3.0], low=-23 * LN2, high=-8 * LN2),
            grad=("loc", "scale"), kl_to=(-23 * LN2, -8 * LN2)),
    Fixture("log_normal_float32", TLN, dict(loc=[-10.0, 0.0, 3.0, -24.0], scale=[2.0, math.exp(-5), 1.0, 0.5]),
            dtype=torch.float32, grad=("loc", "scale"), kl_to=(-20.0, 0.0)),
    Fixture("log_uniform_prior", TLU, dict(low=-20.0, high=0.0), grad=("low", "high")),
    Fixture("log_uniform_batch", TLU, dict(low=[-20.0, -5.3, -23 * LN2], high=[0.0, 0.0, -8 * LN2]),
            grad=("low", "high")),
    Fixture("log_uniform_narrow", TLU, dict(low=[-1e-3, -7.0], high=[0.0, -7.0 + 1e-6]), grad=("low", "high"),
            tol=dict(grad=1e-4)),
    Fixture("log_uniform_float32", TLU, dict(low=[-20.0, -10.0], high=[0.0, -1.0]), dtype=torch.float32,
            grad=("low", "high")),
]
IDS = [f.name for f in FIXTURES]
QUANTILES = [0.0, 1e-13, 1e-9, 1e-5, 0.01, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99, 1 - 1e-5, 1 - 1e-9, 1 - 1e-13, 1.0]
NODES, WEIGHTS = (torch.from_numpy(a) for a in special.roots_legendre(48))


@pytest.fixture(params=FIXTURES, ids=IDS)
def fixture(request) -> Fixture:
    return request.param


def _ends(fixture: Fixture) -> torch.Tensor:
    """x = ln θ at the quantiles: shape (len(QUANTILES), *batch_shape), float64."""
    d64 = fixture.make(torch.float64)
    u = torch.tensor(QUANTILES, dtype=torch.float64).reshape(-1, *[1] * len(d64.batch_shape))
    x = torch.log(d64.icdf(u.expand(-1, *d64.batch_shape)))
    low, high = torch.broadcast_tensors(d64.low.double(), d64.high.double())
    x[0], x[-1] = low.expand(d64.batch_shape), high.expand(d64.batch_shape)
    return x


def _pieces(fixture: Fixture, d, integrand: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """∫ integrand(x, ln p(x)) dx over each piece between quantiles, p the density of x = ln θ under ``d``:
    shape (len(QUANTILES) − 1, *batch_shape)."""
    ends = _ends(fixture)
    a, b = ends[:-1], ends[1:]
    shape = (-1,) + (1,) * ends.dim()
    x = (a + b) / 2 + (b - a) / 2 * NODES.reshape(shape)              # (nodes, pieces, *batch)
    log_p = d.log_prob(torch.exp(x).to(d.mean.dtype)).double() + x    # (p(θ) dθ = p(θ) θ dx)
    return ((b - a) / 2 * (WEIGHTS.reshape(shape) * integrand(x, log_p)).sum(0))


def _close(got, want, rtol: float, atol: float = 0.0, what: str = "") -> None:
    got, want = torch.as_tensor(got).double(), torch.as_tensor(want).double()
    assert got.shape == want.shape, what
    err = (got - want).abs()
    assert (err <= atol + rtol * want.abs()).all(), f"{what}: max error {err.max():.3g} (got {got}, want {want})"


# -- shapes and support --------------------------------------------------------------------------------
def test_batch_shape_support_and_sample_shapes(fixture):
    d = fixture.make()
    shapes = [torch.as_tensor(v).shape for v in fixture.params.values()]
    assert d.batch_shape == torch.broadcast_shapes(*shapes) and d.event_shape == ()
    torch.manual_seed(0)
    for sample_shape in [(), (5,), (2, 3)]:
        for draw in (d.sample, d.rsample):
            theta = draw(torch.Size(sample_shape))
            assert theta.shape == torch.Size(sample_shape) + d.batch_shape and theta.dtype == fixture.dtype
            assert bool(d.support.check(theta).all())
            assert torch.isfinite(d.log_prob(theta)).all()
    for value in (d.mean, d.variance, d.entropy(), d.cdf(d.sample()), d.icdf(torch.full(d.batch_shape, 0.5))):
        assert value.shape == d.batch_shape and value.dtype == fixture.dtype and torch.isfinite(value).all()
    assert d.has_rsample and not d.support.is_discrete


def test_expand_behaves_as_broadcasting(fixture):
    d = fixture.make()
    for new in [(2,) + tuple(d.batch_shape), (3, 2) + tuple(d.batch_shape)]:
        e = d.expand(torch.Size(new))
        assert e.batch_shape == new and type(e) is type(d)
        torch.manual_seed(1)
        theta = e.sample()
        assert theta.shape == new
        for got, want in [(e.log_prob(theta), d.log_prob(theta)), (e.cdf(theta), d.cdf(theta)),
                          (e.mean, d.mean.expand(new)), (e.variance, d.variance.expand(new)),
                          (e.entropy(), d.entropy().expand(new))]:
            assert torch.equal(got, want)
    singleton = [i for i, n in enumerate(d.batch_shape) if n == 1]
    if singleton:  # an existing dimension of size one grows
        new = list(d.batch_shape)
        new[singleton[0]] = 4
        e = d.expand(torch.Size(new))
        assert e.batch_shape == tuple(new) and torch.equal(e.mean, d.mean.expand(new))
    wide = [i for i, n in enumerate(d.batch_shape) if n > 1]
    if wide:  # a dimension that is not one cannot change
        bad = list(d.batch_shape)
        bad[wide[0]] += 1
        with pytest.raises((RuntimeError, ValueError)):
            d.expand(torch.Size(bad))


# -- density, cdf, icdf ---------------------------------------------------------------------------------
def test_density_integrates_to_the_cdf_differences(fixture):
    d = fixture.make()
    pieces = _pieces(fixture, d, lambda x, log_p: log_p.exp())
    u = torch.tensor(QUANTILES, dtype=torch.float64)
    rtol = fixture.rtol("mass")
    _close(pieces.sum(0), torch.ones(d.batch_shape), rtol, what="total mass")
    want = (u[1:] - u[:-1]).reshape(-1, *[1] * len(d.batch_shape)).expand_as(pieces)
    _close(pieces, want, 0.0, atol=max(rtol, 1e-9), what="mass between quantiles")
    # the CDF at the quantiles' points, from the left end
    theta = torch.exp(_ends(fixture)[1:-1]).to(fixture.dtype)
    _close(d.cdf(theta), pieces.cumsum(0)[:-1], 0.0, atol=max(rtol, 1e-9), what="cdf")


def test_icdf_inverts_cdf(fixture):
    d = fixture.make()
    u = torch.tensor([1e-6, 0.01, 0.3, 0.5, 0.7, 0.99, 1 - 1e-6], dtype=fixture.dtype)
    u = u.reshape(-1, *[1] * len(d.batch_shape)).expand(-1, *d.batch_shape)
    atol = fixture.tol.get("icdf", 1e-9 if fixture.dtype == torch.float64 else 1e-5)
    _close(d.cdf(d.icdf(u)), u, 0.0, atol=atol, what="cdf(icdf(u))")


# -- moments and entropy -------------------------------------------------------------------------------
def test_mean_variance_and_entropy_equal_their_integrals(fixture):
    d = fixture.make()
    rtol = fixture.rtol("moments")
    mean = _pieces(fixture, d, lambda x, log_p: torch.exp(x + log_p)).sum(0)
    _close(d.mean, mean, rtol, what="mean")
    m = d.mean.double()
    variance = _pieces(fixture, d, lambda x, log_p: (torch.exp(x) - m) ** 2 * log_p.exp()).sum(0)
    _close(d.variance, variance, max(rtol, 1e-6), what="variance")  # (m itself is 1e-8 off at most)
    # H(θ) = −∫ p_θ ln p_θ dθ, with ln p_θ = ln p_x − x
    entropy = _pieces(fixture, d, lambda x, log_p: -log_p.exp() * (log_p - x)).sum(0)
    _close(d.entropy(), entropy, 0.0, atol=rtol * max(1.0, float(entropy.abs().max())), what="entropy")


def test_monte_carlo_agrees_with_mean_variance_and_cdf(fixture):
    d = fixture.make()
    torch.manual_seed(2)
    n = 20_000
    theta = d.sample((n,)).double()
    mean, var = d.mean.double(), d.variance.double()
    se = (var / n).sqrt()
    assert ((theta.mean(0) - mean).abs() <= 5 * se + 1e-12 * mean).all()
    # the sample variance's standard error from the fourth central moment
    centred = theta - mean
    se_var = ((centred**4).mean(0) - var**2).clamp(min=0).sqrt() / math.sqrt(n)
    assert ((centred.square().mean(0) - var).abs() <= 6 * se_var + 1e-9 * var).all()
    u = d.cdf(d.sample((2_000,))).double().reshape(2_000, -1)
    for column in u.T:
        if column.max() - column.min() > 0:  # (a collapsed float32 one is a point mass)
            assert stats.kstest(column.numpy(), stats.uniform.cdf).pvalue > 1e-4


# -- gradients -------------------------------------------------------------------------------------------
def test_rsample_gradients_are_finite_and_equal_finite_differences(fixture):
    params = {k: torch.tensor(v, dtype=torch.float64) for k, v in fixture.params.items()}
    leaves = {k: params[k].clone().requires_grad_() for k in fixture.grad}

    def f(**values):
        torch.manual_seed(3)
        theta = fixture.cls(**{**params, **values}).rsample((6,))
        return (theta.log() * torch.linspace(0.5, 1.5, 6, dtype=torch.float64).reshape(6, *[1] * (theta.dim() - 1))).sum()

    out = f(**leaves)
    grads = torch.autograd.grad(out, list(leaves.values()))
    for (name, leaf), grad in zip(leaves.items(), grads):
        assert torch.isfinite(grad).all(), name
        fd = torch.zeros_like(leaf)
        flat, flat_fd = leaf.detach().reshape(-1), fd.reshape(-1)
        for i in range(flat.numel()):
            h = 1e-6 * max(abs(float(flat[i])), 1.0) if name != "scale" else 1e-6 * float(flat[i])
            if fixture.cls is TLU:  # (the bounds of a narrow support move by a fraction of its width)
                h = min(h, 1e-3 * float((params["high"] - params["low"]).abs().min()))
            plus, minus = flat.clone(), flat.clone()
            plus[i] += h
            minus[i] -= h
            with torch.no_grad():
                flat_fd[i] = (f(**{name: plus.reshape(leaf.shape)}) - f(**{name: minus.reshape(leaf.shape)})) / (2 * h)
        scale = fd.abs().max().clamp(min=1e-12)
        _close(grad.reshape(fd.shape), fd, 0.0, atol=float(scale) * fixture.rtol("grad") * 100 + 1e-10,
               what=f"d/d{name}")


# -- KL ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kl_fixture", [f for f in FIXTURES if f.kl_to], ids=[f.name for f in FIXTURES if f.kl_to])
def test_kl_to_the_log_uniform_prior_equals_its_integral(kl_fixture, kernels_on_and_off):
    q = kl_fixture.make()
    p = TLU(*kl_fixture.kl_to)
    kl = torch.distributions.kl_divergence(q, p)
    assert kl.shape == q.batch_shape and kl.dtype == kl_fixture.dtype
    # KL = ∫ p_q(x) (ln p_q(x) − ln p_p(x)) dx over x = ln θ (the change of variables cancels)
    log_width = math.log(kl_fixture.kl_to[1] - kl_fixture.kl_to[0])
    want = _pieces(kl_fixture, q, lambda x, log_p: log_p.exp() * (log_p + log_width)).sum(0)
    rtol = kl_fixture.rtol("kl")
    _close(kl, want, 0.0, atol=rtol * max(1.0, float(want.abs().max())), what="KL")
    assert (kl >= -rtol).all()
    # its gradient (the training loss's) is finite, on the fused kernels' path too for a 1-d batch
    loc = q.loc.detach().reshape(-1).clone().requires_grad_()
    scale = q.scale.detach().reshape(-1).clone().requires_grad_()
    flat = TLN(loc, scale, q.low.reshape(-1), q.high.reshape(-1))
    g_loc, g_scale = torch.autograd.grad(torch.distributions.kl_divergence(flat, p).sum(), (loc, scale))
    assert torch.isfinite(g_loc).all() and torch.isfinite(g_scale).all()


def test_every_fixture_class_is_a_bmrs_distribution():
    assert {f.cls for f in FIXTURES} == {bmrs.TruncatedLogNormal, bmrs.TruncatedLogUniform}
    assert len({f.name for f in FIXTURES}) == len(FIXTURES)
    assert np.all([f.dtype in (torch.float32, torch.float64) for f in FIXTURES])
