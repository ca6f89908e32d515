// metamixer_fast._C: Python module init and the `metamixer_cpp` op library with build_info();
// the kernels add their ops to it from csrc/mix.cpp and csrc/mixed_kd_loss.cpp.
//
// The public ops (`metamixer::*`) are defined in Python (metamixer_fast/ops.py) so that the
// package works without this module; their CPU bodies call the `metamixer_cpp::*` ops.
#include <Python.h>

#include <torch/library.h>
#include <torch/version.h>

#include <string>

#include "core/build_info.h"

extern "C" {
// Importing metamixer_fast._C loads this library, which runs the TORCH_LIBRARY blocks below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1,
                                          nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace metamixer {
namespace {

std::string build_info() {
  std::string info = "compiler=" + core::compiler_string();
  info += "; torch=" TORCH_VERSION;
  info += "; cplusplus=" + std::to_string(__cplusplus);
#ifdef _OPENMP
  info += "; openmp=" + std::to_string(_OPENMP);
#else
  info += "; openmp=no";
#endif
  return info;
}

}  // namespace
}  // namespace metamixer

TORCH_LIBRARY(metamixer_cpp, m) {
  m.def("build_info() -> str", &metamixer::build_info);
}
