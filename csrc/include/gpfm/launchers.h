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

// ---- tissue masking (pixel math in gpfm/tissue.h) ------------------------------------------------
// Planes are C-contiguous uint8 [h, w]; masks hold 0/1; h * w < 2^31.

// RGB (channels 3) or RGBA (4) thumbnail, channels packed: pixel (y, x) at data[y*sy + x*sx].
struct TissueImage {
  const uint8_t* data;
  int64_t h, w, channels;
  int64_t sy, sx;
};

struct MaskParams {
  int dark_threshold;     // pixels whose brightest channel is below this never count as tissue
  int median_k;           // odd; 1 = no median
  int fixed_threshold;    // >= 0: use it; < 0: Otsu, raised to min_threshold
  int min_threshold;
  int close_k, open_k;    // odd elliptical element sizes; 1 = skip
  int64_t min_tissue_px;  // smaller 8-connected tissue components are dropped
  int64_t min_hole_px;    // smaller 4-connected holes are filled
};

enum class MorphOp : int { Dilate = 0, Erode = 1, Close = 2, Open = 3 };

void tissue_score_cpu(const TissueImage& src, uint8_t* dst, int dark_threshold);
void median_blur_cpu(const uint8_t* src, uint8_t* dst, int64_t h, int64_t w, int k);
void histogram256_cpu(const uint8_t* src, int64_t n, int64_t* hist);
void morphology_cpu(const uint8_t* src, uint8_t* dst, int64_t h, int64_t w, MorphOp op, int k);
void filter_components_cpu(const uint8_t* src, uint8_t* dst, int64_t h, int64_t w, int64_t min_tissue_px,
                           int64_t min_hole_px);
void integral_image_cpu(const uint8_t* mask, int32_t* sat, int64_t h, int64_t w);  // sat: [h + 1, w + 1]
// The whole chain above; returns the threshold level used.
int segment_tissue_cpu(const TissueImage& src, const MaskParams& params, uint8_t* mask, int32_t* sat);

// Patch lattice over a width x height level-0 image: top-lefts round(i * stride) inside it, patches
// of size x size level-0 pixels; one mask pixel covers scale_x x scale_y level-0 pixels.
struct PatchLattice {
  int64_t width, height;
  double stride, size, scale_x, scale_y, threshold;
};
// Writes the row-major top-lefts (int64 [n, 2]) whose tissue fraction (on the mask's summed-area
// table sat [h + 1, w + 1]) is >= threshold, and those fractions; returns n. The outputs hold
// room for every lattice position.
int64_t patch_grid_cpu(const int32_t* sat, int64_t h, int64_t w, const PatchLattice& lattice, int64_t* coords,
                       float* fractions);

#ifdef GPFM_WITH_CUDA
int tissue_score_cuda(const TissueImage& src, uint8_t* dst, int dark_threshold, void* stream);
int median_blur_cuda(const uint8_t* src, uint8_t* dst, int64_t h, int64_t w, int k, void* stream);
int histogram256_cuda(const uint8_t* src, int64_t n, int64_t* hist, void* stream);
int morphology_cuda(const uint8_t* src, uint8_t* dst, int64_t h, int64_t w, MorphOp op, int k, void* stream);
int filter_components_cuda(const uint8_t* src, uint8_t* dst, int64_t h, int64_t w, int64_t min_tissue_px,
                           int64_t min_hole_px, void* stream);
int integral_image_cuda(const uint8_t* mask, int32_t* sat, int64_t h, int64_t w, void* stream);
// The level used is written to the device int `level`.
int segment_tissue_cuda(const TissueImage& src, const MaskParams& params, uint8_t* mask, int32_t* sat, int32_t* level,
                        void* stream);
#endif

// ---- gather: decoded stored tiles -> normalized model input (pixel math in gpfm/resample.h) ------

// Decoded tiles of one pyramid level, each [h, w, 3] uint8 with rows sy and pixels sx bytes
// apart (channels packed). CPU: tile i starts at ptrs[i]. CUDA: tile i starts at stack + i * sn.
struct TileRefs {
  const uint8_t* const* ptrs;
  const uint8_t* stack;
  int64_t sn;
  int64_t n, h, w, sy, sx;
};

// Where each patch's pixels are. Patch i has its own frame: tile lut[i, r, c] (an index into the
// tiles, -1 = none) covers frame pixels [r*h, (r+1)*h) x [c*w, (c+1)*w). Its source rectangle has
// its top-left at (rects[i, 0], rects[i, 1]) in that frame; frame pixels at x >= rects[i, 2] or
// y >= rects[i, 3] (beyond the level), in a -1 tile or outside the lut are white (255).
struct GatherPatches {
  const int32_t* lut;    // [n, rows, cols]
  const int32_t* rects;  // [n, 4]
  int64_t n, rows, cols;
};

struct GatherParams {
  int src_width;        // source rectangle of every patch (px at the read level)
  int src_height;
  int out_size;         // side of the (square) model input
  int white_level;      // background pixel: all channels >= white_level after resampling
  OutDType dtype;
  Normalize norm;
};

// Writes a contiguous [n, 3, out, out] batch to dst and, when background is not null, the
// fraction of background pixels of each patch to background[0..n).
void gather_cpu(const TileRefs& tiles, const GatherPatches& patches, const GatherParams& params, void* dst,
                float* background);

#ifdef GPFM_WITH_CUDA
// tiles.stack, patches.lut, patches.rects, dst and background are device pointers.
int gather_cuda(const TileRefs& tiles, const GatherPatches& patches, const GatherParams& params, void* dst,
                float* background, void* stream);
#endif

}  // namespace gpfm
