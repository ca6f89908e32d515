// AVX-512 row kernel of the fused local + global mix (core::mix2_forward_planes), for float
// and uint8 images. One output row, 16 elements per step, everything in registers:
//
//   u_i = in box_i ? round_T(w_i x_i + (1 - w_i) x_src_i) : x_i      (the local mix of sample i)
//   u_k = in box_k ? round_T(w_k x_k + (1 - w_k) x_src_k) : x_k      (the same for k = src2_i)
//   out = round_T(w2 u_i + (1 - w2) u_k)
//
// where "in box" is a lane mask from the column range, so a 32-wide row with a box edge in the
// middle costs two vector steps instead of several short copies and blends. The partners x_src
// are loaded only under the box mask. Each product and sum is rounded separately (the _round_
// forms, which the compiler never contracts into an FMA), and round_T is the rounding of the
// first mix call's output (none for float; nearest even and [0, 255] for uint8), so the result
// is bit for bit that of the two mix calls. Needs AVX-512 F, BW and VL (byte masks); callers
// check cpu_has_avx512bw() at run time.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#define METAMIXER_HAVE_AVX512_MIX2 1

namespace metamixer::core::avx512 {

inline bool cpu_has_avx512bw() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl");
  return has;
}

#define METAMIXER_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))
constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

METAMIXER_AVX512 inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
METAMIXER_AVX512 inline __m512 load16(const uint8_t* p, __mmask16 m) {
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, p)));
}

// uint8 rounding of a value in [0, 256): nearest even (cvtps in the default rounding mode),
// clamped at 0 (-0.0 and tiny negatives cannot occur for w in [0, 1], but cost one max), and
// the unsigned saturating narrow clamps at 255.
METAMIXER_AVX512 inline __m512i to_u8_range(__m512 v) {
  return _mm512_max_epi32(_mm512_cvtps_epi32(v), _mm512_setzero_si512());
}
METAMIXER_AVX512 inline __m512 round_to(float*, __m512 v) { return v; }
METAMIXER_AVX512 inline __m512 round_to(uint8_t*, __m512 v) {
  return _mm512_cvtepi32_ps(_mm512_min_epi32(to_u8_range(v), _mm512_set1_epi32(255)));
}

METAMIXER_AVX512 inline void store16(float* p, __mmask16 m, __m512 v) {
  if (m == 0xFFFF) _mm512_storeu_ps(p, v);
  else _mm512_mask_storeu_ps(p, m, v);
}
METAMIXER_AVX512 inline void store16(uint8_t* p, __mmask16 m, __m512 v) {
  const __m128i q = _mm512_cvtusepi32_epi8(to_u8_range(v));
  if (m == 0xFFFF) _mm_storeu_si128(reinterpret_cast<__m128i*>(p), q);
  else _mm_mask_storeu_epi8(p, m, q);
}

METAMIXER_AVX512 inline __m512 blend(__m512 w, __m512 v, __m512 a, __m512 b) {
  return _mm512_add_round_ps(_mm512_mul_round_ps(w, a, kRound), _mm512_mul_round_ps(v, b, kRound), kRound);
}

// The lanes whose column (`lanes`) lies in [c0, c1).
METAMIXER_AVX512 inline __mmask16 columns_in(__m512i lanes, int64_t c0, int64_t c1) {
  return _mm512_cmpge_epi32_mask(lanes, _mm512_set1_epi32(static_cast<int32_t>(c0))) &
         _mm512_cmplt_epi32_mask(lanes, _mm512_set1_epi32(static_cast<int32_t>(c1)));
}

// The local mix inside the box lanes `in`. For uint8, w = 0 or 1 selects exactly (the integer
// blend is exact there), which is MetaMixer's CutMix case; floats always blend (0 * inf and
// signed zeros must come out as the reference's arithmetic gives them).
template <typename T>
METAMIXER_AVX512 inline __m512 local_mix(__m512 u, const T* partner, __mmask16 in, float w, __m512 wv,
                                        __m512 vv) {
  if constexpr (std::is_same_v<T, uint8_t>) {
    if (w == 0.0f) return _mm512_mask_mov_ps(u, in, load16(partner, in));
    if (w == 1.0f) return u;
  }
  return _mm512_mask_mov_ps(u, in, round_to(static_cast<T*>(nullptr), blend(wv, vv, u, load16(partner, in))));
}

// One row of `len` elements. [ci0, ci1) and [ck0, ck1) are the box columns of samples i and k
// in this row (empty ranges where the row is outside a box).
template <typename T>
METAMIXER_AVX512 void mix2_row(const T* xi, const T* xsi, const T* xk, const T* xsk, T* out, int64_t len,
                               int64_t ci0, int64_t ci1, float wi, int64_t ck0, int64_t ck1, float wk,
                               float w2) {
  const __m512 wiv = _mm512_set1_ps(wi), viv = _mm512_set1_ps(1.0f - wi);
  const __m512 wkv = _mm512_set1_ps(wk), vkv = _mm512_set1_ps(1.0f - wk);
  const __m512 w2v = _mm512_set1_ps(w2), v2v = _mm512_set1_ps(1.0f - w2);
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t c = 0; c < len; c += 16) {
    const __mmask16 m = len - c >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (len - c)) - 1u);
    __m512 ui = load16(xi + c, m), uk = load16(xk + c, m);
    const __m512i lanes = _mm512_add_epi32(iota, _mm512_set1_epi32(static_cast<int32_t>(c)));
    const __mmask16 bi = m & columns_in(lanes, ci0, ci1), bk = m & columns_in(lanes, ck0, ck1);
    if (bi) ui = local_mix(ui, xsi + c, bi, wi, wiv, viv);
    if (bk) uk = local_mix(uk, xsk + c, bk, wk, wkv, vkv);
    store16(out + c, m, blend(w2v, v2v, ui, uk));
  }
}

#undef METAMIXER_AVX512

}  // namespace metamixer::core::avx512
#endif
