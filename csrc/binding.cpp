// metamixer_fast._C: Python module init, the `metamixer_cpp` op library with build_info() (the
// kernels add their ops to it from csrc/mix.cpp and csrc/mixed_kd_loss.cpp), and three Python
// functions, mixed_kd_loss, mix and mix2, the eager fast paths of the metamixer_fast functions
// of the same names.
//
// The public ops (`metamixer::*`) are defined in Python (metamixer_fast/ops.py) so that the
// package works without this module; their CPU bodies call the `metamixer_cpp::*` ops.
#include <Python.h>

#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/grad_mode.h>
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

// The tensors of an eager mix call, (x, src, w, box) or (x, src, w, box, src2, w2): true when
// every one is a plain CPU tensor (box may be None) and none needs a gradient (autograd must
// see such a call, through the custom op).
bool eager_mix_args(PyObject* const* args, Py_ssize_t nargs,
                    std::vector<std::optional<at::Tensor>>& t) {
  if (!eager_path_open()) return false;
  t.resize(nargs);
  for (Py_ssize_t i = 0; i < nargs; ++i)
    if (!optional_tensor(args[i], t[i]) || (i != 3 && !t[i].has_value())) return false;
  if (at::GradMode::is_enabled())
    for (const auto& v : t)
      if (v.has_value() && v->requires_grad()) return false;
  return true;
}

// mix(x, src, w, box) -> out and mix2(x, src, w, box, src2, w2) -> out, or None when the call
// is not one for the eager path. Bad arguments raise with the C++ checks' messages.
template <Py_ssize_t Args>
PyObject* mix_entry(PyObject* const* args, Py_ssize_t nargs, const char* signature) {
  HANDLE_TH_ERRORS
  if (nargs != Args) {
    PyErr_Format(PyExc_TypeError, "%s takes %d positional arguments", signature, int(Args));
    return nullptr;
  }
  std::vector<std::optional<at::Tensor>> t;
  if (!eager_mix_args(args, nargs, t)) Py_RETURN_NONE;
  at::Tensor out;
  {
    pybind11::gil_scoped_release no_gil;
    out = Args == 4 ? mix_eager(*t[0], *t[1], *t[2], t[3])
                    : mix2_eager(*t[0], *t[1], *t[2], t[3], *t[4], *t[5]);
  }
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

PyObject* mix(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  return mix_entry<4>(args, nargs, "mix(x, src, w, box)");
}

PyObject* mix2(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  return mix_entry<6>(args, nargs, "mix2(x, src, w, box, src2, w2)");
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
    {"mix", reinterpret_cast<PyCFunction>(reinterpret_cast<void*>(mix)), METH_FASTCALL,
     "The eager fast path of metamixer_fast.mix (returns None when not taken)."},
    {"mix2", reinterpret_cast<PyCFunction>(reinterpret_cast<void*>(mix2)), METH_FASTCALL,
     "The eager fast path of metamixer_fast.mix2 (returns None when not taken)."},
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
