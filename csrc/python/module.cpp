// gpfm_engine._core: the compiled half of the engine. Each area registers itself.
#include <pybind11/pybind11.h>

#include "areas.h"

PYBIND11_MODULE(_core, m) {
  m.doc() = "gpfm-engine compiled kernels (CPU launchers, CUDA launchers when compiled)";
  gpfm::py_glue::init_build_info(m);
  gpfm::py_glue::init_normalize(m);
  gpfm::py_glue::init_gather(m);
  gpfm::py_glue::init_tissue(m);
}
