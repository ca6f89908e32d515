// AVX-512 row kernel of the fused local + global mix (core::mix2_forward_planes) for float
// images. One output row, 16 elements per step, everything in registers:
//
//   u_i = in box_i ? w_i x_i + (1 - w_i) x_src_i : x_i      (the local mix of sample i)
//   u_k = in box_k ? w_k x_k + (1 - w_k) x_src_k : x_k      (the same for k = src2_i)
//   out = w2 u_i + (1 - w2) u_k
//
// where "in box" is a lane mask from the column range, so a 32-wide row with a box edge in the
// middle costs two vector steps instead of several short copies and blends. The partners x_src
// are loaded only under the box mask. Each product and sum is rounded separately (the _round_
// forms, which the compiler never contracts into an FMA), and the box lanes blend even for
// w = 0 or 1 (0 * inf and signed zeros must come out as the reference's arithmetic gives them),
// so the result is bit for bit that of the two mix calls. Needs AVX-512F; callers check
// core::cpu_has_avx512f() at run time.
#pragma once

#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#define METAMIXER_HAVE_AVX512_MIX2 1

namespace metamixer::core::avx512 {

#define METAMIXER_AVX512 __attribute__((target("avx512f")))
constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

METAMIXER_AVX512 inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }

METAMIXER_AVX512 inline void store16(float* p, __mmask16 m, __m512 v) {
  if (m == 0xFFFF) _mm512_storeu_ps(p, v);
  else _mm512_mask_storeu_ps(p, m, v);
}

METAMIXER_AVX512 inline __m512 blend(__m512 w, __m512 v, __m512 a, __m512 b) {
  return _mm512_add_round_ps(_mm512_mul_round_ps(w, a, kRound), _mm512_mul_round_ps(v, b, kRound), kRound);
}

// The lanes whose column (`lanes`) lies in [c0, c1).
METAMIXER_AVX512 inline __mmask16 columns_in(__m512i lanes, int64_t c0, int64_t c1) {
  return _mm512_cmpge_epi32_mask(lanes, _mm512_set1_epi32(static_cast<int32_t>(c0))) &
         _mm512_cmplt_epi32_mask(lanes, _mm512_set1_epi32(static_cast<int32_t>(c1)));
}

// One row of `len` elements. [ci0, ci1) and [ck0, ck1) are the box columns of samples i and k
// in this row (empty ranges where the row is outside a box).
METAMIXER_AVX512 inline void mix2_row(const float* xi, const float* xsi, const float* xk,
                                      const float* xsk, float* out, int64_t len, int64_t ci0,
                                      int64_t ci1, float wi, int64_t ck0, int64_t ck1, float wk,
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
    if (bi) ui = _mm512_mask_mov_ps(ui, bi, blend(wiv, viv, ui, load16(xsi + c, bi)));
    if (bk) uk = _mm512_mask_mov_ps(uk, bk, blend(wkv, vkv, uk, load16(xsk + c, bk)));
    store16(out + c, m, blend(w2v, v2v, ui, uk));
  }
}

#undef METAMIXER_AVX512

}  // namespace metamixer::core::avx512
#endif
