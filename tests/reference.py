"""Independent references: the textbook (unstabilised) formulas evaluated with mpmath at 60 digits.

High precision makes the naive forms exact enough to judge the library's stable float64 forms;
none of the library's code is used here.
"""

from __future__ import annotations

import mpmath as mp

mp.mp.dps = 60

LOW, HIGH = -20.0, 0.0


def _phi(z):
    return mp.npdf(z)


def _Phi(z):
    return mp.ncdf(z)


def _mass(l, u):
    """Φ(u) − Φ(l), mirrored when l > 0 so that 1 − tiny is never formed."""
    if l > 0:
        return _Phi(-l) - _Phi(-u)
    return _Phi(u) - _Phi(l)


def _z(mu, sigma, low, high):
    return _mass((low - mu) / sigma, (high - mu) / sigma)


def moments(mu, sigma, low=LOW, high=HIGH):
    """(E[θ], Var[θ], SNR) of θ = e^x, x ~ N(mu, sigma²) truncated to [low, high]."""
    mu, sigma, low, high = (mp.mpf(v) for v in (mu, sigma, low, high))
    alpha, beta = (low - mu) / sigma, (high - mu) / sigma
    z = _z(mu, sigma, low, high)

    def raw(k):
        return mp.exp(k * mu + k * k * sigma * sigma / 2) * _mass(alpha - k * sigma, beta - k * sigma) / z

    m1, m2 = raw(1), raw(2)
    var = m2 - m1 * m1
    return m1, var, m1 / mp.sqrt(var)


def kl(mu, sigma, low=LOW, high=HIGH):
    """KL(q ‖ U[low, high]) by the textbook formula."""
    mu, sigma, low, high = (mp.mpf(v) for v in (mu, sigma, low, high))
    alpha, beta = (low - mu) / sigma, (high - mu) / sigma
    z = _z(mu, sigma, low, high)
    return (
        mp.log(high - low) - mp.log(sigma) - mp.log(2 * mp.pi * mp.e) / 2 - mp.log(z)
        - (alpha * _phi(alpha) - beta * _phi(beta)) / (2 * z)
    )


def mean_log(mu, sigma, low=LOW, high=HIGH):
    mu, sigma, low, high = (mp.mpf(v) for v in (mu, sigma, low, high))
    alpha, beta = (low - mu) / sigma, (high - mu) / sigma
    return mu + sigma * (_phi(alpha) - _phi(beta)) / _z(mu, sigma, low, high)


def log_mass(mu, sigma, lo, hi, low=LOW, high=HIGH):
    mu, sigma, lo, hi, low, high = (mp.mpf(v) for v in (mu, sigma, lo, hi, low, high))
    return mp.log(_z(mu, sigma, lo, hi)) - mp.log(_z(mu, sigma, low, high))


def delta_f_uniform(mu, sigma, r_low, r_high, low=LOW, high=HIGH):
    return log_mass(mu, sigma, r_low, r_high, low, high) + mp.log(high - low) - mp.log(mp.mpf(r_high) - mp.mpf(r_low))


def delta_f_normal(mu, sigma, m, s, low=LOW, high=HIGH):
    """The published BMRS_N equation (with the 2π that the public code omits), at 60 digits."""
    mu, sigma, m, s, low, high = (mp.mpf(v) for v in (mu, sigma, m, s, low, high))
    v = sigma**2 + s**2
    var_t = sigma**2 * s**2 / v
    mu_t = (mu * s**2 + m * sigma**2) / v
    z_t = _z(mu_t, mp.sqrt(var_t), low, high)
    z_p = _z(m, s, low, high)
    z = _z(mu, sigma, low, high)
    return (
        mp.log(z_t * (high - low) / (z_p * z))
        + mp.log(var_t / (2 * mp.pi * s**2 * sigma**2)) / 2
        - (mu**2 / sigma**2 + m**2 / s**2 - mu_t**2 / var_t) / 2
    )


def log_density_at(mu, sigma, x, low=LOW, high=HIGH):
    """ln q(x) for the truncated normal on x = ln θ."""
    mu, sigma, x = mp.mpf(mu), mp.mpf(sigma), mp.mpf(x)
    return mp.log(_phi((x - mu) / sigma) / (sigma * _z(mu, sigma, low, high)))


# (mu, sigma) for the gradient checks: middle regime, both tails near and far (t up to 1.5e9), wide and narrow σ, near-symmetric cases
GRADIENT_POINTS = [
    (0.0, 0.0067), (-10.0, 1.0), (-10.0, 30.0), (2.0, 0.5), (0.5, 1e-3), (5.0, 1e-6), (-25.0, 0.5),
    (-20.01, 1e-3), (-30.0, 1e-7), (-19.9, 0.05), (-0.1, 0.05), (100.0, 100.0), (-120.0, 100.0),
    (0.0, 148.0), (3.0, 2e-9), (-10.0, 2e-9), (1e-3, 2.0), (0.05, 0.001), (-1.0, 5.0), (-20.0, 3.0),
    (0.2, 0.0067), (1.0, 0.02), (-21.0, 0.03), (40.0, 7.0),
]


def kl_gradients(mu, sigma, low=LOW, high=HIGH):
    """∂KL/∂(mu, sigma, low, high) of the textbook KL at 80 digits (mpmath's numerical derivative)."""
    with mp.workdps(80):
        at = [mp.mpf(v) for v in (mu, sigma, low, high)]

        def partial(i):
            def f(v):
                args = list(at)
                args[i] = v
                return kl(*args)
            return float(mp.diff(f, at[i]))

        return [partial(i) for i in range(4)]
