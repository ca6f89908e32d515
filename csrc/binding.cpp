// metamixer_fast._C: Python module init, the `metamixer_cpp` op library with build_info() (the
// kernels add their ops to it from csrc/mix.cpp and csrc/mixed_kd_loss.cpp), and one Python
// function, mixed_kd_loss, the eager fast path of metamixer_fast.mixed_kd_loss.
//
// The public ops (`metamixer::*`) are defined in Python (metamixer_fast/ops.py) so that the
// package works without this module; their CPU bodies call the `metamixer_cpp::*` ops.
#include <Python.h>

#include <ATen/PythonTorchFunctionTLS.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <pybind11/pybind11.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/library.h>
#include <torch/version.h>

#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "core/build_info.h"
#include "eager.h"

namespace metamixer {
namespace {

// A tensor the eager path may take: a plain torch.Tensor (or Parameter) on the CPU, neither a
// tensor subclass (FakeTensor, ...) nor wrapped by a torch.func transform.
std::optional<at::Tensor> plain_cpu_tensor(PyObject* obj) {
  if (!THPVariable_CheckExact(obj)) return std::nullopt;
  const at::Tensor& t = THPVariable_Unpack(obj);
  const c10::DispatchKeySet keys = t.key_set();
  if (!t.device().is_cpu() || keys.has_any(c10::python_ks) || keys.has_any(c10::functorch_transforms_ks))
    return std::nullopt;
  return t;
}

// None or a plain CPU tensor; false for anything else.
bool optional_tensor(PyObject* obj, std::optional<at::Tensor>& out) {
  if (obj == Py_None) return true;
  out = plain_cpu_tensor(obj);
  return out.has_value();
}

// True when nothing needs to see the call: no dispatch or torch-function mode is active and
// METAMIXER_BACKEND does not force another backend (read on every call, as _backend does).
bool eager_path_open() {
  if (c10::impl::TorchDispatchModeTLS::any_modes_set() || at::impl::torch_function_mode_enabled())
    return false;
  const char* forced = std::getenv("METAMIXER_BACKEND");
  return forced == nullptr || forced[0] == '\0' || std::strcmp(forced, "cpp") == 0;
}

// mixed_kd_loss(logits, labels, weights, temperature, label_smoothing, mode, peer_matrix,
// detach_targets) -> (ce, kd), or None when the call is not one for the eager path (then the
// caller takes the custom op). logits: a tensor [K, B, C] or a list/tuple of K tensors [B, C].
// Bad values raise (ValueError/RuntimeError) with the C++ checks' messages.
PyObject* mixed_kd_loss(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 8) {
    PyErr_SetString(PyExc_TypeError, "mixed_kd_loss takes 8 positional arguments");
    return nullptr;
  }
  if (!eager_path_open()) Py_RETURN_NONE;
  std::vector<at::Tensor> logits;
  PyObject* z = args[0];
  if (PyList_Check(z) || PyTuple_Check(z)) {
    PyObject** items = PySequence_Fast_ITEMS(z);
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(z); ++i) {
      std::optional<at::Tensor> t = plain_cpu_tensor(items[i]);
      if (!t) Py_RETURN_NONE;
      logits.push_back(std::move(*t));
    }
  } else if (std::optional<at::Tensor> t = plain_cpu_tensor(z)) {
    logits.push_back(std::move(*t));
  }
  std::optional<at::Tensor> labels = plain_cpu_tensor(args[1]), weights, peer;
  if (logits.empty() || !labels || !optional_tensor(args[2], weights) ||
      !optional_tensor(args[6], peer) || !PyUnicode_Check(args[5]))
    Py_RETURN_NONE;
  const double temperature = PyFloat_AsDouble(args[3]);
  const double label_smoothing = PyFloat_AsDouble(args[4]);
  Py_ssize_t mode_size = 0;
  const char* mode = PyUnicode_AsUTF8AndSize(args[5], &mode_size);
  const int detach = PyObject_IsTrue(args[7]);
  if (PyErr_Occurred()) {  // not numbers / not a bool: the Python path names the argument
    PyErr_Clear();
    Py_RETURN_NONE;
  }
  at::Tensor ce, kd;
  {
    pybind11::gil_scoped_release no_gil;
    std::tie(ce, kd) = mixed_kd_loss_eager(logits, *labels, weights, temperature, label_smoothing,
                                           std::string_view(mode, mode_size), peer, detach != 0);
  }
  PyObject* out = PyTuple_New(2);
  if (out == nullptr) return nullptr;
  PyTuple_SET_ITEM(out, 0, THPVariable_Wrap(std::move(ce)));  // (steals the new references)
  PyTuple_SET_ITEM(out, 1, THPVariable_Wrap(std::move(kd)));
  return out;
  END_HANDLE_TH_ERRORS
}

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

PyMethodDef methods[] = {
    {"mixed_kd_loss", reinterpret_cast<PyCFunction>(reinterpret_cast<void*>(mixed_kd_loss)),
     METH_FASTCALL, "The eager fast path of metamixer_fast.mixed_kd_loss (returns None when not taken)."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace
}  // namespace metamixer

extern "C" {
// Importing metamixer_fast._C loads this library, which runs the TORCH_LIBRARY blocks below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1,
                                          metamixer::methods, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(metamixer_cpp, m) {
  m.def("build_info() -> str", &metamixer::build_info);
}
