"""ΔF (Bayesian model reduction) against mpmath, SciPy quadrature and its defining properties."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from scipy import integrate, stats

import bmrs
import reference as R
from bmrs.evidence import delta_f_quadrature

LOW, HIGH = -20.0, 0.0
LN2 = math.log(2.0)
F64 = dict(dtype=torch.float64)


def _grid(dtype):
    mu, log_sigma = np.meshgrid(np.linspace(-25, 5, 31), np.linspace(-8, 3, 23), indexing="ij")
    mu = torch.tensor(mu.ravel(), dtype=dtype)
    sigma = torch.tensor(log_sigma.ravel(), dtype=dtype).exp()
    return mu, sigma, [(float(m), float(s)) for m, s in zip(mu.double(), sigma.double())]


def _rel(got, want):
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray([float(w) for w in want])
    return np.abs(got - want) / np.maximum(1.0, np.abs(want))


@functools.lru_cache(maxsize=None)
def _reference(dtype, p1=None):
    """The 60-digit ΔF on the grid (BMRS_N, or BMRS_U at p1), computed once for kernels on and off."""
    _, _, points = _grid(dtype)
    if p1 is None:
        return [R.delta_f_normal(m, s, LOW, 1e-6) for m, s in points]
    reduced = bmrs.precision_prior(p1)
    return [R.delta_f_uniform(m, s, float(reduced.low), float(reduced.high)) for m, s in points]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 1e-3)], ids=["f64", "f32"])
def test_bmrs_n_matches_published_equation_at_high_precision(dtype, tol, kernels_on_and_off):
    mu, sigma, points = _grid(dtype)
    q = bmrs.TruncatedLogNormal(mu, sigma)
    got = bmrs.delta_f(q, bmrs.TruncatedLogUniform(), bmrs.spike_prior())
    assert got.dtype == dtype
    want = _reference(dtype)
    err = _rel(got.double(), want)
    assert err.max() < tol
    # Decisions agree wherever the reference is not within rounding of the boundary.
    want_f = np.array([float(w) for w in want])
    clear = np.abs(want_f) > 1e-3
    assert ((got.double().numpy() >= 0) == (want_f >= 0))[clear].all()


@pytest.mark.parametrize("p1", [8, 4, 1, 22])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 1e-3)], ids=["f64", "f32"])
def test_bmrs_u_matches_mpmath(p1, dtype, tol, kernels_on_and_off):
    mu, sigma, points = _grid(dtype)
    q = bmrs.TruncatedLogNormal(mu, sigma)
    got = bmrs.delta_f(q, bmrs.TruncatedLogUniform(), bmrs.precision_prior(p1))
    want = _reference(dtype, p1)
    assert _rel(got.double(), want).max() < tol


def test_public_code_offset_of_half_log_two_pi_would_be_caught():
    """The reference code omits the 2π: its ΔF is ours + ½ ln 2π. Pin ours to the equation."""
    q = bmrs.TruncatedLogNormal(torch.tensor([-10.0, -19.0], **F64), torch.tensor([1.0, 0.5], **F64))
    got = bmrs.delta_f(q, bmrs.TruncatedLogUniform(), bmrs.spike_prior())
    want = np.array([float(R.delta_f_normal(-10.0, 1.0, LOW, 1e-6)), float(R.delta_f_normal(-19.0, 0.5, LOW, 1e-6))])
    assert np.abs(got.numpy() - want).max() < 1e-8
    assert np.abs(got.numpy() + 0.5 * math.log(2 * math.pi) - want).min() > 0.9


@pytest.mark.parametrize("mu,sigma", [(-10.0, 2.0), (-18.0, 1.0), (-3.0, 0.5), (-22.0, 1.5), (1.0, 3.0)])
def test_bmrs_n_with_wide_reduced_prior_matches_scipy_quadrature(mu, sigma):
    """Any reduced TLN, by direct quadrature of ∫ q p̃ / p over x: an independent check of the algebra."""
    m, s = -15.0, 0.7
    q = bmrs.TruncatedLogNormal(torch.tensor(mu, **F64), torch.tensor(sigma, **F64))
    reduced = bmrs.TruncatedLogNormal(torch.tensor(m, **F64), torch.tensor(s, **F64))
    q_pdf = stats.truncnorm((LOW - mu) / sigma, (HIGH - mu) / sigma, loc=mu, scale=sigma).pdf
    r_pdf = stats.truncnorm((LOW - m) / s, (HIGH - m) / s, loc=m, scale=s).pdf
    integral, _ = integrate.quad(lambda x: q_pdf(x) * r_pdf(x) * (HIGH - LOW), LOW, HIGH, points=[m, mu], limit=200,
                                 epsabs=0.0, epsrel=1e-12)
    assert float(bmrs.delta_f(q, bmrs.TruncatedLogUniform(), reduced)) == pytest.approx(math.log(integral), abs=1e-7)
    assert float(delta_f_quadrature(q, bmrs.TruncatedLogUniform(), reduced)) == pytest.approx(math.log(integral), abs=1e-7)


@pytest.mark.parametrize("mu,sigma", [(-10.0, 2.0), (-18.0, 1.0), (-3.0, 0.5)])
def test_bmrs_u_matches_scipy_quadrature(mu, sigma):
    reduced = bmrs.precision_prior(8)
    a, b = float(reduced.low), float(reduced.high)
    q_pdf = stats.truncnorm((LOW - mu) / sigma, (HIGH - mu) / sigma, loc=mu, scale=sigma).pdf
    mass, _ = integrate.quad(q_pdf, a, b, points=[min(max(mu, a), b)])
    want = math.log(mass) + math.log(HIGH - LOW) - math.log(b - a)
    q = bmrs.TruncatedLogNormal(torch.tensor(mu, **F64), torch.tensor(sigma, **F64))
    assert float(bmrs.delta_f(q, bmrs.TruncatedLogUniform(), reduced)) == pytest.approx(want, abs=1e-9)


def test_delta_f_quadrature_path_for_other_reduced_priors():
    """A reduced prior with no closed form (a beta on θ) goes through quadrature; check vs SciPy."""

    class BetaPrior(torch.distributions.Beta):
        pass

    reduced = BetaPrior(torch.tensor(0.5, **F64), torch.tensor(3.0, **F64))
    mu, sigma = -2.0, 1.0
    q = bmrs.TruncatedLogNormal(torch.tensor(mu, **F64), torch.tensor(sigma, **F64))
    q_pdf = stats.truncnorm((LOW - mu) / sigma, (HIGH - mu) / sigma, loc=mu, scale=sigma).pdf
    # p̃_x(x)/p_x(x) = Beta(e^x) e^x (b − a)
    integral, _ = integrate.quad(lambda x: q_pdf(x) * stats.beta(0.5, 3.0).pdf(math.exp(x)) * math.exp(x) * 20.0,
                                 LOW, HIGH, points=[mu], limit=200)
    assert float(bmrs.delta_f(q, bmrs.TruncatedLogUniform(), reduced)) == pytest.approx(math.log(integral), abs=1e-6)


@pytest.mark.parametrize("mu,sigma", [(mu, sigma) for mu in (-2.0, -5.0, -20.0, 1.0) for sigma in (1e-2, 1e-3, 1e-4)]
                         + [(-30.0, 1e-2), (-30.0, 1e-3)])
def test_delta_f_quadrature_resolves_narrow_posteriors(mu, sigma):
    # the outer 1/48 of a narrow posterior's mass sits within a few σ of a wide panel's inner end: 16 nodes
    # spread over the panel missed it (ΔF off by ln(1 − 2/48) at σ = 1e-4).  Judged against the closed form,
    # itself pinned to mpmath and SciPy above.  (Beyond a bound the mass lies within σ/t of it: at μ = −30,
    # σ = 1e-4 that is 1e-9, where float64's spacing of x near −20 alone moves q by 4e-6 between nodes.)
    q = bmrs.TruncatedLogNormal(torch.tensor(mu, **F64), torch.tensor(sigma, **F64))
    reduced = bmrs.TruncatedLogNormal(torch.tensor(-15.0, **F64), torch.tensor(3.0, **F64))
    prior = bmrs.TruncatedLogUniform()
    assert float(delta_f_quadrature(q, prior, reduced)) == pytest.approx(float(bmrs.delta_f(q, prior, reduced)), abs=1e-9)


def test_bmrs_n_decision_equals_sign_rule_and_prunes_collapsed():
    q = bmrs.TruncatedLogNormal(torch.tensor([0.0, -30.0, 5.0, -25.0], **F64), torch.tensor([0.0067, 0.1, 2e-9, 2e-9], **F64))
    df = bmrs.delta_f(q, bmrs.TruncatedLogUniform(), bmrs.spike_prior())
    assert (df >= 0).tolist() == [False, True, False, True]


def test_prior_validation():
    q = bmrs.TruncatedLogNormal(torch.tensor(-1.0), torch.tensor(1.0))
    with pytest.raises(bmrs.ConfigError, match="reduced prior's support"):
        bmrs.delta_f(q, bmrs.TruncatedLogUniform(), bmrs.TruncatedLogUniform(-25.0, -1.0))
    with pytest.raises(bmrs.ConfigError, match="prior must be a TruncatedLogUniform"):
        bmrs.delta_f(q, q, bmrs.spike_prior())
    for bad in (0, 23, -1, 30, float("nan"), "8", True):
        with pytest.raises(bmrs.ConfigError, match="p1 must be"):
            bmrs.precision_prior(bad)
    for bad in (0.0, float("inf"), float("nan"), "1e-12", True):
        with pytest.raises(bmrs.ConfigError, match="spike variance"):
            bmrs.spike_prior(variance=bad)
    for bounds in (dict(low=float("nan")), dict(high=float("nan")), dict(low=1.0, high=0.0), dict(low="a")):
        for make in (bmrs.spike_prior, lambda **kw: bmrs.precision_prior(8, **kw)):
            with pytest.raises(bmrs.ConfigError):
                make(**bounds)
    for bad in (None, 8, "spike"):
        with pytest.raises(bmrs.ConfigError, match="reduced prior must be"):
            bmrs.delta_f(q, bmrs.TruncatedLogUniform(), bad)


# --- properties (hypothesis) ---------------------------------------------------------------------

mus = st.floats(-25.0, 5.0)
log_sigmas = st.floats(-8.0, 3.0)


@settings(max_examples=200, deadline=None)
@given(mus, log_sigmas)
def test_reducing_to_the_prior_changes_nothing(mu, log_sigma):
    q = bmrs.TruncatedLogNormal(torch.tensor(mu, **F64), torch.tensor(math.exp(log_sigma), **F64))
    p = bmrs.TruncatedLogUniform(torch.tensor(LOW, **F64), torch.tensor(HIGH, **F64))
    assert float(bmrs.delta_f(q, p, p)) == 0.0


@settings(max_examples=200, deadline=None)
@given(mus, st.floats(-20.0, 5.0), st.floats(0.5, 22.5))
def test_bmrs_u_bound_and_mass_rule(mu, log_sigma, p1):
    q = bmrs.TruncatedLogNormal(torch.tensor(mu, **F64), torch.tensor(math.exp(log_sigma), **F64))
    reduced = bmrs.precision_prior(p1)
    width = float(reduced.high - reduced.low)
    df = float(bmrs.delta_f(q, bmrs.TruncatedLogUniform(), reduced))
    assert df <= math.log((HIGH - LOW) / width) + 1e-12
    log_mass = float(q.log_mass(reduced.low, reduced.high))
    threshold = math.log(width / (HIGH - LOW))
    if abs(log_mass - threshold) > 1e-9:
        assert (df >= 0) == (log_mass >= threshold)


@settings(max_examples=60, deadline=None)
@given(st.floats(-24.0, 3.0), st.floats(-4.0, 2.0))
def test_bmrs_n_tends_to_posterior_density_at_lower_bound(mu, log_sigma):
    sigma = math.exp(log_sigma)
    q = bmrs.TruncatedLogNormal(torch.tensor(mu, **F64), torch.tensor(sigma, **F64))
    limit = math.log(HIGH - LOW) + float(R.log_density_at(mu, sigma, LOW))
    gaps = []
    # The approach is linear in s: ΔF − limit ≈ −(decay rate of q at a)·s·√(2/π), so go well below s = 1e-6.
    for variance in (1e-8, 1e-16, 1e-24):
        df = float(bmrs.delta_f(q, bmrs.TruncatedLogUniform(), bmrs.spike_prior(variance=variance)))
        gaps.append(abs(df - limit))
    assert gaps[-1] <= max(1e-6, 1e-6 * abs(limit))
    assert gaps[0] >= gaps[-1] - 1e-9


@settings(max_examples=200, deadline=None)
@given(mus, st.floats(-20.0, 5.0))
def test_kl_is_non_negative(mu, log_sigma):
    q = bmrs.TruncatedLogNormal(torch.tensor(mu, **F64), torch.tensor(math.exp(log_sigma), **F64))
    assert float(torch.distributions.kl_divergence(q, bmrs.TruncatedLogUniform())) >= -1e-12


@settings(max_examples=50, deadline=None)
@given(st.floats(-19.0, -1.0))
def test_kl_tends_to_zero_as_sigma_grows_inside(mu):
    p = bmrs.TruncatedLogUniform()
    kls = [float(torch.distributions.kl_divergence(
        bmrs.TruncatedLogNormal(torch.tensor(mu, **F64), torch.tensor(s, **F64)), p)) for s in (10.0, 100.0, 1000.0, 1e4)]
    assert all(a > b for a, b in zip(kls, kls[1:]))
    assert kls[-1] < 1e-5


@pytest.mark.parametrize("reduced", ["spike", "u8", "u4"])
def test_fast_path_equals_differentiable_path_on_the_wide_grid(reduced):
    """Without gradients ΔF evaluates each element's regime only; it must agree with the full path."""
    mu, log_sigma = np.meshgrid(np.linspace(-25, 5, 61), np.linspace(-20, 5, 51), indexing="ij")
    mu = torch.tensor(mu.ravel(), **F64)
    sigma = torch.tensor(log_sigma.ravel(), **F64).exp()
    prior = {"spike": bmrs.spike_prior(), "u8": bmrs.precision_prior(8), "u4": bmrs.precision_prior(4)}[reduced]
    fast = bmrs.delta_f(bmrs.TruncatedLogNormal(mu, sigma), bmrs.TruncatedLogUniform(), prior)
    slow = bmrs.delta_f(bmrs.TruncatedLogNormal(mu.requires_grad_(), sigma), bmrs.TruncatedLogUniform(), prior)
    rel = (fast - slow.detach()).abs() / slow.detach().abs().clamp(min=1.0)
    assert torch.isfinite(fast).all() and rel.max() < 1e-12


def test_chunked_evaluation_equals_one_pass(monkeypatch):
    """Large batches are evaluated in cache-sized chunks; the result must not depend on that."""
    import bmrs.evidence as reduction
    g = torch.Generator().manual_seed(0)
    mu = torch.empty(5000, **F64).uniform_(-25, 5, generator=g)
    sigma = torch.empty(5000, **F64).uniform_(-20, 5, generator=g).exp()
    q = bmrs.TruncatedLogNormal(mu.reshape(50, 100), sigma.reshape(50, 100))
    whole = {name: bmrs.delta_f(q, bmrs.TruncatedLogUniform(), r)
             for name, r in [("n", bmrs.spike_prior()), ("u", bmrs.precision_prior(8))]}
    monkeypatch.setattr(reduction, "_CHUNK", 777)
    for name, r in [("n", bmrs.spike_prior()), ("u", bmrs.precision_prior(8))]:
        chunked = bmrs.delta_f(q, bmrs.TruncatedLogUniform(), r)
        assert chunked.shape == (50, 100) and torch.equal(chunked, whole[name])
