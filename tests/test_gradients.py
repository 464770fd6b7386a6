"""Gradients against mpmath derivatives of the textbook formulas (80 digits): the KL's closed form, and
E[θ] through the stable forms (whose erfcx derivative must not cancel far in a tail)."""

from __future__ import annotations

import mpmath as mp
import numpy as np
import pytest
import torch

import bmrs
import reference as R
from bmrs.distributions import _truncnorm as tn

LOW, HIGH = -20.0, 0.0
F64 = dict(dtype=torch.float64)

POINTS, _reference_grads = R.GRADIENT_POINTS, R.kl_gradients


def _close(got, want, rtol):
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    return np.abs(got - want) <= rtol * np.maximum(np.abs(want), 1e-12)


def test_gradients_in_mu_and_sigma_match_mpmath():
    mu = torch.tensor([p[0] for p in POINTS], **F64, requires_grad=True)
    sigma = torch.tensor([p[1] for p in POINTS], **F64, requires_grad=True)
    kl = tn.kl_to_uniform(mu, sigma, torch.tensor(LOW, **F64), torch.tensor(HIGH, **F64))
    kl.sum().backward()
    want = np.array([_reference_grads(m, s)[:2] for m, s in POINTS])
    ok_mu, ok_sigma = _close(mu.grad, want[:, 0], 1e-8), _close(sigma.grad, want[:, 1], 1e-8)
    bad = [POINTS[i] for i in np.flatnonzero(~(ok_mu & ok_sigma))]
    assert not bad, f"gradient off at (mu, sigma) = {bad}"


def test_gradients_in_the_bounds_match_mpmath():
    points = [(-3.0, 1.5, -7.0, 2.0), (1.0, 0.3, -20.0, 0.0), (-25.0, 2.0, -20.0, 0.0), (-1.0, 10.0, -4.0, 6.0)]
    args = [torch.tensor([p[i] for p in points], **F64, requires_grad=True) for i in range(4)]
    tn.kl_to_uniform(*args).sum().backward()
    want = np.array([_reference_grads(*p) for p in points])
    for i in range(4):
        assert _close(args[i].grad, want[:, i], 1e-7).all(), (i, args[i].grad, want[:, i])


def test_gradient_of_broadcast_inputs_has_their_shapes():
    mu = torch.tensor(0.3, **F64, requires_grad=True)
    sigma = torch.tensor([0.1, 0.5, 2.0], **F64, requires_grad=True)
    tn.kl_to_uniform(mu, sigma, torch.tensor(LOW, **F64), torch.tensor(HIGH, **F64)).sum().backward()
    assert mu.grad.shape == () and sigma.grad.shape == (3,)
    per_point = [_reference_grads(0.3, float(s))[0] for s in sigma.detach()]
    assert _close(mu.grad, sum(per_point), 1e-8)


def test_gradcheck_against_finite_differences():
    mu = torch.tensor([-3.0, 0.4, -19.0, 2.0], **F64, requires_grad=True)
    sigma = torch.tensor([1.0, 0.2, 0.7, 3.0], **F64, requires_grad=True)
    low = torch.tensor(-20.0, **F64, requires_grad=True)
    high = torch.tensor(0.5, **F64, requires_grad=True)
    assert torch.autograd.gradcheck(tn.kl_to_uniform, (mu, sigma, low, high))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_noise_layer_kl_gradient_reaches_its_parameters(dtype):
    layer = bmrs.MultiplicativeNoise(4).to(dtype)
    with torch.no_grad():
        layer.mu.copy_(torch.tensor([0.0, 3.0, -10.0, -30.0]))
        layer.log_sigma.copy_(torch.tensor([-5.0, -20.0, 0.0, -16.0]))
    layer.kl().sum().backward()
    sigma = layer.log_sigma.detach().double().clamp(-20, 5).exp()
    want = np.array([_reference_grads(float(m), float(s))[:2] for m, s in zip(layer.mu.detach().double(), sigma)])
    assert layer.mu.grad.dtype == dtype
    assert _close(layer.mu.grad.double(), want[:, 0], 1e-5).all()
    # through σ = exp(log σ): ∂/∂ log σ = σ ∂/∂σ (log σ = −20 sits on the clamp, where autograd passes it)
    assert _close(layer.log_sigma.grad.double(), want[:, 1] * sigma.numpy(), 1e-5).all()


def test_mean_gradient_matches_mpmath_far_into_a_tail():
    """E[θ] is differentiated op by op; ln erfcx and λ carry their own non-cancelling derivatives
    (autograd's erfcx′ was off by 3e−5 at σ = 1e−3 and by 1e10 at σ = 1e−6)."""
    mu = torch.tensor([p[0] for p in POINTS], **F64, requires_grad=True)
    sigma = torch.tensor([p[1] for p in POINTS], **F64, requires_grad=True)
    bmrs.TruncatedLogNormal(mu, sigma, LOW, HIGH).mean.sum().backward()
    with mp.workdps(80):
        want = np.array([[float(mp.diff(lambda v: R.moments(v, s)[0], mp.mpf(m))),
                          float(mp.diff(lambda v: R.moments(m, v)[0], mp.mpf(s)))] for m, s in POINTS])
    # E[θ] ≤ 1, so 1e−14 is float64's absolute resolution of ∂E/∂μ and of σ ∂E/∂σ
    s = sigma.detach().numpy()
    for got, ref in ((mu.grad.numpy(), want[:, 0]), (sigma.grad.numpy() * s, want[:, 1] * s)):
        err = np.abs(got - ref)
        bad = err > 1e-7 * np.abs(ref) + 1e-14
        assert not bad.any(), [(POINTS[i], float(got[i]), ref[i]) for i in np.flatnonzero(bad)]


def _far_end_negligible(mu, sigma):
    l, u = (LOW - mu) / sigma, (HIGH - mu) / sigma
    if l < 0 < u:
        return True
    near, far = (-u, -l) if u <= 0 else (l, u)
    return (far - near) * (far + near) > 100  # Φ(far)/Φ(near) < e^-50


def test_one_sided_batches_take_the_short_path_to_the_same_numbers():
    """When no tail posterior sees its far end, the KL skips the interval masses; values and gradients
    must be those the general path gives the same posteriors in a batch that needs it."""
    short = [i for i, (m, s) in enumerate(POINTS) if _far_end_negligible(m, s)]
    assert 0 < len(short) < len(POINTS) and any(m >= HIGH or m <= LOW for m, _ in (POINTS[i] for i in short))
    mu = torch.tensor([p[0] for p in POINTS], **F64)
    sigma = torch.tensor([p[1] for p in POINTS], **F64)
    bounds = torch.tensor(LOW, **F64), torch.tensor(HIGH, **F64)
    general = tn.kl_to_uniform_with_grad(mu, sigma, *bounds)
    alone = tn.kl_to_uniform_with_grad(mu[short], sigma[short], *bounds)
    for whole, part in zip(general, alone):
        torch.testing.assert_close(part, whole[short], rtol=1e-12, atol=1e-300)
