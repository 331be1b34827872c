// Tissue-mask pixel math, written once for the CPU launchers (csrc/cpu/tissue.cpp) and the CUDA
// launchers (csrc/cuda/tissue.cu). Each function is one pixel's or one row's share of a step; the
// launchers only decide which thread runs which row, so both devices compute the same bytes.
//
// Steps (all on a thumbnail of a few megapixels at most, indices fit in int32):
//   score      RGB(A) -> OpenCV's 8-bit HSV saturation, 0 where the pixel is dark (pen, borders)
//   median     exact k x k median, borders replicated (cv::medianBlur): selection networks built
//              at compile time for k = 3, 5, 7 (vectorizable), a sliding histogram otherwise
//   threshold  Otsu from a 256-bin histogram, OpenCV's double arithmetic (cv::THRESH_OTSU)
//   binarize   median > level, packed 64 pixels per word for the binary steps
//   morphology binary dilate/erode with cv::getStructuringElement(MORPH_ELLIPSE), outside ignored,
//              as unions of horizontally dilated packed rows (word-wide shifts)
//   components run-length union-find on the packed rows: drop small tissue (8-connected), fill
//              small holes (4-connected background not touching the border)
//   integral   summed-area table of the 0/1 mask
#pragma once
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>

#include "gpfm/hd.h"

namespace gpfm::tissue {

GPFM_HD int imin(int a, int b) { return a < b ? a : b; }
GPFM_HD int imax(int a, int b) { return a > b ? a : b; }
GPFM_HD int clampi(int v, int lo, int hi) { return v < lo ? lo : (v > hi ? hi : v); }

GPFM_HD int popcount64(uint64_t v) {
#if defined(__CUDA_ARCH__)
  return __popcll(v);
#elif defined(__POPCNT__) || !defined(__x86_64__)
  return __builtin_popcountll(v);
#else
  // Baseline x86-64 has no popcnt instruction, and the builtin becomes a libgcc call per word.
  v -= (v >> 1) & 0x5555555555555555ull;
  v = (v & 0x3333333333333333ull) + ((v >> 2) & 0x3333333333333333ull);
  v = (v + (v >> 4)) & 0x0F0F0F0F0F0F0F0Full;
  return static_cast<int>((v * 0x0101010101010101ull) >> 56);
#endif
}

GPFM_HD int ctz64(uint64_t v) {  // v != 0
#if defined(__CUDA_ARCH__)
  return __ffsll(static_cast<long long>(v)) - 1;
#else
  return __builtin_ctzll(v);
#endif
}

// ---- atomics: device atomics on the GPU, GCC builtins on the CPU threads ------------------------
// Shared = false is for memory that one thread owns (a CPU pass run as a single task): plain
// loads and stores, since locked instructions would be most of the work of a small thumbnail's
// component labelling.

template <bool Shared = true>
GPFM_HD int32_t atomic_min_i32(int32_t* p, int32_t v) {
  if constexpr (!Shared) {
    const int32_t old = *p;
    if (v < old) *p = v;
    return old;
  } else {
#if defined(__CUDA_ARCH__)
    return atomicMin(reinterpret_cast<int*>(p), v);
#else
    int32_t old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (v < old && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
    return old;
#endif
  }
}

template <bool Shared = true>
GPFM_HD void atomic_add_i32(int32_t* p, int32_t v) {
  if constexpr (!Shared) {
    *p += v;
  } else {
#if defined(__CUDA_ARCH__)
    atomicAdd(reinterpret_cast<int*>(p), v);
#else
    __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
#endif
  }
}

template <bool Shared = true>
GPFM_HD void atomic_or_i32(int32_t* p, int32_t v) {
  if constexpr (!Shared) {
    *p |= v;
  } else {
#if defined(__CUDA_ARCH__)
    atomicOr(reinterpret_cast<int*>(p), v);
#else
    __atomic_fetch_or(p, v, __ATOMIC_RELAXED);
#endif
  }
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

// OpenCV's 8-bit RGB->HSV saturation divides by V through a 12-bit fixed-point table,
// round(255 * 2^12 / V) (never a tie for V <= 255). The CPU builds the table once per process;
// CUDA passes it to each launch.
struct SaturationTable {
  int32_t div[256];
};

GPFM_HD int32_t saturation_divisor(int v) { return v == 0 ? 0 : (2 * (255 << 12) + v) / (2 * v); }

// cv::cvtColor(RGB2HSV) saturation for 8-bit input, bit for bit.
GPFM_HD int saturation_u8(int r, int g, int b, const SaturationTable& t) {
  const int v = imax(r, imax(g, b)), m = imin(r, imin(g, b));
  return ((v - m) * t.div[v] + (1 << 11)) >> 12;
}

// Saturation, forced to 0 where the brightest channel is below `dark_threshold`: black borders,
// dark pen and scanner debris are saturated but never tissue on a brightfield slide.
// Branch-free, so that a row of pixels vectorizes.
GPFM_HD uint8_t tissue_score(int r, int g, int b, int dark_threshold, const SaturationTable& t) {
  const int s = saturation_u8(r, g, b, t);
  return static_cast<uint8_t>(imax(r, imax(g, b)) < dark_threshold ? 0 : s);
}

// One pixel of an RGB (channels == 3) or RGBA (channels == 4) image; channels are packed.
GPFM_HD uint8_t score_pixel(const uint8_t* px, int channels, int dark_threshold, const SaturationTable& t) {
  int r = px[0], g = px[1], b = px[2];
  if (channels == 4) {
    const int a = px[3];
    r = over_white(r, a);
    g = over_white(g, a);
    b = over_white(b, a);
  }
  return tissue_score(r, g, b, dark_threshold, t);
}

// ---- median ------------------------------------------------------------------------------------

constexpr int kMaxKernel = 255;  // largest odd median / structuring-element size

// Exact median of every k x k window (k odd, <= kMaxKernel) centred on row y, borders replicated,
// written to out[0..w). Huang's sliding histogram: per pixel one window column leaves and one
// enters (O(k)), and the running median moves by the few levels the counts demand.
GPFM_HD void median_row(const uint8_t* src, int64_t stride, int h, int w, int k, int y, uint8_t* out) {
  const int r = k / 2, half = (k * k) / 2;
  const uint8_t* rows[kMaxKernel];
  for (int i = 0; i < k; ++i) rows[i] = src + static_cast<int64_t>(clampi(y - r + i, 0, h - 1)) * stride;
  int hist[256];
  for (int i = 0; i < 256; ++i) hist[i] = 0;
  for (int dx = -r; dx <= r; ++dx) {
    const int x = clampi(dx, 0, w - 1);
    for (int i = 0; i < k; ++i) ++hist[rows[i][x]];
  }
  int m = 0, below = 0;  // below = number of window values < m
  while (below + hist[m] <= half) below += hist[m++];
  out[0] = static_cast<uint8_t>(m);
  for (int x = 1; x < w; ++x) {
    const int gone = imax(x - r - 1, 0), come = imin(x + r, w - 1);
    if (gone != come) {
      int shift = 0;
      for (int i = 0; i < k; ++i) {
        const int vo = rows[i][gone], vi = rows[i][come];
        --hist[vo];
        ++hist[vi];
        shift += (vi < m) - (vo < m);
      }
      below += shift;
    }
    while (below > half) below -= hist[--m];
    while (below + hist[m] <= half) below += hist[m++];
    out[x] = static_cast<uint8_t>(m);
  }
}

// Selection networks for small k, generated at compile time. A window's k columns (or rows: the
// median is symmetric) are sorted first, then a network selects the median of the k sorted
// columns: Batcher's odd-even merge sort started at the merge of the sorted columns, with
// comparisons against padding (+infinity) resolved while building it and every comparison that
// cannot reach the median pruned. 3x3 needs 15 compares, 5x5 88, 7x7 210. Being comparator
// networks, they run unchanged on SIMD vectors (CPU, 16-64 pixels at a time, sharing sorted rows
// and pairs of windows: see MedianNetwork) and on scalars (CUDA, one pixel per thread).
namespace net {

struct CompareOp {
  int lo, hi, kind;  // values at slots lo, hi -> min to lo and max to hi (kind 0), only min (1), only max (2)
};

constexpr int kMaxWires = 64;
constexpr int kMaxOps = 1024;

struct Network {
  CompareOp op[kMaxOps] = {};
  int count = 0;
  int out[kMaxWires] = {};  // slot holding the value of each output wire, -1 = +infinity
};

constexpr int pow2_at_least(int n) {
  int p = 1;
  while (p < n) p *= 2;
  return p;
}

// How many values each block of wires holds (the rest of a block is +infinity padding).
struct Blocks {
  int valid[kMaxWires] = {};
};

// `count` blocks of `valid` values each, the first holding `first_valid` instead when >= 0.
constexpr Blocks blocks(int count, int valid, int first_valid = -1) {
  Blocks b{};
  for (int i = 0; i < count; ++i) b.valid[i] = (i == 0 && first_valid >= 0) ? first_valid : valid;
  return b;
}

// Batcher's odd-even merge sort on n wires (n a power of two) whose blocks of `sorted`
// consecutive wires are already sorted. Wire w holds a value when w % block < fill.valid[w /
// block], else +infinity; values live in slots (their first wire) and a comparison with +infinity
// only moves a value between wires, so it is not emitted.
constexpr Network batcher(int n, int sorted, const Blocks& fill, int block) {
  Network r{};
  int slot[kMaxWires] = {};
  for (int w = 0; w < n; ++w) slot[w] = w % block < fill.valid[w / block] ? w : -1;
  for (int p = sorted; p < n; p *= 2)
    for (int d = p; d >= 1; d /= 2)
      for (int j = d % p; j + d < n; j += 2 * d)
        for (int i = 0; i < d && i + j + d < n; ++i) {
          const int a = i + j, b = i + j + d;
          if (a / (2 * p) != b / (2 * p) || slot[b] < 0) continue;
          if (slot[a] < 0) {
            slot[a] = slot[b];
            slot[b] = -1;
            continue;
          }
          r.op[r.count++] = CompareOp{slot[a], slot[b], 0};
        }
  for (int w = 0; w < n; ++w) r.out[w] = slot[w];
  return r;
}

// Keeps only the comparisons that feed output wires [first, first + m), each reduced to the
// one result that is used when the other is not.
constexpr Network prune(const Network& in, int first, int m) {
  bool need[kMaxWires] = {};
  for (int w = first; w < first + m; ++w) need[in.out[w]] = true;
  CompareOp kept[kMaxOps] = {};
  int n = 0;
  for (int i = in.count - 1; i >= 0; --i) {
    const CompareOp o = in.op[i];
    const bool lo = need[o.lo], hi = need[o.hi];
    if (!lo && !hi) continue;
    kept[n++] = CompareOp{o.lo, o.hi, lo && hi ? 0 : (lo ? 1 : 2)};
    need[o.lo] = need[o.hi] = true;
  }
  Network r{};
  r.count = n;
  for (int i = 0; i < n; ++i) r.op[i] = kept[n - 1 - i];
  for (int w = 0; w < kMaxWires; ++w) r.out[w] = in.out[w];
  return r;
}

}  // namespace net

// Two vertically adjacent windows share K - 1 of their K sorted rows (Adams, "Fast median filters
// using separable sorting networks", 2021): ranks half - K .. half (K + 1 values) of those
// K(K - 1) values are the only ones that can be either median (half = (K*K - 1) / 2), so a pair
// costs one `core` network over the shared rows and two small `merge` networks, each of the
// K + 1 core values with the window's own row, the median at merged rank K. 7x7: 187 + 2 x 14
// comparisons per pair instead of 2 x 210.
template <int K>
struct MedianNetwork {
  static_assert(K == 3 || K == 5 || K == 7, "selection networks are built for k = 3, 5, 7");
  static constexpr int P = net::pow2_at_least(K);       // a sorted column (or row) occupies P slots
  static constexpr int M = net::pow2_at_least(K + 1);   // the core's K + 1 values, or a row, in M slots
  static constexpr int half = (K * K - 1) / 2;
  static constexpr net::Network column = net::prune(net::batcher(P, 1, net::blocks(1, K), P), 0, K);
  static constexpr net::Network select = net::prune(net::batcher(P * P, P, net::blocks(K, K), P), half, 1);
  static constexpr net::Network core = net::prune(net::batcher(P * P, P, net::blocks(K - 1, K), P), half - K, K + 1);
  static constexpr net::Network merge = net::prune(net::batcher(2 * M, M, net::blocks(2, K, K + 1), M), K, 1);
};

GPFM_HD constexpr bool has_median_network(int k) { return k == 3 || k == 5 || k == 7; }

// min / max of one scalar pixel; the CPU supplies the same for 16-pixel vectors.
struct ScalarMinMax {
  GPFM_HD static uint8_t lo(uint8_t a, uint8_t b) { return a < b ? a : b; }
  GPFM_HD static uint8_t hi(uint8_t a, uint8_t b) { return a < b ? b : a; }
};

// Network facts as constant expressions: device code may use them only as template arguments.
enum class Net { Column, Select, Core, Merge };

template <int K, Net N>
constexpr const net::Network& network() {
  return N == Net::Column ? MedianNetwork<K>::column
         : N == Net::Select ? MedianNetwork<K>::select
         : N == Net::Core   ? MedianNetwork<K>::core
                            : MedianNetwork<K>::merge;
}
template <int K, Net N>
constexpr net::CompareOp network_op(int i) { return network<K, N>().op[i]; }
template <int K, Net N>
constexpr int network_size() { return network<K, N>().count; }
template <int K>
constexpr int column_rank_slot(int i) { return MedianNetwork<K>::column.out[i]; }
template <int K>
constexpr int median_slot() { return MedianNetwork<K>::select.out[MedianNetwork<K>::half]; }
template <int K>
constexpr int core_rank_slot(int i) { return MedianNetwork<K>::core.out[MedianNetwork<K>::half - K + i]; }
template <int K>
constexpr int merged_median_slot() { return MedianNetwork<K>::merge.out[K]; }

template <int Slot, class T>
GPFM_HD T pick(const T* v) { return v[Slot]; }

template <class MinMax, class T, int Lo, int Hi, int Kind>
GPFM_HD void compare_exchange(T* v) {
  const T a = v[Lo], b = v[Hi];
  if (Kind != 2) v[Lo] = MinMax::lo(a, b);
  if (Kind != 1) v[Hi] = MinMax::hi(a, b);
}

template <int K, Net N, class MinMax, class T, size_t... I>
GPFM_HD void run_network(T* v, std::index_sequence<I...>) {
  (compare_exchange<MinMax, T, network_op<K, N>(I).lo, network_op<K, N>(I).hi, network_op<K, N>(I).kind>(v), ...);
}

template <int K, Net N, class MinMax, class T>
GPFM_HD void run_network(T* v) {
  run_network<K, N, MinMax>(v, std::make_index_sequence<network_size<K, N>()>());
}

template <int K, class T, size_t... I>
GPFM_HD void gather_sorted(const T* v, T* sorted, std::index_sequence<I...>) {
  ((sorted[I] = pick<column_rank_slot<K>(I)>(v)), ...);
}

template <int K, class T, size_t... I>
GPFM_HD void gather_core(const T* v, T* ranks, std::index_sequence<I...>) {
  ((ranks[I] = pick<core_rank_slot<K>(I)>(v)), ...);
}

// in[0..K) -> sorted[0..K) ascending.
template <int K, class MinMax, class T>
GPFM_HD void sort_column(const T* in, T* sorted) {
  T v[MedianNetwork<K>::P];
  for (int i = 0; i < K; ++i) v[i] = in[i];
  run_network<K, Net::Column, MinMax>(v);
  gather_sorted<K>(v, sorted, std::make_index_sequence<K>());
}

// The median of K sorted columns, column c's rank i at v[c * P + i]; v is used as scratch.
template <int K, class MinMax, class T>
GPFM_HD T select_median(T* v) {
  run_network<K, Net::Select, MinMax>(v);
  return pick<median_slot<K>()>(v);
}

// The K + 1 middle ranks (see MedianNetwork) of K - 1 sorted rows, row c's rank i at v[c * P + i]
// (v is used as scratch), to ranks[0..K].
template <int K, class MinMax, class T>
GPFM_HD void select_core(T* v, T* ranks) {
  run_network<K, Net::Core, MinMax>(v);
  gather_core<K>(v, ranks, std::make_index_sequence<K + 1>());
}

// The median of a window from its pair's core ranks[0..K] and its own sorted row[0..K).
template <int K, class MinMax, class T>
GPFM_HD T merge_median(const T* ranks, const T* row) {
  constexpr int M = MedianNetwork<K>::M;
  T v[2 * M];
  for (int i = 0; i <= K; ++i) v[i] = ranks[i];
  for (int i = 0; i < K; ++i) v[M + i] = row[i];
  run_network<K, Net::Merge, MinMax>(v);
  return pick<merged_median_slot<K>()>(v);
}

// One output pixel through the networks (the CUDA path; the CPU shares sorted columns per row).
template <int K>
GPFM_HD uint8_t median_pixel(const uint8_t* src, int64_t stride, int h, int w, int x, int y) {
  constexpr int P = MedianNetwork<K>::P, r = K / 2;
  uint8_t v[P * P];
  for (int c = 0; c < K; ++c) {
    uint8_t column[K];
    const int xx = clampi(x - r + c, 0, w - 1);
    for (int i = 0; i < K; ++i) column[i] = src[static_cast<int64_t>(clampi(y - r + i, 0, h - 1)) * stride + xx];
    sort_column<K, ScalarMinMax>(column, v + c * P);
  }
  return select_median<K, ScalarMinMax>(v);
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

// ---- packed binary rows ------------------------------------------------------------------------
// A packed row holds pixel x in bit (x & 63) of word (x >> 6); bits past the width are 0.

GPFM_HD int words_for(int w) { return (w + 63) >> 6; }
GPFM_HD uint64_t tail_mask(int w) { return (w & 63) ? (~0ull >> (64 - (w & 63))) : ~0ull; }

// Eight 0/1 bytes (byte j = pixel j, little-endian) <-> eight bits, by multiply and carry-free
// SWAR tricks.
GPFM_HD uint64_t gather_byte_flags(uint64_t flags) { return (flags * 0x0102040810204080ull) >> 56; }

GPFM_HD uint64_t spread_bits(uint64_t byte) {
  const uint64_t y = (byte * 0x0101010101010101ull) & 0x8040201008040201ull;  // byte j keeps bit j
  return ((((y & 0x7F7F7F7F7F7F7F7Full) + 0x7F7F7F7F7F7F7F7Full) | y) & 0x8080808080808080ull) >> 7;
}

// bits = (row[x] > level) for x < w: thresholding the score (level 0 packs a 0/1 mask).
GPFM_HD void pack_row(const uint8_t* row, int w, int level, uint64_t* bits) {
  for (int i = 0, base = 0; base < w; ++i, base += 64) {
    const int n = imin(64, w - base);
    uint8_t flags[64] = {};
    for (int j = 0; j < n; ++j) flags[j] = row[base + j] > level;
    uint64_t word = 0;
    for (int g = 0; g < 8; ++g) {
      uint64_t eight;
      memcpy(&eight, flags + 8 * g, 8);
      word |= gather_byte_flags(eight) << (8 * g);
    }
    bits[i] = word;
  }
}

GPFM_HD void unpack_row(const uint64_t* bits, int w, uint8_t* row) {
  for (int i = 0, base = 0; base < w; ++i, base += 64) {
    uint8_t bytes[64];
    for (int g = 0; g < 8; ++g) {
      const uint64_t eight = spread_bits((bits[i] >> (8 * g)) & 0xFFu);
      memcpy(bytes + 8 * g, &eight, 8);
    }
    memcpy(row + base, bytes, static_cast<size_t>(imin(64, w - base)));
  }
}

// The words of one colour: the row itself for 1, its complement (within the width) for 0.
GPFM_HD uint64_t color_word(const uint64_t* bits, int i, int nw, uint64_t tail, uint8_t color) {
  const uint64_t v = color ? bits[i] : ~bits[i];
  return i == nw - 1 ? v & tail : v;
}

// ---- morphology --------------------------------------------------------------------------------

// Half-width of row dy (-k/2..k/2) of cv::getStructuringElement(MORPH_ELLIPSE, {k, k}) for odd k,
// with OpenCV's arithmetic (sqrt, then round half to even).
GPFM_HD int ellipse_halfwidth(int k, int dy) {
  const int r = k / 2;
  if (r == 0) return 0;
  const double inv_r2 = 1.0 / (static_cast<double>(r) * r);
  return static_cast<int>(rint(r * sqrt((r * r - dy * dy) * inv_r2)));
}

// t |= (t shifted by +s) | (t shifted by -s), 1 <= s <= 63, across the words of a packed row.
// NW > 0 promises nw == NW (the row functions below take the same parameter): the CPU instantiates
// the few word counts of small thumbnails, whose loops then unroll; 0 = any width.
template <int NW = 0>
GPFM_HD void shift_or(uint64_t* t, int nw, int s) {
  if (NW > 0) nw = NW;
  uint64_t prev = 0, cur = t[0];
  for (int i = 0; i + 1 < nw; ++i) {
    const uint64_t next = t[i + 1];
    t[i] = cur | (cur << s) | (prev >> (64 - s)) | (cur >> s) | (next << (64 - s));
    prev = cur;
    cur = next;
  }
  t[nw - 1] = cur | (cur << s) | (prev >> (64 - s)) | (cur >> s);
}

// Horizontal dilation of a row already dilated by radius `from` up to radius `to`: the radius
// covered doubles with each shift_or.
template <int NW = 0>
GPFM_HD void dilate_horizontally(uint64_t* t, int nw, int from, int to) {
  for (int c = from; c < to;) {
    const int s = imin(imin(c + 1, to - c), 63);
    shift_or<NW>(t, nw, s);
    c += s;
  }
}

// The elliptical element as horizontal radii: its rows dy = -r..r have half-width
// radius[pick[dy + r]], and radius[0..n) lists the distinct half-widths in ascending order.
struct Ellipse {
  int r, n;
  int radius[kMaxKernel / 2 + 1];
  int pick[kMaxKernel];
};

GPFM_HD Ellipse make_ellipse(int k) {
  Ellipse e{};
  e.r = k / 2;
  for (int dy = -e.r; dy <= 0; ++dy) {  // half-widths grow towards the middle row
    const int d = ellipse_halfwidth(k, dy);
    if (e.n == 0 || e.radius[e.n - 1] != d) e.radius[e.n++] = d;
    e.pick[dy + e.r] = e.pick[e.r - dy] = e.n - 1;
  }
  return e;
}

// Dilation and erosion are unions of horizontally dilated rows: output row y is the OR over the
// element's rows dy of source row y + dy dilated by that row's half-width. A source row serves k
// output rows with only e.n distinct radii, so each row is dilated once per radius (planes
// `plane` words apart) and then combined. Erosion is the complement of the dilated complement.
// Pixels outside the image are ignored (OpenCV's default border for morphology), so the image
// edge neither grows nor erodes the mask.
template <int NW = 0>
GPFM_HD void dilate_row_radii(const uint64_t* row, int w, bool erode, const Ellipse& e, uint64_t* out, int64_t plane) {
  const int nw = NW > 0 ? NW : words_for(w);
  const uint64_t flip = erode ? ~0ull : 0;
  for (int i = 0; i < nw; ++i) out[i] = row[i] ^ flip;
  out[nw - 1] &= tail_mask(w);
  int covered = 0;
  for (int j = 0; j < e.n; ++j) {
    uint64_t* t = out + j * plane;
    if (j > 0)
      for (int i = 0; i < nw; ++i) t[i] = t[i - plane];
    dilate_horizontally<NW>(t, nw, covered, e.radius[j]);
    covered = e.radius[j];
  }
}

// Row y of the dilation (or erosion) from the dilated rows of dilate_row_radii, whose first
// stored row is y0.
template <int NW = 0>
GPFM_HD void combine_rows(const uint64_t* dilated, int64_t plane, int y0, int h, int w, int y, const Ellipse& e,
                          bool erode, uint64_t* out) {
  const int nw = NW > 0 ? NW : words_for(w);
  const int dy0 = imax(-e.r, -y), dy1 = imin(e.r, h - 1 - y);  // rows inside the image
  const uint64_t flip = erode ? ~0ull : 0;
  const uint64_t* first = dilated + e.pick[dy0 + e.r] * plane + static_cast<int64_t>(y + dy0 - y0) * nw;
  for (int i = 0; i < nw; ++i) out[i] = first[i];
  for (int dy = dy0 + 1; dy <= dy1; ++dy) {
    const uint64_t* row = dilated + e.pick[dy + e.r] * plane + static_cast<int64_t>(y + dy - y0) * nw;
    for (int i = 0; i < nw; ++i) out[i] |= row[i];
  }
  for (int i = 0; i < nw; ++i) out[i] ^= flip;
  out[nw - 1] &= tail_mask(w);
}

// ---- connected components (run-length union-find) ---------------------------------------------
// A run is a maximal horizontal stretch of one colour, [start, end), found in a packed row with
// word-wide bit tricks. Runs of a row are stored
// contiguously after the runs of the rows above; row_begin[y]..row_begin[y+1] index them.
// parent[] is a union-find forest whose roots are each component's smallest run index, so the
// labels do not depend on the order in which threads merge rows.

// Run starts (or ends) of one colour in word i: set bits whose left (right) neighbour is not set.
GPFM_HD uint64_t run_starts(const uint64_t* bits, int i, int nw, uint64_t tail, uint8_t color) {
  const uint64_t v = color_word(bits, i, nw, tail, color);
  const uint64_t left = i > 0 ? color_word(bits, i - 1, nw, tail, color) >> 63 : 0;
  return v & ~((v << 1) | left);
}

GPFM_HD uint64_t run_ends(const uint64_t* bits, int i, int nw, uint64_t tail, uint8_t color) {
  const uint64_t v = color_word(bits, i, nw, tail, color);
  const uint64_t right = i + 1 < nw ? color_word(bits, i + 1, nw, tail, color) << 63 : 0;
  return v & ~((v >> 1) | right);
}

GPFM_HD int count_runs(const uint64_t* bits, int w, uint8_t color) {
  const int nw = words_for(w);
  const uint64_t tail = tail_mask(w);
  int n = 0;
  for (int i = 0; i < nw; ++i) n += popcount64(run_starts(bits, i, nw, tail, color));
  return n;
}

// start[n] = first pixel, end[n] = one past the last pixel of the row's n-th run of `color`.
GPFM_HD void fill_runs(const uint64_t* bits, int w, uint8_t color, int32_t* start, int32_t* end) {
  const int nw = words_for(w);
  const uint64_t tail = tail_mask(w);
  int ns = 0, ne = 0;
  for (int i = 0; i < nw; ++i) {
    for (uint64_t b = run_starts(bits, i, nw, tail, color); b; b &= b - 1) start[ns++] = i * 64 + ctz64(b);
    for (uint64_t b = run_ends(bits, i, nw, tail, color); b; b &= b - 1) end[ne++] = i * 64 + ctz64(b) + 1;
  }
}

// Sets pixels [x0, x1) of a packed row to `value`.
GPFM_HD void set_span(uint64_t* bits, int x0, int x1, bool value) {
  while (x0 < x1) {
    const int i = x0 >> 6, lo = x0 & 63, n = imin(64 - lo, x1 - x0);
    const uint64_t m = (n == 64 ? ~0ull : ((1ull << n) - 1)) << lo;
    bits[i] = value ? bits[i] | m : bits[i] & ~m;
    x0 += n;
  }
}

// Other threads may link a root while we walk; a stale read still names an ancestor, and
// uf_union's atomic min notices a root that stopped being one. The device read is volatile so it
// goes to L2, where the atomics land, instead of a stale L1 line.
GPFM_HD int32_t uf_find(const int32_t* parent, int32_t i) {
  while (true) {
#if defined(__CUDA_ARCH__)
    const int32_t p = *reinterpret_cast<const volatile int32_t*>(parent + i);
#else
    const int32_t p = __atomic_load_n(parent + i, __ATOMIC_RELAXED);
#endif
    if (p == i) return i;
    i = p;
  }
}

// The root of run i. A forest that one thread owns also has the walked path halved (each node
// re-pointed to its grandparent), which keeps later walks short; roots stay the same.
template <bool Shared>
GPFM_HD int32_t uf_root(int32_t* parent, int32_t i) {
  if constexpr (Shared) {
    return uf_find(parent, i);
  } else {
    while (parent[i] != i) {
      parent[i] = parent[parent[i]];
      i = parent[i];
    }
    return i;
  }
}

// Lock-free union (Playne & Hawick 2018): the larger root is linked under the smaller with an
// atomic min. If another thread linked it first (to `old`), the min has moved it under the
// smaller of the two, and the union goes on with `old` so that link is not lost.
template <bool Shared = true>
GPFM_HD void uf_union(int32_t* parent, int32_t a, int32_t b) {
  while (true) {
    a = uf_root<Shared>(parent, a);
    b = uf_root<Shared>(parent, b);
    if (a == b) return;
    if (a > b) {
      const int32_t t = a;
      a = b;
      b = t;
    }
    const int32_t old = atomic_min_i32<Shared>(&parent[b], a);
    if (old == b) return;
    b = old;
  }
}

// Unions the runs of row y ([a0, a1)) with those of row y - 1 ([b0, b1)) that touch them:
// sharing a column (4-connectivity) or also diagonally (8-connectivity).
template <bool Shared = true>
GPFM_HD void merge_rows(const int32_t* start, const int32_t* end, int32_t a0, int32_t a1, int32_t b0, int32_t b1,
                        bool conn8, int32_t* parent) {
  const int32_t slack = conn8 ? 1 : 0;
  while (a0 < a1 && b0 < b1) {
    if (start[b0] < end[a0] + slack && start[a0] < end[b0] + slack) uf_union<Shared>(parent, a0, b0);
    if (end[a0] <= end[b0]) ++a0;
    else ++b0;
  }
}

// Adds run i of row y to its component's area and border flag (label[i] = its root).
template <bool Shared = true>
GPFM_HD void accumulate_run(int32_t* parent, const int32_t* start, const int32_t* end, int32_t i, int y, int h, int w,
                            int32_t* label, int32_t* area, int32_t* border) {
  const int32_t root = uf_root<Shared>(parent, i);
  label[i] = root;
  atomic_add_i32<Shared>(&area[root], end[i] - start[i]);
  if (y == 0 || y == h - 1 || start[i] == 0 || end[i] == w) atomic_or_i32<Shared>(&border[root], 1);
}

// Whether a component of `color` changes colour: tissue (1) smaller than min_area disappears;
// background (0) smaller than min_area that does not reach the image border (a hole) is filled.
GPFM_HD bool flips(uint8_t color, int32_t area, int32_t border, int64_t min_area) {
  return area < min_area && (color != 0 || border == 0);
}

// Writes row y of dst: src's packed row, with the runs of components that flip set to !color.
GPFM_HD void paint_row(const uint64_t* src, uint64_t* dst, int w, uint8_t color, const int32_t* start,
                       const int32_t* end, const int32_t* label, const int32_t* area, const int32_t* border,
                       int32_t r0, int32_t r1, int64_t min_area) {
  const int nw = words_for(w);
  for (int i = 0; i < nw; ++i) dst[i] = src[i];
  for (int32_t i = r0; i < r1; ++i) {
    const int32_t root = label[i];
    if (flips(color, area[root], border[root], min_area)) set_span(dst, start[i], end[i], color == 0);
  }
}

// ---- summed-area table -------------------------------------------------------------------------
// sat is (h + 1) x (w + 1), row stride `stride`: sat[y][x] = number of mask pixels above and left
// of (x, y). Built as row prefixes (row y + 1 from mask row y), then accumulated down columns.

// prefix[0..w] = running count of nonzero pixels of one row.
GPFM_HD void row_prefix(const uint8_t* row, int w, int32_t* prefix) {
  int32_t s = 0;
  prefix[0] = 0;
  for (int x = 0; x < w; ++x) {
    s += row[x] != 0;
    prefix[x + 1] = s;
  }
}

// Row y + 1 of the table from row y (`above`) in one pass: the serial form of the two steps.
GPFM_HD void integral_row(const uint8_t* row, int w, const int32_t* above, int32_t* out) {
  int32_t s = 0;
  out[0] = 0;
  for (int x = 0; x < w; ++x) {
    s += row[x] != 0;
    out[x + 1] = above[x + 1] + s;
  }
}

GPFM_HD void accumulate_columns(int32_t* sat, int64_t stride, int h, int x0, int x1) {
  for (int y = 1; y <= h; ++y) {
    int32_t* row = sat + y * stride;
    const int32_t* above = row - stride;
    for (int x = x0; x < x1; ++x) row[x] += above[x];
  }
}

// ---- patch tissue fractions --------------------------------------------------------------------
// A patch's tissue fraction is the exact area integral of the mask over its rectangle: the table
// is bilinear inside each mask pixel, because the mask is constant there. The double arithmetic
// is TissueMask.fractions' (NumPy) step for step, so both give the same bits.

// Mask area in [0, u] x [0, v] (mask pixels, real-valued corners) of an h x w mask.
GPFM_HD double area_below(const int32_t* sat, int64_t stride, int h, int w, double u, double v) {
  u = u < 0.0 ? 0.0 : (u > w ? static_cast<double>(w) : u);
  v = v < 0.0 ? 0.0 : (v > h ? static_cast<double>(h) : v);
  const int i = imin(static_cast<int>(floor(u)), w - 1), j = imin(static_cast<int>(floor(v)), h - 1);
  const double a = u - i, b = v - j;
  const int32_t* t0 = sat + j * stride + i;
  const int32_t* t1 = t0 + stride;
  return (1 - a) * (1 - b) * t0[0] + a * (1 - b) * t0[1] + (1 - a) * b * t1[0] + a * b * t1[1];
}

// Tissue fraction of the level-0 rectangle (x0, y0, pw, ph); one mask pixel is sx x sy level-0
// pixels, and area outside the mask counts as background.
GPFM_HD double rect_fraction(const int32_t* sat, int h, int w, double x0, double y0, double pw, double ph, double sx,
                             double sy) {
  const int64_t stride = w + 1;
  const double du = pw / sx, dv = ph / sy;
  const double u0 = x0 / sx, v0 = y0 / sy, u1 = u0 + du, v1 = v0 + dv;
  const double area = area_below(sat, stride, h, w, u1, v1) - area_below(sat, stride, h, w, u0, v1) -
                      area_below(sat, stride, h, w, u1, v0) + area_below(sat, stride, h, w, u0, v0);
  return area / (du * dv);
}

// Level-0 position of lattice step i: round(i * stride), half to even as NumPy rounds.
GPFM_HD int64_t lattice_position(int64_t i, double stride) {
  return static_cast<int64_t>(rint(static_cast<double>(i) * stride));
}

}  // namespace gpfm::tissue
