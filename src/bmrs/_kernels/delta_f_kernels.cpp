// ΔF of BMRS_N and BMRS_U for large batches without gradients (see bmrs/evidence.py).
//
// The formulas are bmrs.evidence's fast path (regime-first interval_parts of _stable.py), evaluated
// a vector of lanes at a time with every regime computed and the right one blended in: the log mass
// of a normal on an interval is kept as −(anchor − loc)²/(2 scale²) + rest, and the quadratic parts
// of several masses are subtracted analytically.  tests/test_delta_f_kernels.py checks the result
// against the PyTorch code and mpmath.

#include "vec_capability.h"
#include "bmrs_constants.h"

#include <cmath>
#include <limits>

namespace {

using VecD = at::vec::Vectorized<double>;

constexpr double kInvSqrt2 = 0.70710678118654752440;
constexpr double kLn2 = 0.69314718055994530942;
constexpr double kLog2Pi = 1.83787706640934548356;
constexpr double kLogSqrtPi = 0.57236494292470008707;
// kFarNegligible (bmrs_constants.h, from constants.py): a far end whose Φ ratio to the near one is below it
// changes nothing
// log erfcx(z): from erfc below this, from the asymptotic series above (erfc(26.5) leaves float64)
constexpr double kErfcxSeriesFrom = 25.0;
// erfcx(z)·z√π = Σ_k (−1)^k (2k − 1)!! w^k, w = 1/(2z²); nine terms reach 1e-18 at z = 25
constexpr double kErfcxSeries[] = {2027025.0, -135135.0, 10395.0, -945.0, 105.0, -15.0, 3.0, -1.0, 1.0};
constexpr int64_t kGrain = 1 << 14;

inline VecD select(const VecD& mask, const VecD& if_true, const VecD& if_false) {
  return VecD::blendv(if_false, if_true, mask);
}

// ln erfcx(z) = z² + ln erfc(z) for z ≥ 0, the square taken exactly (z² = hi + lo with an FMA)
inline VecD log_erfcx(const VecD& z) {
  const VecD big = z > VecD(kErfcxSeriesFrom);
  const VecD zs = select(big, VecD(1.0), z);
  const VecD hi = zs * zs;
  const VecD lo = at::vec::fmsub(zs, zs, hi);
  const VecD direct = (zs.erfc().log() + hi) + lo;
  const VecD zb = select(big, z, VecD(2.0 * kErfcxSeriesFrom));
  const VecD w = VecD(0.5) / (zb * zb);
  VecD series(kErfcxSeries[0]);
  for (int i = 1; i < 9; ++i) series = at::vec::fmadd(series, w, VecD(kErfcxSeries[i]));
  const VecD asymptotic = series.log() - zb.log() - VecD(kLogSqrtPi);
  return select(big, asymptotic, direct);
}

constexpr int kAllLanes = (1 << VecD::size()) - 1;

// whether no lane / every lane of a comparison mask is set
inline bool none_of(const VecD& mask) { return mask.zero_mask() == kAllLanes; }
inline bool all_of(const VecD& mask) { return mask.zero_mask() == 0; }

// ln(1 − eˣ), x ≤ 0 (Mächler's switch at −ln 2); a branch no lane needs is not evaluated
inline VecD log1mexp(const VecD& x) {
  const VecD near_zero = x > VecD(-kLn2);
  if (all_of(near_zero)) return (VecD(0.0) - x.expm1()).log();
  if (none_of(near_zero)) return (VecD(0.0) - x.exp()).log1p();
  const VecD x_near = select(near_zero, x, VecD(-1.0));
  const VecD x_far = select(near_zero, VecD(-1.0), x);
  return select(near_zero, (VecD(0.0) - x_near.expm1()).log(), (VecD(0.0) - x_far.exp()).log1p());
}

// ln(Φ(u) − Φ(l)) for l ≤ 0 ≤ u: erf(u/√2) ≥ 0 ≥ erf(l/√2) add without cancellation
inline VecD mid_rest(const VecD& l, const VecD& u) {
  return (VecD(0.5) * ((u * VecD(kInvSqrt2)).erf() - (l * VecD(kInvSqrt2)).erf())).log();
}

// ln(Φ(u) − Φ(l)) − (the quadratic part) for lanes whose interval lies in a tail (see interval_parts)
inline VecD tail_rest(const VecD& lo, const VecD& hi, const VecD& inv_scale, const VecD& l, const VecD& u,
                      const VecD& upper, const VecD& tail);

struct Parts {
  VecD anchor, rest, lower, upper;  // lower/upper: lane masks of the two tail regimes
};

// _stable.interval_parts(lo, hi, loc, scale, standardized=(l, u), fast=True) for one vector of lanes
inline Parts interval_parts(const VecD& lo, const VecD& hi, const VecD& loc, const VecD& inv_scale, const VecD& l,
                            const VecD& u) {
  const VecD zero(0.0);
  const VecD lower = u <= zero;
  const VecD upper = (l >= zero) & ~lower;
  const VecD tail = lower | upper;
  const VecD anchor = select(lower, hi, select(upper, lo, loc));
  // the mean inside the interval (both ends' erf), or in a tail (erfcx of the near end, maybe the far
  // end's); a regime no lane is in is not evaluated
  const VecD rest = none_of(tail) ? mid_rest(l, u)
                    : select(tail, tail_rest(lo, hi, inv_scale, l, u, upper, tail),
                             all_of(tail) ? VecD(0.0) : mid_rest(select(tail, VecD(-1.0), l), select(tail, VecD(1.0), u)));
  return {anchor, rest, lower, upper};
}

inline VecD tail_rest(const VecD& lo, const VecD& hi, const VecD& inv_scale, const VecD& l, const VecD& u,
                      const VecD& upper, const VecD& tail) {
  const VecD zero(0.0);
  // mirrored onto the lower tail: near = the end closest to the mean, both ≤ 0; placeholders elsewhere
  const VecD near = select(tail, select(upper, zero - l, u), VecD(-1.0));
  const VecD far = select(tail, select(upper, zero - u, l), VecD(-2.0));
  const VecD gap = select(tail, (lo - hi) * inv_scale, VecD(-1.0));
  const VecD log_erfcx_near = log_erfcx(near * VecD(-kInvSqrt2));
  VecD ratio = gap * (far + near) * VecD(-0.5);
  const VecD close = (ratio > VecD(kFarNegligible)) & tail;
  if (!none_of(close)) {  // some lane's far end matters
    ratio = select(close, ratio + log_erfcx(far * VecD(-kInvSqrt2)) - log_erfcx_near, ratio);
  }
  return log_erfcx_near - VecD(kLn2) + log1mexp(ratio);
}

inline Parts interval_parts(const VecD& lo, const VecD& hi, const VecD& loc, const VecD& scale) {
  const VecD inv_scale = VecD(1.0) / scale;
  return interval_parts(lo, hi, loc, inv_scale, (lo - loc) * inv_scale, (hi - loc) * inv_scale);
}

// −[(x1 − loc)² − (x0 − loc)²]/(2 scale²) as an exact product
inline VecD half_sq_gap(const VecD& x1, const VecD& x0, const VecD& loc, const VecD& scale) {
  return VecD(0.0) - (x1 - x0) * (x1 + x0 - VecD(2.0) * loc) / (VecD(2.0) * scale * scale);
}

// out[i] = f(mu[i], sigma[i]) over float64 1-d tensors, a vector of lanes at a time on all threads
template <typename F>
at::Tensor map_pairs(const at::Tensor& mu_in, const at::Tensor& sigma_in, F f) {
  TORCH_CHECK(mu_in.scalar_type() == at::kDouble && sigma_in.scalar_type() == at::kDouble, "float64 inputs");
  TORCH_CHECK(mu_in.dim() == 1 && sigma_in.sizes() == mu_in.sizes(), "mu and sigma: 1-d, same size");
  const auto mu = mu_in.contiguous(), sigma = sigma_in.contiguous();
  auto out = at::empty_like(mu);
  const double *m = mu.data_ptr<double>(), *s = sigma.data_ptr<double>();
  double* o = out.data_ptr<double>();
  constexpr int64_t L = VecD::size();
  at::parallel_for(0, (mu.numel() + L - 1) / L, kGrain / L, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t i = b * L;
      const int count = int(std::min<int64_t>(L, mu.numel() - i));
      // padding lanes get a harmless posterior
      const VecD mv = count == L ? VecD::loadu(m + i) : VecD::set(VecD(-1.0), VecD::loadu(m + i, count), count);
      const VecD sv = count == L ? VecD::loadu(s + i) : VecD::set(VecD(1.0), VecD::loadu(s + i, count), count);
      f(mv, sv).store(o + i, count);
    }
  });
  return out;
}

}  // namespace

// evidence._delta_f_normal for posteriors N(mu, sigma²) on [low, high] and the reduced prior
// N(m, s²) on [r_low, r_high] (ln θ), the prior log-uniform on [low, high].
at::Tensor delta_f_normal(const at::Tensor& mu, const at::Tensor& sigma, double low, double high, double m, double s,
                          double r_low, double r_high) {
  const double lo_t = std::max(low, r_low), hi_t = std::min(high, r_high);
  if (!(hi_t > lo_t)) return at::full_like(mu, -std::numeric_limits<double>::infinity());
  const VecD vm(m), vs(s), var_r(s * s), vlow(low), vhigh(high), vlo_t(lo_t), vhi_t(hi_t);
  const Parts z_p = interval_parts(VecD(r_low), VecD(r_high), vm, vs);
  const VecD d_p = z_p.anchor - vm;
  const VecD base = VecD(std::log(high - low)) - z_p.rest;
  return map_pairs(mu, sigma, [&](const VecD& mv, const VecD& sv) {
    const VecD var_q = sv * sv;
    const VecD v = var_q + var_r;
    const VecD inv_v = VecD(1.0) / v;
    const VecD mu_t = (mv * var_r + vm * var_q) * inv_v;
    const VecD sigma_t = sv * vs * inv_v.sqrt();
    const VecD inv_vs = VecD(1.0) / (v * sigma_t);
    const Parts z_q = interval_parts(vlow, vhigh, mv, sv);
    // x − μ̃ = [(x − μ)s² + (x − m)σ²]/v keeps an end that equals m exact
    const VecD l_t = ((vlo_t - mv) * var_r + (vlo_t - vm) * var_q) * inv_vs;
    const VecD u_t = ((vhi_t - mv) * var_r + (vhi_t - vm) * var_q) * inv_vs;
    const Parts z_t = interval_parts(vlo_t, vhi_t, mu_t, VecD(1.0) / sigma_t, l_t, u_t);
    const VecD t_mid = ~(z_t.lower | z_t.upper);
    const VecD d_e = z_q.anchor - mv;
    const VecD delta_mu = select(t_mid, (vm - mv) * var_q * inv_v, z_t.anchor - mv);
    const VecD delta_m = select(t_mid, (mv - vm) * var_r * inv_v, z_t.anchor - vm);
    const VecD quad = (d_e - delta_mu) * (d_e + delta_mu) / (VecD(2.0) * var_q)
                      - (delta_m - d_p) * (delta_m + d_p) / (VecD(2.0) * var_r);
    return base - VecD(0.5) * (VecD(kLog2Pi) + v.log()) + quad + z_t.rest - z_q.rest;
  });
}

// evidence._delta_f_uniform: ln q(r_low ≤ x ≤ r_high) + ln(high − low) − ln(r_high − r_low)
at::Tensor delta_f_uniform(const at::Tensor& mu, const at::Tensor& sigma, double low, double high, double r_low,
                           double r_high) {
  const double lo = std::max(low, r_low), hi = std::min(high, r_high);
  if (!(hi > lo)) return at::full_like(mu, -std::numeric_limits<double>::infinity());
  const VecD vlow(low), vhigh(high), vlo(lo), vhi(hi);
  const VecD log_widths(std::log(high - low) - std::log(r_high - r_low));
  return map_pairs(mu, sigma, [&](const VecD& mv, const VecD& sv) {
    const Parts whole = interval_parts(vlow, vhigh, mv, sv);
    const Parts sub = interval_parts(vlo, vhi, mv, sv);
    return half_sq_gap(sub.anchor, whole.anchor, mv, sv) + sub.rest - whole.rest + log_widths;
  });
}
