// Every launcher the binding can call. CPU launchers run threaded over host memory; CUDA launchers
// enqueue on the caller's stream and return a cudaError_t value (0 = success) without
// synchronising.
#pragma once
#include <cstdint>
#include <string>

#include "gpfm/dtype.h"
#include "gpfm/normalize.h"

namespace gpfm {

// Strided uint8 HWC image batch: element (n, y, x, c) is at data[n*sn + y*sy + x*sx + c].
struct U8ImageBatch {
  const uint8_t* data;
  int64_t n, h, w;
  int64_t sn, sy, sx;
};

// Writes a contiguous [n, 3, h, w] batch of `dtype` to dst.
void normalize_nchw_cpu(const U8ImageBatch& src, void* dst, OutDType dtype, const Normalize& norm);

#ifdef GPFM_WITH_CUDA
int normalize_nchw_cuda(const U8ImageBatch& src, void* dst, OutDType dtype, const Normalize& norm, void* stream);

int cuda_device_count(int* driver_version, int* runtime_version);
std::string cuda_error_string(int code);
#endif

}  // namespace gpfm
