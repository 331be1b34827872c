// Helpers shared by the kernel bindings: choosing the output dtype, turning views into launcher
// arguments and raising CUDA errors as Python exceptions.
#pragma once
#include <pybind11/pybind11.h>

#include <array>
#include <string>

#include "gpfm/launchers.h"
#include "tensor_view.h"

namespace gpfm::py_glue {

OutDType out_dtype_of(const TensorView& v, const char* name);

// A [N, H, W, 3] uint8 view as launcher input (strided; the channel stride must be 1).
U8ImageBatch image_batch_of(const TensorView& v, const char* name);

std::array<float, 3> triple(const pybind11::sequence& s, const char* name);

// Both views must live on the same device; returns true when that device is CUDA (and raises if
// the extension was built without CUDA).
bool same_device(const TensorView& a, const TensorView& b, const char* what);

void check_cuda(int code, const char* what);

}  // namespace gpfm::py_glue
