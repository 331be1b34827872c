// CPU launchers of the tissue-mask steps: threads over rows (gpfm::parallel_for), the per-row and
// per-pixel work in gpfm/tissue.h. Called with the GIL released.
#include <algorithm>
#include <cstring>
#include <vector>

#include "gpfm/launchers.h"
#include "gpfm/parallel.h"
#include "gpfm/tissue.h"

namespace gpfm {
namespace {
using namespace tissue;

// Rows per task: about 64 KiB of pixels, so small thumbnails do not pay for threads.
int64_t row_grain(int64_t w) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(w, 1)); }

template <class Fn>
void for_rows(int64_t h, int64_t w, Fn&& fn) {
  parallel_for(h, row_grain(w), [&](int64_t b, int64_t e) {
    for (int64_t y = b; y < e; ++y) fn(static_cast<int>(y));
  });
}

void binarize_cpu(const uint8_t* src, uint8_t* dst, int64_t h, int64_t w, int level) {
  for_rows(h, w, [&](int y) {
    for (int64_t x = 0; x < w; ++x) dst[y * w + x] = binarize(src[y * w + x], level);
  });
}

// One dilation or erosion through per-row prefix counts.
void morph_once(const uint8_t* src, uint8_t* dst, int64_t h, int64_t w, int k, bool erode) {
  const int r = k / 2;
  std::vector<int> halfw(k);
  for (int dy = -r; dy <= r; ++dy) halfw[dy + r] = ellipse_halfwidth(k, dy);
  const int64_t pstride = w + 1;
  std::vector<int32_t> prefix(h * pstride);
  for_rows(h, w, [&](int y) { row_prefix(src + y * w, static_cast<int>(w), prefix.data() + y * pstride); });
  for_rows(h, w, [&](int y) {
    for (int x = 0; x < w; ++x)
      dst[y * w + x] = morph_pixel(prefix.data(), pstride, static_cast<int>(h), static_cast<int>(w), x, y,
                                   halfw.data(), r, erode);
  });
}

// Flips the components of `color` that `flips` selects (see gpfm/tissue.h), writing 0/1 to dst.
void component_pass(const uint8_t* src, uint8_t* dst, int64_t h, int64_t w, uint8_t color, bool conn8,
                    int64_t min_area) {
  if (min_area <= 0) {  // nothing can flip: skip the labelling
    for_rows(h, w, [&](int y) {
      for (int64_t x = 0; x < w; ++x) dst[y * w + x] = src[y * w + x] != 0;
    });
    return;
  }
  const int hi = static_cast<int>(h), wi = static_cast<int>(w);
  std::vector<int32_t> row_begin(h + 1, 0);
  for_rows(h, w, [&](int y) { row_begin[y + 1] = count_runs(src + y * w, wi, color); });
  for (int64_t y = 0; y < h; ++y) row_begin[y + 1] += row_begin[y];
  const int32_t total = row_begin[h];
  std::vector<int32_t> start(total), end(total), parent(total), label(total), area(total, 0), border(total, 0);
  for_rows(h, w, [&](int y) {
    fill_runs(src + y * w, wi, color, start.data() + row_begin[y], end.data() + row_begin[y]);
    for (int32_t i = row_begin[y]; i < row_begin[y + 1]; ++i) parent[i] = i;
  });
  for_rows(h, w, [&](int y) {
    if (y > 0)
      merge_rows(start.data(), end.data(), row_begin[y], row_begin[y + 1], row_begin[y - 1], row_begin[y], conn8,
                 parent.data());
  });
  for_rows(h, w, [&](int y) {
    for (int32_t i = row_begin[y]; i < row_begin[y + 1]; ++i)
      accumulate_run(parent.data(), start.data(), end.data(), i, y, hi, wi, label.data(), area.data(), border.data());
  });
  for_rows(h, w, [&](int y) {
    paint_row(src + y * w, dst + y * w, wi, color, start.data(), end.data(), label.data(), area.data(), border.data(),
              row_begin[y], row_begin[y + 1], min_area);
  });
}

}  // namespace

void tissue_score_cpu(const TissueImage& src, uint8_t* dst, int dark_threshold) {
  const int channels = static_cast<int>(src.channels);
  for_rows(src.h, src.w, [&](int y) {
    const uint8_t* row = src.data + y * src.sy;
    uint8_t* out = dst + y * src.w;
    for (int64_t x = 0; x < src.w; ++x) out[x] = score_pixel(row + x * src.sx, channels, dark_threshold);
  });
}

void median_blur_cpu(const uint8_t* src, uint8_t* dst, int64_t h, int64_t w, int k) {
  if (k <= 1) {
    std::memcpy(dst, src, static_cast<size_t>(h * w));
    return;
  }
  parallel_for(h, std::max<int64_t>(1, row_grain(w) / k), [&](int64_t b, int64_t e) {
    int hist[256];
    for (int64_t y = b; y < e; ++y)
      median_row(src, w, static_cast<int>(h), static_cast<int>(w), k, static_cast<int>(y), dst + y * w, hist);
  });
}

void histogram256_cpu(const uint8_t* src, int64_t n, int64_t* hist) {
  std::fill(hist, hist + 256, 0);
  parallel_for(n, 1 << 18, [&](int64_t b, int64_t e) {
    int64_t local[256] = {0};
    for (int64_t i = b; i < e; ++i) ++local[src[i]];
    for (int i = 0; i < 256; ++i)
      if (local[i]) __atomic_fetch_add(hist + i, local[i], __ATOMIC_RELAXED);
  });
}

void morphology_cpu(const uint8_t* src, uint8_t* dst, int64_t h, int64_t w, MorphOp op, int k) {
  if (op == MorphOp::Dilate || op == MorphOp::Erode) return morph_once(src, dst, h, w, k, op == MorphOp::Erode);
  std::vector<uint8_t> mid(h * w);
  const bool close = op == MorphOp::Close;
  morph_once(src, mid.data(), h, w, k, !close);
  morph_once(mid.data(), dst, h, w, k, close);
}

void filter_components_cpu(const uint8_t* src, uint8_t* dst, int64_t h, int64_t w, int64_t min_tissue_px,
                           int64_t min_hole_px) {
  std::vector<uint8_t> mid(h * w);
  component_pass(src, mid.data(), h, w, 1, true, min_tissue_px);
  component_pass(mid.data(), dst, h, w, 0, false, min_hole_px);
}

void integral_image_cpu(const uint8_t* mask, int32_t* sat, int64_t h, int64_t w) {
  const int64_t stride = w + 1;
  std::fill(sat, sat + stride, 0);
  for_rows(h, w, [&](int y) { row_prefix(mask + y * w, static_cast<int>(w), sat + (y + 1) * stride); });
  const int64_t chunk = 1024;
  parallel_for((stride + chunk - 1) / chunk, 1, [&](int64_t b, int64_t e) {
    accumulate_columns(sat, stride, static_cast<int>(h), static_cast<int>(b * chunk),
                       static_cast<int>(std::min(stride, e * chunk)));
  });
}

int segment_tissue_cpu(const TissueImage& src, const MaskParams& p, uint8_t* mask, int32_t* sat) {
  const int64_t h = src.h, w = src.w;
  std::vector<uint8_t> a(h * w), b(h * w);
  tissue_score_cpu(src, a.data(), p.dark_threshold);
  median_blur_cpu(a.data(), b.data(), h, w, p.median_k);
  int otsu = 0;
  if (p.fixed_threshold < 0) {
    int64_t hist[256];
    histogram256_cpu(b.data(), h * w, hist);
    otsu = otsu_threshold(hist);
  }
  const int level = choose_threshold(otsu, p.fixed_threshold, p.min_threshold);
  binarize_cpu(b.data(), a.data(), h, w, level);
  if (p.close_k > 1) {
    morphology_cpu(a.data(), b.data(), h, w, MorphOp::Close, p.close_k);
    std::swap(a, b);
  }
  if (p.open_k > 1) {
    morphology_cpu(a.data(), b.data(), h, w, MorphOp::Open, p.open_k);
    std::swap(a, b);
  }
  filter_components_cpu(a.data(), mask, h, w, p.min_tissue_px, p.min_hole_px);
  integral_image_cpu(mask, sat, h, w);
  return level;
}

}  // namespace gpfm
