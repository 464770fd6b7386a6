// KL(q ‖ U[low, high]) of a truncated normal on x = ln θ and its gradient, element by element (_truncnorm_kl's formulas).
// Part of noise_kernels.cpp, which includes it once, after its own includes (one translation unit).
#pragma once

namespace {

struct KLTerms {
  double kl, h_mu, h_sigma;  // KL − ln W + ln σ, σ ∂H/∂μ, σ ∂H/∂σ (as _truncnorm's _*_kl_terms)
};

// mean inside [low, high]: the textbook forms (_truncnorm_kl._mid_kl_terms)
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
// t_far ≥ t σ away (_truncnorm_kl._tail_kl_terms); `width` = (high − low)/σ
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
