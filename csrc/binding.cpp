// ATen binding layer of metamixer_fast._C: Python module init, the `metamixer_cpp` op
// library, and CPU kernels that wrap the torch-free cores in csrc/core.
//
// The public ops (`metamixer::*`) are defined in Python (metamixer_fast/ops.py) so that the
// package works without this module; their CPU bodies call the `metamixer_cpp::*` ops here.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/version.h>

#include <string>

#include "core/build_info.h"
#include "core/logsumexp.h"

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

// logsumexp(scale * x) over the last dim of a 2-D float tensor, rows in parallel.
at::Tensor row_logsumexp(const at::Tensor& x, double scale) {
  TORCH_CHECK(x.dim() == 2, "row_logsumexp: 'x' must be 2-D [rows, n], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat, "row_logsumexp: 'x' must be float32, got ",
              x.scalar_type());
  const at::Tensor xc = x.contiguous();
  const int64_t rows = xc.size(0), n = xc.size(1);
  at::Tensor out = at::empty({rows}, xc.options());
  const float* in = xc.data_ptr<float>();
  float* res = out.data_ptr<float>();
  const float s = static_cast<float>(scale);
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) res[r] = core::row_logsumexp(in + r * n, n, s);
  });
  return out;
}

}  // namespace
}  // namespace metamixer

TORCH_LIBRARY(metamixer_cpp, m) {
  m.def("build_info() -> str", &metamixer::build_info);
  m.def("row_logsumexp(Tensor x, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(metamixer_cpp, CPU, m) {
  m.impl("row_logsumexp", &metamixer::row_logsumexp);
}
