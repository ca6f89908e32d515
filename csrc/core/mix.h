// Torch-free core of metamixer::mix (DESIGN.md section 2.2): region and blend mixing.
//
//   out[i, p] = x[i, p]                              for p outside box_i
//   out[i, p] = w_i x[i, p] + (1 - w_i) x[src_i, p]  for p inside box_i
//
// Backward, for an upstream gradient g shaped like x:
//   dx[k, p] = g[k, p] * (p in box_k ? w_k : 1) + sum_{j : src_j = k, p in box_j} (1 - w_j) g[j, p]
//   dw_i     = sum_{p in box_i} g[i, p] (x[i, p] - x[src_i, p])
//
// Layout. Every supported tensor is viewed as N samples of `planes` x `rows` x `row_len`
// contiguous elements, with the box covering rows [y0, y1) and columns [c0, c1) of every plane:
//   NCHW [N, C, H, W]          planes = C, rows = H, row_len = W,     columns = (x0, x1)
//   NHWC (channels_last)       planes = 1, rows = H, row_len = W * C, columns = (x0 C, x1 C)
//   features [N, D]            planes = 1, rows = 1, row_len = D,     box = the whole row
// so one row loop serves all three without a layout copy. The caller passes boxes already in
// this (row, column) form.
//
// Arithmetic. The blend runs in Compute<T> = float for uint8/fp16/bf16 and T for float/double,
// as three separately rounded operations (w*a, (1-w)*b, their sum), exactly like the eager
// reference; no FMA instruction is ever enabled for this code, so nothing is contracted.
// uint8 rounds half to even and clamps to [0, 255] (SSE2, AVX2 or AVX-512 does 16 pixels at a
// time, AVX-512 for w in [0, 1], where no clamp is needed; w = 0 or 1 is a memcpy for uint8,
// where it is exact); float blends take AVX2 or AVX-512 where the CPU has it (picked at run
// time), fp16 and bf16 blends (and the whole-sample backward) AVX-512, with the conversions of
// half.h done 16 lanes at a time. Copies (outside the box) are memcpy.
//
// Fused op: mix2_forward_planes computes mix(mix(x, src, w, box), src2, w2, None) in one pass
// (see there), bit for bit equal to the two calls.
//
// Bytes moved. Forward: reads x_i once and x_src_i inside box_i, writes out once:
// (S + |box|) reads + S writes per sample of S elements. The forward works on whole planes
// (one memcpy for the rows above and below the box), which matters for 32-wide images, and
// on maps of at most kSmallPlane elements on runs of planes with lane masks that repeat with
// the plane (mix_plane_run). Backward (gather per destination, so repeated partners never
// race): reads g_k, x_k and x_src_k once and g_j inside box_j for every j with src_j = k,
// writes dx once; by rows, or for float, fp16 and bf16 boxes on small maps by whole samples
// (mix_backward_samples).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

// GCC 12's AVX-512 intrinsics read a self-initialised "undefined" vector, which -Wuninitialized
// reports wherever they are inlined (GCC bug 105593, fixed in GCC 13).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include "half.h"
#include "mix_avx512.h"

namespace metamixer::core {

// Per-dtype load/store between storage T and the compute type.
template <typename T>
struct Compute {
  using type = T;  // float, double
  static T load(T v) { return v; }
  static T store(T v) { return v; }
};
template <>
struct Compute<uint8_t> {
  using type = float;
  static float load(uint8_t v) { return static_cast<float>(v); }
  // Round half to even (adding 1.5 * 2^23 leaves no fraction bits in the default rounding
  // mode) and clamp, as torch's round().clamp(0, 255) does; vectorizes with plain SSE2.
  static uint8_t store(float v) {
    float r = (v + 12582912.0f) - 12582912.0f;
    r = r < 0.0f ? 0.0f : (r > 255.0f ? 255.0f : r);
    return static_cast<uint8_t>(r);
  }
};
template <>
struct Compute<Half> {
  using type = float;
  static float load(Half v) { return to_float(v); }
  static Half store(float v) { return to_half(v); }
};
template <>
struct Compute<BFloat16> {
  using type = float;
  static float load(BFloat16 v) { return to_float(v); }
  static BFloat16 store(float v) { return to_bfloat16(v); }
};

template <typename T>
using compute_t = typename Compute<T>::type;

// The 16-bit float storage types, and those whose AVX-512 paths (mix_avx512.h) compute in 16
// float lanes.
template <typename T>
constexpr bool kHalfWidth = std::is_same_v<T, Half> || std::is_same_v<T, BFloat16>;
template <typename T>
constexpr bool kWideFloat = std::is_same_v<T, float> || kHalfWidth<T>;

// Accumulator of the backward: double for double, float otherwise.
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Columns per window of the fused forward's and the backward's cache-resident scratch.
constexpr int64_t kWindow = 4096;

struct MixLayout {
  int64_t n = 0, planes = 1, rows = 1, row_len = 0;
  int64_t sample_size() const { return planes * rows * row_len; }
  int64_t total_rows() const { return n * planes * rows; }
};

// box is [N][4] = (y0, y1, c0, c1) in row/column units of the layout (see top of file).
inline bool row_in_box(const int64_t* box, int64_t y) { return y >= box[0] && y < box[1]; }

#if defined(__SSE2__)
// 16 uint8 blends: widen to 4 x 4 floats, w*a + v*b (separately rounded, as the scalar path),
// convert with the default round-to-nearest-even mode (cvtps2dq) and pack with unsigned
// saturation, which is the clamp to [0, 255]. GCC's auto-vectorization of the scalar loop is
// about 8x slower here. SSE2 is part of x86-64, so no run-time check is needed.
inline void blend16_u8(const uint8_t* a, const uint8_t* b, uint8_t* out, __m128 w, __m128 v) {
  const __m128i zero = _mm_setzero_si128();
  const __m128i va = _mm_loadu_si128(reinterpret_cast<const __m128i*>(a));
  const __m128i vb = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b));
  const __m128i a16[2] = {_mm_unpacklo_epi8(va, zero), _mm_unpackhi_epi8(va, zero)};
  const __m128i b16[2] = {_mm_unpacklo_epi8(vb, zero), _mm_unpackhi_epi8(vb, zero)};
  __m128i q[4];
  for (int h = 0; h < 2; ++h) {
    for (int k = 0; k < 2; ++k) {
      const __m128i a32 = k == 0 ? _mm_unpacklo_epi16(a16[h], zero) : _mm_unpackhi_epi16(a16[h], zero);
      const __m128i b32 = k == 0 ? _mm_unpacklo_epi16(b16[h], zero) : _mm_unpackhi_epi16(b16[h], zero);
      const __m128 lhs = _mm_mul_ps(w, _mm_cvtepi32_ps(a32));
      const __m128 rhs = _mm_mul_ps(v, _mm_cvtepi32_ps(b32));
      q[2 * h + k] = _mm_cvtps_epi32(_mm_add_ps(lhs, rhs));
    }
  }
  const __m128i lo = _mm_packs_epi32(q[0], q[1]), hi = _mm_packs_epi32(q[2], q[3]);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm_packus_epi16(lo, hi));
}
#endif

#if defined(__x86_64__) && defined(__GNUC__)
#define METAMIXER_HAVE_AVX2_PATH 1
// The same 16-pixel blend with 8-wide float vectors, compiled for AVX2 (not FMA: the products
// must stay separately rounded) and called only when the CPU reports AVX2 at run time.
__attribute__((target("avx2"))) inline void blend_u8_avx2(const uint8_t* a, const uint8_t* b,
                                                          uint8_t* out, int64_t len, float w,
                                                          int64_t* done) {
  const __m256 wv = _mm256_set1_ps(w), vv = _mm256_set1_ps(1.0f - w);
  int64_t c = 0;
  for (; c + 16 <= len; c += 16) {
    __m256i q[2];
    for (int h = 0; h < 2; ++h) {
      const __m128i a8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(a + c + 8 * h));
      const __m128i b8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + c + 8 * h));
      const __m256 lhs = _mm256_mul_ps(wv, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(a8)));
      const __m256 rhs = _mm256_mul_ps(vv, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b8)));
      q[h] = _mm256_cvtps_epi32(_mm256_add_ps(lhs, rhs));
    }
    // packs works within 128-bit lanes: reorder the 64-bit quarters back into pixel order
    const __m256i p16 = _mm256_permute4x64_epi64(_mm256_packs_epi32(q[0], q[1]), 0xD8);
    const __m128i p8 = _mm_packus_epi16(_mm256_castsi256_si128(p16), _mm256_extracti128_si256(p16, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + c), p8);
  }
  *done = c;
}

inline bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
}
inline bool cpu_has_avx512f() {
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
}

// float blends, w*a + (1-w)*b with both products and the sum rounded separately: 8 lanes with
// AVX2 (no FMA enabled, nothing to contract); 16 with avx512::blend_f32. The baseline is GCC's
// SSE2 vectorization of the scalar loop.
__attribute__((target("avx2"))) inline int64_t blend_f32_avx2(const float* a, const float* b,
                                                              float* out, int64_t len, float w) {
  const __m256 wv = _mm256_set1_ps(w), vv = _mm256_set1_ps(1.0f - w);
  int64_t c = 0;
  for (; c + 8 <= len; c += 8) {
    const __m256 lhs = _mm256_mul_ps(wv, _mm256_loadu_ps(a + c));
    const __m256 rhs = _mm256_mul_ps(vv, _mm256_loadu_ps(b + c));
    _mm256_storeu_ps(out + c, _mm256_add_ps(lhs, rhs));
  }
  return c;
}
#endif

template <typename T>
void blend_span(const T* a, const T* b, T* out, int64_t len, compute_t<T> w) {
  using C = Compute<T>;
  int64_t c = 0;
  if constexpr (std::is_same_v<T, uint8_t>) {
    // exact for integers: w = 1 gives a, w = 0 gives b (for floats 0 * inf or -0 would differ)
    if (w == 1.0f || w == 0.0f) {
      std::memcpy(out, w == 1.0f ? a : b, static_cast<size_t>(len));
      return;
    }
#if defined(METAMIXER_HAVE_AVX2_PATH)
    if (cpu_has_avx512f() && w >= 0.0f && w <= 1.0f) {  // blend_u8's precondition
      c = avx512::blend_u8(a, b, out, len, w);
    } else if (cpu_has_avx2()) {
      blend_u8_avx2(a, b, out, len, w, &c);
    }
#endif
#if defined(__SSE2__)
    const __m128 wv = _mm_set1_ps(w), vv = _mm_set1_ps(1.0f - w);
    for (; c + 16 <= len; c += 16) blend16_u8(a + c, b + c, out + c, wv, vv);
#endif
  }
#if defined(METAMIXER_HAVE_AVX512_MIX2)
  if constexpr (kHalfWidth<T>) {
    if (cpu_has_avx512f()) c = avx512::blend_16bit(a, b, out, len, w);
  }
#endif
#if defined(METAMIXER_HAVE_AVX2_PATH)
  if constexpr (std::is_same_v<T, float>) {
    if (cpu_has_avx512f()) {
      c = avx512::blend_f32(a, b, out, len, w);
    } else if (cpu_has_avx2()) {
      c = blend_f32_avx2(a, b, out, len, w);
    }
  }
#endif
  const compute_t<T> v = compute_t<T>(1) - w;
  for (; c < len; ++c) {
    const compute_t<T> lhs = w * C::load(a[c]);
    const compute_t<T> rhs = v * C::load(b[c]);
    out[c] = C::store(lhs + rhs);
  }
}

// Columns [cb, ce) of one row, written to out_cb[0 .. ce - cb); a, b point at column 0 of their
// rows: copy outside [c0, c1), blend inside (if the row is in the box).
template <typename T>
void mix_window(const T* a, const T* b, T* out_cb, int64_t cb, int64_t ce, const int64_t* box,
                int64_t y, compute_t<T> w) {
  int64_t c0 = ce, c1 = ce;
  if (row_in_box(box, y) && box[2] < box[3]) {
    c0 = box[2] < cb ? cb : (box[2] > ce ? ce : box[2]);
    c1 = box[3] < c0 ? c0 : (box[3] > ce ? ce : box[3]);
  }
  if (c0 > cb) std::memcpy(out_cb, a + cb, sizeof(T) * (c0 - cb));
  blend_span(a + c0, b + c0, out_cb + (c0 - cb), c1 - c0, w);
  if (ce > c1) std::memcpy(out_cb + (c1 - cb), a + c1, sizeof(T) * (ce - c1));
}

// Rows [yb, ye) of one plane (a, b, out point at row yb): one memcpy for the rows above and
// below the box, one blend for box rows that span the whole width, else row by row. Working on
// runs of rows instead of single rows is what keeps 32-wide images fast.
template <typename T>
void mix_rows(const T* a, const T* b, T* out, int64_t len, const int64_t* box, int64_t yb,
              int64_t ye, compute_t<T> w) {
  int64_t y0 = ye, y1 = ye;
  if (box[2] < box[3]) {
    y0 = box[0] < yb ? yb : (box[0] > ye ? ye : box[0]);
    y1 = box[1] < y0 ? y0 : (box[1] > ye ? ye : box[1]);
  }
  const int64_t top = (y0 - yb) * len, mid = (y1 - yb) * len, all = (ye - yb) * len;
  if (top > 0) std::memcpy(out, a, sizeof(T) * top);
  if (box[2] == 0 && box[3] == len) {
    blend_span(a + top, b + top, out + top, mid - top, w);
#if defined(METAMIXER_HAVE_AVX512_MIX2)
  } else if (std::is_same_v<T, float> && cpu_has_avx512f() && len < (int64_t{1} << 31)) {
    if constexpr (std::is_same_v<T, float>)
      avx512::mix_rows(a + top, b + top, out + top, len, y1 - y0, box[2], box[3], w);
#endif
  } else {
    for (int64_t y = y0; y < y1; ++y) {
      const int64_t o = (y - yb) * len;
      mix_window(a + o, b + o, out + o, 0, len, box, y, w);
    }
  }
  if (all > mid) std::memcpy(out + mid, a + mid, sizeof(T) * (all - mid));
}

// The forward's sample order: follow i -> partner_i, so that the partner an output reads is the
// next output's own sample and is still in cache; each sample then comes from memory about
// once instead of twice (once as itself, once as a partner).
inline std::vector<int64_t> partner_chain_order(const int64_t* partner, int64_t n) {
  std::vector<int64_t> order;
  order.reserve(n);
  std::vector<char> seen(n, 0);
  for (int64_t s = 0; s < n; ++s)
    for (int64_t i = s; !seen[i]; i = partner[i]) seen[i] = 1, order.push_back(i);
  return order;
}

// Planes of at most kSmallPlane elements (NCHW maps up to 32x32) are mixed a run of planes at
// a time (mix_plane_run) instead of a plane at a time: per-plane and per-row calls on 4x4 maps
// cost 14x the box-free blend, and at 32x32 the run is still as fast as the plane loop.
constexpr int64_t kSmallPlane = 1024;

// Sets bits [lo, hi) of a bitmap held in 16-bit words.
inline void set_bits(uint16_t* words, int64_t lo, int64_t hi) {
  while (lo < hi) {
    const int64_t bit = lo % 16, n = std::min<int64_t>(16 - bit, hi - lo);
    words[lo / 16] = static_cast<uint16_t>(words[lo / 16] | (((1u << n) - 1u) << bit));
    lo += n;
  }
}

// Bit l of masks[s]: whether element 16 s + l of a run of whole planes lies in the box (at row
// and column ((16 s + l) % plane) of its plane). The pattern repeats every
// lcm(plane, 16) / 16 = plane / gcd(plane, 16) <= kSmallPlane steps, the count returned; it is
// set a box row at a time (a bit at a time cost 3x the mixing at 3x32x32).
inline int64_t periodic_box_masks(const MixLayout& L, const int64_t* box, uint16_t* masks) {
  const int64_t plane = L.rows * L.row_len;
  int64_t gcd = 1;
  while (gcd < 16 && plane % (2 * gcd) == 0) gcd *= 2;
  const int64_t period = plane / gcd;
  std::fill(masks, masks + period, uint16_t{0});
  for (int64_t at = 0; at < 16 / gcd * plane; at += plane)  // the planes of lcm(plane, 16)
    for (int64_t y = box[0]; y < box[1]; ++y)
      set_bits(masks, at + y * L.row_len + box[2], at + y * L.row_len + box[3]);
  return period;
}

// np whole planes of one sample (a, b, out at the first), each plane of at most kSmallPlane
// elements: out = a outside the box, the blend of a and b inside. Float with AVX-512, and
// uint8, fp16 and bf16 with AVX-512BW, take lane masks that repeat with the plane; otherwise
// (double, or an older CPU) one memcpy of the run, then a blend per box row of each plane.
template <typename T>
void mix_plane_run(const T* a, const T* b, T* out, int64_t np, const MixLayout& L,
                   const int64_t* box, compute_t<T> w) {
  const int64_t plane = L.rows * L.row_len, len = L.row_len;
  const bool empty = box[0] >= box[1] || box[2] >= box[3];
  if (!empty && box[0] == 0 && box[1] == L.rows && box[2] == 0 && box[3] == len) {
    blend_span(a, b, out, np * plane, w);  // the whole planes: one blend
    return;
  }
#if defined(METAMIXER_HAVE_AVX512_MIX2)
  bool lanes = false;  // AVX-512 lane masks for this dtype, CPU and weight
  if constexpr (std::is_same_v<T, float>) lanes = cpu_has_avx512f();
  if constexpr (std::is_same_v<T, uint8_t>)
    lanes = avx512::cpu_has_avx512bw() && w >= 0.0f && w <= 1.0f;
  if constexpr (kHalfWidth<T>)
    lanes = avx512::cpu_has_avx512bw();
  if constexpr (!std::is_same_v<T, double>) {
    if (lanes && !empty) {
      uint16_t masks[kSmallPlane];
      const int64_t period = periodic_box_masks(L, box, masks);
      avx512::mix_periodic(a, b, out, np * plane, masks, period, w);
      return;
    }
  }
#endif
  std::memcpy(out, a, sizeof(T) * np * plane);
  if (empty) return;
  for (int64_t p = 0; p < np; ++p)
    for (int64_t y = box[0]; y < box[1]; ++y) {
      const int64_t o = p * plane + y * len + box[2];
      blend_span(a + o, b + o, out + o, box[3] - box[2], w);
    }
}

// Forward over units [begin, end) of the flattened (sample, plane) index, samples taken in
// `order` (partner_chain_order of src: x_src_i, read inside box_i, is the next output's x_i).
template <typename T>
void mix_forward_planes(const T* x, T* out, const int64_t* src, const compute_t<T>* w,
                        const int64_t* boxes, const int64_t* order, const MixLayout& L,
                        int64_t begin, int64_t end) {
  const int64_t S = L.sample_size(), plane = L.rows * L.row_len;
  if (plane <= kSmallPlane) {  // the units of one sample in [begin, end) as one run of planes
    for (int64_t u = begin; u < end;) {
      const int64_t i = order[u / L.planes], p = u % L.planes;
      const int64_t np = std::min(end - u, L.planes - p), off = p * plane;
      mix_plane_run(x + i * S + off, x + src[i] * S + off, out + i * S + off, np, L, boxes + 4 * i,
                    w[i]);
      u += np;
    }
    return;
  }
  for (int64_t u = begin; u < end; ++u) {
    const int64_t i = order[u / L.planes], off = i * S + (u % L.planes) * plane;
    const T* b = x + src[i] * S + (off - i * S);
    mix_rows(x + off, b, out + off, L.row_len, boxes + 4 * i, 0, L.rows, w[i]);
  }
}

// Fused local + global mixing, the two-call composition mix(mix(x, src, w, box), src2, w2, None)
// in one pass. With u = mix(x, src, w, box) and k = src2_i, out_i = w2_i u_i + (1 - w2_i) u_k.
// Runs of rows outside both box_i and box_k have u = x there, so they are one blend of x_i and
// x_k. A row crossing a box gets u_i (and/or u_k) formed a window at a time in the caller's
// scratch (2 * kWindow elements, cache-resident), rounded to T exactly as the first call's
// output would be, then blended. On CPUs with AVX-512, float and uint8 (with AVX-512BW and
// every weight in [0, 1]) take mix2_planes_avx512: short spans cost more than the arithmetic on
// 32-wide rows, and lane masks avoid them.
// Bytes: reads x_i, x_k (and their local partners inside the boxes), writes out once; samples
// are taken in partner_chain_order, so x_k is read again from cache as the next x_i, and the
// batch comes from memory about once. stream_output (the caller's choice where mix2_can_stream
// allows it, the same for every unit) writes out past the cache on the AVX-512 paths.
inline bool crosses_box(const int64_t* box, int64_t y) { return box[2] < box[3] && row_in_box(box, y); }

// The first row after y (y < rows) where crosses_box(box, .) changes, or rows: runs of rows are
// found from the box edges: testing every row took 13-20% of mix2 at 256x3x32x32.
inline int64_t box_edge_after(const int64_t* box, int64_t y, int64_t rows) {
  if (box[2] >= box[3] || box[0] >= box[1]) return rows;
  const int64_t edge = y < box[0] ? box[0] : (y < box[1] ? box[1] : rows);
  return edge < rows ? edge : rows;
}

// The end of the run of rows from y on which both boxes' memberships stay as at y.
inline int64_t run_end(const int64_t* bi, const int64_t* bk, int64_t y, int64_t rows) {
  return std::min(box_edge_after(bi, y, rows), box_edge_after(bk, y, rows));
}

// The fused forward's work units: bands of up to kBandBytes of one plane's rows. For float
// images the order is plane, band, then sample along the partner chain, so the partner x_k
// that a unit reads is the next unit's x_i a band later, still in the L1 or L2 cache (whole
// samples as units brought it back three 200 KB planes of traffic later at 64x3x224x224 fp32,
// from the L3 cache; the new order took 6% off mix2 there, and 6% at 256x3x32x32). uint8 keeps
// whole samples in chain order (sample, plane, band): its kernel is bound by the arithmetic of
// its float blend, a sample's traffic fits the L2 cache either way, and the longer streams were
// 6-8% faster. Measured with one thread in a C++ harness, alternating the two orders.
constexpr int64_t kBandBytes = 64 << 10;

struct Mix2Bands {
  int64_t rows, count;  // rows per band, bands per plane
  bool sample_major;
};

template <typename T>
Mix2Bands mix2_bands(const MixLayout& L) {
  const int64_t row_bytes = std::max<int64_t>(1, L.row_len * static_cast<int64_t>(sizeof(T)));
  const int64_t rows = std::clamp<int64_t>(kBandBytes / row_bytes, 1, std::max<int64_t>(1, L.rows));
  return {rows, (L.rows + rows - 1) / rows, std::is_same_v<T, uint8_t>};
}

// The number of work units of mix2_forward_planes.
template <typename T>
int64_t mix2_units(const MixLayout& L) {
  return L.n * L.planes * mix2_bands<T>(L).count;
}

// The pointers of work unit u: sample i, its global partner k = src2_i, both local partners and
// both boxes, and the output, all at the start of the unit's plane; the unit's rows are [y0, y1).
template <typename T>
struct Mix2Unit {
  int64_t i, k;
  const int64_t *bi, *bk;
  const T *xi, *xsi, *xk, *xsk;
  T* o;
  int64_t y0, y1;
};

template <typename T>
Mix2Unit<T> mix2_unit(const T* x, T* out, const int64_t* src, const int64_t* boxes,
                      const int64_t* src2, const int64_t* order, const MixLayout& L,
                      const Mix2Bands& bands, int64_t u) {
  const int64_t per_sample = L.planes * bands.count;  // units of one sample
  const int64_t j = bands.sample_major ? u / per_sample : u % L.n;  // the chain position
  const int64_t b = bands.sample_major ? u % per_sample : u / L.n;  // plane * count + band
  const int64_t band = b % bands.count, plane = b / bands.count;
  const int64_t S = L.sample_size(), i = order[j], k = src2[i];
  const int64_t in_off = plane * L.rows * L.row_len, y0 = band * bands.rows;
  return {i, k, boxes + 4 * i, boxes + 4 * k, x + i * S + in_off, x + src[i] * S + in_off,
          x + k * S + in_off, x + src[k] * S + in_off, out + i * S + in_off, y0,
          std::min(L.rows, y0 + bands.rows)};
}

// Whether mix2_forward_planes can write `out` past the cache (non-temporal stores): on the
// AVX-512 paths (float, and uint8 with AVX-512BW) where rows are whole 16-element steps and the
// output is 64-byte aligned, so every store is a full, aligned one (uint8 with a weight outside
// [0, 1] takes the portable path, through the cache). Whether it should is measured per call
// size: see core/store_choice.h.
template <typename T>
bool mix2_can_stream(const T* out, const MixLayout& L) {
#if defined(METAMIXER_HAVE_AVX512_MIX2)
  const bool aligned = L.row_len % 16 == 0 && reinterpret_cast<uintptr_t>(out) % 64 == 0;
  if constexpr (std::is_same_v<T, float>) return cpu_has_avx512f() && aligned;
  if constexpr (std::is_same_v<T, uint8_t>) return avx512::cpu_has_avx512bw() && aligned;
#endif
  (void)out, (void)L;
  return false;
}

#if defined(METAMIXER_HAVE_AVX512_MIX2)
// mix2_forward_planes for float and uint8 with the AVX-512 row kernels (mix_avx512.h): a plane
// is at most five runs of rows with the same box columns; a run outside both boxes is one blend.
// `stream`: see mix2_can_stream.
template <typename T>
void mix2_planes_avx512(const T* x, T* out, const int64_t* src, const float* w,
                        const int64_t* boxes, const int64_t* src2, const float* w2,
                        const int64_t* order, const MixLayout& L, int64_t begin, int64_t end,
                        bool stream) {
  const int64_t len = L.row_len;
  const Mix2Bands bands = mix2_bands<T>(L);
  for (int64_t u = begin; u < end; ++u) {
    const Mix2Unit<T> p = mix2_unit(x, out, src, boxes, src2, order, L, bands, u);
    for (int64_t y = p.y0; y < p.y1;) {
      const int64_t at = y * len;
      const bool in_i = crosses_box(p.bi, y), in_k = crosses_box(p.bk, y);
      const int64_t ye = run_end(p.bi, p.bk, y, p.y1);
      if (!in_i && !in_k) {  // u = x on both sides: the run is one blend of x_i and x_k
        const int64_t n = (ye - y) * len;
        const int64_t c = stream ? avx512::blend_streamed(p.xi + at, p.xk + at, p.o + at, n, w2[p.i]) : 0;
        blend_span(p.xi + at + c, p.xk + at + c, p.o + at + c, n - c, w2[p.i]);
      } else {  // an empty column range where the run is outside one of the boxes
        avx512::mix2_rows(p.xi + at, p.xsi + at, p.xk + at, p.xsk + at, p.o + at, len, ye - y,
                          in_i ? p.bi[2] : 0, in_i ? p.bi[3] : 0, w[p.i], in_k ? p.bk[2] : 0,
                          in_k ? p.bk[3] : 0, w[p.k], w2[p.i], stream);
      }
      y = ye;
    }
  }
  if (stream) _mm_sfence();  // streamed stores are weakly ordered: done before the caller joins
}
#endif

template <typename T>
void mix2_forward_planes(const T* x, T* out, const int64_t* src, const compute_t<T>* w,
                         const int64_t* boxes, const int64_t* src2, const compute_t<T>* w2,
                         const int64_t* order, const MixLayout& L, T* scratch, int64_t begin,
                         int64_t end, bool stream_output = false) {
  const int64_t len = L.row_len, plane = L.rows * len;
#if defined(METAMIXER_HAVE_AVX512_MIX2)
  if constexpr (std::is_same_v<T, float>) {
    if (cpu_has_avx512f() && plane < (int64_t{1} << 31)) {
      mix2_planes_avx512(x, out, src, w, boxes, src2, w2, order, L, begin, end, stream_output);
      return;
    }
  }
  if constexpr (std::is_same_v<T, uint8_t>) {  // the lane masks hold columns in int32, as above
    if (avx512::cpu_has_avx512bw() && plane < (int64_t{1} << 31) &&
        avx512::weights_in_unit_interval(w, L.n) && avx512::weights_in_unit_interval(w2, L.n)) {
      mix2_planes_avx512(x, out, src, w, boxes, src2, w2, order, L, begin, end, stream_output);
      return;
    }
  }
#endif
  T* ua = scratch;
  T* ub = scratch + kWindow;
  const Mix2Bands bands = mix2_bands<T>(L);
  for (int64_t u = begin; u < end; ++u) {
    const auto [i, k, bi, bk, xi, xsi, xk, xsk, o, y0, y1] =
        mix2_unit(x, out, src, boxes, src2, order, L, bands, u);
    for (int64_t y = y0; y < y1;) {
      const int64_t at = y * len;
      const bool in_i = crosses_box(bi, y), in_k = crosses_box(bk, y);
      if (!in_i && !in_k) {  // a run of rows where u_i = x_i and u_k = x_k
        const int64_t ye = run_end(bi, bk, y, y1);
        blend_span(xi + at, xk + at, o + at, (ye - y) * len, w2[i]);
        y = ye;
        continue;
      }
      for (int64_t cb = 0; cb < len; cb += kWindow) {
        const int64_t ce = cb + kWindow < len ? cb + kWindow : len;
        if (in_i) mix_window(xi + at, xsi + at, ua, cb, ce, bi, y, w[i]);
        if (in_k) mix_window(xk + at, xsk + at, ub, cb, ce, bk, y, w[k]);
        blend_span(in_i ? ua : xi + at + cb, in_k ? ub : xk + at + cb, o + at + cb, ce - cb, w2[i]);
      }
      ++y;
    }
  }
}

// The backward's conversions of a window between fp16/bf16 storage and its float
// accumulators, 16 lanes at a time on AVX-512 CPUs (the scalar fp16 encode dominated the
// backward of a box); they return the count done, the caller converting the rest (and every
// element for the other types).
template <typename T>
int64_t widen_span(const T* src, compute_t<T>* dst, int64_t n) {
#if defined(METAMIXER_HAVE_AVX512_MIX2)
  if constexpr (kHalfWidth<T>)
    if (cpu_has_avx512f()) return avx512::widen_span(src, dst, n);
#endif
  (void)src, (void)dst, (void)n;
  return 0;
}
template <typename T>
int64_t narrow_span(const compute_t<T>* src, T* dst, int64_t n) {
#if defined(METAMIXER_HAVE_AVX512_MIX2)
  if constexpr (kHalfWidth<T>)
    if (cpu_has_avx512f()) return avx512::narrow_span(src, dst, n);
#endif
  (void)src, (void)dst, (void)n;
  return 0;
}

// Destination-major inverse of src: the samples j with src_j = k are
// list[offsets[k] .. offsets[k + 1]), in increasing j (so the sum order is deterministic).
inline void invert_partners(const int64_t* src, int64_t n, std::vector<int64_t>& offsets,
                            std::vector<int64_t>& list) {
  offsets.assign(n + 1, 0);
  for (int64_t j = 0; j < n; ++j) ++offsets[src[j] + 1];
  for (int64_t k = 0; k < n; ++k) offsets[k + 1] += offsets[k];
  list.assign(n, 0);
  std::vector<int64_t> fill(offsets.begin(), offsets.end() - 1);
  for (int64_t j = 0; j < n; ++j) list[fill[src[j]]++] = j;
}

// dot_diff from element c on, given the partial sums `part` of the elements before it.
template <typename T>
acc_t<T> dot_diff_finish(const T* g, const T* a, const T* b, int64_t len, acc_t<T>* part,
                         int64_t c) {
  using C = Compute<T>;
  using A = acc_t<T>;
  for (; c + 8 <= len; c += 8)
    for (int k = 0; k < 8; ++k)
      part[k] += A(C::load(g[c + k])) * (A(C::load(a[c + k])) - A(C::load(b[c + k])));
  for (; c < len; ++c) part[0] += A(C::load(g[c])) * (A(C::load(a[c])) - A(C::load(b[c])));
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

// sum_c g[c] (a[c] - b[c]) over a span, in acc_t<T> with 8 independent partial sums (element c
// into part[c % 8]); float, fp16 and bf16 take AVX-512 where the CPU has it, with the same bits.
template <typename T>
acc_t<T> dot_diff(const T* g, const T* a, const T* b, int64_t len) {
  acc_t<T> part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t c = 0;
#if defined(METAMIXER_HAVE_AVX512_MIX2)
  if constexpr (kWideFloat<T>) {
    if (cpu_has_avx512f()) c = avx512::dot_diff_parts(g, a, b, len, part);
  }
#endif
  return dot_diff_finish(g, a, b, len, part, c);
}

#if defined(METAMIXER_HAVE_AVX512_MIX2)
// The float gather of one window [cb, ce) of row y by avx512::gather_window_f32: false (nothing
// done) when more than kMaxParts partners' boxes cross the row, which the scalar loop then takes.
inline bool gather_window_avx512(const float* g, const int64_t* boxes, const float* w,
                                 const int64_t* partners, int64_t n_partners, int64_t S,
                                 int64_t in_off, int64_t y, const float* gk, float* out,
                                 int64_t cb, int64_t ce, int64_t c0, int64_t c1, float wk) {
  constexpr int64_t kMaxParts = 8;
  avx512::GatherPart parts[kMaxParts];
  int64_t n = 0;
  for (int64_t t = 0; t < n_partners; ++t) {
    const int64_t j = partners[t];
    const int64_t* bj = boxes + 4 * j;
    const int64_t j0 = std::max(bj[2], cb), j1 = std::min(bj[3], ce);
    if (!row_in_box(bj, y) || j0 >= j1) continue;
    if (n == kMaxParts) return false;
    parts[n++] = {g + j * S + in_off + cb, j0, j1, 1.0f - w[j]};
  }
  avx512::gather_window_f32(gk + cb, out + cb, ce - cb, cb, c0, c1, wk, parts, n);
  return true;
}
#endif

// Backward over destination rows [begin, end) of samples taken in `order` (partner_chain_order
// of src: with src a permutation, sample k reads x_src_k and g_j for src_j = k, and the next
// sample, src_k, reads x_src_k again as its own x and g_k as its partner's gradient, both still
// in cache): writes dx for those rows and the row's share of dw (dw_rows, indexed by sample).
// Each row is done in windows of kWindow columns so that the accumulators (`buf`, kWindow of
// them, owned by the calling thread) and the g_k window stay in L1 while the partners'
// gradients are gathered into them and dw's products are taken. A window inside both boxes
// with exactly one partner j (the whole-sample blend of a permutation: the global blend at a
// feature stage) skips `buf`: dx = (w_k g_k) + ((1 - w_j) g_j) in one pass, the same
// operations in the same order as the gather, so the same bits. Other float windows gather
// 16 lanes a step on AVX-512 CPUs (gather_window_avx512), with the scalar loop's bits. dw_rows
// null: dx only (when autograd needs no dw, which also leaves x unread).
template <typename T>
void mix_backward_rows(const T* g, const T* x, const int64_t* src, const compute_t<T>* w,
                       const int64_t* boxes, const int64_t* order, const MixLayout& L,
                       const int64_t* inv_offsets, const int64_t* inv_list, T* dx,
                       acc_t<T>* dw_rows, compute_t<T>* buf, int64_t begin, int64_t end) {
  using C = Compute<T>;
  using CT = compute_t<T>;
  const int64_t per_sample = L.planes * L.rows, S = L.sample_size(), len = L.row_len;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t k = order[r / per_sample], y = r % L.rows;
    const int64_t in_off = (r % per_sample) * len;
    const int64_t* bk = boxes + 4 * k;
    const T* gk = g + k * S + in_off;
    const T* xk = x + k * S + in_off;
    const T* xs = x + src[k] * S + in_off;
    T* out = dx + k * S + in_off;
    const bool k_row = row_in_box(bk, y);
    acc_t<T> dw_share = 0;
    for (int64_t cb = 0; cb < len; cb += kWindow) {
      const int64_t ce = cb + kWindow < len ? cb + kWindow : len;
      const int64_t c0 = k_row ? std::max(bk[2], cb) : cb, c1 = k_row ? std::min(bk[3], ce) : cb;
      if (c0 == cb && c1 == ce && inv_offsets[k + 1] - inv_offsets[k] == 1) {
        const int64_t j = inv_list[inv_offsets[k]];
        const int64_t* bj = boxes + 4 * j;
        if (row_in_box(bj, y) && bj[2] <= cb && bj[3] >= ce) {  // the one-partner path
          const CT wk = w[k], v = CT(1) - w[j];
          const T* gj = g + j * S + in_off;
          acc_t<T> part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
          int64_t done = 0;  // columns from cb on that the AVX-512 loop did (dx and dw's partials)
#if defined(METAMIXER_HAVE_AVX512_MIX2)
          if constexpr (kWideFloat<T>) {
            if (cpu_has_avx512f() && dw_rows)
              done = avx512::one_partner_backward<T, true>(gk + cb, gj + cb, xk + cb, xs + cb,
                                                           out + cb, ce - cb, wk, v, part);
            else if (cpu_has_avx512f())
              done = avx512::one_partner_backward<T, false>(gk + cb, gj + cb, xk + cb, xs + cb,
                                                            out + cb, ce - cb, wk, v, part);
          }
#endif
          for (int64_t c = cb + done; c < ce; ++c)
            out[c] = C::store(C::load(gk[c]) * wk + v * C::load(gj[c]));
          if (dw_rows) dw_share += dot_diff_finish(gk + cb, xk + cb, xs + cb, ce - cb, part, done);
          continue;
        }
      }
      bool gathered = false;  // by the 16-lane gather (the same sums, the same bits)
#if defined(METAMIXER_HAVE_AVX512_MIX2)
      if constexpr (std::is_same_v<T, float>)
        gathered = cpu_has_avx512f() && len < (int64_t{1} << 31) &&
                   gather_window_avx512(g, boxes, w, inv_list + inv_offsets[k],
                                        inv_offsets[k + 1] - inv_offsets[k], S, in_off, y, gk,
                                        out, cb, ce, c0, c1, w[k]);
#endif
      if (!gathered) {
        for (int64_t c = cb + widen_span(gk + cb, buf, ce - cb); c < ce; ++c)
          buf[c - cb] = C::load(gk[c]);
        for (int64_t c = c0; c < c1; ++c) buf[c - cb] = buf[c - cb] * w[k];
        for (int64_t t = inv_offsets[k]; t < inv_offsets[k + 1]; ++t) {
          const int64_t j = inv_list[t];
          const int64_t* bj = boxes + 4 * j;
          if (!row_in_box(bj, y)) continue;
          const CT v = CT(1) - w[j];
          const T* gj = g + j * S + in_off;
          const int64_t j0 = std::max(bj[2], cb), j1 = std::min(bj[3], ce);
          for (int64_t c = j0; c < j1; ++c) buf[c - cb] += v * C::load(gj[c]);
        }
        for (int64_t c = cb + narrow_span(buf, out + cb, ce - cb); c < ce; ++c)
          out[c] = C::store(buf[c - cb]);
      }
      if (dw_rows && c1 > c0) dw_share += dot_diff(gk + c0, xk + c0, xs + c0, c1 - c0);
    }
    if (dw_rows) dw_rows[k * per_sample + r % per_sample] = dw_share;
  }
}

#if defined(METAMIXER_HAVE_AVX512_MIX2)
// Whether mix's backward takes mix_backward_samples: float, fp16 or bf16 on an AVX-512BW CPU,
// boxes on maps of at most kSmallPlane elements (rows > 1: not the whole-sample blend, which
// is one long row).
template <typename T>
bool backward_by_samples(const MixLayout& L) {
  return kWideFloat<T> && avx512::cpu_has_avx512bw() && L.rows > 1 &&
         L.rows * L.row_len <= kSmallPlane;
}

// Partners per pass of mix_backward_samples (their masks live on the stack).
constexpr int64_t kMaxParts = 8;

// The backward over samples [begin, end) of `order` when backward_by_samples: each sample's
// planes are one run (avx512::gather_periodic), its partners with non-empty boxes kMaxParts a
// pass; between passes the float sums wait in dx (float) or in a scratch run (fp16, bf16), so
// dx is rounded once, as the scalar gather rounds it. Writes dx and, if dw is not null,
// dw[k] = the sum over box k of g_k (x_k - x_src_k), in an order fixed per sample (so
// whatever the threads' ranges). (A template so that the binding's dtype dispatch compiles it
// for every T: it does nothing for uint8 and double, which backward_by_samples refuses.)
template <typename T>
void mix_backward_samples(const T* g, const T* x, const int64_t* src, const compute_t<T>* w,
                          const int64_t* boxes, const int64_t* order, const MixLayout& L,
                          const int64_t* inv_offsets, const int64_t* inv_list, T* dx,
                          acc_t<T>* dw, int64_t begin, int64_t end) {
  if constexpr (kWideFloat<T>) {
    const int64_t S = L.sample_size();
    uint16_t mk[kSmallPlane], mj[kMaxParts][kSmallPlane];
    avx512::PeriodicPart<T> parts[kMaxParts];
    std::vector<float> scratch;  // fp16/bf16 sums between passes (more than kMaxParts partners)
    auto has_box = [boxes](int64_t j) {
      const int64_t* b = boxes + 4 * j;
      return b[0] < b[1] && b[2] < b[3];
    };
    for (int64_t pos = begin; pos < end; ++pos) {
      const int64_t k = order[pos];
      const int64_t period = periodic_box_masks(L, boxes + 4 * k, mk);
      int64_t todo = 0;  // partners with a box
      for (int64_t t = inv_offsets[k]; t < inv_offsets[k + 1]; ++t) todo += has_box(inv_list[t]);
      float* sums = nullptr;
      if constexpr (std::is_same_v<T, float>) sums = dx + k * S;
      else if (todo > kMaxParts) scratch.resize(S), sums = scratch.data();
      int64_t t = inv_offsets[k];
      for (bool first = true; first || todo > 0; first = false) {
        int64_t n = 0;  // the next pass's partners
        for (; t < inv_offsets[k + 1] && n < kMaxParts; ++t) {
          const int64_t j = inv_list[t];
          if (!has_box(j)) continue;
          periodic_box_masks(L, boxes + 4 * j, mj[n]);
          parts[n] = {g + j * S, mj[n], 1.0f - w[j]};
          ++n;
        }
        todo -= n;
        const float share =
            avx512::gather_periodic(first, todo == 0, first && dw, g + k * S, x + k * S,
                                    x + src[k] * S, sums, dx + k * S, S, mk, period, w[k], parts, n);
        if (first && dw) dw[k] = share;
      }
    }
  }
}
#endif

// dw_i = sum of the row shares of sample i, in row order.
template <typename A>
void reduce_dw_rows(const A* dw_rows, const MixLayout& L, A* dw) {
  const int64_t per_sample = L.planes * L.rows;
  for (int64_t i = 0; i < L.n; ++i) {
    A s = 0;
    for (int64_t r = 0; r < per_sample; ++r) s += dw_rows[i * per_sample + r];
    dw[i] = s;
  }
}

}  // namespace metamixer::core

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
