// CPU launchers of the tissue-mask steps: threads over rows (gpfm::parallel_for), the per-row and
// per-pixel work in gpfm/tissue.h. Called with the GIL released.
// The wide pixel vectors below (and the network templates of gpfm/tissue.h instantiated with
// them) only run inside the flattened AVX functions, all internal, so GCC's note that passing them
// in baseline code changes the ABI concerns no real call.
#pragma GCC diagnostic ignored "-Wpsabi"

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstring>
#include <memory>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "gpfm/isa.h"
#include "gpfm/launchers.h"
#include "gpfm/parallel.h"
#include "gpfm/tissue.h"

namespace gpfm {
namespace {
using namespace tissue;

using Words = std::vector<uint64_t>;

// The median networks run on vectors of pixels (GCC vector extensions): 16 at a time with the
// baseline ISA (SSE2 pminub/pmaxub on x86-64, NEON on ARM), 32 with AVX2 and 64 with AVX-512BW
// where the CPU has them (chosen once at run time; the outputs are the same bytes).
typedef uint8_t U8x16 __attribute__((vector_size(16)));
typedef uint8_t U8x32 __attribute__((vector_size(32)));
typedef uint8_t U8x64 __attribute__((vector_size(64)));

template <class V>
struct VectorMinMax {
  static V lo(V a, V b) { return a < b ? a : b; }
  static V hi(V a, V b) { return a < b ? b : a; }
};

template <class V>
V load(const uint8_t* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <class V>
void store(uint8_t* p, V v) { std::memcpy(p, &v, sizeof(v)); }

// Rows [b, e) of the k x k median (k = K) through the networks, two rows at a time. Every source
// row's K-pixel horizontal windows are sorted once (K sorted planes, lanes = x) into a ring of
// K + 1 rows, shared by the K output rows that use them; a pair of output rows then costs one
// core network over their K - 1 shared rows and one small merge each (see MedianNetwork).
template <int K, class V>
void median_rows_network(const uint8_t* src, int h, int w, int b, int e, uint8_t* dst) {
  constexpr int r = K / 2, N = sizeof(V), kRing = K + 1;
  const int64_t cw = (w + N - 1) / N * N;  // a sorted plane: whole vectors
  std::vector<uint8_t> planes(static_cast<size_t>(kRing) * K * cw), padded(static_cast<size_t>(w + K + N));
  int held[kRing];
  for (int& v : held) v = INT32_MIN;
  // The sorted planes of source row yy (replicated beyond the top and bottom edges).
  auto sorted_row = [&](int yy) -> const uint8_t* {
    const int slot = (yy % kRing + kRing) % kRing;  // yy may be negative (above the top edge)
    uint8_t* ring = planes.data() + static_cast<int64_t>(slot) * K * cw;
    if (held[slot] == yy) return ring;
    held[slot] = yy;
    const uint8_t* row = src + static_cast<int64_t>(clampi(yy, 0, h - 1)) * w;
    std::memset(padded.data(), row[0], r);  // replicated left and right edges
    std::memcpy(padded.data() + r, row, static_cast<size_t>(w));
    std::memset(padded.data() + r + w, row[w - 1], padded.size() - r - w);
    for (int x0 = 0; x0 < w; x0 += N) {
      V in[K], sorted[K];
      for (int c = 0; c < K; ++c) in[c] = load<V>(padded.data() + x0 + c);
      sort_column<K, VectorMinMax<V>>(in, sorted);
      for (int i = 0; i < K; ++i) store(ring + i * cw + x0, sorted[i]);
    }
    return ring;
  };
  auto put = [&](uint8_t* out, int x0, V m) {
    if (x0 + N <= w) {
      store(out + x0, m);
    } else {  // the row's last partial vector
      uint8_t tail[N];
      store(tail, m);
      std::memcpy(out + x0, tail, static_cast<size_t>(w - x0));
    }
  };
  for (int y = b; y < e; y += 2) {
    const bool pair = y + 1 < e;
    const uint8_t* shared[K - 1];
    for (int c = 0; c < K - 1; ++c) shared[c] = sorted_row(y - r + 1 + c);
    const uint8_t* first = sorted_row(y - r);
    const uint8_t* second = pair ? sorted_row(y + r + 1) : nullptr;
    for (int x0 = 0; x0 < w; x0 += N) {
      V v[MedianNetwork<K>::P * MedianNetwork<K>::P], ranks[K + 1], own[K];
      for (int c = 0; c < K - 1; ++c)
        for (int i = 0; i < K; ++i) v[c * MedianNetwork<K>::P + i] = load<V>(shared[c] + i * cw + x0);
      select_core<K, VectorMinMax<V>>(v, ranks);
      for (int i = 0; i < K; ++i) own[i] = load<V>(first + i * cw + x0);
      put(dst + static_cast<int64_t>(y) * w, x0, merge_median<K, VectorMinMax<V>>(ranks, own));
      if (!pair) continue;
      for (int i = 0; i < K; ++i) own[i] = load<V>(second + i * cw + x0);
      put(dst + static_cast<int64_t>(y + 1) * w, x0, merge_median<K, VectorMinMax<V>>(ranks, own));
    }
  }
}

Isa isa() { return cpu_isa(); }

using MedianRowsFn = void (*)(const uint8_t*, int, int, int, int, uint8_t*);

#if defined(__x86_64__)
// The AVX builds of the networks; flatten inlines them so they are compiled for that ISA too.
template <int K>
__attribute__((target("avx2"), flatten)) void median_rows_avx2(const uint8_t* src, int h, int w, int b, int e,
                                                                uint8_t* dst) {
  median_rows_network<K, U8x32>(src, h, w, b, e, dst);
}
template <int K>
__attribute__((target("avx512bw"), flatten)) void median_rows_avx512(const uint8_t* src, int h, int w, int b, int e,
                                                                      uint8_t* dst) {
  median_rows_network<K, U8x64>(src, h, w, b, e, dst);
}
#endif

// The network rows for K on this CPU.
template <int K>
MedianRowsFn median_rows_for_cpu() {
#if defined(__x86_64__)
  if (isa() == Isa::Avx512) return median_rows_avx512<K>;
  if (isa() == Isa::Avx2) return median_rows_avx2<K>;
#endif
  return median_rows_network<K, U8x16>;
}

// Rows [b, e) of the k x k median: networks for k = 3, 5, 7, the sliding histogram otherwise.
void median_rows(const uint8_t* src, int64_t h, int64_t w, int k, int64_t b, int64_t e, uint8_t* dst) {
  static const MedianRowsFn network[3] = {median_rows_for_cpu<3>(), median_rows_for_cpu<5>(), median_rows_for_cpu<7>()};
  const int hi = static_cast<int>(h), wi = static_cast<int>(w);
  if (k == 1) {
    std::memcpy(dst + b * w, src + b * w, static_cast<size_t>((e - b) * w));
  } else if (has_median_network(k)) {
    network[k / 2 - 1](src, hi, wi, static_cast<int>(b), static_cast<int>(e), dst);
  } else {
    for (int64_t y = b; y < e; ++y) median_row(src, w, hi, wi, k, static_cast<int>(y), dst + y * w);
  }
}

// Pixels per task. The light passes cost about a nanosecond per pixel, so they only split on
// thumbnails large enough for a task to outweigh starting a thread; the median costs a few.
constexpr int64_t kLightTaskPixels = int64_t{1} << 20;
constexpr int64_t kMedianTaskPixels = int64_t{1} << 17;

int64_t row_grain(int64_t w, int64_t task_pixels = kLightTaskPixels) {
  return std::max<int64_t>(1, task_pixels / std::max<int64_t>(w, 1));
}

// parallel_for, except that a range of one task runs inline: most thumbnails are a few hundred
// rows, and asking the pool costs more than such a pass (thread count lookup, std::function).
template <class Fn>
void split(int64_t n, int64_t grain, Fn&& fn) {
  if (n <= grain) {
    if (n > 0) fn(int64_t{0}, n);
    return;
  }
  parallel_for(n, grain, fn);
}

template <class Fn>
void for_rows(int64_t h, int64_t w, Fn&& fn) {
  split(h, row_grain(w), [&](int64_t b, int64_t e) {
    for (int64_t y = b; y < e; ++y) fn(static_cast<int>(y));
  });
}

SaturationTable saturation_table() {
  SaturationTable t{};
  for (int v = 0; v < 256; ++v) t.div[v] = saturation_divisor(v);
  return t;
}

// Adds the counts of the bytes p[0..n) to hist (shared by the tasks). Eight interleaved 32-bit
// sub-histograms: a saturation plane is mostly long runs of one value, and with a single table
// every increment of such a run waits for the previous one's store (a few cycles per byte).
void count_bytes(const uint8_t* p, int64_t n, int64_t* hist) {
  constexpr int kSub = 8;
  uint32_t sub[kSub][256] = {};
  int64_t i = 0;
  for (; i + kSub <= n; i += kSub) {
    uint64_t eight;
    std::memcpy(&eight, p + i, kSub);
    for (int j = 0; j < kSub; ++j) ++sub[j][(eight >> (8 * j)) & 0xFF];
  }
  for (; i < n; ++i) ++sub[0][p[i]];
  for (int v = 0; v < 256; ++v) {
    int64_t count = 0;
    for (int j = 0; j < kSub; ++j) count += sub[j][v];
    if (count) __atomic_fetch_add(hist + v, count, __ATOMIC_RELAXED);
  }
}

// The median plane and, when `hist` is given, its 256-bin histogram in the same pass.
void median_pass(const uint8_t* src, uint8_t* dst, int64_t h, int64_t w, int k, int64_t* hist) {
  if (hist) std::fill(hist, hist + 256, 0);
  split(h, row_grain(w, kMedianTaskPixels * 7 / std::max(k, 7)), [&](int64_t b, int64_t e) {
    median_rows(src, h, w, k, b, e, dst);
    if (hist) count_bytes(dst + b * w, (e - b) * w, hist);
  });
}

using PackRowFn = void (*)(const uint8_t*, int, int, uint64_t*);

#if defined(__x86_64__)
// pack_row with a byte compare and a movemask per 32 pixels; a last partial word takes pack_row.
__attribute__((target("avx2"))) void pack_row_avx2(const uint8_t* row, int w, int level, uint64_t* bits) {
  int i = 0;
  if (level >= 0 && level < 255) {
    const __m256i above = _mm256_set1_epi8(static_cast<char>(level + 1));  // x > level <=> max(x, level + 1) == x
    for (; 64 * i + 64 <= w; ++i) {
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 64 * i));
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 64 * i + 32));
      const uint32_t lo = static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_cmpeq_epi8(_mm256_max_epu8(a, above), a)));
      const uint32_t hi = static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_cmpeq_epi8(_mm256_max_epu8(b, above), b)));
      bits[i] = lo | static_cast<uint64_t>(hi) << 32;
    }
  }
  if (64 * i < w) pack_row(row + 64 * i, w - 64 * i, level, bits + i);
}
#endif

void pack(const uint8_t* src, int64_t h, int64_t w, int level, uint64_t* bits) {
#if defined(__x86_64__)
  static const PackRowFn pack_fn = isa() == Isa::Portable ? pack_row : pack_row_avx2;
#else
  static const PackRowFn pack_fn = pack_row;
#endif
  const int64_t nw = words_for(static_cast<int>(w));
  for_rows(h, w, [&](int y) { pack_fn(src + y * w, static_cast<int>(w), level, bits + y * nw); });
}

// Pixels [x, w) of mask row y and summed-area row y + 1 (from row y, `above`) out of packed row y;
// x is a multiple of 8 and `run` counts the row's pixels set before x. Per 8 pixels, the spread
// 0/1 bytes are the mask bytes, and multiplying them by 0x0101...01 gives their running counts
// (byte j = pixels 0..j: at most 8, so no byte carries into the next).
void unpack_integral_tail(const uint64_t* __restrict bits, int x, int w, int32_t run, const int32_t* __restrict above,
                          uint8_t* __restrict row, int32_t* __restrict out) {
  for (; x < w; x += 8) {
    const uint64_t byte = (bits[x >> 6] >> (x & 63)) & 0xFFu;
    const uint64_t ones = spread_bits(byte), counts = ones * 0x0101010101010101ull;
    const int n = imin(8, w - x);
    std::memcpy(row + x, &ones, static_cast<size_t>(n));
    for (int j = 0; j < n; ++j)
      out[x + 1 + j] = above[x + 1 + j] + run + static_cast<int32_t>((counts >> (8 * j)) & 0xFFu);
    run += static_cast<int32_t>(counts >> 56);  // byte 7: all eight
  }
}

// Mask row y and summed-area row y + 1 in one pass (the table's first column is 0).
void unpack_integral_row(const uint64_t* bits, int w, const int32_t* above, uint8_t* row, int32_t* out) {
  out[0] = 0;
  unpack_integral_tail(bits, 0, w, 0, above, row, out);
}

using UnpackIntegralRowFn = void (*)(const uint64_t*, int, const int32_t*, uint8_t*, int32_t*);

#if defined(__x86_64__)
// unpack_integral_row 32 pixels per step: each byte of the 32 bits is broadcast to 8 lanes and
// tested against its lane's bit, the running counts within each 8 lanes come from three shifted
// adds, and each 8 are widened and added to the row above and the count so far.
__attribute__((target("avx2,popcnt"))) void unpack_integral_row_avx2(const uint64_t* bits, int w, const int32_t* above,
                                                                    uint8_t* row, int32_t* out) {
  const __m256i pick = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3,
                                        3, 3, 3, 3, 3);
  const __m256i bit = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ull));
  const __m256i one = _mm256_set1_epi8(1);
  int32_t run = 0;
  out[0] = 0;
  int x = 0;
  for (; x + 32 <= w; x += 32) {
    const uint32_t b = static_cast<uint32_t>(bits[x >> 6] >> (x & 63));
    const __m256i spread = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(b)), pick), bit);
    const __m256i ones = _mm256_and_si256(_mm256_cmpeq_epi8(spread, bit), one);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(row + x), ones);
    __m256i counts = _mm256_add_epi8(ones, _mm256_slli_epi64(ones, 8));
    counts = _mm256_add_epi8(counts, _mm256_slli_epi64(counts, 16));
    counts = _mm256_add_epi8(counts, _mm256_slli_epi64(counts, 32));  // byte j of 8: pixels 0..j of those 8
    alignas(32) uint64_t eight[4];
    _mm256_store_si256(reinterpret_cast<__m256i*>(eight), counts);
    for (int g = 0; g < 4; ++g) {
      const __m256i c = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<int64_t>(eight[g])));
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(above + x + 1 + 8 * g));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + x + 1 + 8 * g),
                          _mm256_add_epi32(_mm256_add_epi32(a, c), _mm256_set1_epi32(run)));
      run += static_cast<int32_t>(eight[g] >> 56);
    }
  }
  unpack_integral_tail(bits, x, w, run, above, row, out);
}
#endif

void unpack(const uint64_t* bits, int64_t h, int64_t w, uint8_t* dst) {
  const int64_t nw = words_for(static_cast<int>(w));
  for_rows(h, w, [&](int y) { unpack_row(bits + y * nw, static_cast<int>(w), dst + y * w); });
}

// Rows [b, e) of one dilation or erosion of a packed plane of NW words per row (0 = any), from
// their own dilated rows and the r rows around.
template <int NW>
void morph_rows(const uint64_t* src, uint64_t* dst, int64_t h, int64_t w, const Ellipse& e, bool erode, int64_t b,
                int64_t end) {
  const int hi = static_cast<int>(h), wi = static_cast<int>(w);
  const int64_t nw = words_for(wi);
  const int64_t y0 = std::max<int64_t>(b - e.r, 0), y1 = std::min<int64_t>(end + e.r, h);
  const int64_t plane = (y1 - y0) * nw;
  std::unique_ptr<uint64_t[]> dilated(new uint64_t[plane * e.n]);
  for (int64_t y = y0; y < y1; ++y)
    dilate_row_radii<NW>(src + y * nw, wi, erode, e, dilated.get() + (y - y0) * nw, plane);
  for (int64_t y = b; y < end; ++y)
    combine_rows<NW>(dilated.get(), plane, static_cast<int>(y0), hi, wi, static_cast<int>(y), e, erode, dst + y * nw);
}

// One dilation or erosion of a packed plane in row tasks. Rows of up to 256 pixels (most
// thumbnails of small specimens) take code compiled for their word count: loops of a runtime
// length of 1..4 words cost about twice the work they do.
void morph_once(const uint64_t* src, uint64_t* dst, int64_t h, int64_t w, int k, bool erode) {
  using RowsFn = void (*)(const uint64_t*, uint64_t*, int64_t, int64_t, const Ellipse&, bool, int64_t, int64_t);
  static constexpr RowsFn fixed[5] = {morph_rows<0>, morph_rows<1>, morph_rows<2>, morph_rows<3>, morph_rows<4>};
  const Ellipse e = make_ellipse(k);
  const int nw = words_for(static_cast<int>(w));
  const RowsFn rows = nw <= 4 ? fixed[nw] : morph_rows<0>;
  split(h, row_grain(w), [&](int64_t b, int64_t end) { rows(src, dst, h, w, e, erode, b, end); });
}

// Close (dilate, erode) or open (erode, dilate) a packed plane in place; `scratch` is its size.
void close_or_open(uint64_t* bits, uint64_t* scratch, int64_t h, int64_t w, int k, bool close) {
  morph_once(bits, scratch, h, w, k, !close);
  morph_once(scratch, bits, h, w, k, close);
}

// Union-find over the runs of rows [0, h), then every run's root, area and border flag. Shared:
// whether rows run on several threads (atomics) or in one task (plain stores).
template <bool Shared>
void label_runs(const int32_t* row_begin, const int32_t* start, const int32_t* end, int64_t h, int64_t w, bool conn8,
                int32_t* parent, int32_t* label, int32_t* area, int32_t* border) {
  const int hi = static_cast<int>(h), wi = static_cast<int>(w);
  for_rows(h, w, [&](int y) {
    if (y > 0) merge_rows<Shared>(start, end, row_begin[y], row_begin[y + 1], row_begin[y - 1], row_begin[y], conn8, parent);
  });
  for_rows(h, w, [&](int y) {
    for (int32_t i = row_begin[y]; i < row_begin[y + 1]; ++i)
      accumulate_run<Shared>(parent, start, end, i, y, hi, wi, label, area, border);
  });
}

// Flips the components of `color` that `flips` selects (see gpfm/tissue.h), packed src -> dst.
void component_pass(const uint64_t* src, uint64_t* dst, int64_t h, int64_t w, uint8_t color, bool conn8,
                    int64_t min_area) {
  const int wi = static_cast<int>(w);
  const int64_t nw = words_for(wi);
  if (min_area <= 0) {  // nothing can flip: skip the labelling
    std::memcpy(dst, src, sizeof(uint64_t) * h * nw);
    return;
  }
  std::vector<int32_t> row_begin(h + 1, 0);
  for_rows(h, w, [&](int y) { row_begin[y + 1] = count_runs(src + y * nw, wi, color); });
  for (int64_t y = 0; y < h; ++y) row_begin[y + 1] += row_begin[y];
  const int64_t total = row_begin[h];
  // One block for the six per-run arrays; only area and border need zeros.
  std::unique_ptr<int32_t[]> runs(new int32_t[6 * total]);
  int32_t *start = runs.get(), *end = start + total, *parent = end + total, *label = parent + total;
  int32_t *area = label + total, *border = area + total;
  std::fill(area, area + 2 * total, 0);
  for_rows(h, w, [&](int y) {
    fill_runs(src + y * nw, wi, color, start + row_begin[y], end + row_begin[y]);
    for (int32_t i = row_begin[y]; i < row_begin[y + 1]; ++i) parent[i] = i;
  });
  if (h <= row_grain(w))  // for_rows runs every row in one task
    label_runs<false>(row_begin.data(), start, end, h, w, conn8, parent, label, area, border);
  else
    label_runs<true>(row_begin.data(), start, end, h, w, conn8, parent, label, area, border);
  for_rows(h, w, [&](int y) {
    paint_row(src + y * nw, dst + y * nw, wi, color, start, end, label, area, border, row_begin[y], row_begin[y + 1],
              min_area);
  });
}

// Drop small tissue, then fill small holes, packed `bits` in place; `scratch` is its size.
void filter_packed(uint64_t* bits, uint64_t* scratch, int64_t h, int64_t w, int64_t min_tissue_px,
                   int64_t min_hole_px) {
  component_pass(bits, scratch, h, w, 1, true, min_tissue_px);
  component_pass(scratch, bits, h, w, 0, false, min_hole_px);
}

// The frame of the standalone binary steps: pack the 0/1 plane src, run step(bits, scratch) on it
// (the result in bits, which the step may swap with its same-sized scratch), unpack into dst.
template <class Step>
void on_packed_plane(const uint8_t* src, uint8_t* dst, int64_t h, int64_t w, Step&& step) {
  const int64_t n = h * words_for(static_cast<int>(w));
  Words bits(n), scratch(n);
  pack(src, h, w, 0, bits.data());
  step(bits, scratch);
  unpack(bits.data(), h, w, dst);
}

// The common packed-RGB row, without the alpha branch; the AVX2 build vectorizes it (table
// gathers), which needs the promise that the output aliases neither input.
void score_rgb_row(const uint8_t* __restrict row, int64_t w, int dark_threshold,
                   const SaturationTable& __restrict table, uint8_t* __restrict out) {
  for (int64_t x = 0; x < w; ++x)
    out[x] = tissue_score(row[3 * x], row[3 * x + 1], row[3 * x + 2], dark_threshold, table);
}

using ScoreRowFn = void (*)(const uint8_t*, int64_t, int, const SaturationTable&, uint8_t*);

#if defined(__x86_64__)
// The bytes of a, b and c that the three shuffle masks select, merged.
__attribute__((target("avx2"))) inline __m128i shuffle3(__m128i a, __m128i b, __m128i c, __m128i ma, __m128i mb,
                                                        __m128i mc) {
  return _mm_or_si128(_mm_or_si128(_mm_shuffle_epi8(a, ma), _mm_shuffle_epi8(b, mb)), _mm_shuffle_epi8(c, mc));
}

// 16 pixels per step: three pshufb per 16-byte load gather each pixel's three channels into three
// planes (which plane holds R, G or B does not matter for max and min), then V - min, OpenCV's
// divisor gathered by V, the fixed-point product and the dark test, all in integers: the same
// bytes as tissue_score. The last w % 16 pixels take the scalar row.
__attribute__((target("avx2"))) void score_rgb_row_avx2(const uint8_t* row, int64_t w, int dark_threshold,
                                                        const SaturationTable& table, uint8_t* out) {
  const __m128i c0 = _mm_setr_epi8(0, 3, 6, 9, 12, 15, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m128i c1 = _mm_setr_epi8(-1, -1, -1, -1, -1, -1, 2, 5, 8, 11, 14, -1, -1, -1, -1, -1);
  const __m128i c2 = _mm_setr_epi8(-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 1, 4, 7, 10, 13);
  const __m128i d0 = _mm_setr_epi8(1, 4, 7, 10, 13, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m128i d1 = _mm_setr_epi8(-1, -1, -1, -1, -1, 0, 3, 6, 9, 12, 15, -1, -1, -1, -1, -1);
  const __m128i d2 = _mm_setr_epi8(-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 2, 5, 8, 11, 14);
  const __m128i e0 = _mm_setr_epi8(2, 5, 8, 11, 14, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m128i e1 = _mm_setr_epi8(-1, -1, -1, -1, -1, 1, 4, 7, 10, 13, -1, -1, -1, -1, -1, -1);
  const __m128i e2 = _mm_setr_epi8(-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 0, 3, 6, 9, 12, 15);
  // v >= dark_threshold <=> max(v, dark) == v; above 255 every pixel is dark.
  const __m128i dark = _mm_set1_epi8(static_cast<char>(clampi(dark_threshold, 0, 255)));
  const __m128i none = dark_threshold > 255 ? _mm_setzero_si128() : _mm_set1_epi8(-1);
  const __m256i round = _mm256_set1_epi32(1 << 11);
  int64_t x = 0;
  for (; x + 16 <= w; x += 16) {
    const uint8_t* p = row + 3 * x;
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16));
    const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 32));
    const __m128i ch0 = shuffle3(a, b, c, c0, c1, c2), ch1 = shuffle3(a, b, c, d0, d1, d2);
    const __m128i ch2 = shuffle3(a, b, c, e0, e1, e2);
    const __m128i v = _mm_max_epu8(ch0, _mm_max_epu8(ch1, ch2));
    const __m128i diff = _mm_sub_epi8(v, _mm_min_epu8(ch0, _mm_min_epu8(ch1, ch2)));
    __m256i s[2];
    for (int half = 0; half < 2; ++half) {
      const __m128i vh = half ? _mm_srli_si128(v, 8) : v, dh = half ? _mm_srli_si128(diff, 8) : diff;
      const __m256i div = _mm256_i32gather_epi32(table.div, _mm256_cvtepu8_epi32(vh), 4);
      s[half] = _mm256_srli_epi32(_mm256_add_epi32(_mm256_mullo_epi32(_mm256_cvtepu8_epi32(dh), div), round), 12);
    }
    const __m256i s16 = _mm256_permute4x64_epi64(_mm256_packus_epi32(s[0], s[1]), 0xD8);
    const __m128i s8 = _mm_packus_epi16(_mm256_castsi256_si128(s16), _mm256_extracti128_si256(s16, 1));
    const __m128i keep = _mm_and_si128(_mm_cmpeq_epi8(_mm_max_epu8(v, dark), v), none);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + x), _mm_and_si128(s8, keep));
  }
  score_rgb_row(row + 3 * x, w - x, dark_threshold, table, out + x);
}
#endif

ScoreRowFn score_row_for_cpu() {
#if defined(__x86_64__)
  if (isa() != Isa::Portable) return score_rgb_row_avx2;
#endif
  return score_rgb_row;
}

}  // namespace

void tissue_score_cpu(const TissueImage& src, uint8_t* dst, int dark_threshold) {
  static const ScoreRowFn score_rgb = score_row_for_cpu();
  const int channels = static_cast<int>(src.channels);
  static const SaturationTable table = saturation_table();  // 256 divisions: once, not per thumbnail
  if (channels == 3 && src.sx == 3 && src.sy == 3 * src.w) {  // packed rows: one long row, one partial vector
    split(src.h * src.w, kLightTaskPixels, [&](int64_t b, int64_t e) {
      score_rgb(src.data + 3 * b, e - b, dark_threshold, table, dst + b);
    });
    return;
  }
  for_rows(src.h, src.w, [&](int y) {
    const uint8_t* row = src.data + y * src.sy;
    uint8_t* out = dst + y * src.w;
    if (channels == 3 && src.sx == 3) {
      score_rgb(row, src.w, dark_threshold, table, out);
    } else {
      for (int64_t x = 0; x < src.w; ++x) out[x] = score_pixel(row + x * src.sx, channels, dark_threshold, table);
    }
  });
}

void median_blur_cpu(const uint8_t* src, uint8_t* dst, int64_t h, int64_t w, int k) {
  median_pass(src, dst, h, w, k, nullptr);
}

void histogram256_cpu(const uint8_t* src, int64_t n, int64_t* hist) {
  std::fill(hist, hist + 256, 0);
  split(n, kLightTaskPixels, [&](int64_t b, int64_t e) { count_bytes(src + b, e - b, hist); });
}

void morphology_cpu(const uint8_t* src, uint8_t* dst, int64_t h, int64_t w, MorphOp op, int k) {
  on_packed_plane(src, dst, h, w, [&](Words& bits, Words& scratch) {
    if (op == MorphOp::Close || op == MorphOp::Open) {
      close_or_open(bits.data(), scratch.data(), h, w, k, op == MorphOp::Close);
    } else {
      morph_once(bits.data(), scratch.data(), h, w, k, op == MorphOp::Erode);
      std::swap(bits, scratch);
    }
  });
}

void filter_components_cpu(const uint8_t* src, uint8_t* dst, int64_t h, int64_t w, int64_t min_tissue_px,
                           int64_t min_hole_px) {
  on_packed_plane(src, dst, h, w, [&](Words& bits, Words& scratch) {
    filter_packed(bits.data(), scratch.data(), h, w, min_tissue_px, min_hole_px);
  });
}

void integral_image_cpu(const uint8_t* mask, int32_t* sat, int64_t h, int64_t w) {
  const int64_t stride = w + 1;
  std::fill(sat, sat + stride, 0);
  if (h * w <= kLightTaskPixels) {  // one task: a single pass, each row from the one above
    for (int64_t y = 0; y < h; ++y)
      integral_row(mask + y * w, static_cast<int>(w), sat + y * stride, sat + (y + 1) * stride);
    return;
  }
  for_rows(h, w, [&](int y) { row_prefix(mask + y * w, static_cast<int>(w), sat + (y + 1) * stride); });
  const int64_t chunk = std::max<int64_t>(1024, kLightTaskPixels / std::max<int64_t>(h, 1));  // columns per task
  parallel_for((stride + chunk - 1) / chunk, 1, [&](int64_t b, int64_t e) {
    accumulate_columns(sat, stride, static_cast<int>(h), static_cast<int>(b * chunk),
                       static_cast<int>(std::min(stride, e * chunk)));
  });
}

int64_t patch_grid_cpu(const int32_t* sat, int64_t h, int64_t w, const PatchLattice& g, int64_t* coords,
                       float* fractions) {
  const int64_t nx = static_cast<int64_t>(std::ceil(g.width / g.stride));
  const int64_t ny = static_cast<int64_t>(std::ceil(g.height / g.stride));
  int64_t n = 0;
  for (int64_t j = 0; j < ny; ++j) {
    const int64_t y = lattice_position(j, g.stride);
    if (y >= g.height) break;
    for (int64_t i = 0; i < nx; ++i) {
      const int64_t x = lattice_position(i, g.stride);
      if (x >= g.width) break;
      const double f = rect_fraction(sat, static_cast<int>(h), static_cast<int>(w), static_cast<double>(x),
                                     static_cast<double>(y), g.size, g.size, g.scale_x, g.scale_y);
      if (f >= g.threshold) {
        coords[2 * n] = x;
        coords[2 * n + 1] = y;
        fractions[n++] = static_cast<float>(f);
      }
    }
  }
  return n;
}

int segment_tissue_cpu(const TissueImage& src, const MaskParams& p, uint8_t* mask, int32_t* sat) {
  const int64_t h = src.h, w = src.w;
  std::unique_ptr<uint8_t[]> score(new uint8_t[h * w]);  // every byte is written: no zero fill
  tissue_score_cpu(src, score.get(), p.dark_threshold);
  int64_t hist[256];
  const bool otsu = p.fixed_threshold < 0;
  median_pass(score.get(), mask, h, w, p.median_k, otsu ? hist : nullptr);  // mask holds the median
  const int level = choose_threshold(otsu ? otsu_threshold(hist) : 0, p.fixed_threshold, p.min_threshold);
  const int64_t n = h * words_for(static_cast<int>(w));
  Words bits(n), scratch(n);
  pack(mask, h, w, level, bits.data());
  if (p.close_k > 1) close_or_open(bits.data(), scratch.data(), h, w, p.close_k, true);
  if (p.open_k > 1) close_or_open(bits.data(), scratch.data(), h, w, p.open_k, false);
  filter_packed(bits.data(), scratch.data(), h, w, p.min_tissue_px, p.min_hole_px);
  if (h * w <= kLightTaskPixels) {  // one task: the mask and the table in a single serial pass
#if defined(__x86_64__)
    static const UnpackIntegralRowFn unpack_integral =
        isa() == Isa::Portable ? unpack_integral_row : unpack_integral_row_avx2;
#else
    static const UnpackIntegralRowFn unpack_integral = unpack_integral_row;
#endif
    std::fill(sat, sat + w + 1, 0);
    for (int64_t y = 0; y < h; ++y)
      unpack_integral(bits.data() + y * words_for(static_cast<int>(w)), static_cast<int>(w), sat + y * (w + 1),
                          mask + y * w, sat + (y + 1) * (w + 1));
  } else {
    unpack(bits.data(), h, w, mask);
    integral_image_cpu(mask, sat, h, w);
  }
  return level;
}

}  // namespace gpfm
