// Fused per-peer cross-entropy + distillation loss (DESIGN.md 2.1), torch-free core.
//
// For one batch row b, the K peers' logit rows z_k[C], s_k = softmax(z_k), p_k = softmax(z_k/T):
//   ce_row[k] = sum_m W[m] ((1 - eps) (lse(z_k) - z_k[L[m]]) + eps (lse(z_k) - mean_c z_k))
//               (the eps term only when eps > 0, as in reference.py)
//   pairwise: kd_row[k] = sum_{t != k} KL(p_t || p_k),
//             KL(p_t || p_k) = 1/T sum_c p_t[c] (z_t[c] - z_k[c]) - (lse(z_t/T) - lse(z_k/T))
//   ensemble: kd_row[k] = KL(softmax(E_k/T) || p_k), E_k = sum_{j: A[k,j] != 0} A[k,j] z_j
// with 0 log 0 = 0 (terms whose target probability is 0 are skipped, so -inf logits are masked
// classes). The binding scales: ce[k] = mean_b ce_row, kd[k] = T^2 mean_b kd_row (/(K-1)).
//
// Forward: one pass over Z. The row is cut into chunks of kChunk classes (all K peers' chunks
// stay in L1); per chunk and peer we take the chunk max, then exp-sums relative to it, then
// merge into the row's running (max, sums) as an online softmax does. Writes row_stats
// [K, B, 3] = (lse(z), lse(z/T), lse(E/T) or 0) and per-row ce/kd [K, B].
// Backward: one pass writing dZ from row_stats (or from the forward's stored exponentials,
// which saves the backward its exponential: see LossArgs::chunk_scale); d ce/dz = Wsum s - eps Wsum/C - (1-eps) sum_m
// W[m] onehot(L[m]); d KL(q || p_k)/dz_k = (p_k - q)/T; with detach_targets=false also
// d KL(q || p)/d(target logits) = q (log q - log p - KL)/T, whose per-row KL needs one extra
// read of the row (cache-resident) before the gradient pass.
// Bytes: forward reads K*B*C logits once; backward reads them once and writes K*B*C gradients.
// With stored exponentials the forward also writes K*B*C values and the backward reads those
// (in place) instead of the logits.
// No [K, B, C] temporary: scratch is a few chunks per thread.

// ------------------------------------------------------------------ ISA-independent part
#ifndef METAMIXER_CORE_MIXED_KD_LOSS_COMMON
#define METAMIXER_CORE_MIXED_KD_LOSS_COMMON

#include <cstdint>

#include "core/simd.h"

namespace metamixer::core {

template <typename T>
struct LossArgs {
  int64_t K = 0, B = 0, C = 0, M = 0;
  const T* const* z = nullptr;        // peer k, row b, class c: z[k][b * z_stride[k] + c]
  const int64_t* z_stride = nullptr;  // [K] row strides (classes are contiguous)
  const int64_t* labels = nullptr;    // [B, M] row-major, each in [0, C)
  const double* weights = nullptr;    // [B, M] row-major
  double temperature = 1.0, label_smoothing = 0.0;
  bool ensemble = false;
  const double* peer = nullptr;  // [K, K] row-major, ensemble mode only
  bool detach_targets = true;
  // [K, B, 3] (lse1, lseT, lseE), float64 whatever T: written by the forward, read by the
  // backward, which rebuilds its softmaxes from them; in fp32 an lse of ~1000 would carry an
  // absolute rounding of ~6e-5 into every probability.
  double* row_stats = nullptr;
  double* ce_rows = nullptr;      // [K, B] forward output
  double* kd_rows = nullptr;      // [K, B] forward output
  const double* grad_ce = nullptr;  // [K] backward input
  const double* grad_kd = nullptr;  // [K] backward input
  T* const* dz = nullptr;           // backward output, laid out like z
  const int64_t* dz_stride = nullptr;
  // Optional, float and double logits only: the gradient buffer doubles as the store of the
  // forward's exponentials. With chunk_scale set, the forward also writes e = exp((z - m)/T)
  // (m: the max of the 512-class chunk) to dz and, per peer and row, stored_slots(C) values to
  // chunk_scale [K, B, stored_slots(C)]: per chunk the factor that makes e p = softmax(z/T),
  // then cT = exp(T lse(z/T) - lse(z)) = ST^T / S1 (the row's sums; used for T in {2, 3, 4},
  // where s = p^T cT). The backward then reads e from dz instead of recomputing it, and
  // overwrites it with dZ in place.
  acc_t<T>* chunk_scale = nullptr;
};

// Values per peer and row in LossArgs::chunk_scale: one per 512-class chunk, then cT.
inline int64_t stored_slots(int64_t C) { return (C + 511) / 512 + 1; }

// Which build of the kernels this CPU runs: the AVX-512 one (csrc/mixed_kd_loss_avx512.cpp),
// the AVX2+FMA one (csrc/mixed_kd_loss_avx2.cpp) or the baseline (SSE2) one.
inline bool cpu_has_avx2_fma() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}
inline bool cpu_has_avx512() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool ok = cpu_has_avx2_fma() && __builtin_cpu_supports("avx512f") &&
                         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl");
  return ok;
#else
  return false;
#endif
}

// Defined in csrc/mixed_kd_loss_avx2.cpp; call only when cpu_has_avx2_fma().
void forward_rows_avx2(const LossArgs<float>& a, int64_t b_begin, int64_t b_end);
void forward_rows_avx2(const LossArgs<bf16>& a, int64_t b_begin, int64_t b_end);
void forward_rows_avx2(const LossArgs<fp16>& a, int64_t b_begin, int64_t b_end);
void backward_rows_avx2(const LossArgs<float>& a, int64_t b_begin, int64_t b_end);
void backward_rows_avx2(const LossArgs<bf16>& a, int64_t b_begin, int64_t b_end);
void backward_rows_avx2(const LossArgs<fp16>& a, int64_t b_begin, int64_t b_end);
void exp_avx2(const float* x, float* y, int64_t n);  // y = vexp(x), for the accuracy test
// The same in csrc/mixed_kd_loss_avx512.cpp; call only when cpu_has_avx512().
void forward_rows_avx512(const LossArgs<float>& a, int64_t b_begin, int64_t b_end);
void forward_rows_avx512(const LossArgs<bf16>& a, int64_t b_begin, int64_t b_end);
void forward_rows_avx512(const LossArgs<fp16>& a, int64_t b_begin, int64_t b_end);
void backward_rows_avx512(const LossArgs<float>& a, int64_t b_begin, int64_t b_end);
void backward_rows_avx512(const LossArgs<bf16>& a, int64_t b_begin, int64_t b_end);
void backward_rows_avx512(const LossArgs<fp16>& a, int64_t b_begin, int64_t b_end);
void exp_avx512(const float* x, float* y, int64_t n);

}  // namespace metamixer::core
#endif  // METAMIXER_CORE_MIXED_KD_LOSS_COMMON

// ------------------------------------------------------------------ ISA-dependent part
#include "core/simd.h"  // emits the simd16 / simd32 helpers for METAMIXER_SIMD_WIDTH

#if METAMIXER_SIMD_WIDTH == 16 && !defined(METAMIXER_CORE_KD_16)
#define METAMIXER_CORE_KD_16
#define METAMIXER_KD_EMIT
#define METAMIXER_KD_NS simd16
#elif METAMIXER_SIMD_WIDTH == 32 && !defined(METAMIXER_CORE_KD_32)
#define METAMIXER_CORE_KD_32
#define METAMIXER_KD_EMIT
#define METAMIXER_KD_NS simd32
#elif METAMIXER_SIMD_WIDTH == 64 && !defined(METAMIXER_CORE_KD_64)
#define METAMIXER_CORE_KD_64
#define METAMIXER_KD_EMIT
#define METAMIXER_KD_NS simd64
#endif

#ifdef METAMIXER_KD_EMIT
#undef METAMIXER_KD_EMIT
#include "core/mixed_kd_loss_impl.h"
#undef METAMIXER_KD_NS
#endif
