"""TruncatedLogNormal / TruncatedLogUniform against mpmath (60 digits) and SciPy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

import bmrs
import reference as R

LOW, HIGH = -20.0, 0.0
MU_GRID = np.linspace(-25.0, 5.0, 31)
LOG_SIGMA_GRID = np.linspace(-8.0, 3.0, 23)


def _grid(dtype):
    mu, log_sigma = np.meshgrid(MU_GRID, LOG_SIGMA_GRID, indexing="ij")
    mu = torch.tensor(mu.ravel(), dtype=dtype)
    sigma = torch.tensor(log_sigma.ravel(), dtype=dtype).exp()
    return mu, sigma


def _ref_points(mu, sigma):
    """The exact values the tensors hold (float32 inputs are judged on their own rounded values)."""
    return [(float(m), float(s)) for m, s in zip(mu.double(), sigma.double())]


@pytest.fixture(scope="module", params=[torch.float64, torch.float32], ids=["f64", "f32"])
def grid(request):
    dtype = request.param
    mu, sigma = _grid(dtype)
    points = _ref_points(mu, sigma)
    tol = 1e-6 if dtype == torch.float64 else 1e-3
    return dtype, mu, sigma, points, tol


def _rel_err(got, want, floor_one=False):
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray([float(w) for w in want])
    scale = np.maximum(1.0, np.abs(want)) if floor_one else np.abs(want)
    return np.abs(got - want) / scale


def test_mean_matches_mpmath(grid):
    dtype, mu, sigma, points, tol = grid
    q = bmrs.TruncatedLogNormal(mu, sigma, LOW, HIGH)
    assert q.mean.dtype == dtype
    want = [R.moments(m, s)[0] for m, s in points]
    assert _rel_err(q.mean.double(), want).max() < tol


def test_mean_of_very_wide_posteriors_matches_mpmath():
    # σ far above the layers' clamp (e⁵), mean inside the interval: the density is nearly flat on it, and
    # kμ + k²σ²/2 against the anchor's quadratic once cancelled in floating point (2e-5 off at σ = 1e6)
    points = [(mu, sigma) for mu in (-10.0, -3.0, -17.0) for sigma in (1e3, 1e4, 1e5, 1e6)]
    mu = torch.tensor([m for m, _ in points], dtype=torch.float64)
    sigma = torch.tensor([s for _, s in points], dtype=torch.float64)
    q = bmrs.TruncatedLogNormal(mu, sigma, LOW, HIGH)
    want = [R.moments(m, s)[0] for m, s in points]
    assert _rel_err(q.mean, want).max() < 1e-10
    assert _rel_err(q.log_mean, [float(R.mp.log(w)) for w in want]).max() < 1e-10


def test_log_mean_of_narrow_posteriors_on_and_beyond_a_bound_matches_mpmath():
    # μ + σ² rounds at |μ| = 20 by up to 2e-15: the shifted ends came out σ-relative wrong, and ln E[θ] for μ
    # on the lower bound lost its 0.8σ (1e-9 off at σ = 1e-9)
    points = [(mu, sigma) for mu in (-20.0, -20.5, 0.0, 5.0, -19.999999) for sigma in (1e-9, 1e-6, 1e-3)]
    mu = torch.tensor([m for m, _ in points], dtype=torch.float64)
    sigma = torch.tensor([s for _, s in points], dtype=torch.float64)
    q = bmrs.TruncatedLogNormal(mu, sigma, LOW, HIGH)
    with R.mp.workdps(90):
        want = [float(R.mp.log(R.moments(m, s)[0])) for m, s in points]
    assert np.abs(q.log_mean.numpy() - np.array(want)).max() < 1e-13


def test_variance_and_snr_of_collapsed_posteriors_inside_the_interval_match_mpmath():
    # σ down to the layers' clamp (e⁻²⁰ ≈ 2e-9) with μ inside: Var ≈ E²σ², SNR ≈ 1/σ.  ln E[θ²] − 2 ln E[θ]
    # must cancel 2μ analytically (in floating point σ² is lost against μ below σ ≈ 1e-8)
    points = [(mu, sigma) for mu in (-3.0, -0.5, -17.0) for sigma in (1e-6, 1e-7, 1e-8, 1e-9)]
    mu = torch.tensor([m for m, _ in points], dtype=torch.float64)
    sigma = torch.tensor([s for _, s in points], dtype=torch.float64)
    q = bmrs.TruncatedLogNormal(mu, sigma, LOW, HIGH)
    ref = [R.moments(m, s) for m, s in points]
    assert _rel_err(q.variance, [r[1] for r in ref]).max() < 1e-6
    assert _rel_err(q.snr, [r[2] for r in ref]).max() < 1e-6


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-9), (torch.float32, 1e-5)], ids=["f64", "f32"])
def test_variance_and_snr_of_narrow_posteriors_at_and_beyond_a_bound_match_mpmath(dtype, tol):
    # σ ≪ the distance scale with μ on a bound or outside the interval: Var/E² ≈ σ²/t² for t ends-in-σ away;
    # as a difference of log normalisers it was lost to rounding (SNR 1.9e4 for 1.7e6 at μ = −20, σ = 1e-6;
    # 6.7e153 for 2e9 at μ = −40, σ = 1e-4)
    mus = (-40.0, -21.0, -20.5, -20.01, -20.0, -19.999, -0.001, 0.0, 0.5, 1.0, 20.0)
    sigmas = (1e-9, 1e-6, 1e-4, 1e-2, 0.1, 0.2)
    mu = torch.tensor([m for m in mus for _ in sigmas], dtype=dtype)
    sigma = torch.tensor([s for _ in mus for s in sigmas], dtype=dtype)
    q = bmrs.TruncatedLogNormal(mu, sigma, LOW, HIGH)
    with R.mp.workdps(90):  # Var/E² down to 1e-36: the textbook difference keeps 50 digits
        ref = [R.moments(m, s) for m, s in _ref_points(mu, sigma)]
    assert _rel_err(q.snr.double(), [r[2] for r in ref]).max() < tol
    ratio = (q.variance.double() / q.mean.double() ** 2).numpy()
    normal = np.array([float(r[1]) >= torch.finfo(dtype).tiny for r in ref])  # (smaller ones round to subnormals)
    assert _rel_err(ratio[normal], [r[1] / r[0] ** 2 for r, n in zip(ref, normal) if n]).max() < max(tol, 1e-8)


def test_variance_and_snr_match_mpmath_where_snr_decides(grid):
    dtype, mu, sigma, points, tol = grid
    q = bmrs.TruncatedLogNormal(mu, sigma, LOW, HIGH)
    ref = [R.moments(m, s) for m, s in points]
    snr_ref = np.array([float(r[2]) for r in ref])
    decides = snr_ref <= 100
    assert decides.sum() > 100  # the comparison covers a real part of the grid
    var_err = _rel_err(q.variance.double().numpy()[decides], [r[1] for r, d in zip(ref, decides) if d])
    snr_err = _rel_err(q.snr.double().numpy()[decides], snr_ref[decides])
    assert var_err.max() < tol and snr_err.max() < tol
    assert torch.isfinite(q.snr).all() and (q.snr >= 0).all()
    assert torch.isfinite(q.variance).all() and (q.variance >= 0).all()


def test_kl_matches_mpmath(grid):
    dtype, mu, sigma, points, tol = grid
    q = bmrs.TruncatedLogNormal(mu, sigma, LOW, HIGH)
    kl = torch.distributions.kl_divergence(q, bmrs.TruncatedLogUniform(LOW, HIGH))
    assert kl.dtype == dtype
    want = [R.kl(m, s) for m, s in points]
    assert _rel_err(kl.double(), want, floor_one=True).max() < tol


def test_mean_log_and_entropy_match_mpmath(grid):
    dtype, mu, sigma, points, tol = grid
    q = bmrs.TruncatedLogNormal(mu, sigma, LOW, HIGH)
    mean_log = [R.mean_log(m, s) for m, s in points]
    assert _rel_err(q.mean_log.double(), mean_log, floor_one=True).max() < tol
    # H(θ) = ln(b − a) − KL + E[ln θ]
    entropy = [math.log(HIGH - LOW) - R.kl(m, s) + ml for (m, s), ml in zip(points, mean_log)]
    assert _rel_err(q.entropy().double(), entropy, floor_one=True).max() < tol


@pytest.mark.parametrize("p1", [8, 4])
def test_log_mass_matches_mpmath(grid, p1):
    dtype, mu, sigma, points, tol = grid
    q = bmrs.TruncatedLogNormal(mu, sigma, LOW, HIGH)
    lo, hi = -23 * math.log(2), -p1 * math.log(2)
    want = [R.log_mass(m, s, lo, hi) for m, s in points]
    assert _rel_err(q.log_mass(lo, hi).double(), want, floor_one=True).max() < tol


def test_default_initialisation_is_not_collapsed_to_zero():
    """The published code returns E[θ] = 0 at μ ≈ 0, ln σ = −5: the truth is ≈ 0.9947."""
    for dtype in (torch.float32, torch.float64):
        q = bmrs.TruncatedLogNormal(torch.zeros(3, dtype=dtype), torch.full((3,), math.exp(-5), dtype=dtype))
        want = float(R.moments(0.0, float(q.scale[0].double()))[0])
        assert want > 0.99
        assert torch.allclose(q.mean.double(), torch.full((3,), want, dtype=torch.float64), rtol=1e-6)


# --- robustness on the wide grid ---------------------------------------------------------------

def _wide_grid(dtype):
    mu, log_sigma = np.meshgrid(np.linspace(-25, 5, 61), np.linspace(-20, 5, 51), indexing="ij")
    mu = torch.tensor(mu.ravel(), dtype=dtype, requires_grad=True)
    log_sigma = torch.tensor(log_sigma.ravel(), dtype=dtype, requires_grad=True)
    return mu, log_sigma


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_everything_finite_on_wide_grid(dtype):
    mu, log_sigma = _wide_grid(dtype)
    q = bmrs.TruncatedLogNormal(mu, log_sigma.exp(), LOW, HIGH)
    p = bmrs.TruncatedLogUniform(LOW, HIGH)
    values = {
        "mean": q.mean,
        "variance": q.variance,
        "snr": q.snr,
        "mean_log": q.mean_log,
        "entropy": q.entropy(),
        "kl": torch.distributions.kl_divergence(q, p),
        "log_mass_8": q.log_mass(-23 * math.log(2), -8 * math.log(2)),
        "delta_f_n": bmrs.delta_f(q, p, bmrs.spike_prior()),
        "delta_f_u8": bmrs.delta_f(q, p, bmrs.precision_prior(8)),
        "delta_f_u4": bmrs.delta_f(q, p, bmrs.precision_prior(4)),
    }
    for name, value in values.items():
        assert torch.isfinite(value).all(), f"{name}: {(~torch.isfinite(value)).sum()} non-finite"
    assert (values["variance"] >= 0).all() and (values["snr"] >= 0).all() and (values["kl"] >= -1e-6).all()

    fresh = bmrs.TruncatedLogNormal(mu, log_sigma.exp(), LOW, HIGH)
    for name, out in {"kl": values["kl"].sum(), "rsample": fresh.rsample((4,)).sum()}.items():
        g_mu, g_ls = torch.autograd.grad(out, (mu, log_sigma))
        assert torch.isfinite(g_mu).all() and torch.isfinite(g_ls).all(), f"gradient of {name} not finite"


# --- sampling ------------------------------------------------------------------------------------

CASES = [(-10.0, 2.0), (0.0, math.exp(-5)), (3.0, 1.0), (-24.0, 0.5), (5.0, 0.1), (-25.0, 0.1), (-20.0, 5.0)]


@pytest.mark.parametrize("mu,sigma", CASES)
def test_rsample_matches_scipy_truncnorm(mu, sigma):
    torch.manual_seed(0)
    q = bmrs.TruncatedLogNormal(torch.tensor(mu, dtype=torch.float64), torch.tensor(sigma, dtype=torch.float64))
    theta = q.rsample((4000,))
    assert (theta >= math.exp(LOW)).all() and (theta <= math.exp(HIGH)).all()
    z = ((theta.log() - mu) / sigma).numpy()
    a, b = (LOW - mu) / sigma, (HIGH - mu) / sigma
    # Far in a tail SciPy's CDF itself runs out of precision in standard units; compare the
    # distance from the near end scaled by the tail rate, which is Exp(1)-like but still exact.
    result = stats.kstest(z, stats.truncnorm(a, b).cdf)
    assert result.pvalue > 1e-3, result


# (The distance from a non-zero end below ulp(x) is not representable, hence σ = 1e-5 there.)
@pytest.mark.parametrize("mu,sigma", [(5.0, 2e-9), (-25.0, 1e-5), (30.0, 1e-3), (-60.0, 1e-2)])
def test_rsample_collapsed_stays_in_bounds_and_follows_exponential_tail(mu, sigma):
    torch.manual_seed(1)
    q = bmrs.TruncatedLogNormal(torch.tensor(mu, dtype=torch.float64), torch.tensor(sigma, dtype=torch.float64))
    x = torch.from_numpy(np.log(q.rsample((4000,)).numpy()))
    assert (x >= LOW).all() and (x <= HIGH).all()
    # Deep in a tail the truncated normal is, to first order, exponential from the near end with
    # rate t/σ (t = distance in standard deviations): the scaled distances are Exp(1).
    near = HIGH if mu > HIGH else LOW
    t = abs(near - mu) / sigma
    u = torch.rand(4000, dtype=torch.float64)
    x_exact = bmrs.distributions._truncnorm.icdf_x(
        torch.tensor(mu, dtype=torch.float64), torch.tensor(sigma, dtype=torch.float64),
        torch.tensor(LOW, dtype=torch.float64), torch.tensor(HIGH, dtype=torch.float64), u)
    scaled = (x_exact - near).abs() * t / sigma
    assert stats.kstest(scaled.numpy(), stats.expon.cdf).pvalue > 1e-3


@pytest.mark.parametrize("mu,sigma", CASES + [(5.0, 1e-3), (-25.0, 1e-3), (-19.99, 0.3)])
def test_rsample_gradients_match_finite_differences(mu, sigma):
    u = torch.tensor([0.01, 0.3, 0.5, 0.7, 0.99], dtype=torch.float64)
    from bmrs.distributions._truncnorm import icdf_x

    def x_of(m, s):
        return icdf_x(m, s, torch.tensor(LOW, dtype=torch.float64), torch.tensor(HIGH, dtype=torch.float64), u)

    m = torch.tensor(mu, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(sigma, dtype=torch.float64, requires_grad=True)
    grads = [torch.autograd.grad(x_of(m, s)[i], (m, s)) for i in range(len(u))]
    h_m, h_s = 1e-6, sigma * 1e-6
    with torch.no_grad():
        fd_m = (x_of(m + h_m, s) - x_of(m - h_m, s)) / (2 * h_m)
        fd_s = (x_of(m, s + h_s) - x_of(m, s - h_s)) / (2 * h_s)
    for i in range(len(u)):
        assert float(grads[i][0]) == pytest.approx(float(fd_m[i]), rel=1e-4, abs=1e-6)
        assert float(grads[i][1]) * sigma == pytest.approx(float(fd_s[i]) * sigma, rel=1e-4, abs=1e-6)


# --- densities -------------------------------------------------------------------------------------

# (integrals of the density, CDF, moments, entropy and KL, icdf ∘ cdf, sampling and expand for every parameter
# shape: tests/test_distribution_laws.py)
def test_log_prob_outside_the_support_is_refused_or_minus_infinity():
    q = bmrs.TruncatedLogNormal(torch.tensor(-10.0, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64),
                                validate_args=True)
    lo, hi = math.exp(LOW), math.exp(HIGH)
    with pytest.raises(ValueError):  # validated by default, as torch.distributions does
        q.log_prob(torch.tensor(lo / 2, dtype=torch.float64))
    unchecked = bmrs.TruncatedLogNormal(q.loc, q.scale, validate_args=False)
    assert float(unchecked.log_prob(torch.tensor(lo / 2, dtype=torch.float64))) == -math.inf
    assert float(q.cdf(torch.tensor(hi, dtype=torch.float64))) == pytest.approx(1.0, abs=1e-12)


def test_log_uniform_masses():
    p = bmrs.TruncatedLogUniform(torch.tensor(LOW, dtype=torch.float64), torch.tensor(HIGH, dtype=torch.float64))
    assert float(p.log_mass(-10.0, 5.0).exp()) == pytest.approx(0.5, rel=1e-12)
    assert float(p.log_mass(1.0, 5.0)) == -math.inf
    assert float(p.entropy()) == pytest.approx(math.log(20.0) - 10.0)


def test_bad_bounds_give_clear_errors():
    with pytest.raises(bmrs.ConfigError, match="low must be smaller than high"):
        bmrs.TruncatedLogNormal(torch.tensor(0.0), torch.tensor(1.0), low=0.0, high=-1.0)
    with pytest.raises(bmrs.ConfigError, match="low must be smaller than high"):
        bmrs.TruncatedLogUniform(1.0, 1.0)
    with pytest.raises(ValueError):
        bmrs.TruncatedLogNormal(torch.tensor(0.0), torch.tensor(-1.0), validate_args=True)


def test_kl_is_infinite_when_posterior_leaves_prior_support():
    q = bmrs.TruncatedLogNormal(torch.tensor(-5.0), torch.tensor(1.0), low=-30.0, high=0.0)
    assert torch.distributions.kl_divergence(q, bmrs.TruncatedLogUniform(-20.0, 0.0)) == math.inf


@pytest.mark.parametrize("low,high", [(-13.7, -0.3), (-5.3, 0.0), (-20.0, 0.0)])
def test_float32_samples_respect_float32_support(low, high):
    """Bounds that float32 rounds: e^low in float32 may differ from rounded float64; samples stay inside."""
    torch.manual_seed(3)
    q = bmrs.TruncatedLogNormal(torch.tensor([-25.0, 5.0, -7.0]), torch.tensor([1e-3, 1e-3, 3.0]), low=low, high=high)
    assert bool(q.support.check(q.rsample((5000,))).all())


def test_float32_distributions_take_either_rounding_of_their_ends():
    # a sample clamped to float32's e^high has a finite density, and the exact float64 e^low is in the support
    q = bmrs.TruncatedLogNormal(torch.tensor([1e3]), torch.tensor([1e-3]), -20.0, -1.0)  # all mass at the end
    samples = q.sample((3,))
    assert bool(q.support.check(samples).all()) and torch.isfinite(q.log_prob(samples)).all()
    exact_low = torch.tensor(math.exp(-20.0), dtype=torch.float64)
    for dist in (bmrs.TruncatedLogNormal(torch.tensor(-3.0), torch.tensor(1.0)), bmrs.TruncatedLogUniform(-20.0, 0.0)):
        assert torch.isfinite(dist.log_prob(exact_low)) and torch.isfinite(dist.log_prob(exact_low.float()))


@pytest.mark.parametrize("make", [lambda: bmrs.TruncatedLogNormal(torch.tensor(-3.0), torch.tensor(1.0),
                                                                   validate_args=True),
                                  lambda: bmrs.TruncatedLogUniform(-20.0, 0.0, validate_args=True)])
def test_cdf_and_icdf_validate_their_arguments(make):
    dist = make()
    with pytest.raises(ValueError):
        dist.cdf(torch.tensor(-1.0))
    with pytest.raises(ValueError):
        dist.icdf(torch.tensor(1.5))
    assert 0 < float(dist.cdf(torch.tensor(0.5))) < 1 and 0 < float(dist.icdf(torch.tensor(0.5))) < 1
