// AVX-512 kernels of the mix core, float arithmetic throughout: the whole-span blends
// (blend_f32, blend_u8), the row kernels of the fused local + global mix
// (core::mix2_forward_planes) for float and, with AVX-512BW, uint8 images, and the box rows of
// mix for float (core::mix_rows). Every product and sum is rounded separately:
// AVX-512F has FMA instructions, and GCC implements _mm512_mul_ps as plain vector arithmetic
// that -ffp-contract may fuse, so `blend` uses the explicitly rounded (_round_) forms, which are
// never contracted. The fused multiply-adds here are exact: for CutMix's w = 0 (see local_mix)
// and on uint8's biased floats (see U8Blend), each rounds once what the scalar formula rounds
// once. Results are bit for bit those of the scalar formulas in mix.h. Needs
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

#include "half.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#define METAMIXER_HAVE_AVX512_MIX2 1

namespace metamixer::core::avx512 {

#define METAMIXER_AVX512 __attribute__((target("avx512f")))
constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

METAMIXER_AVX512 inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }

// 16 values of a storage type as floats, and back: for fp16 and bf16 bit for bit the scalar
// conversions of half.h (to_float, to_half, to_bfloat16), whose loops GCC does not vectorize
// (an fp16 whole-sample blend took 20x a clone of the batch).
METAMIXER_AVX512 inline __m512 widen_bits(__m256i h, Half) { return _mm512_cvtph_ps(h); }
METAMIXER_AVX512 inline __m512 widen_bits(__m256i h, BFloat16) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
// vcvtps2ph rounds to nearest even as to_half does, but keeps a NaN's payload where to_half
// gives the quiet NaN of its sign (sign | 0x7E00): NaN lanes become that NaN's float first.
METAMIXER_AVX512 inline __m256i narrow_bits(__m512 v, Half) {
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  const __m512i sign = _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(INT32_MIN));
  const __m512 quiet = _mm512_castsi512_ps(_mm512_or_si512(sign, _mm512_set1_epi32(0x7FC00000)));
  return _mm512_cvtps_ph(_mm512_mask_mov_ps(v, nan, quiet), kRound);
}
// to_bfloat16's integer rounding, 16 lanes: (u + 0x7FFF + ((u >> 16) & 1)) >> 16, NaN -> 0x7FC0.
METAMIXER_AVX512 inline __m256i narrow_bits(__m512 v, BFloat16) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i bias = _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}
METAMIXER_AVX512 inline __m512 widen16(const float* p) { return _mm512_loadu_ps(p); }
template <typename T>
METAMIXER_AVX512 inline __m512 widen16(const T* p) {
  return widen_bits(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), T{});
}
METAMIXER_AVX512 inline void narrow16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
template <typename T>
METAMIXER_AVX512 inline void narrow16(T* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), narrow_bits(v, T{}));
}

// Stores 16 floats at p; with `stream`, past the cache (p must then be 64-byte aligned): the
// store neither reads the line first nor leaves it dirty for a later operation to write back,
// and the line is not in cache for the next reader (mix2 picks the mode by measurement, see
// core/store_choice.h). The caller fences (_mm_sfence) after streamed stores.
METAMIXER_AVX512 inline void put16(float* p, __m512 v, bool stream) {
  if (stream) _mm512_stream_ps(p, v);
  else _mm512_storeu_ps(p, v);
}

// store16 of the lanes in m: a full mask may stream (as put16), a partial one never does.
METAMIXER_AVX512 inline void store16(float* p, __mmask16 m, __m512 v, bool stream = false) {
  if (m == 0xFFFF) put16(p, v, stream);
  else _mm512_mask_storeu_ps(p, m, v);
}

METAMIXER_AVX512 inline __m512 blend(__m512 w, __m512 v, __m512 a, __m512 b) {
  return _mm512_add_round_ps(_mm512_mul_round_ps(w, a, kRound), _mm512_mul_round_ps(v, b, kRound), kRound);
}

// out[c] = w a[c] + (1 - w) b[c] for c < (len rounded down to 16); returns that count.
// `stream`: as put16 (out 64-byte aligned).
METAMIXER_AVX512 inline int64_t blend_f32(const float* a, const float* b, float* out, int64_t len,
                                          float w, bool stream = false) {
  const __m512 wv = _mm512_set1_ps(w), vv = _mm512_set1_ps(1.0f - w);
  int64_t c = 0;
  for (; c + 16 <= len; c += 16)
    put16(out + c, blend(wv, vv, _mm512_loadu_ps(a + c), _mm512_loadu_ps(b + c)), stream);
  return c;
}

// blend_f32 for fp16 and bf16 storage (float arithmetic, the scalar path's roundings).
template <typename T>
METAMIXER_AVX512 inline int64_t blend_16bit(const T* a, const T* b, T* out, int64_t len, float w) {
  const __m512 wv = _mm512_set1_ps(w), vv = _mm512_set1_ps(1.0f - w);
  int64_t c = 0;
  for (; c + 16 <= len; c += 16) narrow16(out + c, blend(wv, vv, widen16(a + c), widen16(b + c)));
  return c;
}

// The widening copy of n storage values to floats, and the narrowing one back, over whole
// 16-lane steps; they return the count done (core::widen_span, narrow_span).
template <typename T>
METAMIXER_AVX512 inline int64_t widen_span(const T* src, float* dst, int64_t n) {
  int64_t c = 0;
  for (; c + 16 <= n; c += 16) _mm512_storeu_ps(dst + c, widen16(src + c));
  return c;
}
template <typename T>
METAMIXER_AVX512 inline int64_t narrow_span(const float* src, T* dst, int64_t n) {
  int64_t c = 0;
  for (; c + 16 <= n; c += 16) narrow16(dst + c, _mm512_loadu_ps(src + c));
  return c;
}

// dot_diff's partial sums for float, fp16 and bf16 storage: acc[c % 8] += g[c] (a[c] - b[c])
// for the 16 elements at c, in float. The differences and products take 16 lanes and each is
// added to its partial in the scalar loop's order (lanes 0-7, then 8-15), so the bits are
// dot_diff's.
template <typename T>
METAMIXER_AVX512 inline __m256 dot_diff_step(__m256 acc, const T* g, const T* a, const T* b,
                                             int64_t c) {
  const __m512 d = _mm512_sub_round_ps(widen16(a + c), widen16(b + c), kRound);
  const __m512 t = _mm512_mul_round_ps(widen16(g + c), d, kRound);
  acc = _mm256_add_ps(acc, _mm512_castps512_ps256(t));
  return _mm256_add_ps(acc, _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(t), 1)));
}

// dot_diff's partial sums part[8] over c < (len rounded down to 16); returns that count.
template <typename T>
METAMIXER_AVX512 inline int64_t dot_diff_parts(const T* g, const T* a, const T* b, int64_t len,
                                               float* part) {
  __m256 acc = _mm256_loadu_ps(part);
  int64_t c = 0;
  for (; c + 16 <= len; c += 16) acc = dot_diff_step(acc, g, a, b, c);
  _mm256_storeu_ps(part, acc);
  return c;
}

// The backward of a whole-sample blend with one partner j, over c < (len rounded down to 16)
// (returned): dx[c] = wk gk[c] + v gj[c], and with Dw dot_diff's partials part[8] of
// gk (xk - xs); float, fp16 or bf16 storage. One loop over the five streams instead of a blend
// pass and a dot_diff pass per window: each of the two passes alone ran at memory speed, and
// together they took their sum (C++ harness, 256x128x16x16 fp32, one thread: 4.3 ms against
// 1.9 + 2.5).
template <typename T, bool Dw>
METAMIXER_AVX512 inline int64_t one_partner_backward(const T* gk, const T* gj, const T* xk,
                                                     const T* xs, T* dx, int64_t len, float wk,
                                                     float v, float* part) {
  const __m512 wv = _mm512_set1_ps(wk), vv = _mm512_set1_ps(v);
  __m256 acc = _mm256_loadu_ps(part);
  int64_t c = 0;
  for (; c + 16 <= len; c += 16) {
    narrow16(dx + c, blend(wv, vv, widen16(gk + c), widen16(gj + c)));
    if (Dw) acc = dot_diff_step(acc, gk, xk, xs, c);
  }
  _mm256_storeu_ps(part, acc);
  return c;
}

// The lanes whose column (`lanes`) lies in [c0, c1).
METAMIXER_AVX512 inline __mmask16 columns_in(__m512i lanes, int64_t c0, int64_t c1) {
  return _mm512_cmpge_epi32_mask(lanes, _mm512_set1_epi32(static_cast<int32_t>(c0))) &
         _mm512_cmplt_epi32_mask(lanes, _mm512_set1_epi32(static_cast<int32_t>(c1)));
}

// ------------------------------------------------------------------ float gather backward
// mix_backward_rows' gather over one window of n columns whose first is column `base` of its
// row (columns as int32 lanes: the caller keeps rows under 2**31), 16 lanes a step with lane
// masks for the box columns instead of scalar loops over short spans (at 16x16 maps those took
// 4.6x the box-free backward), the step's sum kept in a register across the partners (an
// output written and read back by masked accesses stalls on store forwarding). The bits are
// the scalar gather's: the same products and sums, each rounded once, in the same order.

// One partner j of the window: its gradient row (at the window's first column), the columns of
// its box in the row, and its factor 1 - w_j.
struct GatherPart {
  const float* g;
  int64_t c0, c1;
  float v;
};

// The 16 column indices of the step starting at column c.
METAMIXER_AVX512 inline __m512i columns_from(int64_t c) {
  return _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(c)),
                          _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
}

// out[c] = g[c] (times w on the columns [c0, c1)) + the sum over `parts`, in order, of
// v g_j[c] on the partner's columns.
METAMIXER_AVX512 inline void gather_window_f32(const float* g, float* out, int64_t n, int64_t base,
                                               int64_t c0, int64_t c1, float w,
                                               const GatherPart* parts, int64_t n_parts) {
  const __m512 wv = _mm512_set1_ps(w);
  for (int64_t c = 0; c < n; c += 16) {
    const __mmask16 mt = n - c >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - c)) - 1);
    const __m512i cols = columns_from(base + c);
    const bool full = mt == 0xFFFF;  // (full accesses unmasked: masked stores cost more)
    __m512 acc = full ? _mm512_loadu_ps(g + c) : _mm512_maskz_loadu_ps(mt, g + c);
    acc = _mm512_mask_mul_round_ps(acc, mt & columns_in(cols, c0, c1), acc, wv, kRound);
    for (int64_t t = 0; t < n_parts; ++t) {
      const GatherPart& p = parts[t];
      const __mmask16 m = mt & columns_in(cols, p.c0, p.c1);
      if (!m) continue;
      const __m512 term = _mm512_mul_round_ps(_mm512_set1_ps(p.v), _mm512_maskz_loadu_ps(m, p.g + c),
                                              kRound);
      acc = _mm512_mask_add_round_ps(acc, m, acc, term, kRound);
    }
    if (full) _mm512_storeu_ps(out + c, acc);
    else _mm512_mask_storeu_ps(out + c, mt, acc);
  }
}

// Box k's partner is a random sample that the chain order has not brought into cache (box i's
// partner is the previous output's box k), and its box is short rows strided across a plane,
// which the hardware prefetchers pick up late. mix2_steps prefetches its columns
// kPrefetchRows rows ahead: about 10% of mix2 at 64x3x224x224 fp32 with one thread. Rows
// shorter than kPrefetchMinLen are left to the hardware (at 32x32 the prefetches cost 3%).
constexpr int64_t kPrefetchRows = 4, kPrefetchMinLen = 64;

// Prefetches the cache lines of row[c0 .. c1).
METAMIXER_AVX512 inline void prefetch_columns(const float* row, int64_t c0, int64_t c1) {
  const uintptr_t end = reinterpret_cast<uintptr_t>(row + c1);
  for (uintptr_t p = reinterpret_cast<uintptr_t>(row + c0) & ~uintptr_t{63}; p < end; p += 64)
    _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0);
}

// The lane masks of each of the `steps` 16-wide steps of a row of `len` elements whose lane 0 of
// step 0 is column `base`: mt[s], the lanes inside the row, and for the column ranges [a0, a1)
// and [b0, b1), their lanes inside the row in ma[s] and mb[s] (mb may be null). Forced inline:
// a first version, called and looping on c < len, cost 4% of mix2 at 32x32, where a plane has
// up to five runs to set up.
__attribute__((always_inline)) METAMIXER_AVX512 inline void step_masks(
    int64_t len, int64_t steps, int64_t base, __mmask16* mt, int64_t a0, int64_t a1,
    __mmask16* ma, int64_t b0, int64_t b1, __mmask16* mb) {
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t s = 0, c = 0; s < steps; ++s, c += 16) {
    mt[s] = len - c >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (len - c)) - 1u);
    const __m512i lanes = _mm512_add_epi32(iota, _mm512_set1_epi32(static_cast<int32_t>(base + c)));
    ma[s] = mt[s] & columns_in(lanes, a0, a1);
    if (mb) mb[s] = mt[s] & columns_in(lanes, b0, b1);
  }
}

// u = in box ? w x + (1 - w) xs : x on the lanes `box` of one 16-wide step (xs is loaded only
// there). For w = +-0 (CutMix) the blend is w x + 1 xs, and one fused multiply-add gives it bit
// for bit: w x is exact (a zero of the product's sign, or NaN for an infinite or NaN x), 1 xs is
// xs, so fma(x, w, xs) rounds the same sum once, as the separately rounded form does. This
// saves two of the six multiplies of a box step, which bound the kernel on some CPUs.
METAMIXER_AVX512 inline __m512 local_mix(__m512 x, const float* xs, __mmask16 box, bool cutmix,
                                         __m512 w, __m512 v) {
  if (!box) return x;
  const __m512 s = load16(xs, box);
  if (cutmix) return _mm512_mask_fmadd_ps(x, box, w, s);
  return _mm512_mask_mov_ps(x, box, blend(w, v, x, s));
}

// One row of `len` elements. [ci0, ci1) and [ck0, ck1) are the box columns of samples i and k
// in this row (empty ranges where the row is outside a box).
METAMIXER_AVX512 inline void mix2_row(const float* xi, const float* xsi, const float* xk,
                                      const float* xsk, float* out, int64_t len, int64_t ci0,
                                      int64_t ci1, float wi, int64_t ck0, int64_t ck1, float wk,
                                      float w2, bool stream) {
  const __m512 wiv = _mm512_set1_ps(wi), viv = _mm512_set1_ps(1.0f - wi);
  const __m512 wkv = _mm512_set1_ps(wk), vkv = _mm512_set1_ps(1.0f - wk);
  const __m512 w2v = _mm512_set1_ps(w2), v2v = _mm512_set1_ps(1.0f - w2);
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t c = 0; c < len; c += 16) {
    const __mmask16 m = len - c >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (len - c)) - 1u);
    const __m512i lanes = _mm512_add_epi32(iota, _mm512_set1_epi32(static_cast<int32_t>(c)));
    const __m512 ui = local_mix(load16(xi + c, m), xsi + c, m & columns_in(lanes, ci0, ci1),
                                wi == 0.0f, wiv, viv);
    const __m512 uk = local_mix(load16(xk + c, m), xsk + c, m & columns_in(lanes, ck0, ck1),
                                wk == 0.0f, wkv, vkv);
    store16(out + c, m, blend(w2v, v2v, ui, uk), stream);
  }
}

// Rows [0, rows) of mix2_rows, `steps` 16-wide steps each. Full: the row is a whole number of
// steps, so no load or store needs the tail mask. Cut: w_i = w_k = +-0 (CutMix boxes), where the
// local mix is one masked fused multiply-add (see local_mix) with no branch: a zero mask loads
// nothing and keeps x. BoxI, BoxK: whether the run crosses box_i, box_k; most box rows cross
// only one of them, and skipping the other's masked load and multiply-add there took 9% off
// mix2 at 256x3x32x32.
template <bool Full, bool Cut, bool BoxI, bool BoxK>
METAMIXER_AVX512 inline void mix2_steps(const float* xi, const float* xsi, const float* xk,
                                        const float* xsk, float* out, int64_t len, int64_t rows,
                                        int64_t steps, const __mmask16* mt, const __mmask16* mi,
                                        const __mmask16* mk, int64_t ck0, int64_t ck1, float wi,
                                        float wk, float w2, bool stream) {
  const __m512 wiv = _mm512_set1_ps(wi), viv = _mm512_set1_ps(1.0f - wi);
  const __m512 wkv = _mm512_set1_ps(wk), vkv = _mm512_set1_ps(1.0f - wk);
  const __m512 w2v = _mm512_set1_ps(w2), v2v = _mm512_set1_ps(1.0f - w2);
  const bool cut_i = wi == 0.0f, cut_k = wk == 0.0f;
  const int64_t prefetch_rows = BoxK && len >= kPrefetchMinLen ? rows - kPrefetchRows : 0;
  for (int64_t r = 0, at = 0; r < rows; ++r, at += len) {
    if (r < prefetch_rows) prefetch_columns(xsk + at + kPrefetchRows * len, ck0, ck1);
    for (int64_t s = 0, c = at; s < steps; ++s, c += 16) {
      __m512 ui = Full ? _mm512_loadu_ps(xi + c) : load16(xi + c, mt[s]);
      __m512 uk = Full ? _mm512_loadu_ps(xk + c) : load16(xk + c, mt[s]);
      if (BoxI) ui = Cut ? _mm512_mask_fmadd_ps(ui, mi[s], wiv, load16(xsi + c, mi[s]))
                         : local_mix(ui, xsi + c, mi[s], cut_i, wiv, viv);
      if (BoxK) uk = Cut ? _mm512_mask_fmadd_ps(uk, mk[s], wkv, load16(xsk + c, mk[s]))
                         : local_mix(uk, xsk + c, mk[s], cut_k, wkv, vkv);
      if (Full) put16(out + c, blend(w2v, v2v, ui, uk), stream);
      else store16(out + c, mt[s], blend(w2v, v2v, ui, uk));
    }
  }
}

// mix2_steps for a run that crosses box_i, box_k or both ([ck0, ck1): box_k's columns).
template <bool Full, bool Cut>
METAMIXER_AVX512 inline void mix2_steps_of_run(const float* xi, const float* xsi, const float* xk,
                                               const float* xsk, float* out, int64_t len,
                                               int64_t rows, int64_t steps, const __mmask16* mt,
                                               const __mmask16* mi, const __mmask16* mk, bool box_i,
                                               int64_t ck0, int64_t ck1, float wi, float wk,
                                               float w2, bool stream) {
  if (box_i && ck0 < ck1)
    mix2_steps<Full, Cut, true, true>(xi, xsi, xk, xsk, out, len, rows, steps, mt, mi, mk, ck0, ck1,
                                      wi, wk, w2, stream);
  else if (box_i)
    mix2_steps<Full, Cut, true, false>(xi, xsi, xk, xsk, out, len, rows, steps, mt, mi, mk, ck0,
                                       ck1, wi, wk, w2, stream);
  else
    mix2_steps<Full, Cut, false, true>(xi, xsi, xk, xsk, out, len, rows, steps, mt, mi, mk, ck0,
                                       ck1, wi, wk, w2, stream);
}

// Rows [0, rows) of a plane (row stride `len`) whose box columns are all [ci0, ci1) and
// [ck0, ck1) (an empty range where the run is outside that box), with the tail and box lane
// masks of every 16-column step computed once for the run instead of once per row (on 32-wide
// rows that set-up cost as much as the arithmetic). Rows longer than 16 * kMaxSteps take
// mix2_row directly. `stream` (as put16) needs len % 16 == 0 and out 64-byte aligned.
METAMIXER_AVX512 inline void mix2_rows(const float* xi, const float* xsi, const float* xk,
                                       const float* xsk, float* out, int64_t len, int64_t rows,
                                       int64_t ci0, int64_t ci1, float wi, int64_t ck0,
                                       int64_t ck1, float wk, float w2, bool stream) {
  constexpr int64_t kMaxSteps = 32;
  const int64_t steps = (len + 15) / 16;
  if (steps > kMaxSteps) {
    for (int64_t r = 0, at = 0; r < rows; ++r, at += len)
      mix2_row(xi + at, xsi + at, xk + at, xsk + at, out + at, len, ci0, ci1, wi, ck0, ck1, wk, w2,
               stream);
    return;
  }
  __mmask16 mt[kMaxSteps], mi[kMaxSteps], mk[kMaxSteps];
  step_masks(len, steps, 0, mt, ci0, ci1, mi, ck0, ck1, mk);
  const bool full = len % 16 == 0, cut = wi == 0.0f && wk == 0.0f;
  const bool box_i = ci0 < ci1;
  // (inline calls: the same calls through a function pointer measured 20% slower)
  if (full && cut)
    mix2_steps_of_run<true, true>(xi, xsi, xk, xsk, out, len, rows, steps, mt, mi, mk, box_i,
                                  ck0, ck1, wi, wk, w2, stream);
  else if (full)
    mix2_steps_of_run<true, false>(xi, xsi, xk, xsk, out, len, rows, steps, mt, mi, mk, box_i,
                                   ck0, ck1, wi, wk, w2, stream);
  else if (cut)
    mix2_steps_of_run<false, true>(xi, xsi, xk, xsk, out, len, rows, steps, mt, mi, mk, box_i,
                                   ck0, ck1, wi, wk, w2, false);
  else
    mix2_steps_of_run<false, false>(xi, xsi, xk, xsk, out, len, rows, steps, mt, mi, mk, box_i,
                                    ck0, ck1, wi, wk, w2, false);
}

// ------------------------------------------------------------------------------ float mix
// Rows [0, rows) of one plane of metamixer::mix (row stride `len`) that all cross the box
// columns [c0, c1): out = x outside them, w x + (1 - w) xs inside, by lane masks instead of a
// copy, a blend and a copy per row (which cost more than the arithmetic on 32-wide rows).
template <bool Full, bool Cut>
METAMIXER_AVX512 inline void mix_steps(const float* x, const float* xs, float* out, int64_t len,
                                       int64_t rows, int64_t steps, const __mmask16* mt,
                                       const __mmask16* mb, __m512 wv, __m512 vv) {
  for (int64_t r = 0, at = 0; r < rows; ++r, at += len) {
    for (int64_t s = 0, c = at; s < steps; ++s, c += 16) {
      const __m512 a = Full ? _mm512_loadu_ps(x + c) : load16(x + c, mt[s]);
      const __m512 u = Cut ? _mm512_mask_fmadd_ps(a, mb[s], wv, load16(xs + c, mb[s]))
                           : local_mix(a, xs + c, mb[s], false, wv, vv);
      if (Full) _mm512_storeu_ps(out + c, u);
      else store16(out + c, mt[s], u);
    }
  }
}

METAMIXER_AVX512 inline void mix_rows(const float* x, const float* xs, float* out, int64_t len,
                                      int64_t rows, int64_t c0, int64_t c1, float w) {
  constexpr int64_t kMaxSteps = 32;
  for (int64_t cb = 0; cb < len; cb += 16 * kMaxSteps) {  // long rows in chunks
    const int64_t n = len - cb < 16 * kMaxSteps ? len - cb : 16 * kMaxSteps;
    const int64_t steps = (n + 15) / 16;
    __mmask16 mt[kMaxSteps], mb[kMaxSteps];
    step_masks(n, steps, cb, mt, c0, c1, mb, 0, 0, nullptr);
    const __m512 wv = _mm512_set1_ps(w), vv = _mm512_set1_ps(1.0f - w);
    const float *xc = x + cb, *xsc = xs + cb;
    float* oc = out + cb;
    const bool full = n % 16 == 0;
    if (full && w == 0.0f) mix_steps<true, true>(xc, xsc, oc, len, rows, steps, mt, mb, wv, vv);
    else if (full) mix_steps<true, false>(xc, xsc, oc, len, rows, steps, mt, mb, wv, vv);
    else if (w == 0.0f) mix_steps<false, true>(xc, xsc, oc, len, rows, steps, mt, mb, wv, vv);
    else mix_steps<false, false>(xc, xsc, oc, len, rows, steps, mt, mb, wv, vv);
  }
}

// metamixer::mix over n elements that are whole planes of a small NCHW map (core::mix_plane_run):
// the box lanes of the 16-wide steps repeat with the plane, so step s takes masks[s % period],
// computed once per sample, instead of a row call per box row of every plane.
METAMIXER_AVX512 inline void mix_periodic(const float* x, const float* xs, float* out, int64_t n,
                                          const uint16_t* masks, int64_t period, float w) {
  const __m512 wv = _mm512_set1_ps(w), vv = _mm512_set1_ps(1.0f - w);
  const bool cut = w == 0.0f;
  int64_t c = 0, s = 0;
  for (; c + 16 <= n; c += 16) {
    const __mmask16 m = masks[s];
    s = s + 1 == period ? 0 : s + 1;
    _mm512_storeu_ps(out + c, local_mix(_mm512_loadu_ps(x + c), xs + c, m, cut, wv, vv));
  }
  if (c < n) {
    const __mmask16 t = static_cast<__mmask16>((1u << (n - c)) - 1u);
    store16(out + c, t, local_mix(load16(x + c, t), xs + c, masks[s] & t, cut, wv, vv));
  }
}

// ------------------------------------------------------------------------------- uint8 mix2
// The same fused local + global mix for uint8 images, 16 pixels per step in 32-bit lanes,
// with every weight in [0, 1] (the caller checks; mix's binding enforces it). Pixels travel as
// biased floats (see U8Blend), so each operand costs one widening straight from memory
// (vpmovzxbd m128) and one fused multiply-add, and each output one add and a truncating narrow.
// The local mix of uint8 with w = 0 or 1 is exact selection (0 a + 1 b = b for integers), so a
// CutMix box is a masked merge of the partner's bytes into x's before the one widening; other w
// blend and round as the first mix call would store them, and that result, already a biased
// float, feeds the global blend. Needs AVX-512BW and VL (masked 16-byte loads).
#define METAMIXER_AVX512BW __attribute__((target("avx512f,avx512bw,avx512vl")))

inline bool cpu_has_avx512bw() {
  static const bool has = __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  return has;
}

// Whether every w[0 .. n) lies in [0, 1] (false for NaN): the uint8 kernels' precondition.
inline bool weights_in_unit_interval(const float* w, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (!(w[i] >= 0.0f && w[i] <= 1.0f)) return false;
  return true;
}

// uint8 arithmetic on biased floats: the pixel p is the float 2^23 + p (bits 0x4B000000 | p),
// made by one OR after the widening instead of a conversion. For w in [0, 1]:
//   w p = fma(w, 2^23 + p, -w 2^23) exactly as the reference's float32 w * p rounds it: w 2^23
//     is exact (a power-of-two scale), so the fused form rounds the exact w p once;
//   s = w a + (1 - w) b then lies in [0, 255.0001], so it needs no clamp, and s + 2^23 rounds it
//     half to even to an integer (the ulp there is 1): the biased float of round(s), whose low
//     byte is the pixel.
// Against widen, convert, multiply, then convert, clamp and saturate on the way out, this took
// 17% off the blend with the data in L1 (AMD Zen 5); exact for all 256 x 256 pixel pairs at
// thousands of weights (test_mix).
struct U8Blend {
  __m512 w, v, w_bias, v_bias;  // w, 1 - w, -w 2^23, -(1 - w) 2^23
};
constexpr float kU8Bias = 8388608.0f;  // 2^23

METAMIXER_AVX512 inline U8Blend u8_blend(float w) {
  const float v = 1.0f - w;
  return {_mm512_set1_ps(w), _mm512_set1_ps(v), _mm512_set1_ps(-w * kU8Bias),
          _mm512_set1_ps(-v * kU8Bias)};
}
METAMIXER_AVX512 inline __m512 biased(__m128i bytes) {
  return _mm512_castsi512_ps(
      _mm512_or_si512(_mm512_cvtepu8_epi32(bytes), _mm512_set1_epi32(0x4B000000)));
}
METAMIXER_AVX512 inline __m512 biased(const uint8_t* p) {
  return biased(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
// The biased round(w a + (1 - w) b) of the biased a and b.
METAMIXER_AVX512 inline __m512 blend_biased(const U8Blend& b, __m512 x, __m512 y) {
  const __m512 s = _mm512_add_round_ps(_mm512_fmadd_round_ps(b.w, x, b.w_bias, kRound),
                                       _mm512_fmadd_round_ps(b.v, y, b.v_bias, kRound), kRound);
  return _mm512_add_round_ps(s, _mm512_set1_ps(kU8Bias), kRound);
}
METAMIXER_AVX512 inline __m128i narrow(__m512 biased_pixels) {
  return _mm512_cvtepi32_epi8(_mm512_castps_si512(biased_pixels));
}

// Stores 16 pixels at p; with `stream`, past the cache (p must then be 16-byte aligned), as
// put16 for floats.
METAMIXER_AVX512 inline void put16_u8(uint8_t* p, __m128i q, bool stream) {
  if (stream) _mm_stream_si128(reinterpret_cast<__m128i*>(p), q);
  else _mm_storeu_si128(reinterpret_cast<__m128i*>(p), q);
}

// out[c] = round(w a[c] + (1 - w) b[c]) for c < (len rounded down to 16), w in [0, 1]; returns
// that count. `stream`: as put16_u8 (out 16-byte aligned).
METAMIXER_AVX512 inline int64_t blend_u8(const uint8_t* a, const uint8_t* b, uint8_t* out,
                                           int64_t len, float w, bool stream = false) {
  const U8Blend wb = u8_blend(w);
  int64_t c = 0;
  for (; c + 16 <= len; c += 16)
    put16_u8(out + c, narrow(blend_biased(wb, biased(a + c), biased(b + c))), stream);
  return c;
}

// 16 pixels of u, the local mix of x with xs on the lanes `box` (within `tail`), as biased
// floats. Select: w is 0 (take xs) or 1 (the caller passes an empty box), so a step inside the
// box reads xs alone, and on a box edge the box lanes of xs are merged into x's bytes by a
// masked load; either way one widening. (Reading x inside the box too, to merge there as well,
// made mix2 20% slower at 64x3x224x224 with the batch coming from memory.) Otherwise the box
// lanes blend.
template <bool Full, bool Select>
METAMIXER_AVX512BW inline __m512 local_mix_u8(const uint8_t* x, const uint8_t* xs, __mmask16 tail,
                                              __mmask16 box, const U8Blend& b) {
  if (Select && Full && box == 0xFFFF) return biased(xs);
  __m128i bytes = Full ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(x))
                       : _mm_maskz_loadu_epi8(tail, x);
  if (Select) {
    if (box) bytes = _mm_mask_loadu_epi8(bytes, box, xs);
    return biased(bytes);
  }
  const __m512 u = biased(bytes);
  if (!box) return u;
  return _mm512_mask_mov_ps(u, box, blend_biased(b, u, biased(_mm_maskz_loadu_epi8(box, xs))));
}

// The rows of mix2_rows_u8_chunk; Full: whole 16-pixel steps, no tail mask on x and out.
template <bool Full, bool Select>
METAMIXER_AVX512BW inline void mix2_steps_u8(const uint8_t* xi, const uint8_t* xsi,
                                             const uint8_t* xk, const uint8_t* xsk, uint8_t* out,
                                             int64_t stride, int64_t rows, int64_t steps,
                                             const __mmask16* mt, const __mmask16* mi,
                                             const __mmask16* mk, float wi, float wk, float w2,
                                             bool stream) {
  const U8Blend bi = u8_blend(wi), bk = u8_blend(wk), b2 = u8_blend(w2);
  for (int64_t r = 0, at = 0; r < rows; ++r, at += stride) {
    for (int64_t s = 0, c = at; s < steps; ++s, c += 16) {
      const __m512 ui = local_mix_u8<Full, Select>(xi + c, xsi + c, mt[s], mi[s], bi);
      const __m512 uk = local_mix_u8<Full, Select>(xk + c, xsk + c, mt[s], mk[s], bk);
      const __m128i q = narrow(blend_biased(b2, ui, uk));
      if (Full) put16_u8(out + c, q, stream);
      else _mm_mask_storeu_epi8(out + c, mt[s], q);
    }
  }
}

// Rows [0, rows) of a uint8 plane (row stride `stride`; `len` <= 16 * kMaxSteps columns from
// each row start) with box columns [ci0, ci1) and [ck0, ck1) on every row.
METAMIXER_AVX512BW inline void mix2_rows_u8_chunk(const uint8_t* xi, const uint8_t* xsi,
                                                  const uint8_t* xk, const uint8_t* xsk,
                                                  uint8_t* out, int64_t stride, int64_t len,
                                                  int64_t rows, int64_t ci0, int64_t ci1, float wi,
                                                  int64_t ck0, int64_t ck1, float wk, float w2,
                                                  bool stream) {
  constexpr int64_t kMaxSteps = 32;
  const int64_t steps = (len + 15) / 16;
  // uint8 is exact under selection: w = 1 keeps x, which is an empty box
  if (wi == 1.0f) ci1 = ci0;
  if (wk == 1.0f) ck1 = ck0;
  __mmask16 mt[kMaxSteps], mi[kMaxSteps], mk[kMaxSteps];
  step_masks(len, steps, 0, mt, ci0, ci1, mi, ck0, ck1, mk);
  const bool full = len % 16 == 0;
  const bool select = (wi == 0.0f || wi == 1.0f) && (wk == 0.0f || wk == 1.0f);
  if (full && select)
    mix2_steps_u8<true, true>(xi, xsi, xk, xsk, out, stride, rows, steps, mt, mi, mk, wi, wk, w2,
                              stream);
  else if (full)
    mix2_steps_u8<true, false>(xi, xsi, xk, xsk, out, stride, rows, steps, mt, mi, mk, wi, wk, w2,
                               stream);
  else if (select)
    mix2_steps_u8<false, true>(xi, xsi, xk, xsk, out, stride, rows, steps, mt, mi, mk, wi, wk, w2,
                               false);
  else
    mix2_steps_u8<false, false>(xi, xsi, xk, xsk, out, stride, rows, steps, mt, mi, mk, wi, wk, w2,
                                false);
}

// mix2_rows for uint8: rows in chunks of 16 * 32 columns. `stream` (as put16_u8) needs
// len % 16 == 0 and out 16-byte aligned.
METAMIXER_AVX512BW inline void mix2_rows(const uint8_t* xi, const uint8_t* xsi, const uint8_t* xk,
                                         const uint8_t* xsk, uint8_t* out, int64_t len,
                                         int64_t rows, int64_t ci0, int64_t ci1, float wi,
                                         int64_t ck0, int64_t ck1, float wk, float w2,
                                         bool stream) {
  constexpr int64_t kChunk = 16 * 32;
  for (int64_t cb = 0; cb < len; cb += kChunk)
    mix2_rows_u8_chunk(xi + cb, xsi + cb, xk + cb, xsk + cb, out + cb, len,
                       len - cb < kChunk ? len - cb : kChunk, rows, ci0 - cb, ci1 - cb, wi,
                       ck0 - cb, ck1 - cb, wk, w2, stream);
}

// The whole-span blends with streamed stores (mix2's runs of rows outside both boxes); return
// the count done, as blend_f32 and blend_u8 (w in [0, 1] for uint8).
METAMIXER_AVX512 inline int64_t blend_streamed(const float* a, const float* b, float* out,
                                               int64_t len, float w) {
  return blend_f32(a, b, out, len, w, true);
}
METAMIXER_AVX512 inline int64_t blend_streamed(const uint8_t* a, const uint8_t* b, uint8_t* out,
                                               int64_t len, float w) {
  return blend_u8(a, b, out, len, w, true);
}

// mix_periodic for uint8, w in [0, 1]: 16 pixels a step as biased floats (local_mix_u8).
// Select: w = 0, where the box lanes take the partner's bytes.
template <bool Select>
METAMIXER_AVX512BW inline void mix_periodic_u8_steps(const uint8_t* x, const uint8_t* xs,
                                                     uint8_t* out, int64_t n, const uint16_t* masks,
                                                     int64_t period, const U8Blend& b) {
  int64_t c = 0, s = 0;
  for (; c + 16 <= n; c += 16) {
    const __mmask16 m = masks[s];
    s = s + 1 == period ? 0 : s + 1;
    put16_u8(out + c, narrow(local_mix_u8<true, Select>(x + c, xs + c, 0xFFFF, m, b)), false);
  }
  if (c < n) {
    const __mmask16 t = static_cast<__mmask16>((1u << (n - c)) - 1u);
    const __m512 u = local_mix_u8<false, Select>(x + c, xs + c, t, masks[s] & t, b);
    _mm_mask_storeu_epi8(out + c, t, narrow(u));
  }
}
METAMIXER_AVX512BW inline void mix_periodic(const uint8_t* x, const uint8_t* xs, uint8_t* out,
                                            int64_t n, const uint16_t* masks, int64_t period,
                                            float w) {
  if (w == 0.0f) mix_periodic_u8_steps<true>(x, xs, out, n, masks, period, u8_blend(w));
  else mix_periodic_u8_steps<false>(x, xs, out, n, masks, period, u8_blend(w));
}

// mix_periodic for fp16 and bf16 storage (the float blend between widen_bits and narrow_bits).
// Lanes outside the box keep x's 16 bits by a merge after the narrowing, so a NaN there is
// copied as it is, not re-encoded.
template <typename T>
METAMIXER_AVX512BW inline void mix_periodic_16bit(const T* x, const T* xs, T* out, int64_t n,
                                                  const uint16_t* masks, int64_t period, float w) {
  const __m512 wv = _mm512_set1_ps(w), vv = _mm512_set1_ps(1.0f - w);
  for (int64_t c = 0, s = 0; c < n; c += 16, s = s + 1 == period ? 0 : s + 1) {
    const __mmask16 t = n - c >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - c)) - 1u);
    const __mmask16 m = masks[s] & t;
    const __m256i a = _mm256_maskz_loadu_epi16(t, x + c);
    __m256i u = a;
    if (m) {
      const __m256i b = _mm256_maskz_loadu_epi16(m, xs + c);
      const __m512 mixed = blend(wv, vv, widen_bits(a, T{}), widen_bits(b, T{}));
      u = _mm256_mask_blend_epi16(m, a, narrow_bits(mixed, T{}));
    }
    _mm256_mask_storeu_epi16(out + c, t, u);
  }
}
METAMIXER_AVX512BW inline void mix_periodic(const Half* x, const Half* xs, Half* out, int64_t n,
                                            const uint16_t* masks, int64_t period, float w) {
  mix_periodic_16bit(x, xs, out, n, masks, period, w);
}
METAMIXER_AVX512BW inline void mix_periodic(const BFloat16* x, const BFloat16* xs, BFloat16* out,
                                            int64_t n, const uint16_t* masks, int64_t period,
                                            float w) {
  mix_periodic_16bit(x, xs, out, n, masks, period, w);
}

// --------------------------------------------------- gather backward, small planes
// The gather of mix_backward_rows over the whole run of small planes of one sample (core::
// mix_backward_samples), for float, fp16 and bf16 storage: box k's lanes and each partner's
// repeat with the plane, so a step takes its masks from periodic tables (core::
// periodic_box_masks) instead of comparing columns row by row (at 4x4 maps the row calls cost
// 4x the box-free backward). AVX-512BW for the masked 16-bit loads and stores.

// 16 values at p as floats, zeros outside m; and the stores of the lanes in m.
METAMIXER_AVX512BW inline __m512 widen_masked(const float* p, __mmask16 m) { return load16(p, m); }
template <typename T>
METAMIXER_AVX512BW inline __m512 widen_masked(const T* p, __mmask16 m) {
  return widen_bits(_mm256_maskz_loadu_epi16(m, p), T{});
}
METAMIXER_AVX512BW inline void narrow_masked(float* p, __mmask16 m, __m512 v) { store16(p, m, v); }
template <typename T>
METAMIXER_AVX512BW inline void narrow_masked(T* p, __mmask16 m, __m512 v) {
  _mm256_mask_storeu_epi16(p, m, narrow_bits(v, T{}));
}

// One partner j: its gradient at the run's first element, its box lanes, and 1 - w_j.
template <typename T>
struct PeriodicPart {
  const T* g;
  const uint16_t* masks;
  float v;
};

// One pass of partners over n elements: the float sums start (first) from g, times w on box
// k's lanes, or else from sums[]; they add v g_j on partner j's lanes for each part in order,
// and end (last) in dx, rounded to T, or else in sums[] (for float, sums may be dx itself).
// Partners come core::kMaxParts a pass and a later pass adds to what the first left, so the
// sums keep the scalar gather's order and bits. With with_dw (first only), returns the sum over
// box k's lanes of g (x - xs) (16 lane partials, then the fixed reduction tree).
// (The flags are plain arguments: their branches go the same way in every step.)
template <typename T>
METAMIXER_AVX512BW inline float gather_periodic(bool first, bool last, bool with_dw, const T* g,
                                                const T* x, const T* xs, float* sums, T* dx,
                                                int64_t n, const uint16_t* mk, int64_t period,
                                                float w, const PeriodicPart<T>* parts,
                                                int64_t n_parts) {
  const __m512 wv = _mm512_set1_ps(w);
  __m512 dw = _mm512_setzero_ps();
  for (int64_t c = 0, s = 0; c < n; c += 16, s = s + 1 == period ? 0 : s + 1) {
    const __mmask16 mt = n - c >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - c)) - 1);
    const bool full = mt == 0xFFFF;  // (full accesses unmasked: masked stores cost more)
    const __mmask16 box = mt & mk[s];
    __m512 acc;
    if (first) {
      acc = full ? widen16(g + c) : widen_masked(g + c, mt);
      if (with_dw && box) {
        const __m512 d =
            _mm512_sub_round_ps(widen_masked(x + c, box), widen_masked(xs + c, box), kRound);
        dw = _mm512_mask_add_round_ps(dw, box, dw, _mm512_mul_round_ps(acc, d, kRound), kRound);
      }
      acc = _mm512_mask_mul_round_ps(acc, box, acc, wv, kRound);
    } else {
      acc = full ? _mm512_loadu_ps(sums + c) : load16(sums + c, mt);
    }
    for (int64_t t = 0; t < n_parts; ++t) {
      const __mmask16 m = mt & parts[t].masks[s];
      if (!m) continue;
      const __m512 term =
          _mm512_mul_round_ps(_mm512_set1_ps(parts[t].v), widen_masked(parts[t].g + c, m), kRound);
      acc = _mm512_mask_add_round_ps(acc, m, acc, term, kRound);
    }
    if (last && full) narrow16(dx + c, acc);
    else if (last) narrow_masked(dx + c, mt, acc);
    else store16(sums + c, mt, acc);
  }
  return with_dw ? _mm512_reduce_add_ps(dw) : 0.0f;
}

#undef METAMIXER_AVX512BW
#undef METAMIXER_AVX512

}  // namespace metamixer::core::avx512
#endif
