// CUDA launcher of the gather kernel: the pixel math of gpfm/resample.h (PIL-exact antialiased
// bicubic) run on the caller's stream, straight from a stacked tile tensor into the backend's
// input buffer.
//
// One block per (patch, band of output rows). The block computes the coefficient tables in shared
// memory (cheaper than a host upload, and it keeps the launch free of host synchronisation), runs
// the horizontal pass for the source rows its band needs into a shared uint8 [rows, S, 3] buffer
// (rounded and clamped as PIL does), then the vertical pass, normalises and writes NCHW
// (consecutive threads write consecutive pixels of a row). Background pixels are counted per warp
// and added to the patch's counter with float atomics (whole numbers below 2^24, so exact in any
// order), then scaled to a fraction.
#include <cuda_runtime.h>

#include <algorithm>
#include <vector>

#include "gpfm/launchers.h"
#include "gpfm/resample.h"

namespace gpfm {
namespace {

namespace rs = resample;

constexpr int kThreads = 256;
constexpr int kMaxBand = 64;
constexpr size_t kDefaultSharedBudget = 48 * 1024;

// Where one patch's pixels are (see GatherPatches). Frame coordinates are small (a few tiles), so
// the per-tap arithmetic is 32-bit: 64-bit division is emulated on the GPU and costs far more.
struct Frame {
  const int32_t* lut;
  int cols, tile_w, tile_h, x0, y0, x_end, y_end;
};

__device__ Frame frame_of(const TileRefs& t, const GatherPatches& p, int64_t i) {
  Frame f;
  f.lut = p.lut + i * p.rows * p.cols;
  f.cols = static_cast<int>(p.cols);
  f.tile_w = static_cast<int>(t.w);
  f.tile_h = static_cast<int>(t.h);
  f.x0 = p.rects[i * 4 + 0];
  f.y0 = p.rects[i * 4 + 1];
  f.x_end = static_cast<int>(min(static_cast<int64_t>(p.rects[i * 4 + 2]), p.cols * t.w));
  f.y_end = static_cast<int>(min(static_cast<int64_t>(p.rects[i * 4 + 3]), p.rows * t.h));
  return f;
}

// The RGB bytes of frame pixel (u, v), or null where the pixel is white.
__device__ const uint8_t* pixel_at(const TileRefs& t, const Frame& f, int u, int v) {
  if (u < 0 || v < 0 || u >= f.x_end || v >= f.y_end) return nullptr;
  const int r = v / f.tile_h, c = u / f.tile_w;
  const int32_t idx = f.lut[r * f.cols + c];
  if (idx < 0 || idx >= t.n) return nullptr;
  return t.stack + idx * t.sn + static_cast<int64_t>(v - r * f.tile_h) * t.sy +
         static_cast<int64_t>(u - c * f.tile_w) * t.sx;
}

// Adds this warp's background count to the patch's counter; every thread of the block calls it.
__device__ void add_background(float* background, int64_t i, int count) {
  for (int offset = 16; offset > 0; offset >>= 1) count += __shfl_down_sync(0xffffffffu, count, offset);
  if ((threadIdx.x & 31) == 0 && count > 0) atomicAdd(background + i, static_cast<float>(count));
}

template <OutDType D>
__device__ void emit(typename OutStore<D>::type* dst, const GatherParams& prm, int64_t i, int yy, int xx,
                     const uint8_t v[3], int* bg) {
  const int64_t s = prm.out_size, plane = s * s;
  for (int c = 0; c < 3; ++c)
    OutStore<D>::store(dst + (i * 3 + c) * plane + yy * s + xx, normalize_value(prm.norm, c, v[c]));
  *bg += rs::is_background(v[0], v[1], v[2], static_cast<uint8_t>(prm.white_level));
}

// Source and output the same size: PIL copies the pixels, so do we.
template <OutDType D>
__global__ void __launch_bounds__(kThreads)
    copy_kernel(TileRefs t, GatherPatches p, GatherParams prm, typename OutStore<D>::type* dst, float* background) {
  const int64_t i = blockIdx.x;
  const Frame f = frame_of(t, p, i);
  const int s = prm.out_size;
  int bg = 0;
  for (int idx = blockIdx.y * blockDim.x + threadIdx.x; idx < s * s; idx += gridDim.y * blockDim.x) {
    const int yy = idx / s, xx = idx - yy * s;
    const uint8_t* px = pixel_at(t, f, f.x0 + xx, f.y0 + yy);
    const uint8_t v[3] = {px ? px[0] : uint8_t{255}, px ? px[1] : uint8_t{255}, px ? px[2] : uint8_t{255}};
    emit<D>(dst, prm, i, yy, xx, v, &bg);
  }
  if (background) add_background(background, i, bg);
}

// One axis' coefficient table in shared memory: taps of output pixel o at k + o * ksize.
struct SharedAxis {
  int32_t* k;
  int* first;
  int* count;
  int ksize;
};

// Carves the table of `a` out of *cursor and fills it with the block's threads.
__device__ SharedAxis shared_axis(const rs::Axis& a, int32_t** cursor) {
  SharedAxis t{*cursor, nullptr, nullptr, a.ksize};
  t.first = t.k + a.out_size * a.ksize;
  t.count = t.first + a.out_size;
  *cursor = t.count + a.out_size;
  for (int o = threadIdx.x; o < a.out_size; o += blockDim.x)
    t.count[o] = rs::axis_coeffs(a, o, t.k + o * a.ksize, &t.first[o]);
  return t;
}

template <OutDType D>
__global__ void __launch_bounds__(kThreads)
    resize_kernel(TileRefs t, GatherPatches p, GatherParams prm, int band, typename OutStore<D>::type* dst,
                  float* background) {
  extern __shared__ int32_t smem[];
  const int s = prm.out_size;
  int32_t* cursor = smem;
  const SharedAxis hx = shared_axis(rs::make_axis(prm.src_width, s), &cursor);
  const SharedAxis vy = shared_axis(rs::make_axis(prm.src_height, s), &cursor);
  uint8_t* tmp = reinterpret_cast<uint8_t*>(cursor);  // [rows, s, 3] horizontal-pass output
  __syncthreads();

  const int64_t i = blockIdx.x;
  const Frame f = frame_of(t, p, i);
  const int yy0 = blockIdx.y * band, yy1 = min(s, yy0 + band);
  const int ys0 = vy.first[yy0], nrows = vy.first[yy1 - 1] + vy.count[yy1 - 1] - ys0;
  for (int idx = threadIdx.x; idx < nrows * s; idx += blockDim.x) {
    const int r = idx / s, xx = idx - r * s;
    const int32_t* k = hx.k + xx * hx.ksize;
    const int v = f.y0 + ys0 + r, u0 = f.x0 + hx.first[xx];
    int32_t acc[3] = {rs::kHalf, rs::kHalf, rs::kHalf};
    for (int tap = 0; tap < hx.count[xx]; ++tap) {
      const uint8_t* px = pixel_at(t, f, u0 + tap, v);
      for (int c = 0; c < 3; ++c) acc[c] += k[tap] * static_cast<int32_t>(px ? px[c] : 255);
    }
    for (int c = 0; c < 3; ++c) tmp[idx * 3 + c] = rs::clip8(acc[c]);
  }
  __syncthreads();

  int bg = 0;
  for (int idx = threadIdx.x; idx < (yy1 - yy0) * s; idx += blockDim.x) {
    const int yy = yy0 + idx / s, xx = idx % s;
    const uint8_t* col = tmp + ((vy.first[yy] - ys0) * s + xx) * 3;
    uint8_t v[3];
    for (int c = 0; c < 3; ++c)
      v[c] = rs::convolve(vy.k + yy * vy.ksize, vy.count[yy], col + c, static_cast<int64_t>(s) * 3);
    emit<D>(dst, prm, i, yy, xx, v, &bg);
  }
  if (background) add_background(background, i, bg);
}

// Counts to fractions, rounded as the CPU launcher rounds them.
__global__ void fraction_kernel(float* v, int64_t n, double pixels) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < n) v[i] = static_cast<float>(static_cast<double>(v[i]) / pixels);
}

// Output rows per block and the dynamic shared memory that takes.
struct BandPlan {
  int band = 0;
  size_t shared = 0;
};

BandPlan plan_bands(const GatherParams& prm, size_t budget) {
  const int out_size = prm.out_size;
  const rs::Axis ax = rs::make_axis(prm.src_width, out_size), ay = rs::make_axis(prm.src_height, out_size);
  std::vector<int32_t> k(ay.ksize);
  std::vector<int> first(out_size), count(out_size);
  for (int i = 0; i < out_size; ++i) count[i] = rs::axis_coeffs(ay, i, k.data(), &first[i]);
  const size_t fixed = sizeof(int32_t) * static_cast<size_t>(out_size) * (ax.ksize + ay.ksize + 4);
  BandPlan best;
  for (int band = 1; band <= std::min(out_size, kMaxBand); ++band) {
    int rows = 0;
    for (int y0 = 0; y0 < out_size; y0 += band) {
      const int y1 = std::min(out_size, y0 + band) - 1;
      rows = std::max(rows, first[y1] + count[y1] - first[y0]);
    }
    const size_t shared = fixed + static_cast<size_t>(rows) * out_size * 3;
    if (shared > budget) break;
    best = BandPlan{band, shared};
  }
  return best;
}

template <OutDType D>
int launch(const TileRefs& t, const GatherPatches& p, const GatherParams& prm, void* dst, cudaStream_t stream,
           float* background) {
  auto* out = static_cast<typename OutStore<D>::type*>(dst);
  const int s = prm.out_size;
  if (prm.src_width == s && prm.src_height == s) {
    const int blocks_per_patch = std::min(64, (s * s + kThreads - 1) / kThreads);
    copy_kernel<D><<<dim3(static_cast<unsigned>(p.n), blocks_per_patch), kThreads, 0, stream>>>(t, p, prm, out,
                                                                                              background);
    return cudaGetLastError();
  }
  BandPlan plan = plan_bands(prm, kDefaultSharedBudget);
  if (plan.band == 0) {
    int device = 0, optin = 0;
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    plan = plan_bands(prm, static_cast<size_t>(optin));
    if (plan.band == 0) return cudaErrorInvalidValue;  // a shrink too large for one block's shared memory
    const cudaError_t err = cudaFuncSetAttribute(resize_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(plan.shared));
    if (err != cudaSuccess) return err;
  }
  const dim3 grid(static_cast<unsigned>(p.n), static_cast<unsigned>((s + plan.band - 1) / plan.band));
  resize_kernel<D><<<grid, kThreads, plan.shared, stream>>>(t, p, prm, plan.band, out, background);
  return cudaGetLastError();
}

}  // namespace

int gather_cuda(const TileRefs& tiles, const GatherPatches& patches, const GatherParams& params, void* dst,
                float* background, void* stream) {
  if (patches.n <= 0) return cudaSuccess;
  if (patches.n > 0x7fffffff) return cudaErrorInvalidValue;
  auto s = static_cast<cudaStream_t>(stream);
  if (background) {
    const cudaError_t err = cudaMemsetAsync(background, 0, sizeof(float) * patches.n, s);
    if (err != cudaSuccess) return err;
  }
  int err = cudaErrorInvalidValue;
  switch (params.dtype) {
    case OutDType::F32: err = launch<OutDType::F32>(tiles, patches, params, dst, s, background); break;
    case OutDType::F16: err = launch<OutDType::F16>(tiles, patches, params, dst, s, background); break;
    case OutDType::BF16: err = launch<OutDType::BF16>(tiles, patches, params, dst, s, background); break;
  }
  if (err != cudaSuccess || !background) return err;
  const double pixels = static_cast<double>(params.out_size) * params.out_size;
  fraction_kernel<<<static_cast<unsigned>((patches.n + 255) / 256), 256, 0, s>>>(background, patches.n, pixels);
  return cudaGetLastError();
}

}  // namespace gpfm
