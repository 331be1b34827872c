#include <pybind11/pybind11.h>

#include "areas.h"
#include "launch_glue.h"

namespace py = pybind11;

namespace gpfm::py_glue {

namespace {
void normalize_to_nchw(const py::handle& src_obj, const py::handle& dst_obj, const py::sequence& mean,
                       const py::sequence& std, intptr_t stream) {
  const TensorView src = view_of(src_obj, "src", stream);
  const TensorView dst = view_of(dst_obj, "dst", stream);
  const U8ImageBatch batch = image_batch_of(src, "src");
  const OutDType dtype = out_dtype_of(dst, "dst");
  if (dst.readonly) throw py::value_error("dst: array is read-only");
  if (dst.shape.size() != 4 || dst.shape[0] != batch.n || dst.shape[1] != 3 || dst.shape[2] != batch.h ||
      dst.shape[3] != batch.w || !dst.c_contiguous())
    throw py::value_error("dst: expected a C-contiguous [N, 3, H, W] array matching src " + src.describe() + ", got " +
                          dst.describe());
  const auto m = triple(mean, "mean"), s = triple(std, "std");
  const Normalize norm = make_normalize(m.data(), s.data());
  const bool cuda = same_device(src, dst, "normalize_to_nchw");
  py::gil_scoped_release release;
#ifdef GPFM_WITH_CUDA
  if (cuda) {
    check_cuda(normalize_nchw_cuda(batch, dst.data, dtype, norm, reinterpret_cast<void*>(stream == -1 ? 0 : stream)),
               "normalize_to_nchw");
    return;
  }
#endif
  (void)cuda;
  normalize_nchw_cpu(batch, dst.data, dtype, norm);
}
}  // namespace

void init_normalize(py::module_& m) {
  m.def("normalize_to_nchw", &normalize_to_nchw, py::arg("src"), py::arg("dst"), py::arg("mean"), py::arg("std"),
        py::arg("stream") = -1,
        "Convert uint8 [N, H, W, 3] RGB into normalized [N, 3, H, W] float32/float16/bfloat16 written into `dst` "
        "((v / 255 - mean) / std). Host arrays run on the CPU threads with the GIL released; CUDA arrays run on "
        "`stream` (a cudaStream_t as int, -1 for the default stream) without synchronising.");
}

}  // namespace gpfm::py_glue
