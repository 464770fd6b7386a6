// at::vec's AVX-512 or AVX2 implementation (SLEEF's special functions, shipped inside libtorch)
// where the compiler targets it (-march=native), the generic one elsewhere.  Every source of the
// extension includes this first, so that all see the same Vectorized types.
#pragma once

#if !defined(CPU_CAPABILITY)
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#endif
#endif

#include <torch/extension.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/Parallel.h>

// defined in delta_f_kernels.cpp
at::Tensor delta_f_normal(const at::Tensor& mu, const at::Tensor& sigma, double low, double high, double m, double s,
                          double r_low, double r_high);
at::Tensor delta_f_uniform(const at::Tensor& mu, const at::Tensor& sigma, double low, double high, double r_low,
                           double r_high);
// defined in conv_kernels.cpp
at::Tensor direct_conv2d(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                         int64_t pad_h, int64_t pad_w);
at::Tensor tanh_f32(const at::Tensor& x);
at::Tensor aligned_linear_f32(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                              int64_t out_features);
