#include <pybind11/pybind11.h>

#include "areas.h"
#include "gpfm/launchers.h"
#include "gpfm/parallel.h"

namespace py = pybind11;

namespace gpfm::py_glue {

namespace {
py::dict build_info() {
  py::dict info;
  info["version"] = GPFM_VERSION;
  info["compiler"] = GPFM_CXX_COMPILER;
  info["threading"] = "std::thread parallel_for";
  info["num_threads"] = num_threads();
#ifdef GPFM_WITH_CUDA
  int driver = 0, runtime = 0;
  const int devices = cuda_device_count(&driver, &runtime);
  info["cuda_compiled"] = true;
  info["cuda_compiler"] = GPFM_CUDA_COMPILER;
  info["cuda_architectures"] = GPFM_CUDA_ARCHS;
  info["cuda_runtime_version"] = runtime;
  info["cuda_driver_version"] = driver;
  info["cuda_device_count"] = devices;
  info["cuda_usable"] = devices > 0;
#else
  info["cuda_compiled"] = false;
  info["cuda_compiler"] = py::none();
  info["cuda_architectures"] = py::none();
  info["cuda_runtime_version"] = 0;
  info["cuda_driver_version"] = 0;
  info["cuda_device_count"] = 0;
  info["cuda_usable"] = false;
#endif
  return info;
}
}  // namespace

void init_build_info(py::module_& m) {
  m.def("build_info", &build_info,
        "What this extension was built with and whether CUDA is usable here (driver and device present).");
  m.def("num_threads", &num_threads, "Threads the CPU launchers use.");
  m.def("set_num_threads", &set_num_threads, py::arg("n"),
        "Set the CPU launchers' thread count (n <= 0 restores the hardware concurrency).");
}

}  // namespace gpfm::py_glue
