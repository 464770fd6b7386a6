"""The fused CPU kernels (bmrs._kernels) against mpmath and against the PyTorch reference code."""

from __future__ import annotations


import mpmath as mp
import numpy as np
import pytest
import torch

import bmrs
import reference as R
from bmrs import _kernels
from bmrs.models import lenet5
from bmrs.distributions import _truncnorm as tn
from bmrs.distributions.fast_sample import sample_theta

# the kernels themselves, compared with the reference: on in a BMRS_KERNELS=0 session too
pytestmark = pytest.mark.usefixtures("kernels_on")

LOW, HIGH = -20.0, 0.0


def test_kernels_build_on_this_machine():
    # the project's own setup installs what the build needs (a C++ compiler is on every machine here)
    assert _kernels.get() is not None


def test_kl_value_and_gradient_match_mpmath():
    assert _kernels.get() is not None
    mu = torch.tensor([p[0] for p in R.GRADIENT_POINTS], dtype=torch.float64, requires_grad=True)
    sigma = torch.tensor([p[1] for p in R.GRADIENT_POINTS], dtype=torch.float64, requires_grad=True)
    kl = tn.kl_to_fixed_uniform(mu, sigma, LOW, HIGH)
    assert _fused(kl)
    kl.sum().backward()
    with mp.workdps(60):
        want_kl = np.array([float(R.kl(mp.mpf(m), mp.mpf(s))) for m, s in R.GRADIENT_POINTS])
    want = np.array([R.kl_gradients(m, s)[:2] for m, s in R.GRADIENT_POINTS])
    np.testing.assert_allclose(kl.detach().numpy(), want_kl, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(mu.grad.numpy(), want[:, 0], rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(sigma.grad.numpy(), want[:, 1], rtol=1e-8, atol=1e-12)


def _kl_and_grads(mu, sigma, low, high):
    mu, sigma = mu.clone().requires_grad_(), sigma.clone().requires_grad_()
    kl = tn.kl_to_fixed_uniform(mu, sigma, low, high)
    kl.sum().backward()
    return kl.detach(), mu.grad, sigma.grad


@pytest.mark.parametrize("bounds", [(-20.0, 0.0), (-7.0, 2.5)])
def test_kl_agrees_with_the_reference_over_the_trained_range(kernels, bounds):
    """Every regime: means inside, near and far below and above, σ from e⁻²⁰ to e⁵ (the clamp)."""
    g = torch.Generator().manual_seed(0)
    n = 20000
    mu = torch.empty(n, dtype=torch.float64).uniform_(-60, 40, generator=g)
    sigma = torch.empty(n, dtype=torch.float64).uniform_(-20, 5, generator=g).exp()
    fused = _kl_and_grads(mu, sigma, *bounds)
    with kernels(False):
        ref = _kl_and_grads(mu, sigma, *bounds)
    # both lose digits to cancellation only where σ is far wider than the interval; scale by 1/σ there
    for got, want, floor in zip(fused, ref, (1e-12, 1e-12 / sigma, 1e-12 / sigma)):
        err = (got - want).abs()
        assert bool((err <= 1e-8 * want.abs() + floor).all()), float((err / (want.abs() + floor)).max())


def test_kl_in_float32_returns_float32_from_float64_arithmetic(kernels):
    mu, sigma = torch.tensor([0.0, -25.0, 3.0]), torch.tensor([0.0067, 0.5, 1e-6])
    got = tn.kl_to_fixed_uniform(mu, sigma, LOW, HIGH)
    with kernels(False):
        want = tn.kl_to_fixed_uniform(mu.double(), sigma.double(), LOW, HIGH)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)


def _graph_names(t: torch.Tensor) -> set[str]:
    names, todo = set(), [t.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is not None and type(fn).__name__ not in names:
            names.add(type(fn).__name__)
            todo.extend(f for f, _ in fn.next_functions)
    return names


def _fused(t: torch.Tensor) -> bool:
    return any("Fused" in name for name in _graph_names(t))


def _draw(mu, sigma, u, mask):
    mu, sigma = mu.clone().requires_grad_(), sigma.clone().requires_grad_()
    theta = sample_theta(mu, sigma, LOW, HIGH, u, mask)
    weight = torch.linspace(-1, 2, theta.numel(), dtype=theta.dtype).reshape(theta.shape)
    (theta * weight).sum().backward()
    return theta.detach(), mu.grad, sigma.grad, _fused(theta)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("masked", [False, True])
def test_sampling_matches_the_reference(kernels, dtype, masked):
    g = torch.Generator().manual_seed(1)
    S = 400
    mu = torch.empty(S, dtype=dtype).uniform_(-28, 6, generator=g)
    sigma = torch.empty(S, dtype=dtype).uniform_(-9, 2.5, generator=g).exp()
    mu[:4] = torch.tensor([0.0, -20.0, 0.01, -19.99], dtype=dtype)  # a bound exactly at the mean, near it
    u = torch.rand(3, 5, S, dtype=dtype, generator=g)
    mask = (torch.rand(S, generator=g) > 0.3).to(dtype) if masked else None
    with torch.no_grad():
        deep = ((HIGH - mu) / sigma < -12) | ((LOW - mu) / sigma > 12)
    mu, sigma = mu[~deep], sigma[~deep]  # deep-tail structures take the exact float64 path either way
    u, mask = u[..., ~deep], None if mask is None else mask[~deep]
    *fused, fused_fn = _draw(mu, sigma, u, mask)
    with kernels(False):
        *ref, ref_fn = _draw(mu, sigma, u, mask)
    assert fused_fn and not ref_fn
    if dtype == torch.float32:
        # the float32 kernel has its own Φ⁻¹ (as accurate as PyTorch's, not bit-equal): both it and
        # the float32 reference must match the reference evaluated in float64
        with kernels(False):
            *exact, _ = _draw(mu.double(), sigma.double(), u.double(), None if mask is None else mask.double())
        for got in (fused, ref):
            _assert_agree(got, exact, theta_rtol=1e-5, grad_rtol=4e-5)
    else:
        _assert_agree(fused, ref, theta_rtol=1e-12, grad_rtol=1e-12)


def _assert_agree(got, want, theta_rtol, grad_rtol):
    torch.testing.assert_close(got[0].double(), want[0].double(), rtol=theta_rtol, atol=0)
    for g, w in zip(got[1:], want[1:]):  # sums over 15 samples: tolerance relative to their scale
        scale = w.abs().max()
        torch.testing.assert_close(g.double(), w.double(), rtol=grad_rtol, atol=float(scale) * grad_rtol)


def test_float32_inverse_normal_cdf_matches_mpmath():
    # the float32 sampler's Φ⁻¹ (Giles centrally, Acklam in the tail) over p in (0, 1/2], including
    # both sides of the switch at 0.0017 (where Giles's central polynomial ends), Acklam's own switch at
    # 0.02425, and float32's subnormals
    p = np.concatenate([np.logspace(-45, np.log10(0.5), 400), np.linspace(0.0016, 0.0018, 40),
                        np.linspace(0.0235, 0.025, 20), [0.5]])
    p = torch.from_numpy(p).float()
    p = p[p > 0]
    got = _kernels.get().ndtri_lower_f32(p).double().numpy()
    with mp.workdps(60):
        want = np.array([float(-mp.sqrt(2) * mp.erfinv(1 - 2 * mp.mpf(float(x)))) for x in p])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)  # a few float32 ulps
    assert _kernels.get().ndtri_lower_f32(torch.zeros(3)).eq(-float("inf")).all()


def test_deep_tail_structures_fall_back_to_the_exact_path():
    mu = torch.tensor([0.0, 30.0], requires_grad=True)  # the second's interval lies 3000σ below its mean
    sigma = torch.tensor([0.5, 0.01])
    theta = sample_theta(mu, sigma, LOW, HIGH, torch.rand(4, 2))
    assert not _fused(theta)
    assert bool(((theta > 0) & (theta <= 1)).all())


def test_training_step_with_kernels_matches_the_reference(kernels):
    """One training step of a LeNet5 with noise: same loss and gradients with or without the kernels.

    (Gradients, not Adam's first step: that step is lr·g/(|g| + eps), which turns a last-bit difference
    in a gradient near eps into a visible one.)"""
    def step():
        torch.manual_seed(0)
        model = lenet5()
        x, y = torch.randn(8, 1, 32, 32), torch.randint(0, 10, (8,))
        loss = torch.nn.functional.cross_entropy(model(x), y) + bmrs.kl_loss(model)
        loss.backward()
        return float(loss.detach()), [p.grad.detach().clone() for p in model.parameters()]

    fused_loss, fused_grads = step()
    with kernels(False):
        ref_loss, ref_grads = step()
    assert abs(fused_loss - ref_loss) <= 1e-5 * abs(ref_loss)
    for a, b in zip(fused_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * float(b.abs().max()))
