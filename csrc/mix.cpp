// ATen binding of the metamixer::mix CPU kernels (core in csrc/core/mix.h).
//
//   metamixer_cpp::mix(x, src, w, box?) -> out
//   metamixer_cpp::mix_backward(grad, x, src, w, box?) -> (dx, dw)
//
// x is [N, C, H, W] or [N, D], read in its mix_format (the rule of metamixer_fast/_layout.py):
// channels_last for a 4-D input whose channels are innermost (a channels_last batch or a crop of
// one), else contiguous; an input not already in that format is copied once, and the output
// takes that format's standard strides. The value checks of
// metamixer_fast/_checks.py::check_mix_values run here, with the same messages, because in
// Python they cost several small torch ops per call. The forward splits (sample, plane) units,
// the backward (sample, plane, row) rows (or, for boxes on small float, fp16 or bf16 maps,
// whole samples: core::backward_by_samples) across threads with at::parallel_for; every output
// element is written by exactly one thread, and the backward gathers per destination, so
// nothing races. mix_eager/mix2_eager (eager.h) are the same kernels for metamixer_fast._C's
// eager entries, which call them without the dispatcher.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <chrono>
#include <cstdlib>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/mix.h"
#include "core/store_choice.h"
#include "eager.h"

namespace metamixer {
namespace {

namespace core_ns = metamixer::core;

// Storage type of the core for an ATen scalar type.
template <typename T>
struct CoreType {
  using type = T;
};
template <>
struct CoreType<at::Half> {
  using type = core_ns::Half;
};
template <>
struct CoreType<at::BFloat16> {
  using type = core_ns::BFloat16;
};

// Everything a kernel call needs besides the tensors: layout, boxes in (row, column) units,
// partners and weights in the compute type, all checked.
template <typename CT>
struct MixPlan {
  core_ns::MixLayout layout;
  std::vector<int64_t> boxes;
  const int64_t* src = nullptr;
  std::vector<CT> w;
};

bool is_channels_last(const at::Tensor& x) {
  return x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// The layout the kernels read and write (the rule of metamixer_fast/_layout.py, which the fake
// implementations follow, so the two must agree): channels_last for a 4-D input whose channels
// are innermost and W next (a channels_last batch, or a crop of one), else contiguous.
at::MemoryFormat mix_format(const at::Tensor& x) {
  const bool last =
      x.dim() == 4 && !x.is_contiguous() && x.stride(1) == 1 && x.stride(3) == x.size(1);
  return last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// The tensor the kernel reads: x itself if it has its mix_format already, else a copy.
at::Tensor readable(const at::Tensor& x) {
  const at::MemoryFormat format = mix_format(x);
  return x.is_contiguous(format) ? x : x.contiguous(format);
}

// Checks partner indices and weights (named src_name/w_name in messages, as in _checks.py)
// and returns the weights in the compute type, converted the way the reference converts them.
template <typename CT>
std::vector<CT> checked_partners(const at::Tensor& src, const at::Tensor& w, int64_t n,
                                 const char* src_name, const char* w_name) {
  TORCH_CHECK_VALUE(src.scalar_type() == at::kLong && src.dim() == 1 && src.size(0) == n &&
                        src.is_contiguous() && src.device().is_cpu(),
                    "mix: '", src_name, "' must be a contiguous int64 CPU tensor [N] = [", n, "]");
  TORCH_CHECK_VALUE(w.is_floating_point() && w.dim() == 1 && w.size(0) == n && w.device().is_cpu(),
                    "mix: '", w_name, "' must be a floating CPU tensor [N] = [", n, "]");
  const int64_t* sp = src.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK_VALUE(sp[i] >= 0 && sp[i] < n, "mix: '", src_name,
                      "' must hold sample indices in [0, N=", n, ")");
  // the original w is checked (a float64 w of 1 + 1e-12 would round to 1 in float32), then
  // converted with the static_cast that w.to(CT) applies
  std::vector<CT> out(n);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "mix weights", [&] {
    const at::Tensor wc = w.contiguous();
    const scalar_t* wp = wc.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < n; ++i) {
      const double v = static_cast<double>(wp[i]);
      TORCH_CHECK_VALUE(v >= 0.0 && v <= 1.0, "mix: '", w_name,
                        "' must lie in [0, 1] (and not be NaN)");
      out[i] = static_cast<CT>(wp[i]);
    }
  });
  return out;
}

template <typename CT>
MixPlan<CT> make_plan(const at::Tensor& x, const at::Tensor& src, const at::Tensor& w,
                      const std::optional<at::Tensor>& box) {
  const int64_t n = x.size(0);
  TORCH_CHECK_VALUE(n >= 1, "mix: 'x' must hold N >= 1 samples");
  if (box.has_value()) {
    TORCH_CHECK_VALUE(x.dim() == 4, "mix: 'box' must be None for [N, D] features");
    const at::ScalarType t = box->scalar_type();
    TORCH_CHECK_VALUE((t == at::kInt || t == at::kLong) && box->dim() == 2 && box->size(0) == n &&
                          box->size(1) == 4 && box->device().is_cpu(),
                      "mix: 'box' must be an int32/int64 CPU tensor [N, 4] = [", n, ", 4]");
  }
  MixPlan<CT> plan;
  plan.w = checked_partners<CT>(src, w, n, "src", "w");
  plan.src = src.const_data_ptr<int64_t>();

  core_ns::MixLayout& L = plan.layout;
  L.n = n;
  int64_t col_scale = 1;
  if (x.dim() == 2) {
    L.row_len = x.size(1);
  } else if (is_channels_last(x)) {
    L.rows = x.size(2);
    L.row_len = x.size(3) * x.size(1);
    col_scale = x.size(1);
  } else {
    L.planes = x.size(1);
    L.rows = x.size(2);
    L.row_len = x.size(3);
  }
  plan.boxes.resize(4 * n);
  if (!box.has_value() || x.dim() == 2) {  // (a box with [N, D] features was refused above)
    // the box is the whole sample: view each sample as one contiguous row
    L.row_len = L.planes * L.rows * L.row_len;
    L.planes = L.rows = 1;
    for (int64_t i = 0; i < n; ++i) {
      int64_t* b = &plan.boxes[4 * i];
      b[0] = 0, b[1] = L.rows, b[2] = 0, b[3] = L.row_len;
    }
    return plan;
  }
  const at::Tensor bx = box->to(at::kLong).contiguous();
  const int64_t* bp = bx.data_ptr<int64_t>();
  const int64_t h = x.size(2), wd_ = x.size(3);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t y0 = bp[4 * i], y1 = bp[4 * i + 1], x0 = bp[4 * i + 2], x1 = bp[4 * i + 3];
    TORCH_CHECK_VALUE(0 <= y0 && y0 <= y1 && y1 <= h && 0 <= x0 && x0 <= x1 && x1 <= wd_,
                      "mix: each 'box' row (y0, y1, x0, x1) must satisfy 0 <= y0 <= y1 <= H=",
                      h, " and 0 <= x0 <= x1 <= W=", wd_);
    int64_t* b = &plan.boxes[4 * i];
    b[0] = y0, b[1] = y1, b[2] = x0 * col_scale, b[3] = x1 * col_scale;
  }
  return plan;
}

// An uninitialized output for x: its sizes, in mix_format(x) with that format's standard strides.
at::Tensor mix_output(const at::Tensor& x) {
  return at::empty(x.sizes(), x.options().memory_format(mix_format(x)));
}

// Units per task: aim for ~32 KiB of output per task so small images still split.
int64_t grain(int64_t unit_elems, size_t elem) {
  const int64_t unit_bytes = std::max<int64_t>(1, unit_elems * static_cast<int64_t>(elem));
  return std::max<int64_t>(1, (int64_t{32} << 10) / unit_bytes);
}
// A thread's scratch window of n elements: allocated once per thread and kept, and left
// uninitialized (the kernels write each element before reading it). Allocating it per call,
// as a 32 KB block next to each fresh output in glibc's heap, made glibc hand the output's
// pages back and fault them in again on the next call: about 700 page faults a call, 8x the
// kernel's own time, at 256x3x32x32 with one thread in bench_mix --alone. (Depending on the
// heap's layout, glibc's defaults can still do that for other reasons; the training loop's
// retain_memory setting prevents it.) Never used re-entrantly: no kernel calls another one
// inside its parallel region.
template <typename T>
T* thread_scratch(int64_t n) {
  thread_local std::unique_ptr<double[]> buf;
  thread_local int64_t have = 0;
  const int64_t doubles = (n * static_cast<int64_t>(sizeof(T)) + 7) / 8;
  if (doubles > have) buf.reset(new double[doubles]), have = doubles;
  return reinterpret_cast<T*>(buf.get());
}

int64_t grain_rows(const core_ns::MixLayout& L, size_t elem) { return grain(L.row_len, elem); }
int64_t grain_planes(const core_ns::MixLayout& L, size_t elem) {
  return grain(L.rows * L.row_len, elem);
}

at::Tensor mix_cpu(const at::Tensor& x_in, const at::Tensor& src, const at::Tensor& w,
                   const std::optional<at::Tensor>& box) {
  TORCH_CHECK_VALUE(x_in.dim() == 2 || x_in.dim() == 4,
                    "mix: 'x' must be [N, C, H, W] images or [N, D] features");
  const at::Tensor x = readable(x_in);
  at::Tensor out = mix_output(x_in);
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kByte, at::kHalf, at::kBFloat16, x.scalar_type(), "mix", [&] {
    using T = typename CoreType<scalar_t>::type;
    using CT = core_ns::compute_t<T>;
    const MixPlan<CT> plan = make_plan<CT>(x, src, w, box);
    const T* xp = reinterpret_cast<const T*>(x.const_data_ptr<scalar_t>());
    T* op = reinterpret_cast<T*>(out.mutable_data_ptr<scalar_t>());
    const core_ns::MixLayout& L = plan.layout;
    const std::vector<int64_t> order = core_ns::partner_chain_order(plan.src, L.n);
    at::parallel_for(0, L.n * L.planes, grain_planes(L, sizeof(T)), [&](int64_t b, int64_t e) {
      core_ns::mix_forward_planes(xp, op, plan.src, plan.w.data(), plan.boxes.data(), order.data(),
                                  L, b, e);
    });
  });
  return out;
}

template <typename T>
int64_t mix2_output_bytes(const core_ns::MixLayout& L) {
  return L.n * L.sample_size() * static_cast<int64_t>(sizeof(T));
}

// How mix2 stores its output (see core/store_choice.h), for the whole process.
core_ns::StoreChoice& store_choice() {
  static core_ns::StoreChoice choice;
  return choice;
}

// mix2's store mode: METAMIXER_STREAM_STORES=on|off forces it (on: wherever
// core::mix2_can_stream allows it); unset or auto leaves it to core::StoreChoice, which then
// wants the call's time (`timed`). Read on every call, so a benchmark can compare the modes in
// one process.
template <typename T>
bool mix2_stream_output(const T* out, const core_ns::MixLayout& L, bool& timed) {
  const char* forced = std::getenv("METAMIXER_STREAM_STORES");
  const std::string mode = forced == nullptr ? "" : forced;
  timed = false;
  if (mode.empty() || mode == "auto") {
    if (!core_ns::mix2_can_stream(out, L)) return false;
    timed = true;
    return store_choice().stream(mix2_output_bytes<T>(L), at::get_num_threads());
  }
  TORCH_CHECK_VALUE(mode == "on" || mode == "off", "METAMIXER_STREAM_STORES='", mode,
                    "' is not one of auto, on, off: unset it or pick one of those");
  return mode == "on" && core_ns::mix2_can_stream(out, L);
}

// mix(mix(x, src, w, box), src2, w2, None) in one pass (core::mix2_forward_planes), over the
// bands of rows of core::mix2_bands.
at::Tensor mix2_cpu(const at::Tensor& x_in, const at::Tensor& src, const at::Tensor& w,
                    const std::optional<at::Tensor>& box, const at::Tensor& src2,
                    const at::Tensor& w2) {
  TORCH_CHECK_VALUE(x_in.dim() == 2 || x_in.dim() == 4,
                    "mix2: 'x' must be [N, C, H, W] images or [N, D] features");
  const at::Tensor x = readable(x_in);
  at::Tensor out = mix_output(x_in);
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kByte, at::kHalf, at::kBFloat16, x.scalar_type(), "mix2", [&] {
    using T = typename CoreType<scalar_t>::type;
    using CT = core_ns::compute_t<T>;
    const MixPlan<CT> plan = make_plan<CT>(x, src, w, box);
    const std::vector<CT> w2c = checked_partners<CT>(src2, w2, x.size(0), "src2", "w2");
    const int64_t* s2 = src2.const_data_ptr<int64_t>();
    const T* xp = reinterpret_cast<const T*>(x.const_data_ptr<scalar_t>());
    T* op = reinterpret_cast<T*>(out.mutable_data_ptr<scalar_t>());
    const core_ns::MixLayout& L = plan.layout;
    const std::vector<int64_t> order = core_ns::partner_chain_order(s2, L.n);
    const int64_t band_elems = core_ns::mix2_bands<T>(L).rows * L.row_len;
    const int64_t units = core_ns::mix2_units<T>(L);
    bool timed = false;
    const bool stream = mix2_stream_output(op, L, timed);
    const auto start = std::chrono::steady_clock::now();
    at::parallel_for(0, units, grain(band_elems, sizeof(T)), [&](int64_t b, int64_t e) {
      T* const scratch = thread_scratch<T>(2 * core_ns::kWindow);
      core_ns::mix2_forward_planes(xp, op, plan.src, plan.w.data(), plan.boxes.data(), s2,
                                   w2c.data(), order.data(), L, scratch, b, e, stream);
    });
    if (timed) {
      const std::chrono::duration<double> took = std::chrono::steady_clock::now() - start;
      store_choice().record(mix2_output_bytes<T>(L), at::get_num_threads(), stream, took.count());
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> mix_backward_cpu(const at::Tensor& grad_in,
                                                    const at::Tensor& x_in, const at::Tensor& src,
                                                    const at::Tensor& w,
                                                    const std::optional<at::Tensor>& box,
                                                    bool need_dw) {
  TORCH_CHECK_VALUE(at::isFloatingType(x_in.scalar_type()),
                    "mix_backward: 'x' must be a floating tensor (", x_in.scalar_type(),
                    " is not differentiable)");
  TORCH_CHECK_VALUE(grad_in.sizes() == x_in.sizes(),
                    "mix_backward: 'grad' must have the shape of 'x', got ", grad_in.sizes(),
                    " and ", x_in.sizes());
  const at::Tensor x = readable(x_in);
  // grad is read in x's layout (usually already so: autograd hands back out's strides)
  const at::Tensor grad = grad_in.to(x.scalar_type()).contiguous(mix_format(x_in));
  at::Tensor dx = mix_output(x_in);
  at::Tensor dw;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mix_backward", [&] {
    using T = typename CoreType<scalar_t>::type;
    using CT = core_ns::compute_t<T>;
    using A = core_ns::acc_t<T>;
    const MixPlan<CT> plan = make_plan<CT>(x, src, w, box);
    const core_ns::MixLayout& L = plan.layout;
    std::vector<int64_t> offsets, list;
    core_ns::invert_partners(plan.src, L.n, offsets, list);
    const T* gp = reinterpret_cast<const T*>(grad.const_data_ptr<scalar_t>());
    const T* xp = reinterpret_cast<const T*>(x.const_data_ptr<scalar_t>());
    T* dxp = reinterpret_cast<T*>(dx.mutable_data_ptr<scalar_t>());
    const std::vector<int64_t> order = core_ns::partner_chain_order(plan.src, L.n);
#if defined(METAMIXER_HAVE_AVX512_MIX2)
    if (core_ns::backward_by_samples<T>(L)) {  // boxes on small maps: whole samples as units
      at::Tensor dw_acc = at::zeros({L.n}, w.options().dtype(at::CppTypeToScalarType<A>::value));
      A* dwp = need_dw ? dw_acc.mutable_data_ptr<A>() : nullptr;
      at::parallel_for(0, L.n, grain(L.sample_size(), sizeof(T)), [&](int64_t b, int64_t e) {
        core_ns::mix_backward_samples(gp, xp, plan.src, plan.w.data(), plan.boxes.data(),
                                      order.data(), L, offsets.data(), list.data(), dxp, dwp, b,
                                      e);
      });
      dw = dw_acc.to(w.scalar_type());
      return;
    }
#endif
    std::vector<A> dw_rows(need_dw ? L.total_rows() : 0);  // none: dx only
    at::parallel_for(0, L.total_rows(), grain_rows(L, sizeof(T)), [&](int64_t b, int64_t e) {
      CT* const buf = thread_scratch<CT>(core_ns::kWindow);
      core_ns::mix_backward_rows(gp, xp, plan.src, plan.w.data(), plan.boxes.data(), order.data(),
                                 L, offsets.data(), list.data(), dxp,
                                 need_dw ? dw_rows.data() : nullptr, buf, b, e);
    });
    if (!need_dw) {
      dw = at::zeros_like(w);
      return;
    }
    at::Tensor dw_acc = at::empty({L.n}, w.options().dtype(at::CppTypeToScalarType<A>::value));
    core_ns::reduce_dw_rows(dw_rows.data(), L, dw_acc.mutable_data_ptr<A>());
    dw = dw_acc.to(w.scalar_type());
  });
  return {dx, dw};
}

}  // namespace

at::Tensor mix_eager(const at::Tensor& x, const at::Tensor& src, const at::Tensor& w,
                     const std::optional<at::Tensor>& box) {
  return mix_cpu(x, src.contiguous(), w, box);
}

at::Tensor mix2_eager(const at::Tensor& x, const at::Tensor& src, const at::Tensor& w,
                      const std::optional<at::Tensor>& box, const at::Tensor& src2,
                      const at::Tensor& w2) {
  return mix2_cpu(x, src.contiguous(), w, box, src2.contiguous(), w2);
}

}  // namespace metamixer

TORCH_LIBRARY_FRAGMENT(metamixer_cpp, m) {
  m.def("mix(Tensor x, Tensor src, Tensor w, Tensor? box) -> Tensor");
  m.def("mix_backward(Tensor grad, Tensor x, Tensor src, Tensor w, Tensor? box, "
        "bool need_dw=True) -> (Tensor, Tensor)");
  m.def("mix2(Tensor x, Tensor src, Tensor w, Tensor? box, Tensor src2, Tensor w2) -> Tensor");
}

TORCH_LIBRARY_IMPL(metamixer_cpp, CPU, m) {
  m.impl("mix", &metamixer::mix_cpu);
  m.impl("mix_backward", &metamixer::mix_backward_cpu);
  m.impl("mix2", &metamixer::mix2_cpu);
}
