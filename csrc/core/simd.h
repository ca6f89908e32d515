// Portable SIMD helpers for the fused kernels, written with GCC/Clang vector extensions (no
// intrinsics): the same source compiles to SSE2 in the baseline build, to AVX2+FMA in
// csrc/mixed_kd_loss_avx2.cpp and to AVX-512 in csrc/mixed_kd_loss_avx512.cpp, which include
// this header inside a `#pragma GCC target` region with METAMIXER_SIMD_WIDTH=32 / 64.
// Everything ISA-dependent lives in a namespace named after the vector width (simd16 / simd32 /
// simd64), so the copies never meet at link time (an inline function compiled for AVX2 must
// never be picked for the baseline build).
//
// What is here: the vector type V<A> (A = float: a vector of float lanes; A = double: a plain
// double, the gradcheck path), a branch-free exp that auto-vectorizes, select/max/horizontal
// reductions that work for vectors and scalars alike, and to_acc/from_acc: the storage <->
// accumulation conversions (for bf16/fp16 those of half.h, the ones the mix core uses).

// ------------------------------------------------------------------ ISA-independent part
#ifndef METAMIXER_CORE_SIMD_COMMON
#define METAMIXER_CORE_SIMD_COMMON

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "half.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>  // the AVX-512 vexp below; GCC declares every intrinsic whatever the target
#endif

namespace metamixer::core {

// Storage types of half-precision logits (bit patterns; converted with to_acc/from_acc), the
// ones the mix core uses (half.h).
using bf16 = BFloat16;
using fp16 = Half;

// Accumulation type: double for double logits (gradcheck), float for everything else.
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccOf<T>::type;

}  // namespace metamixer::core
#endif  // METAMIXER_CORE_SIMD_COMMON

// ------------------------------------------------------------------ ISA-dependent part
#ifndef METAMIXER_SIMD_WIDTH
#define METAMIXER_SIMD_WIDTH 16
#endif
#if METAMIXER_SIMD_WIDTH == 16 && !defined(METAMIXER_CORE_SIMD_16)
#define METAMIXER_CORE_SIMD_16
#define METAMIXER_SIMD_EMIT
#define METAMIXER_SIMD_NS simd16
#elif METAMIXER_SIMD_WIDTH == 32 && !defined(METAMIXER_CORE_SIMD_32)
#define METAMIXER_CORE_SIMD_32
#define METAMIXER_SIMD_EMIT
#define METAMIXER_SIMD_NS simd32
#elif METAMIXER_SIMD_WIDTH == 64 && !defined(METAMIXER_CORE_SIMD_64)
#define METAMIXER_CORE_SIMD_64
#define METAMIXER_SIMD_EMIT
#define METAMIXER_SIMD_NS simd64
#endif

#ifdef METAMIXER_SIMD_EMIT
#undef METAMIXER_SIMD_EMIT
namespace metamixer::core::METAMIXER_SIMD_NS {

constexpr int kLanes = METAMIXER_SIMD_WIDTH / 4;
typedef float vfloat __attribute__((vector_size(METAMIXER_SIMD_WIDTH)));
typedef int32_t vint __attribute__((vector_size(METAMIXER_SIMD_WIDTH)));

template <typename A>
struct VecOf;  // the compute vector for accumulation type A
template <>
struct VecOf<float> {
  using type = vfloat;
  static constexpr int lanes = kLanes;
};
template <>
struct VecOf<double> {
  using type = double;
  static constexpr int lanes = 1;
};

// Integer type with the lane layout of U (for the bit tricks in vexp).
template <typename U>
struct IntOf;
template <>
struct IntOf<float> {
  using type = int32_t;
};
template <>
struct IntOf<vfloat> {
  using type = vint;
};

template <typename To, typename From>
inline To bits_as(const From& x) {
  static_assert(sizeof(To) == sizeof(From), "bit cast between types of different size");
  To y;
  std::memcpy(&y, &x, sizeof(To));
  return y;
}

template <typename U, typename S>
inline U splat(S s) {
  return U{} + s;
}

template <typename U>
inline U load(const float* p) {
  U v;
  std::memcpy(&v, p, sizeof(U));  // unaligned vector load
  return v;
}
template <typename U>
inline U load(const double* p) {
  return *p;
}
inline void store(float* p, const vfloat& v) { std::memcpy(p, &v, sizeof(v)); }
inline void store(float* p, float v) { *p = v; }
inline void store(double* p, double v) { *p = v; }

// {0, 1, 2, ...} in the lanes of U (the lane mask of a padded vector is lane_index < count).
template <typename U>
inline U lane_index() {
  U v{};
  for (int i = 0; i < int(sizeof(U) / sizeof(v[0])); ++i) v[i] = static_cast<decltype(v[0] + 0)>(i);
  return v;
}
template <>
inline double lane_index<double>() { return 0.0; }
template <>
inline float lane_index<float>() { return 0.0f; }

// Lane-wise cond ? a : b, for vectors (cond is a lane mask) and scalars (cond is a bool).
template <typename M, typename U>
inline U select(const M& cond, const U& a, const U& b) {
  return cond ? a : b;
}
// max that ignores NaN in x (a NaN row is caught by the sums, which do propagate it).
template <typename U>
inline U vmax(const U& m, const U& x) {
  return x > m ? x : m;
}

// Horizontal sum / max by halving in registers (a store and scalar reloads would stall on
// store forwarding).
typedef float vf2 __attribute__((vector_size(8)));
typedef float vf4 __attribute__((vector_size(16)));
inline vf2 fold_sum(vf4 v) { return __builtin_shufflevector(v, v, 0, 1) + __builtin_shufflevector(v, v, 2, 3); }
inline vf2 fold_max(vf4 v) { return vmax(__builtin_shufflevector(v, v, 0, 1), __builtin_shufflevector(v, v, 2, 3)); }
#if METAMIXER_SIMD_WIDTH >= 32
typedef float vf8 __attribute__((vector_size(32)));
inline vf4 fold_sum(vf8 v) { return __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7); }
inline vf4 fold_max(vf8 v) { return vmax(__builtin_shufflevector(v, v, 0, 1, 2, 3), __builtin_shufflevector(v, v, 4, 5, 6, 7)); }
#endif
#if METAMIXER_SIMD_WIDTH >= 64
inline vf8 fold_sum(vfloat v) {
  return __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
         __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
}
inline vf8 fold_max(vfloat v) {
  return vmax(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7),
              __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15));
}
#endif
inline float hsum(vf2 v) { return v[0] + v[1]; }
inline float hmax(vf2 v) { return v[1] > v[0] ? v[1] : v[0]; }
#if METAMIXER_SIMD_WIDTH >= 16
inline float hsum(vf4 v) { return hsum(fold_sum(v)); }
inline float hmax(vf4 v) { return hmax(fold_max(v)); }
#endif
#if METAMIXER_SIMD_WIDTH >= 32
inline float hsum(vf8 v) { return hsum(fold_sum(v)); }
inline float hmax(vf8 v) { return hmax(fold_max(v)); }
#endif
#if METAMIXER_SIMD_WIDTH >= 64
inline float hsum(vfloat v) { return hsum(fold_sum(v)); }
inline float hmax(vfloat v) { return hmax(fold_max(v)); }
#endif
inline float hsum(float v) { return v; }
inline double hsum(double v) { return v; }
inline float hmax(float v) { return v; }
inline double hmax(double v) { return v; }

// exp(r) for |r| <= ln2/2 as 1 + r + r^2 q(r), q of degree 4 fitted for the least maximum
// relative error (3e-9, far below float rounding; a degree-5 q gains nothing measurable).
template <typename U>
__attribute__((always_inline)) inline U exp_reduced(U r) {
  U q = splat<U>(1.381461276e-3f);
  q = q * r + 8.368710056e-3f;
  q = q * r + 4.166838899e-2f;
  q = q * r + 1.666652113e-1f;
  q = q * r + 4.999999404e-1f;
  return q * (r * r) + r + 1.0f;
}

// exp(x) for float lanes, branch-free: x = n ln2 + r with |r| <= ln2/2, exp(r) by the degree-6
// polynomial above, 2^n built in the exponent bits. n comes from the round-to-nearest of adding
// 1.5 * 2^23 (no float->int conversion needed).
// About 2 ulp over [-87, 88] (checked against std::exp in csrc/tests); below -87 it returns 0
// (the true value is a subnormal < 1.7e-38), above 88 +inf; -inf -> 0, NaN -> NaN.
template <typename U>
__attribute__((always_inline)) inline U vexp(U x) {
  using I = typename IntOf<U>::type;
  const U lo = splat<U>(-87.0f), hi = splat<U>(88.0f);
  const U xc = select(x > hi, hi, select(x < lo, lo, x));
  const U magic = splat<U>(12582912.0f);  // 1.5 * 2^23
  const U t = xc * 1.44269504088896341f + magic;
  const U n = t - magic;
  const I ni = bits_as<I>(t) - bits_as<I>(magic);
  const U r = xc - n * 0.693359375f - n * -2.12194440e-4f;
  const U er = exp_reduced(r);
  // The mask keeps the shift defined for NaN lanes (ni is then garbage; the result is NaN anyway);
  // for every finite lane ni + 127 is already in [1, 254].
  const U scale = bits_as<U>(((ni + 127) & 0xff) << 23);
  const U y = er * scale;
  return select(x < lo, U{}, select(x > hi, splat<U>(std::numeric_limits<float>::infinity()), y));
}
inline double vexp(double x) { return std::exp(x); }
// exp(x) for x <= 88 or NaN, as the kernels take it (logits minus their max, or minus a
// log-sum-exp): the AVX-512 version below then skips its upper clamp.
template <typename U>
__attribute__((always_inline)) inline U vexp_bounded(U x) {
  return vexp(x);
}

#if METAMIXER_SIMD_WIDTH == 64 && (defined(__x86_64__) || defined(__i386__))
// The AVX-512 build (compiled under its target pragma): the same reduction and polynomial, but
// vscalefps multiplies by 2^n, and it overflows to inf and underflows to subnormals and 0 by
// itself, so the clamps shrink to one max and one min and the exponent-bit construction and the
// final range selects go: 13 vector instructions instead of about 23, for a kernel that is
// bound by them. The range widens to [-104, 89]: results below exp(-87) are subnormal instead
// of 0 (below -103.9 they round to 0), exp(-inf) = 0, inf for x >= 88.73, NaN -> NaN.
// Bounded: the caller guarantees x <= 88 or NaN, so the upper clamp (only there to keep +inf
// and huge x out of the range reduction) goes.
inline __m512 m512(vfloat v) { return reinterpret_cast<__m512>(v); }
template <bool Bounded>
__attribute__((always_inline)) inline vfloat vexp512(vfloat x) {
  // vmaxps/vminps return their second operand when either is NaN, so a NaN lane stays NaN.
  // The masked forms with every lane set: the unmasked intrinsics pass an undefined source
  // that trips GCC 12's false -Wuninitialized (bug 105593); they compile to the same instructions.
  constexpr __mmask16 all = 0xFFFF;
  const __m512 lo = m512(splat<vfloat>(-104.0f)), hi = m512(splat<vfloat>(89.0f));
  __m512 xc = _mm512_mask_max_ps(lo, all, lo, m512(x));
  if constexpr (!Bounded) xc = _mm512_mask_min_ps(hi, all, hi, xc);
  const vfloat xv = reinterpret_cast<vfloat>(xc);
  const vfloat magic = splat<vfloat>(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const vfloat n = (xv * 1.44269504088896341f + magic) - magic;
  const vfloat r = xv - n * 0.693359375f - n * -2.12194440e-4f;
  const __m512 er_ = m512(exp_reduced(r));
  return reinterpret_cast<vfloat>(_mm512_mask_scalef_ps(er_, all, er_, m512(n)));
}
inline vfloat vexp(vfloat x) { return vexp512<false>(x); }
inline vfloat vexp_bounded(vfloat x) { return vexp512<true>(x); }
#endif

// ---- half-precision storage <-> accumulation type
inline float to_acc(float v) { return v; }
inline double to_acc(double v) { return v; }
inline float to_acc(bf16 v) { return to_float(v); }
inline float to_acc(fp16 v) { return to_float(v); }

template <typename T>
inline T from_acc(float v);
template <>
inline float from_acc<float>(float v) {
  return v;
}
template <>
inline bf16 from_acc<bf16>(float v) {
  return to_bfloat16(v);
}
template <>
inline fp16 from_acc<fp16>(float v) {
  return to_half(v);
}

}  // namespace metamixer::core::METAMIXER_SIMD_NS
#undef METAMIXER_SIMD_NS
#endif  // METAMIXER_SIMD_EMIT
