// One init function per binding area; module.cpp calls them all.
#pragma once
#include <pybind11/pybind11.h>

namespace gpfm::py_glue {
void init_build_info(pybind11::module_& m);
void init_normalize(pybind11::module_& m);
void init_gather(pybind11::module_& m);
void init_tissue(pybind11::module_& m);
}  // namespace gpfm::py_glue
