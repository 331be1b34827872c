// Tissue-mask pixel math, written once for the CPU launchers (csrc/cpu/tissue.cpp) and the CUDA
// launchers (csrc/cuda/tissue.cu). Each function is one pixel's or one row's share of a step; the
// launchers only decide which thread runs which row, so both devices compute the same bytes.
//
// Steps (all on a thumbnail of a few megapixels at most, indices fit in int32):
//   score      RGB(A) -> OpenCV's 8-bit HSV saturation, 0 where the pixel is dark (pen, borders)
//   median     exact k x k median, borders replicated (cv::medianBlur)
//   threshold  Otsu from a 256-bin histogram, OpenCV's double arithmetic (cv::THRESH_OTSU)
//   morphology binary dilate/erode with cv::getStructuringElement(MORPH_ELLIPSE), outside ignored
//   components run-length union-find: drop small tissue (8-connected), fill small holes
//              (4-connected background not touching the border)
//   integral   summed-area table of the 0/1 mask
#pragma once
#include <cfloat>
#include <cmath>
#include <cstdint>

#include "gpfm/hd.h"

namespace gpfm::tissue {

GPFM_HD int imin(int a, int b) { return a < b ? a : b; }
GPFM_HD int imax(int a, int b) { return a > b ? a : b; }
GPFM_HD int clampi(int v, int lo, int hi) { return v < lo ? lo : (v > hi ? hi : v); }

// ---- atomics: device atomics on the GPU, GCC builtins on the CPU threads ------------------------

GPFM_HD int32_t atomic_min_i32(int32_t* p, int32_t v) {
#if defined(__CUDA_ARCH__)
  return atomicMin(reinterpret_cast<int*>(p), v);
#else
  int32_t old = __atomic_load_n(p, __ATOMIC_RELAXED);
  while (v < old && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return old;
#endif
}

GPFM_HD void atomic_add_i32(int32_t* p, int32_t v) {
#if defined(__CUDA_ARCH__)
  atomicAdd(reinterpret_cast<int*>(p), v);
#else
  __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
#endif
}

GPFM_HD void atomic_or_i32(int32_t* p, int32_t v) {
#if defined(__CUDA_ARCH__)
  atomicOr(reinterpret_cast<int*>(p), v);
#else
  __atomic_fetch_or(p, v, __ATOMIC_RELAXED);
#endif
}

// Unfused double arithmetic: nvcc would otherwise contract a*b+c into an FMA on the device and the
// Otsu threshold could differ from the host's (and OpenCV's) by one level on near-ties. The host
// build targets baseline x86-64, which has no FMA to contract into.
GPFM_HD double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
GPFM_HD double add_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}
GPFM_HD double sub_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dsub_rn(a, b);
#else
  return a - b;
#endif
}
GPFM_HD double div_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __ddiv_rn(a, b);
#else
  return a / b;
#endif
}

// ---- score -------------------------------------------------------------------------------------

// Straight (non-premultiplied) alpha composited onto white, as a slide viewer shows empty areas.
GPFM_HD int over_white(int c, int a) { return (c * a + 255 * (255 - a) + 127) / 255; }

// cv::cvtColor(RGB2HSV) saturation for 8-bit input, bit for bit: OpenCV divides by V through a
// 12-bit fixed-point table round(255 * 2^12 / V) (which never ties for V <= 255).
GPFM_HD int saturation_u8(int r, int g, int b) {
  const int v = imax(r, imax(g, b));
  if (v == 0) return 0;
  const int m = imin(r, imin(g, b));
  const int sdiv = (2 * (255 << 12) + v) / (2 * v);
  return ((v - m) * sdiv + (1 << 11)) >> 12;
}

// Saturation, forced to 0 where the brightest channel is below `dark_threshold`: black borders,
// dark pen and scanner debris are saturated but never tissue on a brightfield slide.
GPFM_HD uint8_t tissue_score(int r, int g, int b, int dark_threshold) {
  if (imax(r, imax(g, b)) < dark_threshold) return 0;
  return static_cast<uint8_t>(saturation_u8(r, g, b));
}

// One pixel of an RGB (channels == 3) or RGBA (channels == 4) image; channels are packed.
GPFM_HD uint8_t score_pixel(const uint8_t* px, int channels, int dark_threshold) {
  int r = px[0], g = px[1], b = px[2];
  if (channels == 4) {
    const int a = px[3];
    r = over_white(r, a);
    g = over_white(g, a);
    b = over_white(b, a);
  }
  return tissue_score(r, g, b, dark_threshold);
}

// ---- median ------------------------------------------------------------------------------------

// Moves the window's column x (rows y-r..y+r, replicated) into (delta=+1) or out of (-1) the
// histogram, keeping `below` = number of window values smaller than the running median `m`.
GPFM_HD void median_column(const uint8_t* src, int64_t stride, int h, int y, int r, int x, int delta, int m, int* hist,
                           int* below) {
  for (int dy = -r; dy <= r; ++dy) {
    const int v = src[static_cast<int64_t>(clampi(y + dy, 0, h - 1)) * stride + x];
    hist[v] += delta;
    if (v < m) *below += delta;
  }
}

// Exact median of every k x k window (k odd) centred on row y, borders replicated, written to
// out[0..w). Huang's sliding histogram: O(k) per pixel. `hist` is 256 ints of the caller's scratch.
GPFM_HD void median_row(const uint8_t* src, int64_t stride, int h, int w, int k, int y, uint8_t* out, int* hist) {
  const int r = k / 2, half = (k * k) / 2;
  for (int i = 0; i < 256; ++i) hist[i] = 0;
  int m = 0, below = 0;
  for (int dx = -r; dx <= r; ++dx) median_column(src, stride, h, y, r, clampi(dx, 0, w - 1), +1, m, hist, &below);
  for (int x = 0; x < w; ++x) {
    if (x > 0) {
      const int gone = clampi(x - r - 1, 0, w - 1), come = clampi(x + r, 0, w - 1);
      if (gone != come) {
        median_column(src, stride, h, y, r, gone, -1, m, hist, &below);
        median_column(src, stride, h, y, r, come, +1, m, hist, &below);
      }
    }
    while (below > half) below -= hist[--m];
    while (below + hist[m] <= half) below += hist[m++];
    out[x] = static_cast<uint8_t>(m);
  }
}

// ---- threshold ---------------------------------------------------------------------------------

// Otsu's threshold of a 256-bin histogram with cv::threshold(THRESH_OTSU)'s exact sequence of
// double operations, so the level is identical to OpenCV's (pixels > level are foreground).
// An empty or single-valued histogram gives 0, as in OpenCV.
GPFM_HD int otsu_threshold(const int64_t* hist) {
  int64_t total = 0;
  for (int i = 0; i < 256; ++i) total += hist[i];
  if (total == 0) return 0;
  const double scale = div_rn(1.0, static_cast<double>(total));
  double mu = 0.0;
  for (int i = 0; i < 256; ++i) mu = add_rn(mu, mul_rn(static_cast<double>(i), static_cast<double>(hist[i])));
  mu = mul_rn(mu, scale);
  const double eps = static_cast<double>(FLT_EPSILON);
  double mu1 = 0.0, q1 = 0.0, max_sigma = 0.0;
  int level = 0;
  for (int i = 0; i < 256; ++i) {
    const double p_i = mul_rn(static_cast<double>(hist[i]), scale);
    mu1 = mul_rn(mu1, q1);
    q1 = add_rn(q1, p_i);
    const double q2 = sub_rn(1.0, q1);
    const double qmin = q1 < q2 ? q1 : q2, qmax = q1 < q2 ? q2 : q1;
    if (qmin < eps || qmax > sub_rn(1.0, eps)) continue;
    mu1 = div_rn(add_rn(mu1, mul_rn(static_cast<double>(i), p_i)), q1);
    const double mu2 = div_rn(sub_rn(mu, mul_rn(q1, mu1)), q2);
    const double d = sub_rn(mu1, mu2);
    const double sigma = mul_rn(mul_rn(mul_rn(q1, q2), d), d);
    if (sigma > max_sigma) {
      max_sigma = sigma;
      level = i;
    }
  }
  return level;
}

// The level the mask uses: a fixed one when given (>= 0), else Otsu's raised to `min_threshold`,
// so a slide of bare glass (whose Otsu level splits noise) yields no tissue.
GPFM_HD int choose_threshold(int otsu, int fixed_threshold, int min_threshold) {
  return fixed_threshold >= 0 ? fixed_threshold : imax(otsu, min_threshold);
}

GPFM_HD uint8_t binarize(uint8_t v, int level) { return v > level ? 1 : 0; }

// ---- morphology --------------------------------------------------------------------------------

// Half-width of row dy (-k/2..k/2) of cv::getStructuringElement(MORPH_ELLIPSE, {k, k}) for odd k,
// with OpenCV's arithmetic (sqrt, then round half to even).
GPFM_HD int ellipse_halfwidth(int k, int dy) {
  const int r = k / 2;
  if (r == 0) return 0;
  const double inv_r2 = 1.0 / (static_cast<double>(r) * r);
  return static_cast<int>(rint(r * sqrt((r * r - dy * dy) * inv_r2)));
}

// prefix[0..w] = running count of nonzero pixels of one row.
GPFM_HD void row_prefix(const uint8_t* row, int w, int32_t* prefix) {
  int32_t s = 0;
  prefix[0] = 0;
  for (int x = 0; x < w; ++x) {
    s += row[x] != 0;
    prefix[x + 1] = s;
  }
}

// Binary dilation (erode = false) or erosion of pixel (x, y) with the elliptical element whose row
// half-widths are halfw[0..2r]. Pixels outside the image are ignored (OpenCV's default border for
// morphology), so the image edge neither grows nor erodes the mask.
GPFM_HD uint8_t morph_pixel(const int32_t* prefix, int64_t pstride, int h, int w, int x, int y, const int* halfw,
                            int r, bool erode) {
  for (int dy = -r; dy <= r; ++dy) {
    const int yy = y + dy;
    if (yy < 0 || yy >= h) continue;
    const int d = halfw[dy + r];
    const int lo = imax(x - d, 0), hi = imin(x + d, w - 1);
    const int32_t* p = prefix + yy * pstride;
    const int32_t count = p[hi + 1] - p[lo];
    if (erode ? count != hi - lo + 1 : count > 0) return erode ? 0 : 1;
  }
  return erode ? 1 : 0;
}

// ---- connected components (run-length union-find) ---------------------------------------------
// A run is a maximal horizontal stretch of one colour, [start, end). Runs of a row are stored
// contiguously after the runs of the rows above; row_begin[y]..row_begin[y+1] index them.
// parent[] is a union-find forest whose roots are each component's smallest run index, so the
// labels do not depend on the order in which threads merge rows.

GPFM_HD bool is_color(uint8_t v, uint8_t color) { return (v != 0) == (color != 0); }

GPFM_HD int count_runs(const uint8_t* row, int w, uint8_t color) {
  int n = 0;
  for (int x = 0; x < w; ++x)
    if (is_color(row[x], color) && (x == 0 || !is_color(row[x - 1], color))) ++n;
  return n;
}

GPFM_HD void fill_runs(const uint8_t* row, int w, uint8_t color, int32_t* start, int32_t* end) {
  int n = 0;
  for (int x = 0; x < w; ++x) {
    if (!is_color(row[x], color)) continue;
    if (x == 0 || !is_color(row[x - 1], color)) start[n] = x;
    if (x == w - 1 || !is_color(row[x + 1], color)) end[n++] = x + 1;
  }
}

// Other threads may link a root while we walk; a stale read still names an ancestor, and
// uf_union's atomic min notices a root that stopped being one.
GPFM_HD int32_t uf_find(const int32_t* parent, int32_t i) {
  while (true) {
#if defined(__CUDA_ARCH__)
    const int32_t p = parent[i];
#else
    const int32_t p = __atomic_load_n(parent + i, __ATOMIC_RELAXED);
#endif
    if (p == i) return i;
    i = p;
  }
}

// Lock-free union (Playne & Hawick 2018): the larger root is linked under the smaller with an
// atomic min, retrying when another thread relinked it first.
GPFM_HD void uf_union(int32_t* parent, int32_t a, int32_t b) {
  while (true) {
    a = uf_find(parent, a);
    b = uf_find(parent, b);
    if (a == b) return;
    if (a > b) {
      const int32_t t = a;
      a = b;
      b = t;
    }
    if (atomic_min_i32(&parent[b], a) == b) return;
  }
}

// Unions the runs of row y ([a0, a1)) with those of row y - 1 ([b0, b1)) that touch them:
// sharing a column (4-connectivity) or also diagonally (8-connectivity).
GPFM_HD void merge_rows(const int32_t* start, const int32_t* end, int32_t a0, int32_t a1, int32_t b0, int32_t b1,
                        bool conn8, int32_t* parent) {
  const int32_t slack = conn8 ? 1 : 0;
  while (a0 < a1 && b0 < b1) {
    if (start[b0] < end[a0] + slack && start[a0] < end[b0] + slack) uf_union(parent, a0, b0);
    if (end[a0] <= end[b0]) ++a0;
    else ++b0;
  }
}

// Adds run i of row y to its component's area and border flag (label[i] = its root).
GPFM_HD void accumulate_run(const int32_t* parent, const int32_t* start, const int32_t* end, int32_t i, int y, int h,
                            int w, int32_t* label, int32_t* area, int32_t* border) {
  const int32_t root = uf_find(parent, i);
  label[i] = root;
  atomic_add_i32(&area[root], end[i] - start[i]);
  if (y == 0 || y == h - 1 || start[i] == 0 || end[i] == w) atomic_or_i32(&border[root], 1);
}

// Whether a component of `color` changes colour: tissue (1) smaller than min_area disappears;
// background (0) smaller than min_area that does not reach the image border (a hole) is filled.
GPFM_HD bool flips(uint8_t color, int32_t area, int32_t border, int64_t min_area) {
  return area < min_area && (color != 0 || border == 0);
}

// Writes row y of dst: src's row as 0/1, with the runs of components that flip set to !color.
GPFM_HD void paint_row(const uint8_t* src, uint8_t* dst, int w, uint8_t color, const int32_t* start,
                       const int32_t* end, const int32_t* label, const int32_t* area, const int32_t* border,
                       int32_t r0, int32_t r1, int64_t min_area) {
  for (int x = 0; x < w; ++x) dst[x] = src[x] != 0;
  for (int32_t i = r0; i < r1; ++i) {
    const int32_t root = label[i];
    if (!flips(color, area[root], border[root], min_area)) continue;
    for (int x = start[i]; x < end[i]; ++x) dst[x] = color ? 0 : 1;
  }
}

// ---- summed-area table -------------------------------------------------------------------------
// sat is (h + 1) x (w + 1), row stride `stride`: sat[y][x] = number of mask pixels above and left
// of (x, y). Built as row prefixes (row y + 1 from mask row y), then accumulated down columns.

GPFM_HD void accumulate_columns(int32_t* sat, int64_t stride, int h, int x0, int x1) {
  for (int y = 1; y <= h; ++y) {
    int32_t* row = sat + y * stride;
    const int32_t* above = row - stride;
    for (int x = x0; x < x1; ++x) row[x] += above[x];
  }
}

}  // namespace gpfm::tissue
