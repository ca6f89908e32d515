// ATen binding of the fused mixed_kd_loss CPU kernels (core: csrc/core/mixed_kd_loss.h).
//
// Ops in the `metamixer_cpp` namespace:
//   mixed_kd_loss_fwd(...) -> (ce[K], kd[K], row_stats[K, B, 3])   CPU kernel
//   mixed_kd_loss_bwd(grad_ce, grad_kd, ..., row_stats, ...) -> dZ  CPU kernel
//   mixed_kd_loss(...) -> (ce, kd)   CPU kernel + an Autograd kernel (MixedKDLossBackward below)
// The first two are the "cpp" backend of the Python custom op metamixer::mixed_kd_loss (the
// path torch.compile traces). The third's Autograd kernel is also mixed_kd_loss_eager (eager.h),
// the eager fast path of metamixer_fast.mixed_kd_loss, which metamixer_fast._C.mixed_kd_loss
// (binding.cpp) calls without the dispatcher: the forward and one autograd node, whose backward
// runs in C++ from the autograd engine, so the eager step skips the Python custom-op machinery
// (~165 us per fwd+bwd at small shapes).
//
// Logits arrive as one [K, B, C] tensor or K [B, C] tensors and are read in place through
// per-peer row pointers and strides (no stacking copy); only a peer whose class dim is not
// contiguous is copied. The gradient has the input's dtype, form and (dense) layout. Value
// checks (label range, weights, peer matrix) run here, on data the kernel reads anyway, with
// the messages of metamixer_fast._checks.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "core/mixed_kd_loss.h"
#include "eager.h"

namespace metamixer {
namespace {

using at::Tensor;
using at::TensorList;

template <typename S>
struct CoreType {
  using type = S;
};
template <>
struct CoreType<at::BFloat16> {
  using type = core::bf16;
};
template <>
struct CoreType<at::Half> {
  using type = core::fp16;
};

// The entries of a small floating tensor as doubles, in row-major order. A 1-D tensor is read
// through its stride: the gradient of ce.sum() arrives expanded (stride 0), and copying it
// contiguous would cost a dispatcher call and an allocation per backward.
std::vector<double> as_doubles(const Tensor& t) {
  const Tensor c = t.dim() <= 1 ? t : t.contiguous();
  const int64_t step = c.dim() == 1 ? c.stride(0) : 1;
  std::vector<double> out(c.numel());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "as_doubles", [&] {
    const scalar_t* p = c.const_data_ptr<scalar_t>();
    for (size_t i = 0; i < out.size(); ++i) out[i] = static_cast<double>(p[i * step]);
  });
  return out;
}

// How far from 1 a row of M weights of dtype t may sum: max(1e-3, M eps(t)), the rule of
// _checks.weight_sum_tolerance (which derives it): a row normalised in bf16 misses 1 by up to
// M u / (1 - (M - 1) u), u = eps / 2 (~0.008 for two weights), which a fixed 1e-3 refused.
double weight_sum_tolerance(at::ScalarType t, int64_t M) {
  const double eps = t == at::kBFloat16 ? 0x1p-7 : t == at::kHalf ? 0x1p-10
                     : t == at::kFloat  ? 0x1p-23 : 0x1p-52;  // torch.finfo(t).eps
  return std::max(1e-3, static_cast<double>(M) * eps);
}

// The dtype as the Python message names it (str(torch.bfloat16) without "torch.").
const char* weight_dtype_name(at::ScalarType t) {
  return t == at::kBFloat16 ? "bfloat16" : t == at::kHalf ? "float16"
         : t == at::kFloat  ? "float32" : "float64";
}

// Everything but the logits, checked with the messages of _checks.py: labels, weights (as
// double), peer matrix and the scalar options.
struct Plan {
  Tensor labels;  // contiguous int64 [B, M] (or [B] with M = 1)
  int64_t M = 1;
  std::vector<double> weights, peer;
  double temperature = 1.0, label_smoothing = 0.0;
  bool ensemble = false, detach_targets = true;
};

// labels [B, M] with weights [B, M]; or, for the eager op, class indices [B] (or [B, 1]) with
// no weights (each row one label of weight 1).
Plan make_plan(const Tensor& labels, const Tensor& weights, int64_t K, int64_t B, int64_t C,
               double temperature, double label_smoothing, c10::string_view mode,
               const std::optional<Tensor>& peer_matrix, bool detach_targets) {
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0,
                    "mixed_kd_loss: 'temperature' must be a finite number > 0");
  TORCH_CHECK_VALUE((labels.dim() == 2 || (labels.dim() == 1 && !weights.defined())) &&
                        labels.size(0) == B && labels.scalar_type() == at::kLong &&
                        labels.device().is_cpu(),
                    "mixed_kd_loss: 'labels' must be an int64 CPU tensor [B, M] with B=", B);
  TORCH_CHECK_VALUE(!weights.defined() || (weights.sizes() == labels.sizes() &&
                                           weights.is_floating_point() && weights.device().is_cpu()),
                    "mixed_kd_loss: 'weights' must be a floating CPU tensor shaped like labels");
  TORCH_CHECK_VALUE(weights.defined() || labels.dim() == 1 || labels.size(1) == 1,
                    "mixed_kd_loss: labels [B, M] with M > 1 need 'weights' of the same shape");
  TORCH_CHECK_VALUE(mode == "pairwise" || mode == "ensemble",
                    "mixed_kd_loss: 'mode' must be 'pairwise' or 'ensemble'");
  TORCH_CHECK_VALUE(label_smoothing >= 0 && label_smoothing <= 1,
                    "mixed_kd_loss: 'label_smoothing' must be in [0, 1]");
  TORCH_CHECK_VALUE(mode == "ensemble" || !peer_matrix.has_value(),
                    "mixed_kd_loss: 'peer_matrix' is used only with mode='ensemble'");
  Plan plan;
  plan.labels = labels.contiguous();
  plan.M = labels.dim() == 2 ? labels.size(1) : 1;
  plan.temperature = temperature, plan.label_smoothing = label_smoothing;
  plan.ensemble = mode == "ensemble", plan.detach_targets = detach_targets;
  const int64_t* lab = plan.labels.data_ptr<int64_t>();
  const int64_t n = plan.labels.numel(), M = plan.M;
  int64_t lo = 0, hi = 0;
  for (int64_t i = 0; i < n; ++i) {
    lo = i == 0 ? lab[i] : std::min(lo, lab[i]);
    hi = i == 0 ? lab[i] : std::max(hi, lab[i]);
  }
  TORCH_CHECK_VALUE(n == 0 || (lo >= 0 && hi < C), "mixed_kd_loss: 'labels' must hold class indices in [0, ",
                    C, "); found values from ", lo, " to ", hi);
  if (!weights.defined()) {
    plan.weights.assign(B, 1.0);
  } else {
    plan.weights = as_doubles(weights);
    const double tol = weight_sum_tolerance(weights.scalar_type(), M);
    bool ok = true, sums = true;
    for (int64_t b = 0; b < B; ++b) {
      double s = 0;
      for (int64_t m = 0; m < M; ++m) {
        const double v = plan.weights[b * M + m];
        ok = ok && std::isfinite(v) && v >= 0;
        s += v;
      }
      sums = sums && std::abs(s - 1.0) <= tol;
    }
    TORCH_CHECK_VALUE(ok, "mixed_kd_loss: 'weights' must be finite and >= 0 (a mixture of labels per row)");
    TORCH_CHECK_VALUE(sums, "mixed_kd_loss: each row of 'weights' must sum to 1 (within ", tol,
                      " for ", M, " ", weight_dtype_name(weights.scalar_type()),
                      " weights per row); normalise it with weights / weights.sum(1, keepdim=True)");
  }
  if (mode == "ensemble") {
    if (peer_matrix.has_value()) {
      const Tensor& a = *peer_matrix;
      TORCH_CHECK_VALUE(a.dim() == 2 && a.size(0) == K && a.size(1) == K && a.is_floating_point() &&
                            a.device().is_cpu(),
                        "mixed_kd_loss: 'peer_matrix' must be a floating [K, K] = [", K, ", ", K,
                        "] CPU tensor");
      plan.peer = as_doubles(a);
      for (double v : plan.peer)
        TORCH_CHECK_VALUE(std::isfinite(v), "mixed_kd_loss: 'peer_matrix' has NaN or inf entries");
    } else {  // the mean of the other peers (reference.default_peer_matrix)
      plan.peer.assign(K * K, 1.0 / double(K - 1));
      for (int64_t k = 0; k < K; ++k) plan.peer[k * K + k] = 0.0;
    }
  }
  return plan;
}

// Per-peer base pointers and row strides of logits given as [K, B, C] or K x [B, C]. A peer
// whose class dim is not contiguous is copied (held in `keep`).
struct Peers {
  int64_t K = 0, B = 0, C = 0;
  std::vector<Tensor> keep;
  std::vector<const void*> base;
  std::vector<int64_t> stride;
};

Peers view_peers(TensorList logits) {
  Peers p;
  TORCH_CHECK_VALUE(!logits.empty(), "mixed_kd_loss: 'logits' is empty");
  const bool stacked = logits.size() == 1;
  const Tensor& first = logits[0];
  TORCH_CHECK_VALUE(first.device().is_cpu(), "mixed_kd_loss: the C++ kernel takes CPU tensors");
  TORCH_CHECK_VALUE(first.dim() == (stacked ? 3 : 2),
                    "mixed_kd_loss: 'logits' must be [K, B, C] or a list of K [B, C] tensors");
  p.K = stacked ? first.size(0) : static_cast<int64_t>(logits.size());
  p.B = first.size(stacked ? 1 : 0);
  p.C = first.size(stacked ? 2 : 1);
  TORCH_CHECK_VALUE(p.K >= 2 && p.B >= 1 && p.C >= 1, "mixed_kd_loss: needs K >= 2, B >= 1, C >= 1");
  for (int64_t k = 0; k < p.K; ++k) {
    Tensor z = stacked ? first.select(0, k) : logits[k];
    TORCH_CHECK_VALUE(z.sizes() == first.sizes().slice(stacked ? 1 : 0) &&
                          z.scalar_type() == first.scalar_type() && z.device() == first.device(),
                      "mixed_kd_loss: every peer's logits must share shape, dtype and device");
    if (z.stride(1) != 1 && p.C > 1) z = z.contiguous();
    p.keep.push_back(z);
    p.base.push_back(z.data_ptr());
    p.stride.push_back(z.stride(0));
  }
  return p;
}

at::ScalarType out_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

int64_t grain_rows(int64_t K, int64_t C) {
  // >= 8k logits (several microseconds of work) per task, so a second thread pays for itself
  return std::max<int64_t>(1, 8192 / std::max<int64_t>(1, K * C));
}

template <typename T>
void run_rows(const core::LossArgs<T>& args, bool backward) {
  at::parallel_for(0, args.B, grain_rows(args.K, args.C), [&](int64_t b0, int64_t b1) {
    if constexpr (!std::is_same_v<T, double>) {  // double (gradcheck) runs the baseline build
      if (core::cpu_has_avx512()) {
        backward ? core::backward_rows_avx512(args, b0, b1) : core::forward_rows_avx512(args, b0, b1);
        return;
      }
      if (core::cpu_has_avx2_fma()) {
        backward ? core::backward_rows_avx2(args, b0, b1) : core::forward_rows_avx2(args, b0, b1);
        return;
      }
    }
    backward ? core::simd16::backward_rows(args, b0, b1) : core::simd16::forward_rows(args, b0, b1);
  });
}

template <typename T>
core::LossArgs<T> make_args(const Peers& p, const Plan& plan, std::vector<const T*>& z) {
  core::LossArgs<T> a;
  a.K = p.K, a.B = p.B, a.C = p.C, a.M = plan.M;
  for (const void* b : p.base) z.push_back(static_cast<const T*>(b));
  a.z = z.data();
  a.z_stride = p.stride.data();
  a.labels = plan.labels.data_ptr<int64_t>();
  a.weights = plan.weights.data();
  a.temperature = plan.temperature, a.label_smoothing = plan.label_smoothing;
  a.ensemble = plan.ensemble;
  a.peer = plan.peer.empty() ? nullptr : plan.peer.data();
  a.detach_targets = plan.detach_targets;
  return a;
}

// Gradients like the inputs (dtype, form, dense layout), with per-peer row pointers for the
// kernel: class dim contiguous, else a contiguous temporary that copy_back() copies over.
struct GradBuffers {
  std::vector<Tensor> grads;    // what the backward returns: one [K, B, C] or K [B, C]
  std::vector<Tensor> targets;  // per peer: the [B, C] the kernel writes
  std::vector<void*> out;
  std::vector<int64_t> stride;
  bool in_place = true;  // every target is a view of grads (no temporaries)

  static GradBuffers like(TensorList logits, int64_t K, int64_t C) {
    std::vector<Tensor> g;
    for (const Tensor& z : logits) g.push_back(at::empty_like(z));
    return GradBuffers(std::move(g), K, C);
  }
  GradBuffers(std::vector<Tensor> g, int64_t K, int64_t C) : grads(std::move(g)) {
    for (int64_t k = 0; k < K; ++k) {
      Tensor g = peer_grad(k);
      if (g.stride(1) != 1 && C > 1) g = at::empty(g.sizes(), g.options()), in_place = false;
      targets.push_back(g);
      out.push_back(g.data_ptr());
      stride.push_back(g.stride(0));
    }
  }
  Tensor peer_grad(int64_t k) const { return grads.size() == 1 ? grads[0].select(0, k) : grads[k]; }
  void copy_back() {
    if (in_place) return;
    for (size_t k = 0; k < targets.size(); ++k) {
      Tensor g = peer_grad(static_cast<int64_t>(k));
      if (g.data_ptr() != targets[k].data_ptr()) g.copy_(targets[k]);
    }
  }
};

// The eager autograd path on float32 logits keeps the forward's exponentials in the
// gradient buffers (LossArgs::chunk_scale): the backward then skips its exponential and
// overwrites them with the gradient. Costs no memory beyond the gradient itself, which
// merely exists from the forward on instead of from the backward on.
struct StoredExp {
  GradBuffers buffers;
  Tensor chunk_scale;  // [K, B, core::stored_slots(C)]
};

// Stored exponentials exist for float and double logits only (half types recompute: storing
// them rounded would cost the gradient accuracy).
template <typename T>
void set_chunk_scale(core::LossArgs<T>& a, const Tensor& scale) {
  if constexpr (std::is_same_v<T, core::acc_t<T>>) {
    a.chunk_scale = scale.data_ptr<T>();
  } else {
    TORCH_CHECK(false, "mixed_kd_loss: stored exponentials need float or double logits");
  }
}

// The forward on peers p = view_peers(logits) with a checked plan.
std::tuple<Tensor, Tensor, Tensor> forward_impl(const Peers& p, const Plan& plan, at::ScalarType dtype,
                                                StoredExp* keep) {
  const auto odt = out_dtype(dtype);
  const auto opts = at::TensorOptions().dtype(odt);
  Tensor stats = at::empty({p.K, p.B, 3}, opts.dtype(at::kDouble));
  std::vector<double> ce_rows(p.K * p.B), kd_rows(p.K * p.B);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "mixed_kd_loss", [&] {
    using T = typename CoreType<scalar_t>::type;
    std::vector<const T*> z;
    core::LossArgs<T> a = make_args<T>(p, plan, z);
    a.row_stats = stats.data_ptr<double>();
    a.ce_rows = ce_rows.data(), a.kd_rows = kd_rows.data();
    std::vector<T*> dz;
    if (keep) {  // (only float32 logits get here: see stored_exp_for)
      for (void* o : keep->buffers.out) dz.push_back(static_cast<T*>(o));
      a.dz = dz.data(), a.dz_stride = keep->buffers.stride.data();
      set_chunk_scale(a, keep->chunk_scale);
    }
    run_rows(a, false);
  });
  // Fixed-order reduction over rows: the result does not depend on the thread count.
  const double t = plan.temperature;
  const double kd_scale = t * t / (plan.ensemble ? 1.0 : double(p.K - 1));
  Tensor ce = at::empty({p.K}, opts), kd = at::empty({p.K}, opts);
  AT_DISPATCH_FLOATING_TYPES(odt, "mixed_kd_loss_sum", [&] {
    for (int64_t k = 0; k < p.K; ++k) {
      double sc = 0, sk = 0;
      for (int64_t b = 0; b < p.B; ++b) sc += ce_rows[k * p.B + b], sk += kd_rows[k * p.B + b];
      ce.data_ptr<scalar_t>()[k] = static_cast<scalar_t>(sc / double(p.B));
      kd.data_ptr<scalar_t>()[k] = static_cast<scalar_t>(sk / double(p.B) * kd_scale);
    }
  });
  return {ce, kd, stats};
}

std::tuple<Tensor, Tensor, Tensor> mixed_kd_loss_fwd(TensorList logits, const Tensor& labels,
                                                     const Tensor& weights, double temperature,
                                                     double label_smoothing, c10::string_view mode,
                                                     const std::optional<Tensor>& peer_matrix,
                                                     bool detach_targets) {
  const Peers p = view_peers(logits);
  const Plan plan = make_plan(labels, weights, p.K, p.B, p.C, temperature, label_smoothing, mode,
                              peer_matrix, detach_targets);
  return forward_impl(p, plan, logits[0].scalar_type(), nullptr);
}

std::vector<double> grad_values(const Tensor& g, int64_t K, const char* name) {
  if (!g.defined()) return std::vector<double>(K, 0.0);
  TORCH_CHECK_VALUE(g.numel() == K && g.is_floating_point(), "mixed_kd_loss backward: '", name,
                    "' must have K=", K, " floating entries");
  return as_doubles(g);
}

// The backward on peers p = view_peers(logits) with a checked plan: into `stored` (which holds
// the forward's exponentials) or into fresh buffers like the logits.
// `stats`: the forward's row_stats, contiguous, float64.
std::vector<Tensor> backward_impl(const Peers& p, const Plan& plan, TensorList logits,
                                  const Tensor& stats, const Tensor& grad_ce,
                                  const Tensor& grad_kd, StoredExp* stored) {
  const auto dtype = logits[0].scalar_type();
  const std::vector<double> gce = grad_values(grad_ce, p.K, "grad_ce");
  const std::vector<double> gkd = grad_values(grad_kd, p.K, "grad_kd");
  std::optional<GradBuffers> fresh;
  GradBuffers& buf = stored ? stored->buffers : fresh.emplace(GradBuffers::like(logits, p.K, p.C));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "mixed_kd_loss_backward", [&] {
    using T = typename CoreType<scalar_t>::type;
    std::vector<const T*> z;
    std::vector<T*> dz;
    for (void* o : buf.out) dz.push_back(static_cast<T*>(o));
    core::LossArgs<T> a = make_args<T>(p, plan, z);
    a.row_stats = const_cast<double*>(stats.data_ptr<double>());
    a.grad_ce = gce.data(), a.grad_kd = gkd.data();
    a.dz = dz.data(), a.dz_stride = buf.stride.data();
    if (stored) set_chunk_scale(a, stored->chunk_scale);
    run_rows(a, true);
  });
  buf.copy_back();
  return std::move(buf.grads);
}

std::vector<Tensor> mixed_kd_loss_bwd(const Tensor& grad_ce, const Tensor& grad_kd, TensorList logits,
                                      const Tensor& labels, const Tensor& weights,
                                      const Tensor& row_stats, double temperature,
                                      double label_smoothing, c10::string_view mode,
                                      const std::optional<Tensor>& peer_matrix, bool detach_targets) {
  const Peers p = view_peers(logits);
  const Plan plan = make_plan(labels, weights, p.K, p.B, p.C, temperature, label_smoothing, mode,
                              peer_matrix, detach_targets);
  TORCH_CHECK_VALUE(row_stats.dim() == 3 && row_stats.size(0) == p.K && row_stats.size(1) == p.B &&
                        row_stats.size(2) == 3,
                    "mixed_kd_loss backward: 'row_stats' must be [K, B, 3]");
  const Tensor stats = row_stats.to(at::kDouble).contiguous();
  return backward_impl(p, plan, logits, stats, grad_ce, grad_kd, nullptr);
}

// Gradient buffers for the forward to store its exponentials in, when the logits are float32
// and give class-contiguous gradient rows; else none. (Not for double: a backward from stored
// exponentials and one that recomputes them differ in the last bits, and gradcheck runs the
// backward twice and asks for identical results.)
std::optional<StoredExp> stored_exp_for(const Peers& p, TensorList logits) {
  if (logits[0].scalar_type() != at::kFloat) return std::nullopt;
  GradBuffers buffers = GradBuffers::like(logits, p.K, p.C);
  if (!buffers.in_place) return std::nullopt;
  Tensor scale = at::empty({p.K, p.B, core::stored_slots(p.C)}, logits[0].options());
  return StoredExp{std::move(buffers), std::move(scale)};
}

// The autograd node of the eager path, written directly against torch::autograd::Node (not
// torch::autograd::Function): it keeps the forward's checked plan and row statistics as C++
// members, so a step builds no IValue map and the backward re-checks nothing.
// Inputs: (grad_ce, grad_kd); outputs: one gradient per logits tensor.
struct MixedKDLossBackward : public torch::autograd::Node {
  // The logits, through SavedVariable: the backward sees them as saved-tensor hooks (offloading,
  // checkpointing) give them back, and unpacking checks that they were not changed in place.
  std::vector<torch::autograd::SavedVariable> logits;
  Plan plan;
  Tensor stats;
  // The forward's exponentials serve one backward: they are overwritten with the gradient and
  // dropped here, so that the gradient is the buffer's only owner (AccumulateGrad then takes
  // it without a copy). A second backward (retain_graph) recomputes.
  std::optional<StoredExp> stored;

  std::string name() const override { return "MixedKDLossBackward"; }

  // Compiled autograd cannot trace this C++ backward; say what works instead.
  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& /*args*/) const override {
    TORCH_CHECK_NOT_IMPLEMENTED(
        false, "mixed_kd_loss: compiled autograd cannot trace the backward of an eager "
               "mixed_kd_loss call; call it inside the torch.compile'd function (which uses the "
               "metamixer::mixed_kd_loss custom op), or run this backward without compiled autograd");
  }

  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    // The engine enables grad mode for backward(create_graph=True); this node's gradient is
    // computed below autograd and would carry no graph, so a second derivative would be
    // silently wrong.
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "mixed_kd_loss: double backward (backward or autograd.grad with create_graph=True) "
                "is not supported; its gradient is computed without a graph");
    std::lock_guard<std::mutex> lock(mutex_);
    std::vector<Tensor> z;
    for (auto& saved : logits) z.push_back(saved.unpack());
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    std::optional<StoredExp> exps = std::move(stored);
    stored.reset();
    return backward_impl(view_peers(z), plan, z, stats, grads[0], grads[1], exps ? &*exps : nullptr);
  }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& saved : logits) saved.reset_data();
    stats.reset();
    stored.reset();
  }
};

// The eager op takes the labels as the user gave them: class indices [B] (weights None) or a
// mixture [B, M] with weights, so the Python wrapper has nothing to build. Registered as the
// op's Autograd kernel: it runs the forward below autograd and, when a gradient is needed, links
// one MixedKDLossBackward node.
std::tuple<Tensor, Tensor> mixed_kd_loss_autograd(TensorList logits, const Tensor& labels,
                                                  const std::optional<Tensor>& weights,
                                                  double temperature, double label_smoothing,
                                                  c10::string_view mode,
                                                  const std::optional<Tensor>& peer_matrix,
                                                  bool detach_targets) {
  namespace ag = torch::autograd;
  const bool grad = ag::compute_requires_grad(logits);
  // No gradient flows to weights or peer_matrix: decline, and the Python checks explain.
  const bool grad_to_weights = (weights && weights->requires_grad()) ||
                               (peer_matrix && peer_matrix->requires_grad());
  TORCH_CHECK(!at::GradMode::is_enabled() || !grad_to_weights,
              "mixed_kd_loss: 'weights' and 'peer_matrix' get no gradient; pass them detached");
  for (const Tensor& z : logits)
    TORCH_CHECK(!z._fw_grad(/*level=*/0).defined(),
                "mixed_kd_loss: forward-mode AD is not supported; use reverse mode (backward)");
  c10::intrusive_ptr<MixedKDLossBackward> node;
  Tensor ce, kd;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    Peers p = view_peers(logits);
    Plan plan = make_plan(labels, weights.value_or(Tensor()), p.K, p.B, p.C, temperature,
                          label_smoothing, mode, peer_matrix, detach_targets);
    std::optional<StoredExp> keep = grad ? stored_exp_for(p, logits) : std::nullopt;
    Tensor stats;
    std::tie(ce, kd, stats) = forward_impl(p, plan, logits[0].scalar_type(), keep ? &*keep : nullptr);
    if (grad) {
      node = c10::make_intrusive<MixedKDLossBackward>();
      node->plan = std::move(plan);
      node->stats = std::move(stats);
      node->stored = std::move(keep);
    }
  }
  if (node) {
    node->set_next_edges(ag::collect_next_edges(logits));
    for (const Tensor& z : logits) node->logits.emplace_back(z, /*is_output=*/false);
    ag::set_history(ce, node);
    ag::set_history(kd, node);
  }
  return {ce, kd};
}

std::tuple<Tensor, Tensor> mixed_kd_loss_nograd(TensorList logits, const Tensor& labels,
                                                const std::optional<Tensor>& weights,
                                                double temperature, double label_smoothing,
                                                c10::string_view mode,
                                                const std::optional<Tensor>& peer_matrix,
                                                bool detach_targets) {
  auto [ce, kd, stats] = mixed_kd_loss_fwd(logits, labels, weights.value_or(Tensor()), temperature,
                                           label_smoothing, mode, peer_matrix, detach_targets);
  return {ce, kd};
}

}  // namespace

std::tuple<Tensor, Tensor> mixed_kd_loss_eager(TensorList logits, const Tensor& labels,
                                               const std::optional<Tensor>& weights,
                                               double temperature, double label_smoothing,
                                               std::string_view mode,
                                               const std::optional<Tensor>& peer_matrix,
                                               bool detach_targets) {
  RECORD_FUNCTION("metamixer::mixed_kd_loss", std::vector<c10::IValue>());
  return mixed_kd_loss_autograd(logits, labels, weights, temperature, label_smoothing, mode,
                                peer_matrix, detach_targets);
}

}  // namespace metamixer

TORCH_LIBRARY_FRAGMENT(metamixer_cpp, m) {
  m.def("mixed_kd_loss_fwd(Tensor[] logits, Tensor labels, Tensor weights, float temperature, "
        "float label_smoothing, str mode, Tensor? peer_matrix, bool detach_targets) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("mixed_kd_loss_bwd(Tensor grad_ce, Tensor grad_kd, Tensor[] logits, Tensor labels, "
        "Tensor weights, Tensor row_stats, float temperature, float label_smoothing, str mode, "
        "Tensor? peer_matrix, bool detach_targets) -> Tensor[]");
  m.def("mixed_kd_loss(Tensor[] logits, Tensor labels, Tensor? weights, float temperature, "
        "float label_smoothing, str mode, Tensor? peer_matrix, bool detach_targets) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(metamixer_cpp, CPU, m) {
  m.impl("mixed_kd_loss_fwd", &metamixer::mixed_kd_loss_fwd);
  m.impl("mixed_kd_loss_bwd", &metamixer::mixed_kd_loss_bwd);
  m.impl("mixed_kd_loss", &metamixer::mixed_kd_loss_nograd);
}

TORCH_LIBRARY_IMPL(metamixer_cpp, Autograd, m) {
  m.impl("mixed_kd_loss", &metamixer::mixed_kd_loss_autograd);
}
