// Output element types of the kernels and their conversions from float, written once for host and
// device. Half and bfloat16 are stored as raw 16-bit patterns so the CPU build needs no compiler
// support for them and both paths round identically (round to nearest, ties to even).
#pragma once
#include <cstdint>
#include <cstring>

#include "gpfm/hd.h"

namespace gpfm {

enum class OutDType : int { F32 = 0, F16 = 1, BF16 = 2 };

GPFM_HD uint32_t float_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  return u;
}

GPFM_HD uint16_t float_to_bf16_bits(float f) {
  uint32_t u = float_bits(f);
  if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu)) return 0x7fc0;  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

GPFM_HD uint16_t float_to_half_bits(float f) {
  const uint32_t u = float_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t abs = u & 0x7fffffffu;
  if (abs >= 0x7f800000u) return static_cast<uint16_t>(sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u : 0u));
  if (abs >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (abs < 0x38800000u) {  // result is subnormal (or zero) in half precision
    if (abs < 0x33000000u) return static_cast<uint16_t>(sign);  // below half of the smallest subnormal
    const uint32_t mant = (abs & 0x007fffffu) | 0x00800000u;
    const int shift = 126 - static_cast<int>(abs >> 23);  // 14..24
    uint32_t half = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1u);
    const uint32_t mid = 1u << (shift - 1);
    if (rem > mid || (rem == mid && (half & 1u))) ++half;
    return static_cast<uint16_t>(sign | half);
  }
  uint32_t h = ((abs - 0x38000000u) >> 13);
  const uint32_t rem = abs & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return static_cast<uint16_t>(sign | h);
}

template <OutDType D>
struct OutStore;

template <>
struct OutStore<OutDType::F32> {
  using type = float;
  GPFM_HD static void store(float* p, float v) { *p = v; }
};
template <>
struct OutStore<OutDType::F16> {
  using type = uint16_t;
  GPFM_HD static void store(uint16_t* p, float v) { *p = float_to_half_bits(v); }
};
template <>
struct OutStore<OutDType::BF16> {
  using type = uint16_t;
  GPFM_HD static void store(uint16_t* p, float v) { *p = float_to_bf16_bits(v); }
};

inline int out_dtype_size(OutDType d) { return d == OutDType::F32 ? 4 : 2; }

}  // namespace gpfm
