// Fused CPU kernels for the noise layers' training step (see bmrs/_kernels/__init__.py).
//
// Each function does in one call, element by element, what the reference PyTorch code in
// bmrs/distributions/fast_sample.py and bmrs/distributions/_truncnorm.py does with dozens of
// whole-tensor operations: the work is tiny, so eager PyTorch pays per operation, not per flop.
// The special functions are PyTorch's own scalar implementations (ATen/native/Math.h), the
// formulas are the reference code's, and tests/test_kernels.py checks the two against each other
// and against mpmath.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/native/Math.h>

#include <algorithm>
#include <cmath>
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

inline double ndtr(double x) { return 0.5 * std::erfc(-x * kInvSqrt2); }

// λ(t) = φ(t) / (1 − Φ(t)), t ≥ 0
inline double inv_mills(double t) { return kSqrt2OverPi / calc_erfcx(t * kInvSqrt2); }

// Σ_{k ≥ first} c_k s^(k − first), Horner in s = 1/t²
inline double h_series(double t, int first) {
  const double s = 1.0 / (t * t);
  double acc = 0.0;
  for (int k = kHTerms - 1; k >= first; --k) acc = acc * s + kHSeries[k];
  return acc;
}

// λ(t) − t without cancellation (≈ 1/t for large t)
inline double inv_mills_excess(double t) {
  return t > kSeriesFrom ? h_series(t, 0) / t : inv_mills(t) - t;
}

// G(t) = 1 − t(λ(t) − t), ≈ 2/t² for large t
inline double one_minus_t_excess(double t) {
  return t > kSeriesFrom ? -h_series(t, 1) / (t * t) : 1.0 - t * (inv_mills(t) - t);
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
  const double a = std::exp(-0.5 * alpha * alpha - 0.5 * kLog2Pi - log_z);
  const double b = std::exp(-0.5 * beta * beta - 0.5 * kLog2Pi - log_z);
  const double d = alpha * a - beta * b;
  const double a2 = alpha * alpha * a, b2 = beta * beta * b;
  return {-0.5 * (kLog2Pi + 1.0) - log_z - 0.5 * d,
          0.5 * ((a - b) * (1.0 - d) + a2 - b2),
          1.0 + 0.5 * (d * (1.0 - d) + alpha * a2 - beta * b2)};
}

// the interval on one side of the mean, mirrored so that its near end is t ≥ 0 and its far end
// t_far ≥ t σ away (_truncnorm._tail_kl_terms); `width` = (high − low)/σ
inline KLTerms tail_kl_terms(double t, double t_far, double width) {
  const double lam = inv_mills(t);
  const double g = one_minus_t_excess(t);
  double kl = -0.5 + std::log(lam) - 0.5 * t * inv_mills_excess(t);
  if (width * (t + t_far) > kFarNegligibleSq) {  // the far end is negligible: ρ = 0
    return {kl, 0.5 * lam * g, 1.0 + 0.5 * t * lam * g};
  }
  // ln r = ln Φ(−t_far) − ln Φ(−t), r the far end's share of the tail mass
  const double log_r = -0.5 * width * (t + t_far) + std::log(calc_erfcx(t_far * kInvSqrt2))
                       - std::log(calc_erfcx(t * kInvSqrt2));
  const double log_one_minus_r = log1mexp(log_r);
  const double rho = std::exp(log_r - log_one_minus_r);
  const double lam_far = inv_mills(t_far);
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
    const double inv_scale = 1.0 / sigma[i];
    const double l = (low - mu[i]) * inv_scale, u = (high - mu[i]) * inv_scale;
    KLTerms terms;
    if (u <= 0.0) {  // interval below the mean: near end high
      terms = tail_kl_terms(-u, -l, (high - low) * inv_scale);
      terms.h_mu = -terms.h_mu;
    } else if (l >= 0.0) {  // above the mean: near end low
      terms = tail_kl_terms(l, u, (high - low) * inv_scale);
    } else {
      terms = mid_kl_terms(l, u);
    }
    out_kl[i] = terms.kl + log_w - std::log(sigma[i]);
    out_loc[i] = -terms.h_mu * inv_scale;
    out_scale[i] = -terms.h_sigma * inv_scale;
  }
  const auto dtype = loc_in.scalar_type();
  return {kl.to(dtype), d_loc.to(dtype), d_scale.to(dtype)};
}

// True when some structure's interval lies more than fast_tail σ into a tail (fast_sample.FAST_TAIL):
// those are drawn by the exact float64 inverse CDF, which the reference code does.
bool any_deep_tail(const at::Tensor& mu_in, const at::Tensor& sigma_in, double low, double high, double fast_tail) {
  const auto mu = mu_in.to(at::kDouble).contiguous();
  const auto sigma = sigma_in.to(at::kDouble).contiguous();
  const double *m = mu.data_ptr<double>(), *s = sigma.data_ptr<double>();
  for (int64_t i = 0; i < mu.numel(); ++i) {
    if ((high - m[i]) / s[i] < -fast_tail || (low - m[i]) / s[i] > fast_tail) return true;
  }
  return false;
}

// Forward of fast_sample._TailInversion for u of shape (rows, S): per structure (float64) the ends
// α, β and the normal masses; per sample (u's dtype) θ = mask · exp(clamp(μ + σz)), Φ(z) = (1 − u)Φ(α) + uΦ(β)
// with the smaller tail inverted.  Returns θ, z and the ends (2, S) in float64.
std::vector<at::Tensor> sample_forward(const at::Tensor& mu_in, const at::Tensor& sigma_in, const at::Tensor& u_in,
                                       const c10::optional<at::Tensor>& mask_in, double low, double high) {
  const int64_t S = mu_in.numel();
  TORCH_CHECK(u_in.dim() == 2 && u_in.size(1) == S, "u must be (rows, S)");
  const auto u = u_in.contiguous();
  const int64_t rows = u.size(0);
  const auto mu64 = mu_in.to(at::kDouble).contiguous();
  const auto sigma64 = sigma_in.to(at::kDouble).contiguous();
  auto ends = at::empty({2, S}, mu64.options());
  const double *m = mu64.data_ptr<double>(), *s = sigma64.data_ptr<double>();
  double *alpha = ends.data_ptr<double>(), *beta = alpha + S;
  for (int64_t j = 0; j < S; ++j) {
    alpha[j] = (low - m[j]) / s[j];
    beta[j] = (high - m[j]) / s[j];
  }
  auto theta = at::empty_like(u);
  auto z = at::empty_like(u);
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "sample_forward", [&] {
    using T = scalar_t;
    // per-structure pieces, rounded to T as the reference code does: α, β, Φ(α), Φ(β) − Φ(α),
    // 1 − Φ(β), Φ(β) − Φ(α) from the upper side, μ, σ
    std::vector<T> piece(8 * S);
    for (int64_t j = 0; j < S; ++j) {
      const double cdf_a = ndtr(alpha[j]), cdf_b = ndtr(beta[j]), sf_a = ndtr(-alpha[j]), sf_b = ndtr(-beta[j]);
      T* p = piece.data() + 8 * j;
      p[0] = T(alpha[j]); p[1] = T(beta[j]); p[2] = T(cdf_a); p[3] = T(cdf_b - cdf_a);
      p[4] = T(sf_b); p[5] = T(sf_a - sf_b); p[6] = T(m[j]); p[7] = T(s[j]);
    }
    const T lo = T(low), hi = T(high);
    const T* up = u.data_ptr<T>();
    T *th = theta.data_ptr<T>(), *zp = z.data_ptr<T>();
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElements / std::max<int64_t>(S, 1)), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t j = 0; j < S; ++j) {
          const T* p = piece.data() + 8 * j;
          const int64_t k = r * S + j;
          const T uk = up[k];
          const T p_low = p[2] + uk * p[3];
          const T p_high = p[4] + (T(1) - uk) * p[5];
          const T v = calc_ndtri(std::min(p_low, p_high));
          // fmin/fmax, not std::clamp: about half the samples hit a bound, and branches mispredict
          const T zk = std::fmin(std::fmax(std::copysign(v, p_low - p_high), p[0]), p[1]);
          zp[k] = zk;
          th[k] = std::fmin(std::fmax(p[6] + p[7] * zk, lo), hi);
        }
      }
    });
  });
  theta.exp_();  // vectorised: a scalar exp in the loop above costs more than this whole pass
  if (mask_in.has_value()) theta.mul_(mask_in->to(u.scalar_type()));
  return {theta, z, ends};
}

// Backward of fast_sample._TailInversion: ∂L/∂μ and ∂L/∂σ summed over the rows,
//   ∂x/∂μ = 1 − A_α − A_β,  ∂x/∂σ = z − αA_α − βA_β,  A_α = (1 − u)φ(α)/φ(z),  A_β = uφ(β)/φ(z),
// an end's A skipped when no live structure has it within FAR_END σ.  Whole-tensor (vectorised)
// ATen calls: per element they beat a scalar loop with its exp, and from C++ they cost little each.
std::vector<at::Tensor> sample_backward(const at::Tensor& grad, const at::Tensor& u, const at::Tensor& z,
                                        const at::Tensor& theta, const at::Tensor& ends,
                                        const c10::optional<at::Tensor>& mask) {
  const auto dtype = u.scalar_type();
  const auto gx = grad * theta;  // ∂L/∂x (θ already carries the mask)
  auto grad_mu = gx.sum(0, false, at::kDouble);
  auto grad_sigma = (gx * z).sum(0, false, at::kDouble);
  const auto live = mask.has_value() ? c10::optional<at::Tensor>(mask->ne(0)) : c10::nullopt;
  for (int side = 0; side < 2; ++side) {
    const auto end64 = ends[side];
    auto near = side == 0 ? end64.gt(-kFarEnd) : end64.lt(kFarEnd);
    if (live.has_value()) near.logical_and_(*live);
    if (!near.any().item<bool>()) continue;
    const auto end = end64.to(dtype);
    const auto factor = ((end - z) * (end + z)).mul_(-0.5).clamp_(-80.0, 80.0).exp_()
                            .mul_(side == 0 ? 1.0 - u : u).mul_(gx);
    const auto g_end = factor.sum(0, false, at::kDouble);
    grad_mu.sub_(g_end);
    grad_sigma.sub_(end64 * g_end);
  }
  return {grad_mu.to(dtype), grad_sigma.to(dtype)};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("kl_to_uniform_with_grad", &kl_to_uniform_with_grad, "KL to the uniform and its gradient");
  m.def("any_deep_tail", &any_deep_tail, "whether some interval lies deep in a tail");
  m.def("sample_forward", &sample_forward, "fused truncated log-normal sampling");
  m.def("sample_backward", &sample_backward, "gradient of the fused sampling");
}
