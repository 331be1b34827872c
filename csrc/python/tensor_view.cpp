#include "tensor_view.h"

#include <pybind11/numpy.h>

#include <sstream>

#include "gpfm/dlpack_abi.h"

namespace py = pybind11;

namespace gpfm::py_glue {
namespace {

const char* kind_name(ScalarKind k) {
  switch (k) {
    case ScalarKind::U8: return "uint8";
    case ScalarKind::F32: return "float32";
    case ScalarKind::F16: return "float16";
    case ScalarKind::BF16: return "bfloat16";
    case ScalarKind::I64: return "int64";
    case ScalarKind::I32: return "int32";
    default: return "unsupported dtype";
  }
}

ScalarKind kind_from_dlpack(const dlpack::DataType& t) {
  if (t.lanes != 1) return ScalarKind::Other;
  if (t.code == dlpack::kUInt && t.bits == 8) return ScalarKind::U8;
  if (t.code == dlpack::kFloat && t.bits == 32) return ScalarKind::F32;
  if (t.code == dlpack::kFloat && t.bits == 16) return ScalarKind::F16;
  if (t.code == dlpack::kBfloat && t.bits == 16) return ScalarKind::BF16;
  if (t.code == dlpack::kInt && t.bits == 64) return ScalarKind::I64;
  if (t.code == dlpack::kInt && t.bits == 32) return ScalarKind::I32;
  return ScalarKind::Other;
}

// The byte-order mark of numbers whose order is not the host's, in NumPy dtypes and buffer formats
// ('!', network order, is big-endian too).
constexpr bool kLittleEndianHost = __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__;
constexpr char kForeignOrder = kLittleEndianHost ? '>' : '<';

ScalarKind kind_from_format(const std::string& f, ssize_t itemsize) {
  if (f.size() > 1 && (f[0] == kForeignOrder || (kLittleEndianHost && f[0] == '!'))) return ScalarKind::Other;
  const char c = f.empty() ? '?' : f.back();
  if (itemsize == 1 && (c == 'B')) return ScalarKind::U8;
  if (itemsize == 4 && c == 'f') return ScalarKind::F32;
  if (itemsize == 2 && c == 'e') return ScalarKind::F16;
  if (itemsize == 8 && (c == 'q' || c == 'l')) return ScalarKind::I64;
  if (itemsize == 4 && (c == 'i' || c == 'l')) return ScalarKind::I32;
  return ScalarKind::Other;
}

// NumPy's dtype kind letter and item size; a byte order other than the host's is refused (the
// kernels read native numbers).
ScalarKind kind_from_numpy(const py::dtype& dt) {
  if (dt.byteorder() == kForeignOrder) return ScalarKind::Other;
  const char kind = dt.kind();
  const ssize_t size = dt.itemsize();
  if (kind == 'u' && size == 1) return ScalarKind::U8;
  if (kind == 'f' && size == 4) return ScalarKind::F32;
  if (kind == 'f' && size == 2) return ScalarKind::F16;
  if (kind == 'i' && size == 8) return ScalarKind::I64;
  if (kind == 'i' && size == 4) return ScalarKind::I32;
  return ScalarKind::Other;
}

// Element strides from byte strides.
int64_t element_stride(ssize_t bytes, ssize_t itemsize) {
  if (bytes % itemsize != 0) throw py::value_error("strides that are not a multiple of the item size");
  return bytes / itemsize;
}

// A NumPy array read straight from the array object. The buffer protocol would have NumPy build
// a format string and a buffer_info on every call: on a small thumbnail, code run once per call
// costs more than the pixels (each cold entry point is microseconds after a cache flush).
TensorView from_numpy(const py::array& a) {
  TensorView v;
  v.data = const_cast<void*>(a.data());
  v.readonly = !a.writeable();
  const py::dtype dt = a.dtype();
  v.itemsize = static_cast<int>(dt.itemsize());
  v.kind = kind_from_numpy(dt);
  for (ssize_t i = 0; i < a.ndim(); ++i) {
    v.shape.push_back(a.shape(i));
    v.strides.push_back(element_stride(a.strides(i), v.itemsize));
  }
  v.keepalive = a;
  return v;
}

TensorView from_buffer(const py::handle& obj) {
  py::buffer buf = py::reinterpret_borrow<py::buffer>(obj);
  py::buffer_info info = buf.request(/*writable=*/false);
  TensorView v;
  v.data = info.ptr;
  v.readonly = info.readonly;
  v.itemsize = static_cast<int>(info.itemsize);
  v.kind = kind_from_format(info.format, info.itemsize);
  for (ssize_t i = 0; i < info.ndim; ++i) {
    v.shape.push_back(info.shape[i]);
    v.strides.push_back(element_stride(info.strides[i], info.itemsize));
  }
  v.keepalive = py::reinterpret_borrow<py::object>(obj);
  return v;
}

TensorView from_dlpack(const py::handle& obj, bool cuda, intptr_t stream) {
  py::object capsule = cuda && stream != -1 ? obj.attr("__dlpack__")(py::arg("stream") = stream)
                                            : obj.attr("__dlpack__")();
  auto* managed = static_cast<dlpack::ManagedTensor*>(PyCapsule_GetPointer(capsule.ptr(), "dltensor"));
  if (managed == nullptr) throw py::error_already_set();
  const dlpack::Tensor& t = managed->dl_tensor;
  TensorView v;
  v.data = static_cast<char*>(t.data) + t.byte_offset;
  v.on_cuda = t.device.device_type == dlpack::kCUDA || t.device.device_type == dlpack::kCUDAManaged;
  v.device_id = t.device.device_id;
  v.kind = kind_from_dlpack(t.dtype);
  v.itemsize = t.dtype.bits / 8;
  v.shape.assign(t.shape, t.shape + t.ndim);
  if (t.strides != nullptr) {
    v.strides.assign(t.strides, t.strides + t.ndim);
  } else {
    v.strides.assign(t.ndim, 1);
    for (int i = t.ndim - 2; i >= 0; --i) v.strides[i] = v.strides[i + 1] * v.shape[i + 1];
  }
  // Borrow without consuming: the capsule keeps its name, so the producer's deleter runs when
  // the capsule (held by keepalive) is released.
  v.keepalive = py::make_tuple(py::reinterpret_borrow<py::object>(obj), capsule);
  return v;
}

}  // namespace

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (auto s : shape) n *= s;
  return n;
}

bool TensorView::c_contiguous() const {
  int64_t expected = 1;
  for (int i = static_cast<int>(shape.size()) - 1; i >= 0; --i) {
    if (shape[i] != 1 && strides[i] != expected) return false;
    expected *= shape[i];
  }
  return true;
}

std::string TensorView::describe() const {
  std::ostringstream s;
  s << kind_name(kind) << "[";
  for (size_t i = 0; i < shape.size(); ++i) s << (i ? ", " : "") << shape[i];
  s << "] on " << (on_cuda ? "cuda:" + std::to_string(device_id) : std::string("cpu"));
  return s.str();
}

TensorView view_of(const py::handle& obj, const char* name, intptr_t stream) {
  try {
    // NumPy arrays are host memory: read directly, without the DLPack attribute probes below,
    // which cost more than the kernel itself on a small thumbnail.
    if (py::isinstance<py::array>(obj)) return from_numpy(py::reinterpret_borrow<py::array>(obj));
    bool cuda = false;
    const bool has_dlpack = py::hasattr(obj, "__dlpack__");
    if (py::hasattr(obj, "__dlpack_device__")) {
      py::tuple dev = obj.attr("__dlpack_device__")();
      const int type = dev[0].cast<int>();
      cuda = type == dlpack::kCUDA || type == dlpack::kCUDAManaged;
    }
    // Host buffers go through the buffer protocol, which (unlike DLPack) accepts read-only arrays.
    if (!cuda && PyObject_CheckBuffer(obj.ptr())) return from_buffer(obj);
    if (has_dlpack) return from_dlpack(obj, cuda, stream);
  } catch (py::error_already_set& e) {
    throw py::value_error(std::string(name) + ": cannot view the array: " + e.what());
  }
  throw py::type_error(std::string(name) + ": expected an array (NumPy, torch, CuPy or any DLPack producer), got " +
                       py::str(py::type::of(obj)).cast<std::string>());
}

void expect(const TensorView& v, const char* name, ScalarKind kind, int ndim) {
  if (v.kind != kind || static_cast<int>(v.shape.size()) != ndim) {
    std::ostringstream s;
    s << name << ": expected a " << ndim << "-d " << kind_name(kind) << " array, got " << v.describe();
    throw py::value_error(s.str());
  }
}

}  // namespace gpfm::py_glue
