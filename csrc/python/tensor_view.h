// A borrowed view of any array-like the engine is handed: NumPy arrays and other buffer-protocol
// objects on the host, and DLPack producers (torch, CuPy, DALI, ...) on the host or a CUDA device.
// The view keeps its source alive; nothing is copied.
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

namespace gpfm::py_glue {

enum class ScalarKind { U8, F32, F16, BF16, I64, I32, Other };

struct TensorView {
  void* data = nullptr;
  bool on_cuda = false;
  int device_id = 0;
  bool readonly = false;
  ScalarKind kind = ScalarKind::Other;
  int itemsize = 0;
  std::vector<int64_t> shape;
  std::vector<int64_t> strides;  // in elements
  pybind11::object keepalive;

  int64_t numel() const;
  bool c_contiguous() const;
  std::string describe() const;  // e.g. "uint8[2, 224, 224, 3] on cpu"
};

// `stream` is the CUDA stream the consumer will use (DLPack array-API convention), passed to
// __dlpack__ so the producer orders its pending writes before our kernels.
TensorView view_of(const pybind11::handle& obj, const char* name, intptr_t stream = -1);

// Throws ValueError naming `name` unless the view has this kind and rank.
void expect(const TensorView& v, const char* name, ScalarKind kind, int ndim);

}  // namespace gpfm::py_glue
