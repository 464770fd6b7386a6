// Constants, scalar special functions (Φ, h(t), inverse Mills ratios) and small tensor helpers of the noise kernels.
// Part of noise_kernels.cpp, which includes it once, after its own includes (one translation unit).
#pragma once

#include "bmrs_constants.h"

namespace {

constexpr double kInvSqrt2 = 0.70710678118654752440;
constexpr double kSqrt2OverPi = 0.79788456080286535588;
constexpr double kLog2Pi = 1.83787706640934548356;
constexpr double kLn2 = 0.69314718055994530942;
// kFarEnd, kFarNegligibleSq, kSeriesFrom and the series of h(t) = t(λ(t) − t) = Σ kHSeries[k] t^(−2k) come from
// bmrs_constants.h, generated from bmrs/_kernels/constants.py (the Python code's values).

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

}  // namespace
