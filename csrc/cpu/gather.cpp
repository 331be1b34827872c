// CPU launcher of the gather kernel: decoded stored tiles -> PIL-exact bicubic resize ->
// normalized NCHW model input, one patch per task on the parallel_for threads.
//
// Layout choices, for speed without leaving integer arithmetic (integer sums are exact in any
// order, so vectorising cannot change a single output value):
// - Pillow's horizontal pass sums neighbouring pixels of one row, which vectorises badly on
//   interleaved RGB. We gather the source square kRows rows at a time transposed (column-major,
//   the kRows * 3 values of one column side by side), so the horizontal pass becomes a sum of
//   whole kLanes-wide vectors with one broadcast coefficient each.
// - Its uint8 result goes to channel planes [3][rows][out], so the vertical pass is again a sum of
//   contiguous rows, and its result is one NCHW output row per channel.
// The two hot loops exist as portable C++ and as AVX2 intrinsics, picked once at run time.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <vector>
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define GPFM_X86 1
#include <immintrin.h>
#else
#define GPFM_X86 0
#endif

#include "gpfm/launchers.h"
#include "gpfm/parallel.h"
#include "gpfm/resample.h"

namespace gpfm {
namespace {

namespace rs = resample;

constexpr int kRows = 16;           // source rows per horizontal block
constexpr int kLanes = kRows * 3;  // values per transposed source column
constexpr int kStride = 64;        // bytes per transposed column: kLanes plus slack for 4-byte moves
constexpr uint8_t kWhite = 255;

// Fixed-point coefficients of one axis for every output pixel.
struct AxisTable {
  rs::Axis axis{};
  std::vector<int32_t> k;  // [out_size, ksize]
  std::vector<int> first, count;

  AxisTable(int in_size, int out_size) : axis(rs::make_axis(in_size, out_size)) {
    k.resize(static_cast<size_t>(out_size) * axis.ksize);
    first.resize(out_size);
    count.resize(out_size);
    for (int i = 0; i < out_size; ++i)
      count[i] = rs::axis_coeffs(axis, i, &k[static_cast<size_t>(i) * axis.ksize], &first[i]);
  }
  const int32_t* taps(int i) const { return &k[static_cast<size_t>(i) * axis.ksize]; }
  int rows_begin() const { return first.front(); }
  int rows_end() const { return first.back() + count.back(); }
};

// Reads rows of one patch's source rectangle out of the tiles, white where there are no pixels.
class PatchSource {
 public:
  PatchSource(const TileRefs& tiles, const GatherPatches& patches, int64_t i, int width)
      : t_(tiles), lut_(patches.lut + i * patches.rows * patches.cols), cols_(patches.cols),
        x0_(patches.rects[i * 4 + 0]), y0_(patches.rects[i * 4 + 1]),
        x_end_(std::min<int64_t>(patches.rects[i * 4 + 2], patches.cols * tiles.w)),
        y_end_(std::min<int64_t>(patches.rects[i * 4 + 3], patches.rows * tiles.h)), width_(width) {}

  // dst[0 .. width*3) = source row y (packed RGB).
  void row(int y, uint8_t* dst) const {
    const int64_t v = y0_ + y;
    if (v < 0 || v >= y_end_) {
      memset(dst, kWhite, static_cast<size_t>(width_) * 3);
      return;
    }
    const int64_t r = v / t_.h, off_y = v % t_.h;
    int64_t u = x0_;
    const int64_t u_end = x0_ + width_;
    while (u < u_end) {
      uint8_t* out = dst + (u - x0_) * 3;
      if (u < 0 || u >= x_end_) {  // left of the frame, or beyond the level's right edge
        const int64_t stop = u < 0 ? std::min<int64_t>(0, u_end) : u_end;
        memset(out, kWhite, static_cast<size_t>(stop - u) * 3);
        u = stop;
        continue;
      }
      const int64_t c = u / t_.w;
      const int64_t stop = std::min({(c + 1) * t_.w, u_end, x_end_});
      const int32_t idx = lut_[r * cols_ + c];
      if (idx < 0 || idx >= t_.n) {
        memset(out, kWhite, static_cast<size_t>(stop - u) * 3);
      } else {
        const uint8_t* src = t_.ptrs[idx] + off_y * t_.sy + (u - c * t_.w) * t_.sx;
        if (t_.sx == 3) {
          memcpy(out, src, static_cast<size_t>(stop - u) * 3);
        } else {
          for (int64_t p = 0; p < stop - u; ++p) memcpy(out + p * 3, src + p * t_.sx, 3);
        }
      }
      u = stop;
    }
  }

 private:
  const TileRefs& t_;
  const int32_t* lut_;
  int64_t cols_;
  int64_t x0_, y0_, x_end_, y_end_;
  int width_;
};

// src_t[x * kStride + r * 3 + c] = rows[r * row_stride + x * 3 + c] for the kRows rows. Moves
// 4 bytes per pixel: the extra byte lands on the next lane, which the next row (or for the last
// row the slack past kLanes) overwrites, so rows needs one readable byte past each row's end.
void transpose_rows(const uint8_t* rows, int64_t row_stride, int width, uint8_t* src_t) {
  for (int x = 0; x < width; ++x) {
    const uint8_t* p = rows + x * 3;
    uint8_t* rec = src_t + static_cast<int64_t>(x) * kStride;
    for (int r = 0; r < kRows; ++r) memcpy(rec + r * 3, p + r * row_stride, 4);
  }
}

// ---- the two hot loops: portable C++ (auto-vectorised for the baseline ISA) and AVX2 ------------

// Horizontal pass over one block: src_t is [in_size][kStride] (kRows source rows transposed, lane
// r * 3 + c = row r, channel c); out_t receives [out_size][kStride] in the same lane order.
void horizontal_block_portable(const uint8_t* src_t, const AxisTable& tab, uint8_t* out_t) {
  for (int xx = 0; xx < tab.axis.out_size; ++xx) {
    const int32_t* k = tab.taps(xx);
    const uint8_t* s = src_t + static_cast<int64_t>(tab.first[xx]) * kStride;
    int32_t acc[kLanes];
    for (int j = 0; j < kLanes; ++j) acc[j] = rs::kHalf;
    for (int t = 0; t < tab.count[xx]; ++t, s += kStride)
      for (int j = 0; j < kLanes; ++j) acc[j] += k[t] * static_cast<int32_t>(s[j]);
    for (int j = 0; j < kLanes; ++j) out_t[static_cast<int64_t>(xx) * kStride + j] = rs::clip8(acc[j]);
  }
}

// Vertical pass for one output row of one channel plane: taps k[0..count) over plane rows
// src, src + stride, ...; writes width uint8 values.
void vertical_row_portable(const uint8_t* src, int64_t stride, const int32_t* k, int count, int width, uint8_t* out) {
  constexpr int kChunk = 32;
  int x = 0;
  for (; x + kChunk <= width; x += kChunk) {
    int32_t acc[kChunk];
    for (int j = 0; j < kChunk; ++j) acc[j] = rs::kHalf;
    const uint8_t* s = src + x;
    for (int t = 0; t < count; ++t, s += stride)
      for (int j = 0; j < kChunk; ++j) acc[j] += k[t] * static_cast<int32_t>(s[j]);
    for (int j = 0; j < kChunk; ++j) out[x + j] = rs::clip8(acc[j]);
  }
  for (; x < width; ++x) out[x] = rs::convolve(k, count, src + x, stride);
}

#if GPFM_X86
#define GPFM_AVX2 __attribute__((target("avx2")))

// acc += k * (8 uint8 at p widened to int32)
GPFM_AVX2 inline __m256i mac8(__m256i acc, __m256i k, const uint8_t* p) {
  const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  return _mm256_add_epi32(acc, _mm256_mullo_epi32(k, v));
}

// rs::clip8 of 16 sums (lo = lanes 0-7, hi = 8-15) stored as 16 bytes: shift, then the saturating
// packs clamp exactly as clip8 does (the shifted sums lie well inside int16).
GPFM_AVX2 inline void clip8_store16(__m256i lo, __m256i hi, uint8_t* p) {
  const __m256i w =
      _mm256_packs_epi32(_mm256_srai_epi32(lo, rs::kPrecisionBits), _mm256_srai_epi32(hi, rs::kPrecisionBits));
  const __m256i ordered = _mm256_permute4x64_epi64(w, 0xD8);  // undo packs' per-128-bit interleave
  const __m128i b = _mm_packus_epi16(_mm256_castsi256_si128(ordered), _mm256_extracti128_si256(ordered, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), b);
}

GPFM_AVX2 void horizontal_block_avx2(const uint8_t* src_t, const AxisTable& tab, uint8_t* out_t) {
  static_assert(kLanes == 48, "six 8-lane accumulators");
  const __m256i half = _mm256_set1_epi32(rs::kHalf);
  for (int xx = 0; xx < tab.axis.out_size; ++xx) {
    const int32_t* k = tab.taps(xx);
    const uint8_t* s = src_t + static_cast<int64_t>(tab.first[xx]) * kStride;
    __m256i a0 = half, a1 = half, a2 = half, a3 = half, a4 = half, a5 = half;
    for (int t = 0; t < tab.count[xx]; ++t, s += kStride) {
      const __m256i kt = _mm256_set1_epi32(k[t]);
      a0 = mac8(a0, kt, s);
      a1 = mac8(a1, kt, s + 8);
      a2 = mac8(a2, kt, s + 16);
      a3 = mac8(a3, kt, s + 24);
      a4 = mac8(a4, kt, s + 32);
      a5 = mac8(a5, kt, s + 40);
    }
    uint8_t* o = out_t + static_cast<int64_t>(xx) * kStride;
    clip8_store16(a0, a1, o);
    clip8_store16(a2, a3, o + 16);
    clip8_store16(a4, a5, o + 32);
  }
}

GPFM_AVX2 void vertical_row_avx2(const uint8_t* src, int64_t stride, const int32_t* k, int count, int width,
                                 uint8_t* out) {
  const __m256i half = _mm256_set1_epi32(rs::kHalf);
  int x = 0;
  for (; x + 16 <= width; x += 16) {
    __m256i lo = half, hi = half;
    const uint8_t* s = src + x;
    for (int t = 0; t < count; ++t, s += stride) {
      const __m256i kt = _mm256_set1_epi32(k[t]);
      lo = mac8(lo, kt, s);
      hi = mac8(hi, kt, s + 8);
    }
    clip8_store16(lo, hi, out + x);
  }
  for (; x < width; ++x) out[x] = rs::convolve(k, count, src + x, stride);
}
#endif

struct HotLoops {
  void (*horizontal)(const uint8_t* src_t, const AxisTable& tab, uint8_t* out_t);
  void (*vertical)(const uint8_t* src, int64_t stride, const int32_t* k, int count, int width, uint8_t* out);
};

// AVX2 where the CPU has it, unless GPFM_SIMD=portable (how the tests reach the portable loops).
HotLoops pick_hot_loops() {
  const char* env = std::getenv("GPFM_SIMD");
  const bool portable = env != nullptr && std::string(env) == "portable";
#if GPFM_X86
  if (!portable && __builtin_cpu_supports("avx2")) return {horizontal_block_avx2, vertical_row_avx2};
#endif
  (void)portable;
  return {horizontal_block_portable, vertical_row_portable};
}

const HotLoops& hot_loops() {
  static const HotLoops loops = pick_hot_loops();
  return loops;
}

// dst[j * dst_stride + i] = src[i * src_stride + j] for a 16 x 16 byte block.
void transpose16x16(const uint8_t* src, int64_t src_stride, uint8_t* dst, int64_t dst_stride) {
#if GPFM_X86
  // Four rounds of interleaving rows i and i + 8 transpose the block (each round rotates the
  // bits of the (row, column) index by one).
  __m128i a[16], b[16];
  for (int i = 0; i < 16; ++i) a[i] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i * src_stride));
  for (int round = 0; round < 4; ++round) {
    for (int i = 0; i < 8; ++i) {
      b[2 * i] = _mm_unpacklo_epi8(a[i], a[i + 8]);
      b[2 * i + 1] = _mm_unpackhi_epi8(a[i], a[i + 8]);
    }
    for (int i = 0; i < 16; ++i) a[i] = b[i];
  }
  for (int j = 0; j < 16; ++j) _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + j * dst_stride), a[j]);
#else
  for (int j = 0; j < 16; ++j)
    for (int i = 0; i < 16; ++i) dst[j * dst_stride + i] = src[i * src_stride + j];
#endif
}

// Moves a block's horizontal output ([out_size][kStride], lane r * 3 + c) into rows `rows` of the
// channel planes (plane c row r at planes[c * plane + r * out_size]).
void scatter_to_planes(const uint8_t* out_t, int out_size, int rows, uint8_t* planes, int64_t plane) {
  uint8_t lanes[kLanes][16];
  int xx = 0;
  for (; xx + 16 <= out_size; xx += 16) {
    for (int g = 0; g < kLanes; g += 16) transpose16x16(out_t + xx * kStride + g, kStride, lanes[g], 16);
    for (int r = 0; r < rows; ++r)
      for (int c = 0; c < 3; ++c) memcpy(planes + c * plane + r * out_size + xx, lanes[r * 3 + c], 16);
  }
  for (; xx < out_size; ++xx)
    for (int r = 0; r < rows; ++r)
      for (int c = 0; c < 3; ++c) planes[c * plane + r * out_size + xx] = out_t[xx * kStride + r * 3 + c];
}

template <OutDType D>
void store_rows(const uint8_t* const rgb[3], int width, const Normalize& norm, void* dst, int64_t plane) {
  auto* out = static_cast<typename OutStore<D>::type*>(dst);
  for (int c = 0; c < 3; ++c)
    for (int x = 0; x < width; ++x) OutStore<D>::store(out + c * plane + x, normalize_value(norm, c, rgb[c][x]));
}

using StoreRows = void (*)(const uint8_t* const rgb[3], int width, const Normalize& norm, void* dst, int64_t plane);

StoreRows store_rows_for(OutDType d) {
  switch (d) {
    case OutDType::F16: return store_rows<OutDType::F16>;
    case OutDType::BF16: return store_rows<OutDType::BF16>;
    default: return store_rows<OutDType::F32>;
  }
}

int64_t count_background(const uint8_t* const rgb[3], int width, int white_level) {
  int64_t n = 0;
  for (int x = 0; x < width; ++x)
    n += rs::is_background(rgb[0][x], rgb[1][x], rgb[2][x], static_cast<uint8_t>(white_level));
  return n;
}

// Everything one patch needs besides its source; scratch buffers are reused across the patches
// a worker handles.
struct PatchJob {
  const TileRefs& tiles;
  const GatherPatches& patches;
  const GatherParams& params;
  const AxisTable* h_axis;  // horizontal pass (null when no axis changes size: PIL copies the pixels)
  const AxisTable* v_axis;  // vertical pass
  StoreRows store;
  char* dst;
  float* background;

  std::vector<uint8_t> row, rows, src_t, out_t, planes, out_rows;

  // One output row yy from the three channel rows rgb; returns its background pixel count.
  int64_t emit_row(int64_t i, int yy, const uint8_t* const rgb[3]) const {
    const int s = params.out_size;
    const int64_t plane = static_cast<int64_t>(s) * s;
    const int64_t elem = out_dtype_size(params.dtype);
    store(rgb, s, params.norm, dst + ((i * 3) * plane + static_cast<int64_t>(yy) * s) * elem, plane);
    return background ? count_background(rgb, s, params.white_level) : 0;
  }

  int64_t copy_patch(int64_t i, const PatchSource& src) {
    const int s = params.out_size;
    row.resize(static_cast<size_t>(s) * 3);
    out_rows.resize(static_cast<size_t>(s) * 3);
    const uint8_t* rgb[3] = {&out_rows[0], &out_rows[s], &out_rows[2 * s]};
    int64_t bg = 0;
    for (int y = 0; y < s; ++y) {
      src.row(y, row.data());
      for (int x = 0; x < s; ++x)
        for (int c = 0; c < 3; ++c) out_rows[c * s + x] = row[x * 3 + c];
      bg += emit_row(i, y, rgb);
    }
    return bg;
  }

  int64_t resize_patch(int64_t i, const PatchSource& src) {
    const AxisTable &hx = *h_axis, &vy = *v_axis;
    const int in = hx.axis.in_size, s = hx.axis.out_size;
    const int y_begin = vy.rows_begin(), y_end = vy.rows_end(), ny = y_end - y_begin;
    const int64_t row_stride = static_cast<int64_t>(in) * 3 + 1;  // + 1: transpose_rows moves 4 bytes a pixel
    rows.resize(static_cast<size_t>(row_stride) * kRows);
    src_t.resize(static_cast<size_t>(in) * kStride);
    out_t.resize(static_cast<size_t>(s) * kStride);
    planes.resize(static_cast<size_t>(3) * ny * s);
    out_rows.resize(static_cast<size_t>(s) * 3);
    const int64_t plane = static_cast<int64_t>(ny) * s;

    for (int yb = y_begin; yb < y_end; yb += kRows) {
      const int nrows = std::min(kRows, y_end - yb);
      for (int r = 0; r < nrows; ++r) src.row(yb + r, &rows[r * row_stride]);
      // rows past the last one are computed, then dropped
      if (nrows < kRows) memset(&rows[nrows * row_stride], kWhite, (kRows - nrows) * row_stride);
      transpose_rows(rows.data(), row_stride, in, src_t.data());
      hot_loops().horizontal(src_t.data(), hx, out_t.data());
      scatter_to_planes(out_t.data(), s, nrows, &planes[static_cast<size_t>(yb - y_begin) * s], plane);
    }

    const uint8_t* rgb[3] = {&out_rows[0], &out_rows[s], &out_rows[2 * s]};
    int64_t bg = 0;
    for (int yy = 0; yy < s; ++yy) {
      const int64_t y0 = vy.first[yy] - y_begin;
      for (int c = 0; c < 3; ++c)
        hot_loops().vertical(&planes[(static_cast<size_t>(c) * ny + y0) * s], s, vy.taps(yy), vy.count[yy], s,
                             &out_rows[static_cast<size_t>(c) * s]);
      bg += emit_row(i, yy, rgb);
    }
    return bg;
  }

  void run(int64_t i) {
    const PatchSource src(tiles, patches, i, params.src_width);
    const int64_t bg = h_axis ? resize_patch(i, src) : copy_patch(i, src);
    const double pixels = static_cast<double>(params.out_size) * params.out_size;
    if (background) background[i] = static_cast<float>(static_cast<double>(bg) / pixels);
  }
};

}  // namespace

void gather_cpu(const TileRefs& tiles, const GatherPatches& patches, const GatherParams& params, void* dst,
                float* background) {
  if (patches.n <= 0) return;
  // PIL skips the pass of an axis that keeps its size; running it anyway is an exact copy (its one
  // non-zero weight is 1.0), so only the all-same case takes the copy path.
  std::optional<AxisTable> h_axis, v_axis;
  if (params.src_width != params.out_size || params.src_height != params.out_size) {
    h_axis.emplace(params.src_width, params.out_size);
    v_axis.emplace(params.src_height, params.out_size);
  }
  const StoreRows store = store_rows_for(params.dtype);
  const int64_t grain = std::max<int64_t>(1, patches.n / (4 * static_cast<int64_t>(num_threads())));
  parallel_for(patches.n, grain, [&](int64_t b, int64_t e) {
    PatchJob job{tiles, patches, params, h_axis ? &*h_axis : nullptr, v_axis ? &*v_axis : nullptr, store,
                 static_cast<char*>(dst), background, {}, {}, {}, {}, {}, {}};
    for (int64_t i = b; i < e; ++i) job.run(i);
  });
}

}  // namespace gpfm
