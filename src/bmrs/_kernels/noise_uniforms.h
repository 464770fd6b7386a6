// The noise layers' counter-based uniforms (bmrs/nn/uniforms.py's stream): keys, rows and column hashes.
// Part of noise_kernels.cpp, which includes it once, after its own includes (one translation unit).
#pragma once

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
