#include <cuda_runtime.h>

#include "gpfm/launchers.h"

namespace gpfm {
namespace {

template <OutDType D>
__global__ void normalize_kernel(U8ImageBatch src, typename OutStore<D>::type* dst, Normalize norm) {
  const int64_t total = src.n * src.h * src.w;
  const int64_t plane = src.h * src.w;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = i / plane, p = i % plane, y = p / src.w, x = p % src.w;
    const uint8_t* in = src.data + n * src.sn + y * src.sy + x * src.sx;
    for (int c = 0; c < 3; ++c) OutStore<D>::store(dst + (n * 3 + c) * plane + p, normalize_value(norm, c, in[c]));
  }
}

template <OutDType D>
int launch(const U8ImageBatch& src, void* dst, const Normalize& norm, cudaStream_t stream) {
  const int64_t total = src.n * src.h * src.w;
  if (total == 0) return cudaSuccess;
  const int threads = 256;
  const int blocks = static_cast<int>(std::min<int64_t>((total + threads - 1) / threads, 65535));
  normalize_kernel<D><<<blocks, threads, 0, stream>>>(src, static_cast<typename OutStore<D>::type*>(dst), norm);
  return cudaGetLastError();
}

}  // namespace

int normalize_nchw_cuda(const U8ImageBatch& src, void* dst, OutDType dtype, const Normalize& norm, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case OutDType::F32: return launch<OutDType::F32>(src, dst, norm, s);
    case OutDType::F16: return launch<OutDType::F16>(src, dst, norm, s);
    case OutDType::BF16: return launch<OutDType::BF16>(src, dst, norm, s);
  }
  return cudaErrorInvalidValue;
}

}  // namespace gpfm
