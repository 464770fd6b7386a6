// Counter-based uniforms for the noise layers (the same stream as bmrs/nn/uniforms.py, bit for bit):
// u[r, c] is a hash of (key, row r, column code c), so that a sample needs no generator state and
// can be formed in the lane that uses it.  The mixer is Wellons's "lowbias32" integer hash
// (two multiplies, three xor-shifts).
//   row hash a_r = mix(mix(r ^ k0) ^ k1),  column hash b_c = mix(mix(c ^ k2) ^ k3)
//   float32: u = ((mix(a_r ^ b_c) >> 8) | 1) · 2⁻²⁴                    (odd multiples of 2⁻²⁴)
//   float64: u = ((mix(a_r ^ b_c) << 20) | (mix(mix(a_r + k2) ^ mix(b_c + k0)) >> 12) | 1) · 2⁻⁵²
// Both lie strictly inside (0, 1) and are exact in their type.
#pragma once

#include <cstdint>

#include "bmrs_constants.h"

namespace bmrs_counter {

// one uint32_t, or a vector of them in the compiler's vector extensions (the fused sampler's lanes)
template <typename U>
inline U mix(U x) {
  x ^= x >> 16;
  x *= kMixMultiplier0;
  x ^= x >> 15;
  x *= kMixMultiplier1;
  x ^= x >> 16;
  return x;
}

struct Key {
  uint32_t k[4];
  uint32_t row(int64_t r) const { return mix(mix(uint32_t(r) ^ k[0]) ^ k[1]); }
  uint32_t column(int64_t c) const { return mix(mix(uint32_t(c) ^ k[2]) ^ k[3]); }
  // the float64 stream's second word, from the row and column hashes
  uint32_t row_low(uint32_t row_hash) const { return mix(row_hash + k[2]); }
  uint32_t column_low(uint32_t column_hash) const { return mix(column_hash + k[0]); }
};

inline float unit_f32(uint32_t row_hash, uint32_t column_hash) {
  return float(int32_t((mix(row_hash ^ column_hash) >> 8) | 1U)) * 0x1p-24f;
}

inline double unit_f64(uint32_t row_hash, uint32_t column_hash, uint32_t row_low, uint32_t column_low) {
  const uint64_t high = mix(row_hash ^ column_hash), low = mix(row_low ^ column_low);
  return double(int64_t((high << 20) | (low >> 12) | 1U)) * 0x1p-52;
}

}  // namespace bmrs_counter
