// Pixel math of the gather kernel, written once for the CPU and CUDA launchers: Pillow's
// antialiased bicubic resize of 8-bit images (libImaging/Resample.c: precompute_coeffs,
// normalize_coeffs_8bpc, ImagingResample{Horizontal,Vertical}_8bpc), reproduced bit for bit.
//
// Why bit-exact rather than "a bicubic": the reference features come from PIL's
// Image.resize((S, S), BICUBIC). When PIL shrinks it widens the a = -0.5 cubic's support by the
// scale factor (antialiasing), normalises the weights of each output pixel, converts them to
// 22-bit fixed point and runs a horizontal then a vertical pass, rounding and clamping to uint8
// in between. Every step below mirrors one of those, in the same double-precision operation
// order, so the integer coefficients, and hence the uint8 results, are identical.
//
// Floating-point contraction: nvcc fuses a * b + c into an FMA by default, which would change
// the last bit of a weight now and then. The d* helpers force separately rounded operations on
// the device; host builds must not enable FMA contraction for this header's callers either (the
// default x86-64 build has no FMA instructions; do not build with -march=native -ffp-contract=fast).
#pragma once
#include <cmath>
#include <cstdint>

#include "gpfm/hd.h"

namespace gpfm::resample {

constexpr int kPrecisionBits = 32 - 8 - 2;              // Pillow's PRECISION_BITS
constexpr int32_t kHalf = 1 << (kPrecisionBits - 1);      // rounding offset every sum starts from
constexpr double kBicubicSupport = 2.0;

GPFM_HD double dadd(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}
GPFM_HD double dmul(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
GPFM_HD double ddiv(double a, double b) {
#ifdef __CUDA_ARCH__
  return __ddiv_rn(a, b);
#else
  return a / b;
#endif
}

// Pillow's bicubic_filter (a = -0.5): ((a + 2) x - (a + 3)) x^2 + 1 on [0, 1),
// ((x - 5) x + 8) x - 4) a on [1, 2).
GPFM_HD double bicubic(double x) {
  if (x < 0.0) x = -x;
  if (x < 1.0) return dadd(dmul(dmul(dadd(dmul(1.5, x), -2.5), x), x), 1.0);
  if (x < 2.0) return dmul(dadd(dmul(dadd(dmul(dadd(x, -5.0), x), 8.0), x), -4.0), -0.5);
  return 0.0;
}

// One axis of a resize from `in_size` to `out_size` pixels over the whole input (PIL's box
// (0, in_size)).
struct Axis {
  int in_size;
  int out_size;
  int ksize;           // coefficients stored per output pixel (Pillow's ksize)
  double scale;        // input pixels per output pixel
  double inv_filterscale;
  double support;      // filter half-width in input pixels
};

GPFM_HD Axis make_axis(int in_size, int out_size) {
  Axis a;
  a.in_size = in_size;
  a.out_size = out_size;
  a.scale = ddiv(static_cast<double>(static_cast<float>(in_size)), static_cast<double>(out_size));
  const double filterscale = a.scale < 1.0 ? 1.0 : a.scale;
  a.support = dmul(kBicubicSupport, filterscale);
  a.ksize = static_cast<int>(ceil(a.support)) * 2 + 1;
  a.inv_filterscale = ddiv(1.0, filterscale);
  return a;
}

// Whether PIL would skip this axis' pass (same size, whole box): the pass is then a plain copy.
GPFM_HD bool is_identity(const Axis& a) { return a.in_size == a.out_size; }

// The filter weight of input pixel `x` for an output pixel centred at `center`.
GPFM_HD double tap_weight(const Axis& a, int x, double center) {
  return bicubic(dmul(dadd(dadd(static_cast<double>(x), -center), 0.5), a.inv_filterscale));
}

// The fixed-point coefficients of output pixel `xx`: k[0..count) weigh input pixels
// [*first, *first + count); k[count..ksize) are zeroed. Returns count. Matches Pillow's
// precompute_coeffs followed by normalize_coeffs_8bpc.
GPFM_HD int axis_coeffs(const Axis& a, int xx, int32_t* k, int* first) {
  const double center = dmul(dadd(static_cast<double>(xx), 0.5), a.scale);
  int xmin = static_cast<int>(dadd(dadd(center, -a.support), 0.5));
  if (xmin < 0) xmin = 0;
  int xmax = static_cast<int>(dadd(dadd(center, a.support), 0.5));
  if (xmax > a.in_size) xmax = a.in_size;
  const int count = xmax - xmin;
  double ww = 0.0;
  for (int x = 0; x < count; ++x) ww = dadd(ww, tap_weight(a, x + xmin, center));
  for (int x = 0; x < count; ++x) {
    double w = tap_weight(a, x + xmin, center);  // recomputed: same inputs, same value
    if (ww != 0.0) w = ddiv(w, ww);
    const double fixed = dmul(w, static_cast<double>(1 << kPrecisionBits));
    k[x] = static_cast<int32_t>(w < 0 ? dadd(-0.5, fixed) : dadd(0.5, fixed));
  }
  for (int x = count; x < a.ksize; ++x) k[x] = 0;
  *first = xmin;
  return count;
}

// A finished sum (started at kHalf) back to uint8, as Pillow's clip8.
GPFM_HD uint8_t clip8(int32_t acc) {
  const int32_t v = acc >> kPrecisionBits;
  return static_cast<uint8_t>(v < 0 ? 0 : (v > 255 ? 255 : v));
}

// One output value of either pass: taps k[0..count) over samples at src[0], src[stride], ...
GPFM_HD uint8_t convolve(const int32_t* k, int count, const uint8_t* src, int64_t stride) {
  int32_t acc = kHalf;
  for (int t = 0; t < count; ++t) acc += k[t] * static_cast<int32_t>(src[t * stride]);
  return clip8(acc);
}

// The per-patch background test: a resampled pixel is background when all three channels are
// at least `white_level` (near-white glass).
GPFM_HD bool is_background(uint8_t r, uint8_t g, uint8_t b, uint8_t white_level) {
  return r >= white_level && g >= white_level && b >= white_level;
}

}  // namespace gpfm::resample
