// Runtime queries for build_info: whether the statically linked CUDA runtime finds a driver and a
// device. Never aborts on machines without either.
#include <cuda_runtime.h>

#include "gpfm/launchers.h"

namespace gpfm {

int cuda_device_count(int* driver_version, int* runtime_version) {
  *driver_version = 0;
  *runtime_version = 0;
  cudaDriverGetVersion(driver_version);
  cudaRuntimeGetVersion(runtime_version);
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error so later calls start clean
    return 0;
  }
  return count;
}

std::string cuda_error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // namespace gpfm
