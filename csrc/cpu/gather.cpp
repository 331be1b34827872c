// CPU launcher of the gather kernel: decoded stored tiles -> PIL-exact bicubic resize ->
// normalized NCHW model input, one patch per task on the parallel_for threads.
//
// Layout choices, for speed without leaving integer arithmetic (integer sums are exact in any
// order, so vectorising cannot change a single output value):
// - Pillow's horizontal pass sums neighbouring pixels of one row, which vectorises badly on
//   interleaved RGB. We gather the source kRows rows at a time transposed: one 48-byte record per
//   source column holding its R of the 16 rows, then G, then B. The horizontal pass is then a sum
//   of whole 48-lane records with one broadcast coefficient each.
// - Its uint8 result goes to channel planes [3][rows][out], so the vertical pass is again a sum of
//   contiguous rows, and its result is one NCHW output row per channel.
// Both transpositions are 16 x 16 byte block transposes (SSE2 on x86); the two hot loops exist as
// portable C++ and as AVX2 intrinsics, picked once at run time.
#include <algorithm>
#include <cstring>
#include <optional>
#include <vector>
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define GPFM_X86 1
#include <immintrin.h>
#else
#define GPFM_X86 0
#endif

#include "gpfm/isa.h"
#include "gpfm/launchers.h"
#include "gpfm/parallel.h"
#include "gpfm/resample.h"

namespace gpfm {
namespace {

namespace rs = resample;

constexpr int kRows = 16;           // source rows per horizontal block: one 16-byte vector per channel
constexpr int kLanes = kRows * 3;  // bytes per transposed record, lane c * kRows + r = channel c of row r
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

// Where one patch's source pixels are: the source rectangle split into runs of columns that lie
// in one tile column of the patch's frame, and per row a pointer into the tile (or white).
class PatchSource {
 public:
  PatchSource(const TileRefs& tiles, const GatherPatches& patches, int64_t i, int width)
      : t_(tiles), lut_(patches.lut + i * patches.rows * patches.cols), cols_(patches.cols),
        x0_(patches.rects[i * 4 + 0]), y0_(patches.rects[i * 4 + 1]),
        x_end_(std::min<int64_t>(patches.rects[i * 4 + 2], patches.cols * tiles.w)),
        y_end_(std::min<int64_t>(patches.rects[i * 4 + 3], patches.rows * tiles.h)), width_(width) {}

  int width() const { return width_; }
  int64_t pixel_stride() const { return t_.sx; }

  // Source columns [x, returned end) lie in one tile column, *column (-1: outside the frame).
  int run(int x, int64_t* column) const {
    const int64_t u = x0_ + x;
    if (u < 0) {
      *column = -1;
      return static_cast<int>(std::min<int64_t>(-x0_, width_));
    }
    if (u >= x_end_) {
      *column = -1;
      return width_;
    }
    *column = u / t_.w;
    return static_cast<int>(std::min({(*column + 1) * t_.w, x0_ + width_, x_end_}) - x0_);
  }

  // Source pixel (x, y) of the run in tile column `column`, or null where it is white.
  const uint8_t* pixel(int x, int y, int64_t column) const {
    const int64_t v = y0_ + y;
    if (column < 0 || v < 0 || v >= y_end_) return nullptr;
    const int64_t r = v / t_.h;
    const int32_t idx = lut_[r * cols_ + column];
    if (idx < 0 || idx >= t_.n) return nullptr;
    return t_.ptrs[idx] + (v - r * t_.h) * t_.sy + (x0_ + x - column * t_.w) * t_.sx;
  }

  // dst[0 .. width*3) = source row y (packed RGB).
  void row(int y, uint8_t* dst) const {
    for (int x = 0, stop; x < width_; x = stop) {
      int64_t column;
      stop = run(x, &column);
      const uint8_t* p = pixel(x, y, column);
      const size_t n = static_cast<size_t>(stop - x);
      if (p == nullptr) {
        memset(dst + x * 3, kWhite, n * 3);
      } else if (t_.sx == 3) {
        memcpy(dst + x * 3, p, n * 3);
      } else {
        for (size_t i = 0; i < n; ++i) memcpy(dst + (x + i) * 3, p + i * t_.sx, 3);
      }
    }
  }

 private:
  const TileRefs& t_;
  const int32_t* lut_;
  int64_t cols_;
  int64_t x0_, y0_, x_end_, y_end_;
  int width_;
};

#if GPFM_X86
// Transposes the 16 x 16 byte block a[0..16) (row i in a[i]) in place: four rounds of interleaving
// rows i and i + 8, each rotating the bits of the (row, column) index by one.
inline void transpose16x16(__m128i a[16]) {
  __m128i b[16];
  for (int round = 0; round < 4; ++round) {
    for (int i = 0; i < 8; ++i) {
      b[2 * i] = _mm_unpacklo_epi8(a[i], a[i + 8]);
      b[2 * i + 1] = _mm_unpackhi_epi8(a[i], a[i + 8]);
    }
    for (int i = 0; i < 16; ++i) a[i] = b[i];
  }
}
#endif

// Source rows [y0, y0 + rows) transposed into records: src_t[x * kLanes + c * kRows + r] = channel
// c of pixel (x, y0 + r), straight from the tiles; rows past `rows` are white (computed, then
// dropped).
void gather_block(const PatchSource& src, int y0, int rows, [[maybe_unused]] bool simd, uint8_t* src_t) {
  static const std::vector<uint8_t> white(kLanes, kWhite);
  const int64_t sx = src.pixel_stride();
  const uint8_t* p[kRows];
  int64_t step[kRows];
  for (int x = 0, stop; x < src.width(); x = stop) {
    int64_t column;
    stop = src.run(x, &column);
    for (int r = 0; r < kRows; ++r) {
      const uint8_t* q = r < rows ? src.pixel(x, y0 + r, column) : nullptr;
      p[r] = q ? q : white.data();
      step[r] = q ? sx : 0;
    }
    const int n = stop - x;
    int i = 0;
#if GPFM_X86
    // 16 pixels of 16 rows: three byte-block transposes turn the rows' 48 bytes into 48 vectors,
    // one per (pixel, channel), each holding that value of the 16 rows.
    for (; simd && sx == 3 && i + 16 <= n; i += 16) {
      uint8_t* rec = src_t + static_cast<int64_t>(x + i) * kLanes;
      for (int g = 0; g < 3; ++g) {
        __m128i a[16];
        for (int r = 0; r < kRows; ++r)
          a[r] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p[r] + i * step[r] + 16 * g));
        transpose16x16(a);
        for (int j = 0; j < 16; ++j) {
          const int byte = 16 * g + j;  // pixel byte / 3, channel byte % 3
          _mm_storeu_si128(reinterpret_cast<__m128i*>(rec + (byte / 3) * kLanes + (byte % 3) * kRows), a[j]);
        }
      }
    }
#endif
    for (; i < n; ++i) {
      uint8_t* rec = src_t + static_cast<int64_t>(x + i) * kLanes;
      for (int r = 0; r < kRows; ++r)
        for (int c = 0; c < 3; ++c) rec[c * kRows + r] = p[r][i * step[r] + c];
    }
  }
}

// ---- the two hot loops: portable C++ (auto-vectorised for the baseline ISA) and AVX2 ------------

// Horizontal pass over one block: src_t is [in_size][kLanes] (see gather_block); out_t receives
// [out_size][kLanes] in the same lane order.
void horizontal_block_portable(const uint8_t* src_t, const AxisTable& tab, uint8_t* out_t) {
  for (int xx = 0; xx < tab.axis.out_size; ++xx) {
    const int32_t* k = tab.taps(xx);
    const uint8_t* s = src_t + static_cast<int64_t>(tab.first[xx]) * kLanes;
    int32_t acc[kLanes];
    for (int j = 0; j < kLanes; ++j) acc[j] = rs::kHalf;
    for (int t = 0; t < tab.count[xx]; ++t, s += kLanes)
      for (int j = 0; j < kLanes; ++j) acc[j] += k[t] * static_cast<int32_t>(s[j]);
    for (int j = 0; j < kLanes; ++j) out_t[static_cast<int64_t>(xx) * kLanes + j] = rs::clip8(acc[j]);
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
    const uint8_t* s = src_t + static_cast<int64_t>(tab.first[xx]) * kLanes;
    __m256i a0 = half, a1 = half, a2 = half, a3 = half, a4 = half, a5 = half;
    for (int t = 0; t < tab.count[xx]; ++t, s += kLanes) {
      const __m256i kt = _mm256_set1_epi32(k[t]);
      a0 = mac8(a0, kt, s);
      a1 = mac8(a1, kt, s + 8);
      a2 = mac8(a2, kt, s + 16);
      a3 = mac8(a3, kt, s + 24);
      a4 = mac8(a4, kt, s + 32);
      a5 = mac8(a5, kt, s + 40);
    }
    uint8_t* o = out_t + static_cast<int64_t>(xx) * kLanes;
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
  bool simd;  // x86 SIMD (SSE2 transposes, AVX2 passes) rather than the portable loops
  void (*horizontal)(const uint8_t* src_t, const AxisTable& tab, uint8_t* out_t);
  void (*vertical)(const uint8_t* src, int64_t stride, const int32_t* k, int count, int width, uint8_t* out);
};

// x86 SIMD where cpu_isa() allows AVX2 (GPFM_SIMD=portable reaches the code non-x86 builds run).
HotLoops pick_hot_loops() {
#if GPFM_X86
  if (cpu_isa() != Isa::Portable) return {true, horizontal_block_avx2, vertical_row_avx2};
#endif
  return {false, horizontal_block_portable, vertical_row_portable};
}

const HotLoops& hot_loops() {
  static const HotLoops loops = pick_hot_loops();
  return loops;
}

// Moves a block's horizontal output ([out_size][kLanes], lane c * kRows + r) into rows `rows` of
// the channel planes (plane c row r at planes[c * plane + r * out_size]).
void scatter_to_planes(const uint8_t* out_t, int out_size, int rows, [[maybe_unused]] bool simd, uint8_t* planes,
                       int64_t plane) {
  int xx = 0;
#if GPFM_X86
  for (; simd && xx + 16 <= out_size; xx += 16) {
    for (int c = 0; c < 3; ++c) {
      __m128i a[16];
      for (int i = 0; i < 16; ++i)
        a[i] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(out_t + (xx + i) * kLanes + c * kRows));
      transpose16x16(a);
      for (int r = 0; r < rows; ++r)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(planes + c * plane + r * out_size + xx), a[r]);
    }
  }
#endif
  for (; xx < out_size; ++xx)
    for (int c = 0; c < 3; ++c)
      for (int r = 0; r < rows; ++r) planes[c * plane + r * out_size + xx] = out_t[xx * kLanes + c * kRows + r];
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

// Per-thread scratch, kept across the patches (and, on the calling thread, the calls) a thread
// handles, so that patches can be handed out one at a time without reallocating.
struct Scratch {
  std::vector<uint8_t> row, src_t, out_t, planes, out_rows;
};

// Everything one patch needs besides its source.
struct PatchJob {
  const TileRefs& tiles;
  const GatherPatches& patches;
  const GatherParams& params;
  const AxisTable* h_axis;  // horizontal pass (null when no axis changes size: PIL copies the pixels)
  const AxisTable* v_axis;  // vertical pass
  StoreRows store;
  char* dst;
  float* background;
  Scratch& scratch;

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
    std::vector<uint8_t>&row = scratch.row, &out_rows = scratch.out_rows;
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
    std::vector<uint8_t>&src_t = scratch.src_t, &out_t = scratch.out_t;
    std::vector<uint8_t>&planes = scratch.planes, &out_rows = scratch.out_rows;
    src_t.resize(static_cast<size_t>(in) * kLanes);
    out_t.resize(static_cast<size_t>(s) * kLanes);
    planes.resize(static_cast<size_t>(3) * ny * s);
    out_rows.resize(static_cast<size_t>(s) * 3);
    const int64_t plane = static_cast<int64_t>(ny) * s;
    const bool simd = hot_loops().simd;

    for (int yb = y_begin; yb < y_end; yb += kRows) {
      const int nrows = std::min(kRows, y_end - yb);
      gather_block(src, yb, nrows, simd, src_t.data());
      hot_loops().horizontal(src_t.data(), hx, out_t.data());
      scatter_to_planes(out_t.data(), s, nrows, simd, &planes[static_cast<size_t>(yb - y_begin) * s], plane);
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
  // One patch per chunk: a patch is ~0.1-2 ms of work, and small chunks keep a thread that the OS
  // descheduled from holding back the end of the batch.
  parallel_for(patches.n, 1, [&](int64_t b, int64_t e) {
    thread_local Scratch scratch;
    PatchJob job{tiles, patches, params, h_axis ? &*h_axis : nullptr, v_axis ? &*v_axis : nullptr, store,
                 static_cast<char*>(dst), background, scratch};
    for (int64_t i = b; i < e; ++i) job.run(i);
  });
}

}  // namespace gpfm
