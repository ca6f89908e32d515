// The mixed_kd_loss row kernels compiled for AVX2 + FMA (8 float lanes), torch-free.
//
// The build has no -march flags (it must run on any x86-64), so this file switches the target
// for its own functions with `#pragma GCC target` and instantiates the core with
// METAMIXER_SIMD_WIDTH=32, which puts every inline function in namespace simd32, apart from
// the baseline simd16 copy. The binding calls these only when core::cpu_has_avx2_fma().
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
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
#endif

#undef METAMIXER_SIMD_WIDTH
#define METAMIXER_SIMD_WIDTH 32
#include "core/mixed_kd_loss.h"

namespace metamixer::core {

void forward_rows_avx2(const LossArgs<float>& a, int64_t b0, int64_t b1) { simd32::forward_rows(a, b0, b1); }
void forward_rows_avx2(const LossArgs<bf16>& a, int64_t b0, int64_t b1) { simd32::forward_rows(a, b0, b1); }
void forward_rows_avx2(const LossArgs<fp16>& a, int64_t b0, int64_t b1) { simd32::forward_rows(a, b0, b1); }
void backward_rows_avx2(const LossArgs<float>& a, int64_t b0, int64_t b1) { simd32::backward_rows(a, b0, b1); }
void backward_rows_avx2(const LossArgs<bf16>& a, int64_t b0, int64_t b1) { simd32::backward_rows(a, b0, b1); }
void backward_rows_avx2(const LossArgs<fp16>& a, int64_t b0, int64_t b1) { simd32::backward_rows(a, b0, b1); }

void exp_avx2(const float* x, float* y, int64_t n) {
  const int64_t nv = n / simd32::kLanes * simd32::kLanes;
  for (int64_t i = 0; i < nv; i += simd32::kLanes)
    simd32::store(y + i, simd32::vexp(simd32::load<simd32::vfloat>(x + i)));
  for (int64_t i = nv; i < n; ++i) y[i] = simd32::vexp(x[i]);
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
