// CUDA launchers of the tissue-mask steps: the same per-row and per-pixel functions as the CPU
// launchers (gpfm/tissue.h), one thread per pixel, row or column, enqueued on the caller's stream.
// Thumbnails are a few megapixels: one thread per row is plenty and keeps the code the CPU's.
// Scratch memory comes from the stream-ordered allocator, so nothing here synchronises.
#include <cuda_runtime.h>

#include <algorithm>

#include "gpfm/launchers.h"
#include "gpfm/tissue.h"

namespace gpfm {
namespace {
using namespace tissue;

constexpr int kThreads = 256;

#define GPFM_CUDA_TRY(expr)                    \
  do {                                         \
    const cudaError_t err_ = (expr);           \
    if (err_ != cudaSuccess) return err_;      \
  } while (0)

unsigned blocks_for(int64_t n, int threads = kThreads) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((n + threads - 1) / threads, 1 << 20)));
}

// Stream-ordered scratch buffer, released (also stream-ordered) when it goes out of scope.
template <class T>
struct Scratch {
  T* ptr = nullptr;
  cudaStream_t stream;
  explicit Scratch(cudaStream_t s) : stream(s) {}
  cudaError_t alloc(int64_t n) { return cudaMallocAsync(reinterpret_cast<void**>(&ptr), sizeof(T) * std::max<int64_t>(n, 1), stream); }
  ~Scratch() {
    if (ptr) cudaFreeAsync(ptr, stream);
  }
};

// ---- kernels -----------------------------------------------------------------------------------

__global__ void score_kernel(TissueImage src, uint8_t* dst, int dark_threshold, SaturationTable table) {
  const int64_t n = src.h * src.w;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t y = i / src.w, x = i % src.w;
    dst[i] = score_pixel(src.data + y * src.sy + x * src.sx, static_cast<int>(src.channels), dark_threshold, table);
  }
}

template <int K>
__global__ void median_network_kernel(const uint8_t* src, uint8_t* dst, int h, int w) {
  const int64_t n = static_cast<int64_t>(h) * w;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    dst[i] = median_pixel<K>(src, w, h, w, static_cast<int>(i % w), static_cast<int>(i / w));
}

__global__ void median_kernel(const uint8_t* src, uint8_t* dst, int h, int w, int k) {
  const int y = blockIdx.x * blockDim.x + threadIdx.x;
  if (y >= h) return;
  median_row(src, w, h, w, k, y, dst + static_cast<int64_t>(y) * w);
}

__global__ void histogram_kernel(const uint8_t* src, int64_t n, int64_t* hist) {
  __shared__ unsigned int local[256];
  for (int i = threadIdx.x; i < 256; i += blockDim.x) local[i] = 0;
  __syncthreads();
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    atomicAdd(&local[src[i]], 1u);
  __syncthreads();
  for (int i = threadIdx.x; i < 256; i += blockDim.x)
    if (local[i]) atomicAdd(reinterpret_cast<unsigned long long*>(hist + i), static_cast<unsigned long long>(local[i]));
}

__global__ void level_kernel(const int64_t* hist, int fixed_threshold, int min_threshold, int32_t* level) {
  const int otsu = fixed_threshold >= 0 ? 0 : otsu_threshold(hist);
  *level = choose_threshold(otsu, fixed_threshold, min_threshold);
}

__global__ void pack_kernel(const uint8_t* src, int h, int w, const int32_t* level, int fixed_level, uint64_t* bits) {
  const int y = blockIdx.x * blockDim.x + threadIdx.x;
  if (y < h) pack_row(src + static_cast<int64_t>(y) * w, w, level ? *level : fixed_level, bits + static_cast<int64_t>(y) * words_for(w));
}

__global__ void unpack_kernel(const uint64_t* bits, int h, int w, uint8_t* dst) {
  const int y = blockIdx.x * blockDim.x + threadIdx.x;
  if (y < h) unpack_row(bits + static_cast<int64_t>(y) * words_for(w), w, dst + static_cast<int64_t>(y) * w);
}

__global__ void prefix_kernel(const uint8_t* src, int h, int w, int32_t* prefix, int64_t pstride) {
  const int y = blockIdx.x * blockDim.x + threadIdx.x;
  if (y < h) row_prefix(src + static_cast<int64_t>(y) * w, w, prefix + y * pstride);
}

__global__ void dilate_radii_kernel(const uint64_t* src, int h, int w, bool erode, Ellipse e, uint64_t* dilated) {
  const int y = blockIdx.x * blockDim.x + threadIdx.x;
  if (y >= h) return;
  const int64_t nw = words_for(w);
  dilate_row_radii(src + y * nw, w, erode, e, dilated + y * nw, h * nw);
}

__global__ void combine_kernel(const uint64_t* dilated, int h, int w, Ellipse e, bool erode, uint64_t* dst) {
  const int y = blockIdx.x * blockDim.x + threadIdx.x;
  if (y >= h) return;
  const int64_t nw = words_for(w);
  combine_rows(dilated, h * nw, 0, h, w, y, e, erode, dst + y * nw);
}

// Run-length labelling, one thread per row; row_begin[h] (the run count) stays on the device.
__global__ void count_runs_kernel(const uint64_t* src, int h, int w, uint8_t color, int32_t* row_begin) {
  const int y = blockIdx.x * blockDim.x + threadIdx.x;
  if (y == 0) row_begin[0] = 0;
  if (y < h) row_begin[y + 1] = count_runs(src + static_cast<int64_t>(y) * words_for(w), w, color);
}

__global__ void scan_rows_kernel(int32_t* row_begin, int h) {
  for (int y = 0; y < h; ++y) row_begin[y + 1] += row_begin[y];
}

__global__ void fill_runs_kernel(const uint64_t* src, int h, int w, uint8_t color, const int32_t* row_begin,
                                 int32_t* start, int32_t* end, int32_t* parent, int32_t* area, int32_t* border) {
  const int y = blockIdx.x * blockDim.x + threadIdx.x;
  if (y >= h) return;
  fill_runs(src + static_cast<int64_t>(y) * words_for(w), w, color, start + row_begin[y], end + row_begin[y]);
  for (int32_t i = row_begin[y]; i < row_begin[y + 1]; ++i) {
    parent[i] = i;
    area[i] = 0;
    border[i] = 0;
  }
}

__global__ void merge_rows_kernel(const int32_t* row_begin, const int32_t* start, const int32_t* end, int h,
                                  bool conn8, int32_t* parent) {
  const int y = blockIdx.x * blockDim.x + threadIdx.x;
  if (y < 1 || y >= h) return;
  merge_rows(start, end, row_begin[y], row_begin[y + 1], row_begin[y - 1], row_begin[y], conn8, parent);
}

__global__ void accumulate_kernel(const int32_t* row_begin, int32_t* parent, const int32_t* start,
                                  const int32_t* end, int h, int w, int32_t* label, int32_t* area, int32_t* border) {
  const int y = blockIdx.x * blockDim.x + threadIdx.x;
  if (y >= h) return;
  for (int32_t i = row_begin[y]; i < row_begin[y + 1]; ++i) accumulate_run(parent, start, end, i, y, h, w, label, area, border);
}

__global__ void paint_kernel(const uint64_t* src, uint64_t* dst, int h, int w, uint8_t color, const int32_t* row_begin,
                             const int32_t* start, const int32_t* end, const int32_t* label, const int32_t* area,
                             const int32_t* border, int64_t min_area) {
  const int y = blockIdx.x * blockDim.x + threadIdx.x;
  if (y >= h) return;
  const int64_t off = static_cast<int64_t>(y) * words_for(w);
  paint_row(src + off, dst + off, w, color, start, end, label, area, border, row_begin[y], row_begin[y + 1], min_area);
}

__global__ void accumulate_columns_kernel(int32_t* sat, int64_t stride, int h) {
  const int x = blockIdx.x * blockDim.x + threadIdx.x;
  if (x < stride) accumulate_columns(sat, stride, h, x, x + 1);
}

// ---- steps -------------------------------------------------------------------------------------

SaturationTable saturation_table() {
  SaturationTable t{};
  for (int v = 0; v < 256; ++v) t.div[v] = saturation_divisor(v);
  return t;
}

int64_t packed_words(int h, int w) { return static_cast<int64_t>(h) * words_for(w); }

cudaError_t pack(const uint8_t* src, int h, int w, const int32_t* level, uint64_t* bits, cudaStream_t s) {
  pack_kernel<<<blocks_for(h), kThreads, 0, s>>>(src, h, w, level, 0, bits);
  return cudaGetLastError();
}

cudaError_t unpack(const uint64_t* bits, int h, int w, uint8_t* dst, cudaStream_t s) {
  unpack_kernel<<<blocks_for(h), kThreads, 0, s>>>(bits, h, w, dst);
  return cudaGetLastError();
}

cudaError_t morph_once(const uint64_t* src, uint64_t* dst, int h, int w, int k, bool erode, cudaStream_t s) {
  const Ellipse e = make_ellipse(k);
  Scratch<uint64_t> dilated(s);
  GPFM_CUDA_TRY(dilated.alloc(packed_words(h, w) * e.n));
  dilate_radii_kernel<<<blocks_for(h), kThreads, 0, s>>>(src, h, w, erode, e, dilated.ptr);
  combine_kernel<<<blocks_for(h), kThreads, 0, s>>>(dilated.ptr, h, w, e, erode, dst);
  return cudaGetLastError();
}

// Close (dilate, erode) or open (erode, dilate) packed `bits` in place; `scratch` is its size.
cudaError_t close_or_open(uint64_t* bits, uint64_t* scratch, int h, int w, int k, bool close, cudaStream_t s) {
  GPFM_CUDA_TRY(morph_once(bits, scratch, h, w, k, !close, s));
  return morph_once(scratch, bits, h, w, k, close, s);
}

// Buffers are sized for the most runs a row can hold, since the actual count stays on the device.
cudaError_t component_pass(const uint64_t* src, uint64_t* dst, int h, int w, uint8_t color, bool conn8,
                           int64_t min_area, cudaStream_t s) {
  if (min_area <= 0)
    return cudaMemcpyAsync(dst, src, sizeof(uint64_t) * packed_words(h, w), cudaMemcpyDeviceToDevice, s);
  const int64_t max_runs = static_cast<int64_t>(h) * ((w + 1) / 2);
  Scratch<int32_t> row_begin(s), start(s), end(s), parent(s), label(s), area(s), border(s);
  GPFM_CUDA_TRY(row_begin.alloc(h + 1));
  for (auto* b : {&start, &end, &parent, &label, &area, &border}) GPFM_CUDA_TRY(b->alloc(max_runs));
  const unsigned rows = blocks_for(h);
  count_runs_kernel<<<rows, kThreads, 0, s>>>(src, h, w, color, row_begin.ptr);
  scan_rows_kernel<<<1, 1, 0, s>>>(row_begin.ptr, h);
  fill_runs_kernel<<<rows, kThreads, 0, s>>>(src, h, w, color, row_begin.ptr, start.ptr, end.ptr, parent.ptr, area.ptr,
                                             border.ptr);
  merge_rows_kernel<<<rows, kThreads, 0, s>>>(row_begin.ptr, start.ptr, end.ptr, h, conn8, parent.ptr);
  accumulate_kernel<<<rows, kThreads, 0, s>>>(row_begin.ptr, parent.ptr, start.ptr, end.ptr, h, w, label.ptr, area.ptr,
                                              border.ptr);
  paint_kernel<<<rows, kThreads, 0, s>>>(src, dst, h, w, color, row_begin.ptr, start.ptr, end.ptr, label.ptr, area.ptr,
                                         border.ptr, min_area);
  return cudaGetLastError();
}

// Drop small tissue, then fill small holes, packed `bits` in place; `scratch` is its size.
cudaError_t filter_packed(uint64_t* bits, uint64_t* scratch, int h, int w, int64_t min_tissue_px, int64_t min_hole_px,
                          cudaStream_t s) {
  GPFM_CUDA_TRY(component_pass(bits, scratch, h, w, 1, true, min_tissue_px, s));
  return component_pass(scratch, bits, h, w, 0, false, min_hole_px, s);
}

cudaError_t integral_image(const uint8_t* mask, int32_t* sat, int h, int w, cudaStream_t s) {
  const int64_t stride = static_cast<int64_t>(w) + 1;
  GPFM_CUDA_TRY(cudaMemsetAsync(sat, 0, sizeof(int32_t) * stride, s));
  prefix_kernel<<<blocks_for(h), kThreads, 0, s>>>(mask, h, w, sat + stride, stride);
  accumulate_columns_kernel<<<blocks_for(stride), kThreads, 0, s>>>(sat, stride, h);
  return cudaGetLastError();
}

cudaError_t histogram(const uint8_t* src, int64_t n, int64_t* hist, cudaStream_t s) {
  GPFM_CUDA_TRY(cudaMemsetAsync(hist, 0, sizeof(int64_t) * 256, s));
  histogram_kernel<<<std::min(blocks_for(n), 1024u), kThreads, 0, s>>>(src, n, hist);
  return cudaGetLastError();
}

cudaError_t median(const uint8_t* src, uint8_t* dst, int h, int w, int k, cudaStream_t s) {
  if (k <= 1) return cudaMemcpyAsync(dst, src, static_cast<size_t>(h) * w, cudaMemcpyDeviceToDevice, s);
  const unsigned pixels = blocks_for(static_cast<int64_t>(h) * w);
  switch (k) {
    case 3: median_network_kernel<3><<<pixels, kThreads, 0, s>>>(src, dst, h, w); return cudaGetLastError();
    case 5: median_network_kernel<5><<<pixels, kThreads, 0, s>>>(src, dst, h, w); return cudaGetLastError();
    case 7: median_network_kernel<7><<<pixels, kThreads, 0, s>>>(src, dst, h, w); return cudaGetLastError();
    default: break;
  }
  // a 1 KiB histogram per thread lives in local memory: small blocks keep more of them resident
  constexpr int threads = 64;
  median_kernel<<<blocks_for(h, threads), threads, 0, s>>>(src, dst, h, w, k);
  return cudaGetLastError();
}

// The frame of the standalone binary steps: pack the 0/1 plane src, run
// step(bits, scratch, h, w, stream) on it (the result in bits, which the step may swap with its
// same-sized scratch), unpack into dst.
template <class Step>
cudaError_t on_packed_plane(const uint8_t* src, uint8_t* dst, int64_t h64, int64_t w64, void* stream, Step&& step) {
  const auto s = static_cast<cudaStream_t>(stream);
  const int h = static_cast<int>(h64), w = static_cast<int>(w64);
  Scratch<uint64_t> bits(s), scratch(s);
  GPFM_CUDA_TRY(bits.alloc(packed_words(h, w)));
  GPFM_CUDA_TRY(scratch.alloc(packed_words(h, w)));
  GPFM_CUDA_TRY(pack(src, h, w, nullptr, bits.ptr, s));
  GPFM_CUDA_TRY(step(bits.ptr, scratch.ptr, h, w, s));
  return unpack(bits.ptr, h, w, dst, s);
}

}  // namespace

int tissue_score_cuda(const TissueImage& src, uint8_t* dst, int dark_threshold, void* stream) {
  score_kernel<<<blocks_for(src.h * src.w), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(src, dst, dark_threshold,
                                                                                             saturation_table());
  return cudaGetLastError();
}

int median_blur_cuda(const uint8_t* src, uint8_t* dst, int64_t h, int64_t w, int k, void* stream) {
  return median(src, dst, static_cast<int>(h), static_cast<int>(w), k, static_cast<cudaStream_t>(stream));
}

int histogram256_cuda(const uint8_t* src, int64_t n, int64_t* hist, void* stream) {
  return histogram(src, n, hist, static_cast<cudaStream_t>(stream));
}

int morphology_cuda(const uint8_t* src, uint8_t* dst, int64_t h, int64_t w, MorphOp op, int k, void* stream) {
  return on_packed_plane(src, dst, h, w, stream, [&](uint64_t*& bits, uint64_t*& scratch, int hi, int wi, cudaStream_t s) {
    if (op == MorphOp::Close || op == MorphOp::Open) return close_or_open(bits, scratch, hi, wi, k, op == MorphOp::Close, s);
    const cudaError_t err = morph_once(bits, scratch, hi, wi, k, op == MorphOp::Erode, s);
    std::swap(bits, scratch);
    return err;
  });
}

int filter_components_cuda(const uint8_t* src, uint8_t* dst, int64_t h, int64_t w, int64_t min_tissue_px,
                           int64_t min_hole_px, void* stream) {
  return on_packed_plane(src, dst, h, w, stream, [&](uint64_t*& bits, uint64_t*& scratch, int hi, int wi, cudaStream_t s) {
    return filter_packed(bits, scratch, hi, wi, min_tissue_px, min_hole_px, s);
  });
}

int integral_image_cuda(const uint8_t* mask, int32_t* sat, int64_t h, int64_t w, void* stream) {
  return integral_image(mask, sat, static_cast<int>(h), static_cast<int>(w), static_cast<cudaStream_t>(stream));
}

int segment_tissue_cuda(const TissueImage& src, const MaskParams& p, uint8_t* mask, int32_t* sat, int32_t* level,
                        void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  const int h = static_cast<int>(src.h), w = static_cast<int>(src.w);
  const int64_t n = src.h * src.w;
  Scratch<uint8_t> score(s);
  Scratch<int64_t> hist(s);
  Scratch<uint64_t> bits(s), scratch(s);
  GPFM_CUDA_TRY(score.alloc(n));
  GPFM_CUDA_TRY(hist.alloc(256));
  GPFM_CUDA_TRY(bits.alloc(packed_words(h, w)));
  GPFM_CUDA_TRY(scratch.alloc(packed_words(h, w)));
  GPFM_CUDA_TRY(static_cast<cudaError_t>(tissue_score_cuda(src, score.ptr, p.dark_threshold, stream)));
  GPFM_CUDA_TRY(median(score.ptr, mask, h, w, p.median_k, s));  // mask holds the median
  if (p.fixed_threshold < 0) GPFM_CUDA_TRY(histogram(mask, n, hist.ptr, s));
  level_kernel<<<1, 1, 0, s>>>(hist.ptr, p.fixed_threshold, p.min_threshold, level);
  GPFM_CUDA_TRY(cudaGetLastError());
  GPFM_CUDA_TRY(pack(mask, h, w, level, bits.ptr, s));
  if (p.close_k > 1) GPFM_CUDA_TRY(close_or_open(bits.ptr, scratch.ptr, h, w, p.close_k, true, s));
  if (p.open_k > 1) GPFM_CUDA_TRY(close_or_open(bits.ptr, scratch.ptr, h, w, p.open_k, false, s));
  GPFM_CUDA_TRY(filter_packed(bits.ptr, scratch.ptr, h, w, p.min_tissue_px, p.min_hole_px, s));
  GPFM_CUDA_TRY(unpack(bits.ptr, h, w, mask, s));
  return integral_image(mask, sat, h, w, s);
}

}  // namespace gpfm
