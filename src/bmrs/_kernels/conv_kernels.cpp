// Direct 2-D convolution for the narrow layers that compaction leaves behind (float32, CPU, stride 1,
// dilation 1, one group, zero padding).
//
// oneDNN pads the channel dimension to its vector block (8 or 16), so a convolution reading one or two
// channels costs as much as one reading sixteen: a LeNet-5 first layer pruned from 6 filters to 2 ran
// no faster than the unpruned one.  Here each output row is accumulated in registers, a block of up to
// eight output channels at a time sharing every input load, so the cost follows the multiply-adds that
// are left.  Inputs are copied per example into a zero-bordered scratch plane, which makes the padding
// and the vector tails uniform.
#include "vec_capability.h"

#include <algorithm>
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#include <sleef.h>
#endif
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;

struct ConvShape {
  int64_t channels, height, width, outs, kh, kw, pad_h, pad_w, out_h, out_w;
  int64_t padded_w, plane;  // the zero-bordered scratch: row length and per-channel size
  int64_t positions;        // out_h rows of padded_w columns, rounded up to whole vectors
};

// P consecutive output vectors at flat position p0 for output channels [o, o + B): each weight broadcast
// serves P input loads, and each input load B weights.
template <int B, int P>
inline void conv_tile(const ConvShape& s, const float* padded, const float* weight, const float* bias, int64_t o,
                      int64_t p0, float* wide) {
  const int64_t taps = s.channels * s.kh * s.kw;
  Vec acc[B][P];
  for (int b = 0; b < B; ++b)
    for (int q = 0; q < P; ++q) acc[b][q] = Vec(bias ? bias[o + b] : 0.0f);
  for (int64_t c = 0; c < s.channels; ++c) {
    for (int64_t i = 0; i < s.kh; ++i) {
      const float* in = padded + c * s.plane + i * s.padded_w + p0;
      const float* w = weight + o * taps + (c * s.kh + i) * s.kw;
      for (int64_t j = 0; j < s.kw; ++j) {
        Vec v[P];
        for (int q = 0; q < P; ++q) v[q] = Vec::loadu(in + j + q * Vec::size());
        for (int b = 0; b < B; ++b) {
          const Vec wb(w[b * taps + j]);
          for (int q = 0; q < P; ++q) acc[b][q] = at::vec::fmadd(v[q], wb, acc[b][q]);
        }
      }
    }
  }
  for (int b = 0; b < B; ++b)
    for (int q = 0; q < P; ++q) acc[b][q].store(wide + b * s.positions + p0 + q * Vec::size());
}

// Output channels [o, o + B) of one example.  The output is computed on the flattened padded grid
// (out_h rows of padded_w columns: position p reads input p + i·padded_w + j for tap (i, j)), so
// every load and store is a whole vector; the columns past out_w are discarded on the copy out.
template <int B>
void conv_block(const ConvShape& s, const float* padded, const float* weight, const float* bias, int64_t o,
                float* wide, float* out_example) {
  constexpr int P = B <= 2 ? 6 : (B <= 4 ? 4 : 2);  // at most 16 accumulators
  int64_t p0 = 0;
  for (; p0 + P * Vec::size() <= s.positions; p0 += P * Vec::size())
    conv_tile<B, P>(s, padded, weight, bias, o, p0, wide);
  for (; p0 < s.positions; p0 += Vec::size()) conv_tile<B, 1>(s, padded, weight, bias, o, p0, wide);
  for (int b = 0; b < B; ++b)
    for (int64_t y = 0; y < s.out_h; ++y)
      std::copy(wide + b * s.positions + y * s.padded_w, wide + b * s.positions + y * s.padded_w + s.out_w,
                out_example + ((o + b) * s.out_h + y) * s.out_w);
}

void conv_example(const ConvShape& s, const float* padded, const float* weight, const float* bias, float* wide,
                  float* out_example) {
  int64_t o = 0;
  for (; o + 8 <= s.outs; o += 8) conv_block<8>(s, padded, weight, bias, o, wide, out_example);
  switch (s.outs - o) {
    case 7: conv_block<7>(s, padded, weight, bias, o, wide, out_example); break;
    case 6: conv_block<6>(s, padded, weight, bias, o, wide, out_example); break;
    case 5: conv_block<5>(s, padded, weight, bias, o, wide, out_example); break;
    case 4: conv_block<4>(s, padded, weight, bias, o, wide, out_example); break;
    case 3: conv_block<3>(s, padded, weight, bias, o, wide, out_example); break;
    case 2: conv_block<2>(s, padded, weight, bias, o, wide, out_example); break;
    case 1: conv_block<1>(s, padded, weight, bias, o, wide, out_example); break;
    default: break;
  }
}

}  // namespace

at::Tensor direct_conv2d(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                         int64_t pad_h, int64_t pad_w) {
  TORCH_CHECK(input.device().is_cpu() && input.scalar_type() == at::kFloat && input.dim() == 4,
              "direct_conv2d: input must be a 4-D float32 CPU tensor");
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == at::kFloat && weight.dim() == 4 &&
                  weight.size(1) == input.size(1),
              "direct_conv2d: weight must be float32 (outs, channels, kh, kw) matching the input's channels");
  TORCH_CHECK(pad_h >= 0 && pad_w >= 0, "direct_conv2d: padding must be non-negative");
  const at::Tensor x = input.contiguous(), w = weight.contiguous();
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == w.size(0), "direct_conv2d: bad bias");
    b = bias->contiguous();
  }
  ConvShape s;
  s.channels = x.size(1), s.height = x.size(2), s.width = x.size(3);
  s.outs = w.size(0), s.kh = w.size(2), s.kw = w.size(3), s.pad_h = pad_h, s.pad_w = pad_w;
  s.out_h = s.height + 2 * pad_h - s.kh + 1, s.out_w = s.width + 2 * pad_w - s.kw + 1;
  TORCH_CHECK(s.out_h > 0 && s.out_w > 0, "direct_conv2d: the kernel is larger than the padded input");
  s.padded_w = s.width + 2 * pad_w;
  s.positions = (s.out_h * s.padded_w + Vec::size() - 1) / Vec::size() * Vec::size();
  // the last vector of the last tap reads up to positions + (kh - 1)·padded_w + kw - 1
  s.plane = (s.height + 2 * pad_h) * s.padded_w + Vec::size() + s.kw;
  const int64_t examples = x.size(0);
  at::Tensor out = at::empty({examples, s.outs, s.out_h, s.out_w}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  const int64_t in_size = s.channels * s.height * s.width, out_size = s.outs * s.out_h * s.out_w;
  at::parallel_for(0, examples, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> padded(static_cast<size_t>(s.channels * s.plane), 0.0f);
    std::vector<float> wide(static_cast<size_t>(8 * s.positions));
    for (int64_t n = begin; n < end; ++n) {
      const float* src = xp + n * in_size;
      for (int64_t c = 0; c < s.channels; ++c)
        for (int64_t r = 0; r < s.height; ++r)
          std::copy(src + (c * s.height + r) * s.width, src + (c * s.height + r + 1) * s.width,
                    padded.data() + c * s.plane + (r + pad_h) * s.padded_w + pad_w);
      conv_example(s, padded.data(), wp, bp, wide.data(), op + n * out_size);
    }
  });
  return out;
}

// tanh of a float32 CPU tensor a vector of lanes at a time, for the compacted network's activations:
// PyTorch's own float32 tanh runs at about a seventh of its sigmoid's speed on this CPU (46 µs against
// 6.4 µs for 256 × 150 values).  SLEEF's 3.5-ulp tanh (shipped inside libtorch) where the compiler targets
// AVX-512 or AVX2: measured at 256 × 29 values, 3.0 µs against 7.8 µs for its 1-ulp tanh (at::vec's), with
// at most 2.7 ulps over [−12, 12]; at::vec's tanh elsewhere.  Returns a new contiguous tensor of x's shape.
inline void tanh_lanes(const float* src, float* dst) {
#if defined(CPU_CAPABILITY_AVX512)
  _mm512_storeu_ps(dst, Sleef_tanhf16_u35(_mm512_loadu_ps(src)));
#elif defined(CPU_CAPABILITY_AVX2)
  _mm256_storeu_ps(dst, Sleef_tanhf8_u35(_mm256_loadu_ps(src)));
#else
  Vec::loadu(src).tanh().store(dst);
#endif
}

at::Tensor tanh_f32(const at::Tensor& x_in) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && x_in.device().is_cpu(), "tanh_f32: a float32 CPU tensor");
  const auto x = x_in.contiguous();
  auto out = at::empty_like(x);
  const float* src = x.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, x.numel(), 32768, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    for (; i + Vec::size() <= end; i += Vec::size()) tanh_lanes(src + i, dst + i);
    if (i < end) {  // the tail through a whole vector of scratch
      alignas(64) float in[Vec::size()] = {}, res[Vec::size()];
      std::copy(src + i, src + end, in);
      tanh_lanes(in, res);
      std::copy(res, res + (end - i), dst + i);
    }
  });
  return out;
}

// An AlignedLinear's inference: x (…, in) times weight (width, in) padded with zero rows to a whole number of
// vectors, plus bias (width) if given, keeping the first `out_features` columns, contiguous.  The product is
// PyTorch's own (addmm, as F.linear), so the result is bit for bit that of slicing F.linear's output; the
// columns are copied here in one pass, which costs a fraction of Python's slice and .contiguous() (about
// 3 µs of a 5 µs product at 256 × 25 → 10).
at::Tensor aligned_linear_f32(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                              int64_t out_features) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu() && x.dim() >= 2,
              "aligned_linear_f32: a float32 CPU input with at least two dimensions");
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(-1) && out_features >= 0 && out_features <= weight.size(0),
              "aligned_linear_f32: weight must be (width >= out_features, in_features)");
  const auto rows2d = x.reshape({-1, x.size(-1)});
  const auto full = bias.has_value() ? at::addmm(*bias, rows2d, weight.t()) : at::mm(rows2d, weight.t());
  const int64_t rows = full.size(0), width = full.size(1);
  auto sizes = x.sizes().vec();
  sizes.back() = out_features;
  auto out = at::empty(sizes, x.options());
  const float* src = full.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) std::copy(src + r * width, src + r * width + out_features, dst + r * out_features);
  return out;
}
