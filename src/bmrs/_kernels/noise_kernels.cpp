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

// by job, in dependency order (each is part of this translation unit)
#include "noise_special.h"
#include "noise_kl.h"
#include "noise_sampling.h"
#include "noise_uniforms.h"

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

// The fused draw for the noise bank (bmrs/nn/fused_draw.py): sample_layers as one autograd node,
// returning θ of every layer, the layers' KL (n,), its sum weighted by `coefs` and the spent flag; or
// nothing when the kernels cannot serve these tensors (not all on the CPU in one float32/float64 dtype,
// or an interval more than fast_tail σ into a tail, which the reference code draws exactly).  An empty
// `words` draws the key from PyTorch's default generator as bmrs.nn.uniforms.draw_key does, only once
// the kernels are known to serve (so that a caller falling back draws the same key itself).
namespace {

// torch.randint(0, 2**32, (4,)) from the default CPU generator (bmrs.nn.uniforms.draw_key), without the
// operator: for a range of 2³² PyTorch takes each value as random64() mod 2³², in order, under the
// generator's lock (ATen's uniform_int_from_to_distribution); tests/test_fused_draw.py checks the two agree.
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
