// The mixed_kd_loss row kernels compiled for AVX-512 (16 float lanes), torch-free.
//
// The build has no -march flags (it must run on any x86-64), so this file switches the target
// for its own functions with `#pragma GCC target` and instantiates the core with
// METAMIXER_SIMD_WIDTH=64, which puts every inline function in namespace simd64, apart from
// the baseline simd16 copy. The binding calls these only when core::cpu_has_avx512().
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "core/mixed_kd_loss.h"  // the ISA-independent declarations and the baseline copy

#if defined(__x86_64__) || defined(__i386__)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")
#endif
#endif

#undef METAMIXER_SIMD_WIDTH
#define METAMIXER_SIMD_WIDTH 64
#include "core/mixed_kd_loss.h"

namespace metamixer::core {

void forward_rows_avx512(const LossArgs<float>& a, int64_t b0, int64_t b1) { simd64::forward_rows(a, b0, b1); }
void forward_rows_avx512(const LossArgs<bf16>& a, int64_t b0, int64_t b1) { simd64::forward_rows(a, b0, b1); }
void forward_rows_avx512(const LossArgs<fp16>& a, int64_t b0, int64_t b1) { simd64::forward_rows(a, b0, b1); }
void backward_rows_avx512(const LossArgs<float>& a, int64_t b0, int64_t b1) { simd64::backward_rows(a, b0, b1); }
void backward_rows_avx512(const LossArgs<bf16>& a, int64_t b0, int64_t b1) { simd64::backward_rows(a, b0, b1); }
void backward_rows_avx512(const LossArgs<fp16>& a, int64_t b0, int64_t b1) { simd64::backward_rows(a, b0, b1); }

void exp_avx512(const float* x, float* y, int64_t n) {
  const int64_t nv = n / simd64::kLanes * simd64::kLanes;
  for (int64_t i = 0; i < nv; i += simd64::kLanes)
    simd64::store(y + i, simd64::vexp(simd64::load<simd64::vfloat>(x + i)));
  for (int64_t i = nv; i < n; ++i) y[i] = simd64::vexp(x[i]);
}

}  // namespace metamixer::core

#if defined(__x86_64__) || defined(__i386__)
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif
#undef METAMIXER_SIMD_WIDTH
