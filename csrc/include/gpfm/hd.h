// Host/device qualifiers so pixel math is written once and compiled for both the CPU launchers
// (g++) and the CUDA launchers (nvcc).
#pragma once

#if defined(__CUDACC__)
#define GPFM_HD __host__ __device__ __forceinline__
#else
#define GPFM_HD inline
#endif
