// Fused CPU kernels for the noise layers' training step (see bmrs/_kernels/__init__.py).
//
// Each function does in one call, element by element, what the reference PyTorch code in
// bmrs/distributions/fast_sample.py and bmrs/distributions/_truncnorm.py does with dozens of
// whole-tensor operations: the work is tiny, so eager PyTorch pays per operation, not per flop.
// The special functions are PyTorch's own scalar implementations (ATen/native/Math.h), except the
// float32 sampler's vectorised Φ⁻¹ (ndtri_lower); the formulas are the reference code's, and
// tests/test_kernels.py checks the two against each other and against mpmath.

#include "vec_capability.h"

#include <utility>
#include "counter_uniforms.h"
#include <ATen/native/Math.h>
#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr double kInvSqrt2 = 0.70710678118654752440;
constexpr double kSqrt2OverPi = 0.79788456080286535588;
constexpr double kLog2Pi = 1.83787706640934548356;
constexpr double kLn2 = 0.69314718055994530942;
// fast_sample.FAR_END: a far end this many σ from every sample adds < 1e-70 to the gradient.
constexpr double kFarEnd = 20.0;
// _truncnorm._FAR_NEGLIGIBLE_SQ: beyond it Φ(far)/Φ(near) < e^-50, the far end changes nothing.
constexpr double kFarNegligibleSq = 100.0;
// _stable._SERIES_FROM and the series of h(t) = t(λ(t) − t) = Σ c_k t^(−2k) (_stable._H_SERIES).
constexpr double kSeriesFrom = 30.0;
constexpr double kHSeries[] = {1.0, -2.0, 10.0, -74.0, 706.0, -8162.0};
constexpr int kHTerms = 6;

// Per-sample elements below which one thread does it all (waking the second costs more).
constexpr int64_t kGrainElements = 4096;
// The backward's column sums split the blocks between threads exactly as the draw did (the same grain),
// so that each thread reads the factors it wrote, still in its own cache: in a training step of the
// Fashion-MNIST MLP (two 128 × 150 layers) the sums took 18-54 µs on one thread reading the other's
// factors, and 7 µs on each of two threads (about 1.5% of the step).

// Below this Φ(x) < 2⁻¹⁰⁷⁵ rounds to 0: returned without calling erfc, whose underflow path (errno) is slow.
constexpr double kNdtrZeroBelow = -38.6;
// Below this eˣ rounds to 0 (the same reason).
constexpr double kExpZeroBelow = -745.2;

inline double ndtr(double x) { return x < kNdtrZeroBelow ? 0.0 : 0.5 * std::erfc(-x * kInvSqrt2); }

// The draw's and its backward's bookkeeping runs between the training step's matrix products, where
// every distinct ATen code path it touches is cold: in a LeNet-5 step the draw's serial parts took
// 125-135 µs against 26-36 µs when the draw ran back to back (25-35 µs of it before the parallel region,
// mostly torch.randint for the key).  So tensors already in the wanted form are used as they are, and
// small results are written through their pointers instead of by tensor operations (85-90 µs then).

// t itself when it is contiguous in `dtype` (no dispatch), else a contiguous copy in it
inline at::Tensor contiguous_as(const at::Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype && t.is_contiguous() ? t : t.to(dtype).contiguous();
}

// a new 1-d tensor holding values[0 … n − 1] in `options`' dtype (float32 or float64)
inline at::Tensor tensor_of(const double* values, int64_t n, const at::TensorOptions& options) {
  auto out = at::empty({n}, options);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "tensor_of", [&] {
    scalar_t* dst = out.data_ptr<scalar_t>();
    for (int64_t i = 0; i < n; ++i) dst[i] = scalar_t(values[i]);
  });
  return out;
}

// a new 0-d tensor holding `value` in `options`' dtype (float32 or float64)
inline at::Tensor scalar_of(double value, const at::TensorOptions& options) {
  auto out = at::empty({}, options);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "scalar_of", [&] { *out.data_ptr<scalar_t>() = scalar_t(value); });
  return out;
}

// element i of a floating-point tensor, as a double
inline double value_at(const at::Tensor& t, int64_t i) {
  double v = 0.0;
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "value_at", [&] { v = double(t.data_ptr<scalar_t>()[i]); });
  return v;
}

inline double exp_or_zero(double x) { return x < kExpZeroBelow ? 0.0 : std::exp(x); }

// (Φ(x), Φ(−x)) from one erfc: the smaller from erfc, the larger as its complement (≥ 1/2, so as
// accurate as erfc of a negative argument would be).
inline std::pair<double, double> ndtr_both(double x) {
  const double small = ndtr(-std::fabs(x)), large = 1.0 - small;
  return x < 0.0 ? std::make_pair(small, large) : std::make_pair(large, small);
}

// λ(t) = φ(t) / (1 − Φ(t)) = √(2/π) / erfcx(t/√2), t ≥ 0: formed in tail_kl_terms from its erfcx

// Σ_{k ≥ first} c_k s^(k − first), Horner in s = 1/t²
inline double h_series(double t, int first) {
  const double s = 1.0 / (t * t);
  double acc = 0.0;
  for (int k = kHTerms - 1; k >= first; --k) acc = acc * s + kHSeries[k];
  return acc;
}

// λ(t) − t without cancellation (≈ 1/t for large t), given lam = λ(t)
inline double inv_mills_excess(double t, double lam) {
  return t > kSeriesFrom ? h_series(t, 0) / t : lam - t;
}

// G(t) = 1 − t(λ(t) − t), ≈ 2/t² for large t, given lam = λ(t)
inline double one_minus_t_excess(double t, double lam) {
  return t > kSeriesFrom ? -h_series(t, 1) / (t * t) : 1.0 - t * (lam - t);
}

// ln(1 − eˣ), x ≤ 0
inline double log1mexp(double x) {
  return x > -kLn2 ? std::log(-std::expm1(x)) : std::log1p(-std::exp(x));
}

struct KLTerms {
  double kl, h_mu, h_sigma;  // KL − ln W + ln σ, σ ∂H/∂μ, σ ∂H/∂σ (as _truncnorm's _*_kl_terms)
};

// mean inside [low, high]: the textbook forms (_truncnorm._mid_kl_terms)
inline KLTerms mid_kl_terms(double alpha, double beta) {
  const double log_z = std::log(0.5 * (std::erf(beta * kInvSqrt2) - std::erf(alpha * kInvSqrt2)));
  const double a = exp_or_zero(-0.5 * alpha * alpha - 0.5 * kLog2Pi - log_z);
  const double b = exp_or_zero(-0.5 * beta * beta - 0.5 * kLog2Pi - log_z);
  const double d = alpha * a - beta * b;
  const double a2 = alpha * alpha * a, b2 = beta * beta * b;
  return {-0.5 * (kLog2Pi + 1.0) - log_z - 0.5 * d,
          0.5 * ((a - b) * (1.0 - d) + a2 - b2),
          1.0 + 0.5 * (d * (1.0 - d) + alpha * a2 - beta * b2)};
}

// the interval on one side of the mean, mirrored so that its near end is t ≥ 0 and its far end
// t_far ≥ t σ away (_truncnorm._tail_kl_terms); `width` = (high − low)/σ
// (each erfcx is evaluated once: it is most of a structure's cost)
inline KLTerms tail_kl_terms(double t, double t_far, double width) {
  const double erfcx_near = calc_erfcx(t * kInvSqrt2);
  const double lam = kSqrt2OverPi / erfcx_near;
  const double g = one_minus_t_excess(t, lam);
  double kl = -0.5 + std::log(lam) - 0.5 * t * inv_mills_excess(t, lam);
  if (width * (t + t_far) > kFarNegligibleSq) {  // the far end is negligible: ρ = 0
    return {kl, 0.5 * lam * g, 1.0 + 0.5 * t * lam * g};
  }
  // ln r = ln Φ(−t_far) − ln Φ(−t), r the far end's share of the tail mass
  const double erfcx_far = calc_erfcx(t_far * kInvSqrt2);
  const double log_r = -0.5 * width * (t + t_far) + std::log(erfcx_far) - std::log(erfcx_near);
  const double log_one_minus_r = log1mexp(log_r);
  const double rho = std::exp(log_r - log_one_minus_r);
  const double lam_far = kSqrt2OverPi / erfcx_far;
  kl += 0.5 * rho * (t_far * lam_far - t * lam) - log_one_minus_r;
  const double far_rho = lam_far * rho;
  const double h_mu = 0.5 * (lam * (1.0 + rho) * (g - t * lam * rho)
                             - far_rho * (1.0 + t_far * t_far + t_far * far_rho)
                             + (t + t_far) * lam * far_rho * (1.0 + rho));
  const double near_w = t * lam, far_w = t_far * lam_far;
  const double delta = rho * (near_w - far_w);
  const double h_sigma = 1.0 + 0.5 * near_w * g
                         + 0.5 * (delta * (1.0 - 2.0 * near_w - delta) + rho * (t * t * near_w - t_far * t_far * far_w));
  return {kl, h_mu, h_sigma};
}

}  // namespace

namespace {

struct KLWithGrad {
  double kl, d_loc, d_scale;
};

// KL(q ‖ U[low, high]) of the truncated normal N(mu, sigma²) on [low, high] and its gradient
KLWithGrad kl_to_uniform_at(double mu, double sigma, double low, double high, double log_w) {
  const double inv_scale = 1.0 / sigma;
  const double l = (low - mu) * inv_scale, u = (high - mu) * inv_scale;
  KLTerms terms;
  if (u <= 0.0) {  // interval below the mean: near end high
    terms = tail_kl_terms(-u, -l, (high - low) * inv_scale);
    terms.h_mu = -terms.h_mu;
  } else if (l >= 0.0) {  // above the mean: near end low
    terms = tail_kl_terms(l, u, (high - low) * inv_scale);
  } else {
    terms = mid_kl_terms(l, u);
  }
  return {terms.kl + log_w - std::log(sigma), -terms.h_mu * inv_scale, -terms.h_sigma * inv_scale};
}

}  // namespace

// KL(q ‖ U[low, high]) of truncated normals N(loc, scale²) on [low, high] in x = ln θ, and its
// gradient in loc and scale (closed form): _truncnorm.kl_to_uniform_with_grad, element by element.
// loc, scale: 1-d, same dtype (float32 or float64, computed in float64); returns three in that dtype.
std::vector<at::Tensor> kl_to_uniform_with_grad(const at::Tensor& loc_in, const at::Tensor& scale_in,
                                                double low, double high) {
  TORCH_CHECK(loc_in.dim() == 1 && scale_in.sizes() == loc_in.sizes(), "loc and scale must be 1-d, same size");
  const auto loc = loc_in.to(at::kDouble).contiguous();
  const auto scale = scale_in.to(at::kDouble).contiguous();
  const int64_t n = loc.numel();
  auto kl = at::empty({n}, loc.options());
  auto d_loc = at::empty({n}, loc.options());
  auto d_scale = at::empty({n}, loc.options());
  const double *mu = loc.data_ptr<double>(), *sigma = scale.data_ptr<double>();
  double *out_kl = kl.data_ptr<double>(), *out_loc = d_loc.data_ptr<double>(), *out_scale = d_scale.data_ptr<double>();
  const double log_w = std::log(high - low);
  for (int64_t i = 0; i < n; ++i) {
    const auto r = kl_to_uniform_at(mu[i], sigma[i], low, high, log_w);
    out_kl[i] = r.kl;
    out_loc[i] = r.d_loc;
    out_scale[i] = r.d_scale;
  }
  const auto dtype = loc_in.scalar_type();
  return {kl.to(dtype), d_loc.to(dtype), d_scale.to(dtype)};
}

namespace {

// True when some of the n structures' interval lies more than fast_tail σ into a tail
// (fast_sample.FAST_TAIL): those are drawn by the exact float64 inverse CDF, which the reference code does.
bool deep_tail_among(const double* m, const double* s, int64_t n, double low, double high, double fast_tail) {
  for (int64_t i = 0; i < n; ++i) {
    if ((high - m[i]) / s[i] < -fast_tail || (low - m[i]) / s[i] > fast_tail) return true;
  }
  return false;
}

}  // namespace

// deep_tail_among for posteriors (mu, sigma)
bool any_deep_tail(const at::Tensor& mu_in, const at::Tensor& sigma_in, double low, double high, double fast_tail) {
  const auto mu = mu_in.to(at::kDouble).contiguous();
  const auto sigma = sigma_in.to(at::kDouble).contiguous();
  return deep_tail_among(mu.data_ptr<double>(), sigma.data_ptr<double>(), mu.numel(), low, high, fast_tail);
}

namespace {

// Structures per column block: the unit by which the sampler and its backward split the work between
// threads (one vector of AVX-512 lanes, two of AVX2).  A thread runs its consecutive blocks of one layer
// as one segment of up to kColumnSegment structures.  With 64-structure blocks shared out whole, LeNet-5's
// threads carried 86 and 140 structures, and the draw took 10% longer than with 16.
constexpr int64_t kColumnBlock = 16;
constexpr int64_t kColumnSegment = 64;
// A structure's own work (its ends, normal masses and KL), in samples' worth, for sizing the grain.
constexpr int64_t kStructureWork = 16;

// Per-structure pieces of the sampling for up to kColumnSegment structures (padded to whole vectors),
// computed in float64 and rounded to T as the reference code does.
template <typename T>
struct Pieces {
  int64_t padded;
  alignas(64) T alpha[kColumnSegment], beta[kColumnSegment], cdf_alpha[kColumnSegment], gap_low[kColumnSegment],
      sf_beta[kColumnSegment], gap_high[kColumnSegment], mu[kColumnSegment], sigma[kColumnSegment], mask[kColumnSegment],
      near_alpha[kColumnSegment], near_beta[kColumnSegment],
      sigma_grad[kColumnSegment];  // ∂σ/∂(the parameter trained): 1 for σ itself, σ·[log σ unclamped] for log σ
  char block_near_alpha[kColumnSegment], block_near_beta[kColumnSegment];  // any near end among a vector's structures

  Pieces(const double* m, const double* s, const double* sigma_grad_or_null, const float* mask_or_null, int64_t S,
         double low, double high, int64_t width)
      : padded((S + width - 1) / width * width) {
    TORCH_CHECK(padded <= kColumnSegment, "a column segment holds at most ", kColumnSegment, " structures");
    std::fill(block_near_alpha, block_near_alpha + kColumnSegment, char(0));
    std::fill(block_near_beta, block_near_beta + kColumnSegment, char(0));
    for (int64_t j = 0; j < padded; ++j) {
      // padding lanes: a harmless interval [−1, 0] around a standard normal, masked off
      const double mj = j < S ? m[j] : 0.0, sj = j < S ? s[j] : 1.0;
      const double a = j < S ? (low - mj) / sj : -1.0, b = j < S ? (high - mj) / sj : 0.0;
      const auto [cdf_a, sf_a] = ndtr_both(a);
      const auto [cdf_b, sf_b] = ndtr_both(b);
      const bool live = j < S && (mask_or_null == nullptr || mask_or_null[j] != 0.0f);
      alpha[j] = T(a); beta[j] = T(b); cdf_alpha[j] = T(cdf_a); gap_low[j] = T(cdf_b - cdf_a);
      sf_beta[j] = T(sf_b); gap_high[j] = T(sf_a - sf_b); mu[j] = T(mj); sigma[j] = T(sj);
      mask[j] = j < S ? (mask_or_null == nullptr ? T(1) : T(mask_or_null[j])) : T(0);
      sigma_grad[j] = j < S && sigma_grad_or_null != nullptr ? T(sigma_grad_or_null[j]) : T(1);
      // an end farther than FAR_END σ (or a dead structure's) contributes nothing to the gradient
      near_alpha[j] = T(live && a > -kFarEnd);
      near_beta[j] = T(live && b < kFarEnd);
      block_near_alpha[j / width] |= near_alpha[j] != T(0);
      block_near_beta[j / width] |= near_beta[j] != T(0);
    }
  }
};

// Φ⁻¹(p) for float32 p ≤ 1/2, both parts accurate to a few float32 ulps (as PyTorch's ndtri):
// p ≥ 0.0017: Giles's single-precision erfinv ("Approximating the erfinv function", 2010),
//   Φ⁻¹(p) = √2 erfinv(2p − 1) = √2 (2p − 1) P(w − 2.5), w = −ln(4p(1 − p)), whose central
//   polynomial holds for w < 5, i.e. p > 0.00169;
// below: Acklam's lower-tail rational in t = √(−2 ln p) (relative error < 1.2e-9), which holds
// down to the smallest float32 p.  Either way one log per lane.
constexpr float kGilesCentral[] = {2.81022636e-08f, 3.43273939e-07f, -3.5233877e-06f, -4.39150654e-06f,
                                   0.00021858087f, -0.00125372503f, -0.00417768164f, 0.246640727f, 1.50140941f};
constexpr float kAcklamC[] = {-7.784894002430293e-03f, -3.223964580411365e-01f, -2.400758277161838e+00f,
                              -2.549732539343734e+00f, 4.374664141464968e+00f, 2.938163982698783e+00f};
constexpr float kAcklamD[] = {7.784695709041462e-03f, 3.224671290700398e-01f, 2.445134137142996e+00f,
                              3.754408661907416e+00f, 1.0f};
constexpr float kTailBelow = 0.0017f;  // Giles's w = 4.98
constexpr float kSqrt2f = 1.41421356237309504880f;

using VecF = at::vec::Vectorized<float>;

template <int N>
inline VecF horner(const VecF& x, const float (&c)[N]) {
  VecF acc(c[0]);
  for (int i = 1; i < N; ++i) acc = at::vec::fmadd(acc, x, VecF(c[i]));
  return acc;
}

// Φ⁻¹(p) for float32 p in [0, 1/2] (−∞ at 0), one vector of lanes at a time
// (the tail's square root and division are skipped for vectors with no lane below kTailBelow: all but
// about 5% of them at 16 lanes, as 0.34% of samples fall there; Acklam's switch at 0.02425 sent half
// of them down both paths, and the draw took 15% longer)
inline VecF ndtri_lower(const VecF& p) {
  const VecF one(1.0f);
  const auto in_tail = p < VecF(kTailBelow);
  const VecF central_arg = VecF(4.0f) * p * (one - p);
  if (in_tail.zero_mask() == (1 << VecF::size()) - 1) {  // every lane false (0.0f)
    return (VecF(2.0f) * p - one) * horner(VecF(-2.5f) - central_arg.log(), kGilesCentral) * VecF(kSqrt2f);
  }
  const VecF tiny(std::numeric_limits<float>::denorm_min());
  const VecF log_arg = VecF::blendv(central_arg, at::vec::maximum(p, tiny), in_tail).log();
  const VecF central = (VecF(2.0f) * p - one) * horner(VecF(-2.5f) - log_arg, kGilesCentral) * VecF(kSqrt2f);
  const VecF t = (VecF(-2.0f) * log_arg).sqrt();
  const VecF tail = horner(t, kAcklamC) / horner(t, kAcklamD);
  return VecF::blendv(VecF::blendv(central, tail, in_tail), VecF(-std::numeric_limits<float>::infinity()),
                      p <= VecF(0.0f));
}

// weight · φ(end)/φ(z) = weight · exp(−(end − z)(end + z)/2), the exponent capped at ±80.  A gradient
// factor, so at::vec's faster inline exp (20 ulp, about 2e-6 relative) serves.  θ = exp(x) takes it too:
// x = μ + σz is itself rounded to float32, and at |x| up to 20 that alone moves θ by up to 1e-6 relative.
template <typename V>
inline V end_weight(const V& end, const V& z, const V& weight) {
  const V e = (end - z) * (end + z) * V(-0.5);
  return at::vec::clamp(e, V(-80.0), V(80.0)).exp_u20() * weight;
}

// One (row, structures j … j+lanes) block of the float32 sampler: θ and θ·∂x/∂μ, θ·∂x/∂σ.
inline void sample_block_f32(const Pieces<float>& P, int64_t j, int64_t block, const VecF& u, float* th_ptr,
                             float* wmu_ptr, float* wsig_ptr, int count, float lo, float hi) {
  const VecF one(1.0f);
  const VecF alpha = VecF::loadu(&P.alpha[j]), beta = VecF::loadu(&P.beta[j]);
  const VecF p_low = at::vec::fmadd(u, VecF::loadu(&P.gap_low[j]), VecF::loadu(&P.cdf_alpha[j]));
  const VecF p_high = at::vec::fmadd(one - u, VecF::loadu(&P.gap_high[j]), VecF::loadu(&P.sf_beta[j]));
  const VecF v = ndtri_lower(at::vec::minimum(p_low, p_high));
  // the smaller tail was inverted: z = v below the median, −v above it
  const VecF z = at::vec::clamp(VecF::blendv(VecF(0.0f) - v, v, p_low < p_high), alpha, beta);
  const VecF x = at::vec::fmadd(VecF::loadu(&P.sigma[j]), z, VecF::loadu(&P.mu[j]));
  const VecF theta = at::vec::clamp(x, VecF(lo), VecF(hi)).exp_u20() * VecF::loadu(&P.mask[j]);
  VecF d_mu = one, d_sigma = z;  // ∂x/∂μ = 1 − A_α − A_β, ∂x/∂σ = z − αA_α − βA_β
  if (P.block_near_alpha[block]) {
    const VecF a = end_weight(alpha, z, (one - u) * VecF::loadu(&P.near_alpha[j]));
    d_mu = d_mu - a;
    d_sigma = d_sigma - alpha * a;
  }
  if (P.block_near_beta[block]) {
    const VecF b = end_weight(beta, z, u * VecF::loadu(&P.near_beta[j]));
    d_mu = d_mu - b;
    d_sigma = d_sigma - beta * b;
  }
  theta.store(th_ptr, count);
  (theta * d_mu).store(wmu_ptr, count);
  (theta * d_sigma * VecF::loadu(&P.sigma_grad[j])).store(wsig_ptr, count);
}

// The same for one float64 sample, with PyTorch's scalar ndtri (float64 training asks for accuracy).
inline void sample_one_f64(const Pieces<double>& P, int64_t j, double uk, double* th, double* wmu, double* wsig,
                           double lo, double hi) {
  const double p_low = P.cdf_alpha[j] + uk * P.gap_low[j];
  const double p_high = P.sf_beta[j] + (1.0 - uk) * P.gap_high[j];
  const double v = calc_ndtri(std::min(p_low, p_high));
  // fmin/fmax, not std::clamp: about half the samples hit a bound, and branches mispredict
  const double z = std::fmin(std::fmax(std::copysign(v, p_low - p_high), P.alpha[j]), P.beta[j]);
  const double theta = std::exp(std::fmin(std::fmax(P.mu[j] + P.sigma[j] * z, lo), hi)) * P.mask[j];
  double d_mu = 1.0, d_sigma = z;
  for (int side = 0; side < 2; ++side) {
    const double end = side == 0 ? P.alpha[j] : P.beta[j];
    const double near = side == 0 ? P.near_alpha[j] : P.near_beta[j];
    if (near == 0.0) continue;
    const double a = (side == 0 ? 1.0 - uk : uk) * std::exp(std::fmin(std::fmax(-0.5 * (end - z) * (end + z), -80.0), 80.0));
    d_mu -= a;
    d_sigma -= end * a;
  }
  *th = theta;
  *wmu = theta * d_mu;
  *wsig = theta * d_sigma * P.sigma_grad[j];
}

// Uniforms read from a (rows, ≥ S) tensor with unit column stride.
struct TensorUniforms {
  const void* data;
  int64_t stride;
  VecF f32(int64_t r, int64_t j, int count) const {
    return VecF::loadu(static_cast<const float*>(data) + r * stride + j, count);
  }
  double f64(int64_t r, int64_t j) const { return static_cast<const double*>(data)[r * stride + j]; }
};

// The compiler's vector extensions over VecF's lanes (AVX-512 or AVX2 under -march=native): at::vec has
// no unsigned 32-bit multiply or logical shift, which the counter hash needs.
typedef uint32_t U32Lanes __attribute__((vector_size(VecF::size() * sizeof(uint32_t))));
typedef int32_t I32Lanes __attribute__((vector_size(VecF::size() * sizeof(int32_t))));
typedef float F32Lanes __attribute__((vector_size(VecF::size() * sizeof(float))));

// bmrs_counter::unit_f32 of one row hash against VecF::size() column hashes, all lanes at once (a few
// vector instructions where the scalar loop takes a dozen per lane)
inline VecF unit_f32_lanes(uint32_t row_hash, const uint32_t* column_hash) {
  U32Lanes columns;
  std::memcpy(&columns, column_hash, sizeof columns);
  const U32Lanes x = bmrs_counter::mix(columns ^ row_hash);
  const F32Lanes u = __builtin_convertvector((I32Lanes)((x >> 8) | 1U), F32Lanes) * 0x1p-24f;
  alignas(64) float lanes[VecF::size()];
  std::memcpy(lanes, &u, sizeof u);
  return VecF::loadu(lanes);
}

// Counter-based uniforms (counter_uniforms.h) for rows row_first + r and the structures' column
// hashes (padded to whole vectors), formed in the lanes that use them.
struct CounterUniforms {
  bmrs_counter::Key key;
  int64_t row_first;
  const uint32_t *column, *column_low;
  VecF f32(int64_t r, int64_t j, int) const { return unit_f32_lanes(key.row(row_first + r), column + j); }
  double f64(int64_t r, int64_t j) const {
    const uint32_t row = key.row(row_first + r);
    return bmrs_counter::unit_f64(row, column[j], key.row_low(row), column_low[j]);
  }
};

// One layer's input to the sampler: posteriors (float64), the optional ∂σ/∂(trained parameter) and mask,
// where its uniforms come from, and its (rows, S) outputs θ, θ·∂x/∂μ, θ·∂x/∂σ·sigma_grad.
template <typename Source>
struct LayerDraw {
  const double *mu, *sigma, *sigma_grad;  // sigma_grad may be null (then 1)
  const float* mask;                       // may be null (then 1)
  int64_t S;
  Source source;
  at::Tensor theta, w_mu, w_sigma;
};

struct ColumnBlock {
  int64_t layer, first, last;  // structures first … last − 1 of a layer
};

// The layers' structures in blocks of at most kColumnBlock, and (in `grain`) how many blocks give a
// thread at least kGrainElements samples' worth of work: small passes run on the calling thread alone.
std::vector<ColumnBlock> column_blocks(const std::vector<int64_t>& widths, int64_t rows, int64_t& grain) {
  std::vector<ColumnBlock> blocks;
  int64_t work = 0;
  for (size_t l = 0; l < widths.size(); ++l) {
    for (int64_t j = 0; j < widths[l]; j += kColumnBlock) blocks.push_back({int64_t(l), j, std::min(widths[l], j + kColumnBlock)});
    work += widths[l] * (rows + kStructureWork);
  }
  const int64_t count = std::max<int64_t>(int64_t(blocks.size()), 1);
  grain = std::max<int64_t>(1, (kGrainElements * count + std::max<int64_t>(work, 1) - 1) / std::max<int64_t>(work, 1));
  return blocks;
}

// fn(b0, b1, segment) for the column blocks split between threads whole, each thread's consecutive
// blocks b0 … b1 − 1 of one layer joined into segments of up to kColumnSegment structures: every column is
// then summed or drawn by one thread in row order, the same whatever the number of threads.
template <typename Fn>
void for_column_segments(const std::vector<ColumnBlock>& blocks, int64_t grain, const Fn& fn) {
  at::parallel_for(0, int64_t(blocks.size()), grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1;) {
      int64_t e = b + 1;
      while (e < b1 && blocks[e].layer == blocks[b].layer && blocks[e].last - blocks[b].first <= kColumnSegment) ++e;
      fn(b, e, ColumnBlock{blocks[b].layer, blocks[b].first, blocks[e - 1].last});
      b = e;
    }
  });
}

// The sampler for structures first … last − 1 of one layer, every row.
template <typename Source>
void sample_columns(const LayerDraw<Source>& d, int64_t first, int64_t last, int64_t rows, double low, double high) {
  const int64_t S = d.S, count = last - first;
  const double* sg = d.sigma_grad != nullptr ? d.sigma_grad + first : nullptr;
  const float* mask = d.mask != nullptr ? d.mask + first : nullptr;
  if (d.theta.scalar_type() == at::kFloat) {
    constexpr int64_t L = VecF::size();
    const Pieces<float> P(d.mu + first, d.sigma + first, sg, mask, count, low, high, L);
    float *th = d.theta.template data_ptr<float>(), *wm = d.w_mu.template data_ptr<float>(), *ws = d.w_sigma.template data_ptr<float>();
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t j = 0; j < count; j += L) {
        const int64_t k = r * S + first + j;
        const int lanes = int(std::min<int64_t>(L, count - j));
        sample_block_f32(P, j, j / L, d.source.f32(r, first + j, lanes), th + k, wm + k, ws + k, lanes, float(low),
                         float(high));
      }
    }
  } else {
    const Pieces<double> P(d.mu + first, d.sigma + first, sg, mask, count, low, high, 1);
    double *th = d.theta.template data_ptr<double>(), *wm = d.w_mu.template data_ptr<double>(), *ws = d.w_sigma.template data_ptr<double>();
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t j = 0; j < count; ++j) {
        const int64_t k = r * S + first + j;
        sample_one_f64(P, j, d.source.f64(r, first + j), th + k, wm + k, ws + k, low, high);
      }
    }
  }
}

// Allocates a layer's (rows, S) outputs in `dtype` (float32 or float64).
template <typename Source>
void allocate_draw(LayerDraw<Source>& d, int64_t rows, at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "the sampler runs in float32 or float64");
  const auto options = at::TensorOptions().dtype(dtype);
  d.theta = at::empty({rows, d.S}, options);
  d.w_mu = at::empty({rows, d.S}, options);
  d.w_sigma = at::empty({rows, d.S}, options);
}

// A layer's μ, σ = exp(clamp(log σ, lo, hi)) and ∂σ/∂log σ (0 where the clamp is active, as
// torch.clamp's gradient), read into float64 arrays by a plain loop (no tensor operations).
struct SigmaOf {
  std::vector<double> mu, sigma, sigma_grad;
  SigmaOf(const at::Tensor& mu_in, const at::Tensor& log_sigma_in, double lo, double hi) {
    TORCH_CHECK(mu_in.numel() == log_sigma_in.numel(), "mu and log sigma must have the same size");
    const int64_t n = mu_in.numel();
    mu.resize(n); sigma.resize(n); sigma_grad.resize(n);
    const auto mu_c = mu_in.contiguous(), ls_c = contiguous_as(log_sigma_in, mu_in.scalar_type());
    AT_DISPATCH_FLOATING_TYPES(mu_c.scalar_type(), "SigmaOf", [&] {
      const scalar_t *m = mu_c.data_ptr<scalar_t>(), *ls = ls_c.data_ptr<scalar_t>();
      for (int64_t i = 0; i < n; ++i) {
        const double l = double(ls[i]);
        mu[i] = double(m[i]);
        sigma[i] = std::exp(std::fmin(std::fmax(l, lo), hi));
        sigma_grad[i] = (l >= lo && l <= hi) ? sigma[i] : 0.0;
      }
    });
  }
  bool any_deep_tail(double low, double high, double fast_tail) const {
    return deep_tail_among(mu.data(), sigma.data(), int64_t(mu.size()), low, high, fast_tail);
  }
};

// Σ_j KL(q_j ‖ U[low, high]) over structures first … last − 1 of one layer's posteriors; coef times its
// gradient in μ and in log σ is written to g_mu and g_log_sigma (1-d, the layer's dtype) at those places.
double kl_columns(const SigmaOf& p, int64_t first, int64_t last, double low, double high, double coef, at::Tensor& g_mu,
                  at::Tensor& g_log_sigma) {
  const double log_w = std::log(high - low);
  double total = 0.0;
  AT_DISPATCH_FLOATING_TYPES(g_mu.scalar_type(), "kl_columns", [&] {
    scalar_t *gm = g_mu.data_ptr<scalar_t>(), *gl = g_log_sigma.data_ptr<scalar_t>();
    for (int64_t j = first; j < last; ++j) {
      const auto r = kl_to_uniform_at(p.mu[j], p.sigma[j], low, high, log_w);
      total += r.kl;
      gm[j] = scalar_t(coef * r.d_loc);
      gl[j] = scalar_t(coef * r.d_scale * p.sigma_grad[j]);
    }
  });
  return total;
}

}  // namespace

// Forward of fast_sample._TailInversion for u of shape (rows, S): per structure (float64) the ends
// α, β and the normal masses; per sample θ = mask · exp(clamp(μ + σz)), Φ(z) = (1 − u)Φ(α) + uΦ(β)
// with the smaller tail inverted, and the backward's factors θ·∂x/∂μ and θ·∂x/∂σ,
//   ∂x/∂μ = 1 − A_α − A_β,  ∂x/∂σ = z − αA_α − βA_β,  A_α = (1 − u)φ(α)/φ(z),  A_β = uφ(β)/φ(z),
// an end skipped for structures that are masked or have it farther than FAR_END σ.
// Returns θ, θ·∂x/∂μ, θ·∂x/∂σ, all (rows, S) in u's dtype.
std::vector<at::Tensor> sample_forward(const at::Tensor& mu_in, const at::Tensor& sigma_in, const at::Tensor& u_in,
                                       const c10::optional<at::Tensor>& mask_in, double low, double high) {
  const int64_t S = mu_in.numel();
  TORCH_CHECK(u_in.dim() == 2 && u_in.size(1) == S, "u must be (rows, S)");
  const auto u = u_in.contiguous();
  const auto mu64 = mu_in.to(at::kDouble).contiguous();
  const auto sigma64 = sigma_in.to(at::kDouble).contiguous();
  at::Tensor mask32;
  if (mask_in.has_value()) mask32 = mask_in->to(at::kFloat).contiguous();
  TORCH_CHECK(u.scalar_type() == at::kFloat || u.scalar_type() == at::kDouble, "u must be float32 or float64");
  LayerDraw<TensorUniforms> d{mu64.data_ptr<double>(), sigma64.data_ptr<double>(), nullptr,
                              mask_in.has_value() ? mask32.data_ptr<float>() : nullptr, S,
                              TensorUniforms{u.data_ptr(), u.size(1)}};
  const int64_t rows = u.size(0);
  allocate_draw(d, rows, u.scalar_type());
  int64_t grain = 1;
  const auto blocks = column_blocks({S}, rows, grain);
  for_column_segments(blocks, grain, [&](int64_t, int64_t, const ColumnBlock& b) { sample_columns(d, b.first, b.last, rows, low, high); });
  return {d.theta, d.w_mu, d.w_sigma};
}

namespace {

bmrs_counter::Key key_of(const std::vector<int64_t>& words) {
  TORCH_CHECK(words.size() == 4, "the key is four 32-bit words");
  bmrs_counter::Key key;
  for (int i = 0; i < 4; ++i) {
    TORCH_CHECK(words[i] >= 0 && words[i] <= 0xFFFFFFFFLL, "key words must lie in [0, 2^32)");
    key.k[i] = uint32_t(words[i]);
  }
  return key;
}

void check_rows(int64_t row_first, int64_t rows) {
  TORCH_CHECK(row_first >= 0 && rows >= 0 && row_first + rows <= (int64_t(1) << 32), "rows must lie in [0, 2^32)");
}

// the column hashes (and the float64 stream's second words) of codes[j] = offset + index[j], padded
// with zeros to `padded` entries
void column_hashes(const bmrs_counter::Key& key, const at::Tensor& index_in, int64_t offset, int64_t padded,
                   std::vector<uint32_t>& column, std::vector<uint32_t>& column_low) {
  const auto index = contiguous_as(index_in, at::kLong);
  const int64_t* idx = index.data_ptr<int64_t>();
  column.assign(padded, 0U);
  column_low.assign(padded, 0U);
  for (int64_t j = 0; j < index.numel(); ++j) {
    const int64_t code = offset + idx[j];
    TORCH_CHECK(code >= 0 && code <= 0xFFFFFFFFLL, "column codes must lie in [0, 2^32)");
    column[j] = key.column(code);
    column_low[j] = key.column_low(column[j]);
  }
}

}  // namespace

// The counter-based uniforms of rows row_first … row_first + rows − 1 and the given column codes:
// (rows, len(codes)), float64 when `float64` is set, else float32 (bmrs/nn/uniforms.py's stream).
at::Tensor counter_uniforms(const std::vector<int64_t>& words, int64_t row_first, int64_t rows, const at::Tensor& codes,
                            bool float64) {
  const auto key = key_of(words);
  check_rows(row_first, rows);
  TORCH_CHECK(codes.dim() == 1, "codes must be 1-d");
  const int64_t C = codes.numel();
  std::vector<uint32_t> column, column_low;
  column_hashes(key, codes, 0, C, column, column_low);
  auto out = at::empty({rows, C}, at::TensorOptions().dtype(float64 ? at::kDouble : at::kFloat));
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(C, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint32_t row = key.row(row_first + r);
      if (float64) {
        const uint32_t row_low = key.row_low(row);
        double* dst = out.data_ptr<double>() + r * C;
        for (int64_t c = 0; c < C; ++c) dst[c] = bmrs_counter::unit_f64(row, column[c], row_low, column_low[c]);
      } else {
        float* dst = out.data_ptr<float>() + r * C;
        for (int64_t c = 0; c < C; ++c) dst[c] = bmrs_counter::unit_f32(row, column[c]);
      }
    }
  });
  return out;
}

// sample_forward for several layers at once, straight from their (μ, log σ) and masks, with counter-based
// uniforms formed in the lanes: rows row_first … row_first + rows − 1, and layer l's structure j at column
// code Σ_{l' < l} full_widths[l'] + kept[l][j] (its position before `shrink` narrowed the layer).
// Returns θ_l for every layer, then every θ_l·∂x/∂μ, then every θ_l·∂x/∂log σ, in μ's dtype; then,
// from the same σ, the layers' KL to the prior U[low, high] (n,) in float64, and its gradient in every μ and
// every log σ.
namespace {

std::vector<at::Tensor> sample_layers_from(const std::vector<SigmaOf>& posteriors, at::TensorList mus,
                                           at::TensorList masks, const std::vector<int64_t>& words, int64_t row_first,
                                           int64_t rows, at::TensorList kept, const std::vector<int64_t>& full_widths,
                                           double low, double high) {
  const size_t n = mus.size();
  TORCH_CHECK(masks.size() == n && kept.size() == n && full_widths.size() == n,
              "one mu, mask, kept index and full width per layer");
  const auto key = key_of(words);
  check_rows(row_first, rows);
  std::vector<at::Tensor> out(5 * n + 1), masks32(n);
  std::vector<std::vector<uint32_t>> column(n), column_low(n);
  std::vector<LayerDraw<CounterUniforms>> draws;
  std::vector<int64_t> widths(n);
  draws.reserve(n);
  int64_t offset = 0;
  for (size_t l = 0; l < n; ++l) {
    const SigmaOf& p = posteriors[l];
    masks32[l] = contiguous_as(masks[l], at::kFloat);
    const int64_t S = widths[l] = mus[l].numel();
    TORCH_CHECK(kept[l].numel() == S && masks32[l].numel() == S, "one mask entry and kept index per structure");
    column_hashes(key, kept[l], offset, (S + VecF::size() - 1) / VecF::size() * VecF::size(), column[l], column_low[l]);
    draws.push_back({p.mu.data(), p.sigma.data(), p.sigma_grad.data(), masks32[l].data_ptr<float>(), S,
                     CounterUniforms{key, row_first, column[l].data(), column_low[l].data()}});
    allocate_draw(draws[l], rows, mus[l].scalar_type());
    out[l] = draws[l].theta;
    out[n + l] = draws[l].w_mu;
    out[2 * n + l] = draws[l].w_sigma;
    out[3 * n + 1 + l] = at::empty({S}, mus[l].options());
    out[4 * n + 1 + l] = at::empty({S}, mus[l].options());
    offset += full_widths[l];
  }
  // each segment draws its θ and forms its blocks' KL, summed per layer in block order below
  int64_t grain = 1;
  const auto blocks = column_blocks(widths, rows, grain);
  std::vector<double> kl_of_block(blocks.size());
  for_column_segments(blocks, grain, [&](int64_t b0, int64_t b1, const ColumnBlock& segment) {
    sample_columns(draws[segment.layer], segment.first, segment.last, rows, low, high);
    for (int64_t i = b0; i < b1; ++i) {
      const ColumnBlock& b = blocks[i];
      kl_of_block[i] = kl_columns(posteriors[b.layer], b.first, b.last, low, high, 1.0, out[3 * n + 1 + b.layer],
                                  out[4 * n + 1 + b.layer]);
    }
  });
  std::vector<double> kl(n, 0.0);
  for (size_t i = 0; i < blocks.size(); ++i) kl[blocks[i].layer] += kl_of_block[i];
  out[3 * n] = tensor_of(kl.data(), int64_t(n), at::TensorOptions().dtype(at::kDouble));  // float64: the node weights and rounds it
  return out;
}

std::vector<SigmaOf> posteriors_of(at::TensorList mus, at::TensorList log_sigmas, double log_sigma_min,
                                   double log_sigma_max) {
  TORCH_CHECK(log_sigmas.size() == mus.size(), "one mu and log sigma per layer");
  std::vector<SigmaOf> out;
  out.reserve(mus.size());
  for (size_t l = 0; l < mus.size(); ++l) out.emplace_back(mus[l], log_sigmas[l], log_sigma_min, log_sigma_max);
  return out;
}

}  // namespace


namespace {

// Backward of fast_sample._TailInversion for several layers at once: for layer l,
// ∂L/∂μ = Σ_rows grad_l · θ∂x/∂μ and ∂L/∂σ = Σ_rows grad_l · θ∂x/∂σ, each column summed in float64 by one
// thread in row order (the same result whatever the number of threads), plus scale_l · (extra_mu_l,
// extra_sigma_l) where extras are given (the gradient of a per-layer term formed in the forward, e.g.
// the layer's KL).  Returns every layer's ∂L/∂μ, then every ∂L/∂σ.
std::vector<at::Tensor> sample_layers_backward(const std::vector<at::Tensor>& grads_in, at::TensorList w_mu,
                                               at::TensorList w_sigma, const std::vector<double>& scales,
                                               at::TensorList extra_mu, at::TensorList extra_sigma) {
  const size_t n = w_mu.size();
  TORCH_CHECK(grads_in.size() == n && w_sigma.size() == n, "one gradient and two factors per layer");
  const bool extra = !extra_mu.empty();
  TORCH_CHECK(!extra || (extra_mu.size() == n && extra_sigma.size() == n && scales.size() == n),
              "one extra term and scale per layer");
  std::vector<at::Tensor> grads(n), out(2 * n);
  std::vector<int64_t> widths(n);
  const int64_t rows = n > 0 ? w_mu[0].size(0) : 0;
  for (size_t l = 0; l < n; ++l) {
    widths[l] = w_mu[l].size(1);
    if (grads_in[l].defined()) {  // undefined: this θ did not reach the loss
      grads[l] = grads_in[l].contiguous();
      TORCH_CHECK(grads[l].dim() == 2 && grads[l].sizes() == w_mu[l].sizes(), "the gradient of a layer's θ must be (rows, S)");
    }
    out[l] = at::empty({widths[l]}, w_mu[l].options());
    out[n + l] = at::empty({widths[l]}, w_mu[l].options());
  }
  if (n == 0) return out;
  int64_t grain = 1;
  const auto blocks = column_blocks(widths, rows, grain);
  AT_DISPATCH_FLOATING_TYPES(w_mu[0].scalar_type(), "sample_layers_backward", [&] {
    for_column_segments(blocks, grain, [&](int64_t, int64_t, const ColumnBlock& b) {
      const int64_t S = widths[b.layer], count = b.last - b.first;
      double acc_mu[kColumnSegment] = {}, acc_sigma[kColumnSegment] = {};
      if (grads[b.layer].defined()) {
        const scalar_t* __restrict__ g = grads[b.layer].data_ptr<scalar_t>() + b.first;
        const scalar_t* __restrict__ wm = w_mu[b.layer].data_ptr<scalar_t>() + b.first;
        const scalar_t* __restrict__ ws = w_sigma[b.layer].data_ptr<scalar_t>() + b.first;
        for (int64_t r = 0; r < rows; ++r) {
          for (int64_t j = 0; j < count; ++j) {
            acc_mu[j] += double(g[r * S + j] * wm[r * S + j]);
            acc_sigma[j] += double(g[r * S + j] * ws[r * S + j]);
          }
        }
      }
      scalar_t* dst_mu = out[b.layer].data_ptr<scalar_t>() + b.first;
      scalar_t* dst_sigma = out[n + b.layer].data_ptr<scalar_t>() + b.first;
      const double scale = extra ? scales[b.layer] : 0.0;
      for (int64_t j = 0; j < count; ++j) {
        double sum_mu = acc_mu[j], sum_sigma = acc_sigma[j];
        if (scale != 0.0) {
          sum_mu += scale * double(extra_mu[b.layer].data_ptr<scalar_t>()[b.first + j]);
          sum_sigma += scale * double(extra_sigma[b.layer].data_ptr<scalar_t>()[b.first + j]);
        }
        dst_mu[j] = scalar_t(sum_mu);
        dst_sigma[j] = scalar_t(sum_sigma);
      }
    });
  });
  return out;
}

}  // namespace

// The backward of sample_forward (one layer, no extra term): ∂L/∂μ and ∂L/∂σ.
std::vector<at::Tensor> sample_backward(const at::Tensor& grad, const at::Tensor& w_mu, const at::Tensor& w_sigma) {
  return sample_layers_backward({grad}, {w_mu}, {w_sigma}, {}, {}, {});
}


namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// sample_layers as one autograd node built in C++ (no Python on the step's path): outputs θ of every
// layer, the layers' KL (n,), their sum weighted by `coefs` (0-d), and a flag (0-d bool, not
// differentiable) that the backward sets, telling a holder of the KL that its graph is spent.
struct SampleLayersNode : public torch::autograd::Function<SampleLayersNode> {
  // the arguments after the two tensor lists: masks and kept indices travel by pointer, not as inputs
  // (they take no gradient, and each input costs the node's construction an edge)
  static constexpr int kPlainArgs = 10;

  static variable_list forward(AutogradContext* ctx, at::TensorList mus, at::TensorList log_sigmas,
                               const std::vector<at::Tensor>* masks, const std::vector<at::Tensor>* kept,
                               const std::vector<SigmaOf>* posteriors,
                               const std::vector<int64_t>* words, int64_t row_first, int64_t rows,
                               const std::vector<int64_t>* full_widths, double low, double high,
                               const std::vector<double>* coefs) {
    const int64_t n = int64_t(mus.size());
    auto out = sample_layers_from(*posteriors, mus, *masks, *words, row_first, rows, *kept, *full_widths, low, high);
    variable_list saved(out.begin() + n, out.begin() + 3 * n);
    saved.insert(saved.end(), out.begin() + 3 * n + 1, out.end());
    ctx->save_for_backward(saved);
    ctx->set_materialize_grads(false);  // an unused output's gradient is left undefined, not a tensor of zeros
    const double* kl64 = out[3 * n].data_ptr<double>();
    double total = 0.0;
    for (int64_t l = 0; l < n; ++l) total += (*coefs)[l] * kl64[l];
    const auto options = mus[0].options();
    auto spent = at::empty({}, at::TensorOptions().dtype(at::kBool));
    *spent.data_ptr<bool>() = false;
    ctx->saved_data["n"] = n;
    ctx->saved_data["spent"] = spent;
    ctx->saved_data["coefs"] = c10::List<double>(*coefs);
    ctx->mark_non_differentiable({spent});
    variable_list result(out.begin(), out.begin() + n);
    result.push_back(tensor_of(kl64, n, options));
    result.push_back(scalar_of(total, options));
    result.push_back(spent);
    return result;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const int64_t n = ctx->saved_data["n"].toInt();
    const auto spent = ctx->saved_data["spent"].toTensor();
    *spent.data_ptr<bool>() = true;
    spent.unsafeGetTensorImpl()->bump_version();  // so that Python can tell from spent._version, no operator
    const auto saved = ctx->get_saved_variables();
    // each layer's KL enters the loss through the per-layer output and through the weighted sum
    const at::Tensor scale_tensor = grads[n].defined() ? grads[n].contiguous() : at::Tensor();
    const double total_grad = grads[n + 1].defined() ? value_at(grads[n + 1], 0) : 0.0;
    const auto coefs = ctx->saved_data["coefs"].toDoubleList();
    std::vector<double> scales(n);
    for (int64_t l = 0; l < n; ++l) {
      scales[l] = (scale_tensor.defined() ? value_at(scale_tensor, l) : 0.0) + total_grad * coefs[l];
    }
    const std::vector<at::Tensor> theta_grads(grads.begin(), grads.begin() + n);
    const at::TensorList factors(saved);
    auto g = sample_layers_backward(theta_grads, factors.slice(0, n), factors.slice(n, n), scales, factors.slice(2 * n, n),
                                    factors.slice(3 * n, n));
    variable_list result(2 * n + kPlainArgs);
    for (int64_t l = 0; l < n; ++l) {
      result[l] = g[l];
      result[n + l] = g[n + l];
    }
    return result;
  }
};

}  // namespace

// The fused draw for the noise bank (bmrs/nn/fused_layers.py): sample_layers as one autograd node,
// returning θ of every layer, the layers' KL (n,), its sum weighted by `coefs` and the spent flag; or
// nothing when the kernels cannot serve these tensors (not all on the CPU in one float32/float64 dtype,
// or an interval more than fast_tail σ into a tail, which the reference code draws exactly).  An empty
// `words` draws the key from PyTorch's default generator as bmrs.nn.uniforms.draw_key does, only once
// the kernels are known to serve (so that a caller falling back draws the same key itself).
namespace {

// torch.randint(0, 2**32, (4,)) from the default CPU generator (bmrs.nn.uniforms.draw_key), without the
// operator: for a range of 2³² PyTorch takes each value as random64() mod 2³², in order, under the
// generator's lock (ATen's uniform_int_from_to_distribution); tests/test_fused_layers.py checks the two agree.
std::vector<int64_t> draw_key_words() {
  auto generator = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(generator.mutex());
  auto* cpu = at::check_generator<at::CPUGeneratorImpl>(generator);
  std::vector<int64_t> words(4);
  for (auto& w : words) w = int64_t(cpu->random64() % (uint64_t(1) << 32));
  return words;
}

}  // namespace

std::vector<at::Tensor> sample_layers_node(const std::vector<at::Tensor>& mus, const std::vector<at::Tensor>& log_sigmas,
                                           const std::vector<at::Tensor>& masks, const std::vector<int64_t>& words,
                                           int64_t row_first, int64_t rows, const std::vector<at::Tensor>& kept,
                                           const std::vector<int64_t>& full_widths, double low, double high,
                                           double log_sigma_min, double log_sigma_max, double fast_tail,
                                           const std::vector<double>& coefs) {
  if (mus.empty() || log_sigmas.size() != mus.size()) return {};
  TORCH_CHECK(coefs.size() == mus.size(), "one KL coefficient per layer");
  const auto dtype = mus[0].scalar_type();
  if (dtype != at::kFloat && dtype != at::kDouble) return {};
  for (const auto* list : {&mus, &log_sigmas}) {
    for (const auto& t : *list) {
      if (!t.device().is_cpu() || t.scalar_type() != dtype) return {};
    }
  }
  for (const auto* list : {&masks, &kept}) {
    for (const auto& t : *list) {
      if (!t.device().is_cpu()) return {};
    }
  }
  std::vector<SigmaOf> posteriors;
  {
    at::NoGradGuard no_grad;
    posteriors = posteriors_of(mus, log_sigmas, log_sigma_min, log_sigma_max);
  }
  for (const auto& p : posteriors) {
    if (p.any_deep_tail(low, high, fast_tail)) return {};
  }
  std::vector<int64_t> key = words;
  if (key.empty()) {
    key = draw_key_words();
  }
  return SampleLayersNode::apply(at::TensorList(mus), at::TensorList(log_sigmas), &masks, &kept, &posteriors, &key,
                                 row_first, rows, &full_widths, low, high, &coefs);
}

// Σ_l coef_l Σ_j KL(q_lj ‖ U[low, high]) with σ = exp(clamp(log σ)), and its gradient in every layer's
// μ and log σ: returns the value (0-d, μ's dtype), then grad_μ of every layer, then grad_log σ of every layer.
std::vector<at::Tensor> kl_layers(const std::vector<at::Tensor>& mus, const std::vector<at::Tensor>& log_sigmas,
                                  const std::vector<double>& coefs, double low, double high, double log_sigma_min,
                                  double log_sigma_max) {
  const size_t n = mus.size();
  TORCH_CHECK(log_sigmas.size() == n && coefs.size() == n, "one mu, log sigma and coefficient per layer");
  std::vector<at::Tensor> out(2 * n + 1);
  double total = 0.0;
  for (size_t l = 0; l < n; ++l) {
    const SigmaOf p(mus[l], log_sigmas[l], log_sigma_min, log_sigma_max);
    out[1 + l] = at::empty({mus[l].numel()}, mus[l].options());
    out[1 + n + l] = at::empty({mus[l].numel()}, mus[l].options());
    total += coefs[l] * kl_columns(p, 0, int64_t(p.mu.size()), low, high, coefs[l], out[1 + l], out[1 + n + l]);
  }
  out[0] = at::scalar_tensor(total, mus.empty() ? at::TensorOptions().dtype(at::kDouble) : mus[0].options());
  return out;
}

// Φ⁻¹(p) for float32 p ≤ 1/2 by the sampler's vectorised approximation (for tests).
at::Tensor ndtri_lower_f32(const at::Tensor& p_in) {
  TORCH_CHECK(p_in.scalar_type() == at::kFloat, "p must be float32");
  const auto p = p_in.contiguous();
  auto out = at::empty_like(p);
  const float* src = p.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  for (int64_t i = 0; i < p.numel(); i += VecF::size()) {
    const int count = int(std::min<int64_t>(VecF::size(), p.numel() - i));
    ndtri_lower(VecF::loadu(src + i, count)).store(dst + i, count);
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("kl_to_uniform_with_grad", &kl_to_uniform_with_grad, "KL to the uniform and its gradient");
  m.def("any_deep_tail", &any_deep_tail, "whether some interval lies deep in a tail");
  m.def("sample_forward", &sample_forward, "fused truncated log-normal sampling");
  m.def("sample_backward", &sample_backward, "gradient of the fused sampling");
  m.def("sample_layers_node", &sample_layers_node, "sample_layers as one autograd node, or nothing");
  m.def("counter_uniforms", &counter_uniforms, "the noise layers' counter-based uniforms");
  m.def("kl_layers", &kl_layers, "weighted KL sum of several layers and its gradient");
  m.def("delta_f_normal", &delta_f_normal, "BMRS_N's delta F without gradients");
  m.def("delta_f_uniform", &delta_f_uniform, "BMRS_U's delta F without gradients");
  m.def("direct_conv2d", &direct_conv2d, "stride-1 float32 convolution for narrow layers");
  m.def("tanh_f32", &tanh_f32, "float32 tanh, a vector of lanes at a time");
  m.def("aligned_linear_f32", &aligned_linear_f32, "float32 linear layer on a zero-padded weight, first columns kept");
  m.def("ndtri_lower_f32", &ndtri_lower_f32, "the float32 sampler's inverse normal CDF, p <= 1/2");
}
