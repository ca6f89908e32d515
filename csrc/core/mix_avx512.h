// AVX-512 kernels of the mix core, float arithmetic throughout: the whole-span blends
// (blend_f32, blend_u8) and the row kernel of the fused local + global mix
// (core::mix2_forward_planes) for float images. Every product and sum is rounded separately:
// AVX-512F has FMA instructions, and GCC implements _mm512_mul_ps as plain vector arithmetic
// that -ffp-contract may fuse, so `blend` uses the explicitly rounded (_round_) forms, which are
// never contracted. Results are bit for bit those of the scalar formulas in mix.h. Needs
// AVX-512F; callers check core::cpu_has_avx512f() at run time.
//
// mix2_row computes one output row, 16 elements per step, everything in registers:
//
//   u_i = in box_i ? w_i x_i + (1 - w_i) x_src_i : x_i      (the local mix of sample i)
//   u_k = in box_k ? w_k x_k + (1 - w_k) x_src_k : x_k      (the same for k = src2_i)
//   out = w2 u_i + (1 - w2) u_k
//
// where "in box" is a lane mask from the column range, so a 32-wide row with a box edge in the
// middle costs two vector steps instead of several short copies and blends. The partners x_src
// are loaded only under the box mask, and the box lanes blend even for w = 0 or 1 (0 * inf and
// signed zeros must come out as the reference's arithmetic gives them), so the result is bit
// for bit that of the two mix calls.
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

// out[c] = w a[c] + (1 - w) b[c] for c < (len rounded down to 16); returns that count.
METAMIXER_AVX512 inline int64_t blend_f32(const float* a, const float* b, float* out, int64_t len,
                                          float w) {
  const __m512 wv = _mm512_set1_ps(w), vv = _mm512_set1_ps(1.0f - w);
  int64_t c = 0;
  for (; c + 16 <= len; c += 16)
    _mm512_storeu_ps(out + c, blend(wv, vv, _mm512_loadu_ps(a + c), _mm512_loadu_ps(b + c)));
  return c;
}

METAMIXER_AVX512 inline __m512 widen(const uint8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// The same for uint8 pixels, widened to float: cvtps rounds to nearest even like cvtps2dq,
// and max(., 0) with the unsigned saturating narrow is the clamp to [0, 255].
METAMIXER_AVX512 inline int64_t blend_u8(const uint8_t* a, const uint8_t* b, uint8_t* out, int64_t len,
                                         float w) {
  const __m512 wv = _mm512_set1_ps(w), vv = _mm512_set1_ps(1.0f - w);
  const __m512i zero = _mm512_setzero_si512();
  int64_t c = 0;
  for (; c + 16 <= len; c += 16) {
    const __m512i q = _mm512_max_epi32(_mm512_cvtps_epi32(blend(wv, vv, widen(a + c), widen(b + c))), zero);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + c), _mm512_cvtusepi32_epi8(q));
  }
  return c;
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

// Rows [0, rows) of a plane (row stride `len`) whose box columns are all [ci0, ci1) and
// [ck0, ck1): mix2_row on each, with the tail and box lane masks of every 16-column step
// computed once for the run instead of once per row (on 32-wide rows that set-up cost as much
// as the arithmetic). Rows longer than 16 * kMaxSteps take mix2_row directly.
METAMIXER_AVX512 inline void mix2_rows(const float* xi, const float* xsi, const float* xk,
                                       const float* xsk, float* out, int64_t len, int64_t rows,
                                       int64_t ci0, int64_t ci1, float wi, int64_t ck0,
                                       int64_t ck1, float wk, float w2) {
  constexpr int64_t kMaxSteps = 32;
  const int64_t steps = (len + 15) / 16;
  if (steps > kMaxSteps) {
    for (int64_t r = 0, at = 0; r < rows; ++r, at += len)
      mix2_row(xi + at, xsi + at, xk + at, xsk + at, out + at, len, ci0, ci1, wi, ck0, ck1, wk, w2);
    return;
  }
  __mmask16 mt[kMaxSteps], mi[kMaxSteps], mk[kMaxSteps];
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t s = 0, c = 0; s < steps; ++s, c += 16) {
    mt[s] = len - c >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (len - c)) - 1u);
    const __m512i lanes = _mm512_add_epi32(iota, _mm512_set1_epi32(static_cast<int32_t>(c)));
    mi[s] = mt[s] & columns_in(lanes, ci0, ci1);
    mk[s] = mt[s] & columns_in(lanes, ck0, ck1);
  }
  const __m512 wiv = _mm512_set1_ps(wi), viv = _mm512_set1_ps(1.0f - wi);
  const __m512 wkv = _mm512_set1_ps(wk), vkv = _mm512_set1_ps(1.0f - wk);
  const __m512 w2v = _mm512_set1_ps(w2), v2v = _mm512_set1_ps(1.0f - w2);
  for (int64_t r = 0, at = 0; r < rows; ++r, at += len) {
    for (int64_t s = 0, c = at; s < steps; ++s, c += 16) {
      __m512 ui = load16(xi + c, mt[s]), uk = load16(xk + c, mt[s]);
      if (mi[s]) ui = _mm512_mask_mov_ps(ui, mi[s], blend(wiv, viv, ui, load16(xsi + c, mi[s])));
      if (mk[s]) uk = _mm512_mask_mov_ps(uk, mk[s], blend(wkv, vkv, uk, load16(xsk + c, mk[s])));
      store16(out + c, mt[s], blend(w2v, v2v, ui, uk));
    }
  }
}

#undef METAMIXER_AVX512

}  // namespace metamixer::core::avx512
#endif
