#include "launch_glue.h"

namespace py = pybind11;

namespace gpfm::py_glue {

OutDType out_dtype_of(const TensorView& v, const char* name) {
  switch (v.kind) {
    case ScalarKind::F32: return OutDType::F32;
    case ScalarKind::F16: return OutDType::F16;
    case ScalarKind::BF16: return OutDType::BF16;
    default: throw py::value_error(std::string(name) + ": output must be float32, float16 or bfloat16, got " + v.describe());
  }
}

U8ImageBatch image_batch_of(const TensorView& v, const char* name) {
  expect(v, name, ScalarKind::U8, 4);
  if (v.shape[3] != 3 || v.strides[3] != 1)
    throw py::value_error(std::string(name) + ": expected [N, H, W, 3] RGB with packed channels, got " + v.describe());
  return U8ImageBatch{static_cast<const uint8_t*>(v.data), v.shape[0], v.shape[1], v.shape[2],
                      v.strides[0], v.strides[1], v.strides[2]};
}

std::array<float, 3> triple(const py::sequence& s, const char* name) {
  if (py::len(s) != 3) throw py::value_error(std::string(name) + ": expected 3 values (one per RGB channel)");
  return {s[0].cast<float>(), s[1].cast<float>(), s[2].cast<float>()};
}

bool same_device(const TensorView& a, const TensorView& b, const char* what) {
  if (a.on_cuda != b.on_cuda || (a.on_cuda && a.device_id != b.device_id))
    throw py::value_error(std::string(what) + ": input " + a.describe() + " and output " + b.describe() +
                          " are on different devices");
#ifndef GPFM_WITH_CUDA
  if (a.on_cuda) throw py::value_error(std::string(what) + ": this build of gpfm_engine._core has no CUDA launchers");
#endif
  return a.on_cuda;
}

void check_cuda(int code, const char* what) {
#ifdef GPFM_WITH_CUDA
  if (code != 0) throw std::runtime_error(std::string(what) + ": CUDA error: " + cuda_error_string(code));
#else
  (void)code;
  (void)what;
#endif
}

}  // namespace gpfm::py_glue
