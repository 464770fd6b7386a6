"""The training sampler (per-structure float64, per-sample float32, hand-written backward) against
SciPy's truncated normal: distribution (KS), values and reparameterisation gradients."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from bmrs.distributions.fast_sample import FAST_TAIL, sample_theta

LOW, HIGH = -20.0, 0.0
# (mu, sigma): the default initialisation, trained-network regimes, a prior-like posterior, and
# posteriors whose interval lies beyond FAST_TAIL in either tail (drawn by the float64 path).
CASES = [(0.0, math.exp(-5)), (-0.7, 0.45), (-10.0, 148.0), (-5.0, 3.0), (0.5, 0.04), (2.0, 0.1),
         (-22.0, 0.1), (-19.5, 0.3)]


def _draw(dtype, n=4000, seed=0):
    mu = torch.tensor([c[0] for c in CASES], dtype=dtype, requires_grad=True)
    sigma = torch.tensor([c[1] for c in CASES], dtype=dtype, requires_grad=True)
    u = torch.rand(n, len(CASES), generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return mu, sigma, u, sample_theta(mu, sigma, LOW, HIGH, u)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_samples_follow_scipy_truncnorm(dtype):
    _, _, _, theta = _draw(dtype)
    assert theta.dtype == dtype
    assert ((theta > 0) & (theta <= math.exp(HIGH))).all()
    for j, (mu, sigma) in enumerate(CASES):
        z = (theta[:, j].detach().double().log().numpy() - mu) / sigma
        a, b = (LOW - mu) / sigma, (HIGH - mu) / sigma
        if b < -FAST_TAIL or a > FAST_TAIL:
            continue  # SciPy's CDF itself loses its digits there; test_deep_columns covers it
        assert stats.kstest(z, stats.truncnorm(a, b).cdf).pvalue > 1e-3, (mu, sigma)


def test_values_and_gradients_match_scipy_quantiles():
    """x = F⁻¹(u) and ∂x/∂μ, ∂x/∂σ by central differences of SciPy's ppf (independent of our code)."""
    mu, sigma, u, theta = _draw(torch.float32, n=64, seed=3)
    weights = torch.randn_like(theta, generator=torch.Generator().manual_seed(4))
    (theta * weights).sum().backward()
    for j, (m, s) in enumerate(CASES):
        a, b = (LOW - m) / s, (HIGH - m) / s
        if b < -FAST_TAIL or a > FAST_TAIL:
            continue

        def x_of(mm, ss):
            return mm + ss * stats.truncnorm((LOW - mm) / ss, (HIGH - mm) / ss).ppf(u[:, j].double().numpy())

        x = x_of(m, s)
        np.testing.assert_allclose(theta[:, j].detach().double().log().numpy(), x, rtol=1e-4, atol=2e-5)
        w = weights[:, j].double().numpy() * np.exp(x)
        h_m, h_s = 1e-5, s * 1e-5
        fd_mu = np.sum(w * (x_of(m + h_m, s) - x_of(m - h_m, s)) / (2 * h_m))
        fd_sigma = np.sum(w * (x_of(m, s + h_s) - x_of(m, s - h_s)) / (2 * h_s))
        scale = np.sum(np.abs(w)) + 1e-12
        assert abs(float(mu.grad[j]) - fd_mu) < 2e-3 * scale, (m, s, float(mu.grad[j]), fd_mu)
        assert abs(float(sigma.grad[j]) * s - fd_sigma * s) < 2e-3 * scale, (m, s)


def test_deep_columns_keep_their_place_and_gradients():
    """Columns beyond FAST_TAIL come from the exact float64 inverse CDF, in their own position."""
    from bmrs.distributions._truncnorm import icdf_x

    mu, sigma, u, theta = _draw(torch.float32, n=16, seed=5)
    theta.sum().backward()
    f64 = dict(dtype=torch.float64)
    for j, (m, s) in enumerate(CASES):
        if not ((HIGH - m) / s < -FAST_TAIL or (LOW - m) / s > FAST_TAIL):
            continue
        mm = torch.tensor(m, **f64, requires_grad=True)
        ss = torch.tensor(s, **f64, requires_grad=True)
        exact = icdf_x(mm, ss, torch.tensor(LOW, **f64), torch.tensor(HIGH, **f64), u[:, j].double()).exp()
        exact.sum().backward()
        torch.testing.assert_close(theta[:, j].double(), exact.detach(), rtol=1e-6, atol=0)
        torch.testing.assert_close(mu.grad[j].double(), mm.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(sigma.grad[j].double(), ss.grad, rtol=1e-5, atol=1e-7)


def test_batched_leading_dimensions_sum_gradients():
    mu = torch.tensor([-1.0, -3.0], requires_grad=True)
    sigma = torch.tensor([0.5, 2.0], requires_grad=True)
    u = torch.rand(3, 4, 2, generator=torch.Generator().manual_seed(6))
    sample_theta(mu, sigma, LOW, HIGH, u).sum().backward()
    g_mu, g_sigma = mu.grad.clone(), sigma.grad.clone()
    mu.grad = sigma.grad = None
    sample_theta(mu, sigma, LOW, HIGH, u.reshape(12, 2)).sum().backward()
    torch.testing.assert_close(mu.grad, g_mu)
    torch.testing.assert_close(sigma.grad, g_sigma)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_layers_sample_in_float32(dtype):
    import bmrs

    noise = bmrs.MultiplicativeNoise(6, dim=-1).to(dtype)
    with torch.no_grad():
        noise.mu.copy_(torch.tensor([-0.7, -3.0, -10.0, 0.3, -19.0, -25.0]))
        noise.log_sigma.copy_(torch.tensor([-1.0, 0.0, 2.0, -3.0, -1.0, -2.0]))
    theta = noise.draw_theta(noise.mu, noise.sigma, 2000)
    assert theta.dtype == torch.float32  # cast to the activations' dtype by the layer
    assert torch.isfinite(theta).all() and (theta > 0).all() and (theta <= 1).all()
    # the tail at μ = −10, σ = e² reaches far below float16's smallest normal number (6e−5)
    assert float(theta[:, 2].min()) < 1e-6
    theta.sum().backward()
    assert noise.mu.grad.dtype == dtype and torch.isfinite(noise.mu.grad.float()).all()


def test_mask_zeroes_columns_and_leaves_live_gradients_alone():
    """θ·mask in one pass; a masked column (here one with both ends near) must not change how the
    live columns' gradients are formed, and gets none itself."""
    mu = torch.tensor([0.0, -10.0, -0.7], requires_grad=True)
    sigma = torch.tensor([math.exp(-5), 148.0, 0.45], requires_grad=True)
    u = torch.rand(256, 3, generator=torch.Generator().manual_seed(7))
    weights = torch.randn(256, 3, generator=torch.Generator().manual_seed(8))
    (sample_theta(mu, sigma, LOW, HIGH, u) * weights).sum().backward()
    ref_mu, ref_sigma = mu.grad.clone(), sigma.grad.clone()
    mu.grad = sigma.grad = None
    mask = torch.tensor([1.0, 0.0, 1.0])
    theta = sample_theta(mu, sigma, LOW, HIGH, u, mask)
    (theta * weights).sum().backward()
    assert (theta[:, 1] == 0).all() and float(mu.grad[1]) == 0 and float(sigma.grad[1]) == 0
    live = [0, 2]
    torch.testing.assert_close(mu.grad[live], ref_mu[live], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sigma.grad[live], ref_sigma[live], rtol=1e-6, atol=1e-6)
