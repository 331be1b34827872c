// Pixel math for "uint8 RGB -> normalized float": out = (v / 255 - mean) / std, folded into one
// multiply-add per channel. Shared by every kernel that writes model input.
#pragma once
#include <cstdint>

#include "gpfm/hd.h"

namespace gpfm {

struct Normalize {
  float scale[3];
  float bias[3];
};

inline Normalize make_normalize(const float mean[3], const float std[3]) {
  Normalize n{};
  for (int c = 0; c < 3; ++c) {
    n.scale[c] = 1.0f / (255.0f * std[c]);
    n.bias[c] = -mean[c] / std[c];
  }
  return n;
}

// `v` is a channel value on the 0..255 scale (integer for plain copies, fractional after
// resampling).
GPFM_HD float normalize_value(const Normalize& n, int c, float v) { return v * n.scale[c] + n.bias[c]; }

}  // namespace gpfm
