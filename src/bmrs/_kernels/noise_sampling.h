// The fused truncated log-normal sampler of one layer (float32 lanes and float64), its work split between threads, and the per-column KL of the multi-layer draw.
// Part of noise_kernels.cpp, which includes it once, after its own includes (one translation unit).
#pragma once

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
