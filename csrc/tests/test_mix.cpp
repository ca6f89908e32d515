// Unit tests of the torch-free mix core (csrc/core/mix.h), run by ctest.
// Expectations are hand-derived on small cases; the Python tests compare every backend with
// metamixer_fast/reference.py on random inputs.
#include <cmath>
#include <cstdio>
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <utility>
#include <vector>

#include "core/mix.h"

namespace core = metamixer::core;

namespace {

int failures = 0;

void expect(bool ok, const char* what) {
  if (!ok) {
    std::printf("FAIL %s\n", what);
    ++failures;
  }
}

template <typename T>
std::vector<T> forward(const std::vector<T>& x, const std::vector<int64_t>& src,
                       const std::vector<core::compute_t<T>>& w, const std::vector<int64_t>& boxes,
                       const core::MixLayout& L) {
  std::vector<T> out(x.size());
  // three parts, as three threads would split the (sample, plane) units (the cuts fall inside a
  // sample wherever the planes allow)
  const int64_t units = L.n * L.planes;
  const std::vector<int64_t> order = core::partner_chain_order(src.data(), L.n);
  for (int64_t part = 0; part < 3; ++part)
    core::mix_forward_planes(x.data(), out.data(), src.data(), w.data(), boxes.data(), order.data(),
                             L, units * part / 3, units * (part + 1) / 3);
  return out;
}

// NCHW 2 x 2 x 3 x 4: sample 0 pastes rows [1, 3) x cols [1, 3) of sample 1 (w = 0); sample 1
// is untouched (empty box), and x is never written.
void test_cutmix_copies_exactly() {
  core::MixLayout L;
  L.n = 2, L.planes = 2, L.rows = 3, L.row_len = 4;
  std::vector<float> x(48);
  for (int i = 0; i < 48; ++i) x[i] = 0.1f * i - 1.7f;
  const std::vector<float> before = x;
  const std::vector<int64_t> boxes = {1, 3, 1, 3, 0, 0, 0, 0};
  const auto out = forward<float>(x, {1, 0}, {0.0f, 0.5f}, boxes, L);
  for (int i = 0; i < 48; ++i) {
    const int s = i / 24, r = (i / 4) % 3, c = i % 4;
    const bool inside = s == 0 && r >= 1 && r < 3 && c >= 1 && c < 3;
    expect(out[i] == (inside ? x[i + 24] : x[i]), "cutmix element");
  }
  expect(x == before, "x unchanged");
}

// uint8 blends round half to even: 0.5*1 + 0.5*2 = 1.5 -> 2, 0.5*2 + 0.5*3 = 2.5 -> 2,
// 0.5*254 + 0.5*255 = 254.5 -> 254; a self-pair with w = 0.3 gives back the pixel.
void test_uint8_rounds_half_to_even() {
  core::MixLayout L;
  L.n = 2, L.row_len = 3;
  const std::vector<uint8_t> x = {1, 2, 254, 2, 3, 255};
  const std::vector<int64_t> whole = {0, 1, 0, 3, 0, 1, 0, 3};
  const auto out = forward<uint8_t>(x, {1, 0}, {0.5f, 0.5f}, whole, L);
  expect(out[0] == 2 && out[1] == 2 && out[2] == 254, "round half even");
  const auto self = forward<uint8_t>(x, {0, 1}, {0.3f, 0.3f}, whole, L);
  expect(self == x, "uint8 self pair");
  expect(core::Compute<uint8_t>::store(-0.4f) == 0 && core::Compute<uint8_t>::store(255.4f) == 255,
         "uint8 clamp");
}

// The uint8 blend of the pixel pair (i & 255, i >> 8) at w, by the scalar formula.
std::vector<uint8_t> scalar_u8_pairs(float w) {
  std::vector<uint8_t> want(65536);
  for (int i = 0; i < 65536; ++i) {
    const float lhs = w * static_cast<float>(i & 255), rhs = (1.0f - w) * static_cast<float>(i >> 8);
    want[i] = core::Compute<uint8_t>::store(lhs + rhs);
  }
  return want;
}

// Every path equals the scalar formula for every pixel pair: the dispatched one (blend_span,
// which routes w outside [0, 1] away from the AVX-512 kernel), SSE2, and the AVX-512 kernel
// directly at 2000 weights in [0, 1] (its biased-float arithmetic must round each product and
// the sum as the scalar floats do; subnormal, tiny and near-1 weights included).
void test_uint8_simd_equals_scalar() {
  std::vector<uint8_t> a(65536 + 5), b(65536 + 5), out(65536 + 5);
  for (int i = 0; i < 65536 + 5; ++i) a[i] = static_cast<uint8_t>(i & 255), b[i] = static_cast<uint8_t>(i >> 8);
  for (float w : {0.5f, 0.25f, 0.1f, 0.3f, 0.7f, 0.999f, 1e-4f, -0.5f, 1.5f, -3.25f}) {
    core::blend_span(a.data(), b.data(), out.data(), 65536 + 5, w);
    const std::vector<uint8_t> want = scalar_u8_pairs(w);
    expect(std::equal(want.begin(), want.end(), out.begin()) && out[65536 + 4] == want[4],
           "uint8 blend_span == scalar");
#if defined(__SSE2__)
    // the SSE2 path directly (blend_span takes a wider one on CPUs that have it)
    std::vector<uint8_t> sse(65536);
    for (int c = 0; c < 65536; c += 16)
      core::blend16_u8(a.data() + c, b.data() + c, sse.data() + c, _mm_set1_ps(w), _mm_set1_ps(1.0f - w));
    expect(std::equal(sse.begin(), sse.end(), want.begin()), "uint8 sse2 == scalar");
#endif
  }
#if defined(METAMIXER_HAVE_AVX512_MIX2)
  if (!core::cpu_has_avx512f()) return;
  std::vector<float> weights = {0.0f, -0.0f, 1.0f, 0.5f, 0.25f, 1e-40f, 1e-30f, 5.9604645e-8f,
                                0.99999994f, 0.50000006f, 0.49999997f};
  uint32_t state = 7u;
  while (weights.size() < 2000) {
    state = state * 1664525u + 1013904223u;
    weights.push_back(static_cast<float>(state >> 8) * 0x1p-24f);  // uniform in [0, 1)
  }
  int wrong = 0;
  for (float w : weights) {
    core::avx512::blend_u8(a.data(), b.data(), out.data(), 65536, w);
    const std::vector<uint8_t> want = scalar_u8_pairs(w);
    wrong += !std::equal(want.begin(), want.end(), out.begin());
  }
  expect(wrong == 0, "uint8 avx512 == scalar at 2000 weights");
#endif
}

#if defined(METAMIXER_HAVE_AVX2_PATH)
// Each wide path the CPU has, called directly (blend_span dispatches to only the widest one),
// equals the scalar formula bit for bit, special float values included.
void test_wide_blend_paths_equal_scalar() {
  const int64_t len = 16 * 40 + 7;
  std::vector<float> a(len), b(len), want(len), got(len);
  std::vector<uint8_t> a8(len), b8(len), want8(len), got8(len);
  for (int64_t i = 0; i < len; ++i) {
    a[i] = std::sin(0.37f * i) * 1e3f, b[i] = std::cos(0.11f * i) * 1e-3f;
    a8[i] = static_cast<uint8_t>(i * 7), b8[i] = static_cast<uint8_t>(255 - i * 3);
  }
  a[3] = INFINITY, b[5] = NAN, a[9] = -0.0f, b[9] = -0.0f, b[17] = 1e-40f;
  for (float w : {0.0f, 1.0f, 0.3f, 0.999f}) {
    for (int64_t i = 0; i < len; ++i) {
      want[i] = w * a[i] + (1.0f - w) * b[i];
      want8[i] = core::Compute<uint8_t>::store(w * float(a8[i]) + (1.0f - w) * float(b8[i]));
    }
    auto same = [&](int64_t n) { return std::memcmp(got.data(), want.data(), sizeof(float) * n) == 0; };
    if (core::cpu_has_avx2()) {
      expect(same(core::blend_f32_avx2(a.data(), b.data(), got.data(), len, w)), "float avx2 == scalar");
      int64_t n8 = 0;
      core::blend_u8_avx2(a8.data(), b8.data(), got8.data(), len, w, &n8);
      expect(std::equal(got8.begin(), got8.begin() + n8, want8.begin()), "uint8 avx2 == scalar");
    }
    if (core::cpu_has_avx512f()) {
      expect(same(core::avx512::blend_f32(a.data(), b.data(), got.data(), len, w)), "float avx512 == scalar");
      const int64_t n8 = core::avx512::blend_u8(a8.data(), b8.data(), got8.data(), len, w);
      expect(n8 > 0 && std::equal(got8.begin(), got8.begin() + n8, want8.begin()), "uint8 avx512 == scalar");
    }
  }
}
#endif

#if defined(METAMIXER_HAVE_AVX512_MIX2)
// The AVX-512 fp16 and bf16 paths equal the scalar formulas of half.h bit for bit: the blend
// over every 16-bit pattern (NaNs of both signs and payloads, infinities, subnormals, values
// that round to inf), and the whole-sample backward's dx and dw partial sums on finite values
// (see `same` for two NaN operands).
template <typename H>
void check_16bit_paths_equal_scalar() {
  if (!core::cpu_has_avx512f()) return;
  using C = core::Compute<H>;
  const int64_t len = 65536 + 7;
  std::vector<H> a(len), b(len), got(len), want(len), fa(len), fb(len), fg(len);
  // fa, fb, fg: values of magnitude below 2 (the exponent's top bit cleared), whose products
  // and sums stay finite
  auto small = [](uint32_t bits) { return H{static_cast<uint16_t>(bits & 0xBFFFu)}; };
  for (int64_t i = 0; i < len; ++i) {
    a[i].bits = static_cast<uint16_t>(i), b[i].bits = static_cast<uint16_t>(i * 40503u + 17u);
    fa[i] = small(a[i].bits), fb[i] = small(b[i].bits), fg[i] = small((i * 2654435761u) >> 9);
  }
  const int64_t steps = len / 16 * 16;
  // equal bits; where both operands are NaN, any NaN: which one's sign the sum keeps is the
  // compiler's choice of operand order, in the scalar loop as in the vector one
  auto same = [&](int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
      const bool two_nans = std::isnan(C::load(a[i])) && std::isnan(C::load(b[i]));
      if (got[i].bits != want[i].bits && !(two_nans && std::isnan(C::load(got[i]))))
        return false;
    }
    return true;
  };
  for (float w : {0.0f, 1.0f, 0.3f, 0.999f, 0.5f}) {
    for (int64_t i = 0; i < len; ++i) {
      const float lhs = w * C::load(a[i]), rhs = (1.0f - w) * C::load(b[i]);
      want[i] = C::store(lhs + rhs);
    }
    const int64_t n = core::avx512::blend_16bit(a.data(), b.data(), got.data(), len, w);
    expect(n == steps && same(n), "16-bit avx512 blend == scalar");
    const float v = 1.0f - w;
    for (int64_t i = 0; i < len; ++i) want[i] = C::store(C::load(fg[i]) * w + v * C::load(fb[i]));
    float part[8] = {0, 0, 0, 0, 0, 0, 0, 0}, scalar[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    const int64_t m = core::avx512::one_partner_backward<H, true>(fg.data(), fb.data(), fa.data(), fb.data(),
                                                                   got.data(), len, w, v, part);
    expect(m == steps && same(m), "16-bit avx512 one-partner dx == scalar");
    const float dw = core::dot_diff_finish(fg.data(), fa.data(), fb.data(), m, part, m);
    const float want_dw = core::dot_diff_finish(fg.data(), fa.data(), fb.data(), m, scalar, 0);
    expect(std::memcmp(&dw, &want_dw, 4) == 0 && std::isfinite(dw), "16-bit avx512 dw partials == scalar");
  }
}

void test_16bit_paths_equal_scalar() {
  check_16bit_paths_equal_scalar<core::Half>();
  check_16bit_paths_equal_scalar<core::BFloat16>();
}
#endif

// channels_last view: rows = H, row_len = W*C, columns scaled by C.
void test_channels_last_box() {
  const int C = 3, H = 2, W = 3;
  core::MixLayout L;
  L.n = 2, L.rows = H, L.row_len = W * C;
  std::vector<double> x(2 * H * W * C);
  for (size_t i = 0; i < x.size(); ++i) x[i] = std::sin(1.0 + i);
  const std::vector<int64_t> boxes = {0, 1, 1 * C, 2 * C, 0, 2, 0, 3 * C};
  const auto out = forward<double>(x, {1, 0}, {0.25, 1.0}, boxes, L);
  for (int h = 0; h < H; ++h)
    for (int wc = 0; wc < W * C; ++wc) {
      const int i = h * W * C + wc;
      const bool inside = h == 0 && wc / C == 1;
      const double want = inside ? 0.25 * x[i] + 0.75 * x[i + H * W * C] : x[i];
      expect(out[i] == want, "channels_last sample 0");
      expect(out[i + H * W * C] == 1.0 * x[i + H * W * C] + 0.0 * x[i], "w = 1 copy");
    }
}

void test_half_and_bfloat16_conversions() {
  const float values[] = {0.0f, -0.0f, 1.0f, -2.5f, 65504.0f, 6.1035156e-05f, 5.9604645e-08f,
                          3.140625f, 1e-3f};
  for (float v : values) {
    expect(core::to_float(core::to_half(v)) == v || std::fabs(v) == 1e-3f, "half round trip");
    const float b = core::to_float(core::to_bfloat16(v));
    expect(std::fabs(b - v) <= std::fabs(v) * (1.0f / 256), "bf16 round trip");
  }
  // ties to even: 1 + 2^-11 is half-way between two halves -> 1; 1 + 3 * 2^-11 -> 1 + 2^-9
  expect(core::to_float(core::to_half(1.0f + std::ldexp(1.0f, -11))) == 1.0f, "half tie even");
  expect(core::to_float(core::to_half(1.0f + 3 * std::ldexp(1.0f, -11))) ==
             1.0f + std::ldexp(1.0f, -9), "half tie up");
  expect(core::to_half(1e6f).bits == 0x7C00, "half overflow to inf");
  expect(std::isnan(core::to_float(core::to_half(NAN))), "half nan");
  expect(core::to_bfloat16(1.0f + std::ldexp(1.0f, -8)).bits == 0x3F80, "bf16 tie even");
  expect(std::isnan(core::to_float(core::to_bfloat16(NAN))), "bf16 nan");
}

// The fused forward's order follows the partner chains and visits every sample exactly once,
// also when src2 repeats partners or pairs a sample with itself.
void test_partner_chain_order() {
  const std::vector<int64_t> cycle = {3, 0, 4, 1, 2}, repeats = {2, 2, 0, 1, 3}, self = {0, 2, 1};
  expect(core::partner_chain_order(cycle.data(), 5) == std::vector<int64_t>({0, 3, 1, 2, 4}),
         "chain order follows i -> src2_i");
  expect(core::partner_chain_order(repeats.data(), 5) == std::vector<int64_t>({0, 2, 1, 3, 4}),
         "chain order with repeated partners");
  expect(core::partner_chain_order(self.data(), 3) == std::vector<int64_t>({0, 1, 2}),
         "chain order with a self-pair");
}

// Backward with repeated partners and a self-pair, features [N = 3, D = 2], whole boxes:
// src = (1, 1, 2): dx_0 = w0 g0; dx_1 = w1 g1 + (1-w0) g0 + (1-w1) g1; dx_2 = w2 g2 + (1-w2) g2.
void test_backward_gathers_repeats() {
  core::MixLayout L;
  L.n = 3, L.row_len = 2;
  const std::vector<double> x = {1, 2, 3, 5, 7, 11}, g = {0.5, -1, 2, 0.25, -3, 4};
  const std::vector<int64_t> src = {1, 1, 2}, boxes = {0, 1, 0, 2, 0, 1, 0, 2, 0, 1, 0, 2};
  const std::vector<double> w = {0.25, 0.5, 0.75};
  std::vector<int64_t> offsets, list;
  core::invert_partners(src.data(), 3, offsets, list);
  expect(offsets == std::vector<int64_t>({0, 0, 2, 3}) && list == std::vector<int64_t>({0, 1, 2}),
         "inverse of src");
  std::vector<double> dx(6), dw_rows(3), dw(3), buf(core::kWindow);
  const std::vector<int64_t> order = core::partner_chain_order(src.data(), 3);
  core::mix_backward_rows(g.data(), x.data(), src.data(), w.data(), boxes.data(), order.data(), L,
                          offsets.data(), list.data(), dx.data(), dw_rows.data(), buf.data(), 0, 3);
  core::reduce_dw_rows(dw_rows.data(), L, dw.data());
  for (int d = 0; d < 2; ++d) {
    expect(std::fabs(dx[d] - 0.25 * g[d]) < 1e-15, "dx_0");
    expect(std::fabs(dx[2 + d] - (0.5 * g[2 + d] + 0.75 * g[d] + 0.5 * g[2 + d])) < 1e-15, "dx_1");
    expect(std::fabs(dx[4 + d] - g[4 + d]) < 1e-15, "dx_2 self pair");
  }
  expect(std::fabs(dw[0] - (0.5 * (1 - 3) + -1 * (2 - 5))) < 1e-15, "dw_0");
  expect(std::fabs(dw[1]) < 1e-15 && std::fabs(dw[2]) < 1e-15, "dw of self pairs is 0");
}

// dw only sums inside the box; dot_diff's 8-way split handles lengths that are not multiples of 8.
void test_dw_inside_box_only() {
  core::MixLayout L;
  L.n = 2, L.rows = 2, L.row_len = 19;
  std::vector<float> x(76), g(76, 1.0f);
  for (int i = 0; i < 76; ++i) x[i] = static_cast<float>(i % 7);
  const std::vector<int64_t> src = {1, 0}, boxes = {1, 2, 2, 13, 0, 0, 0, 0};
  const std::vector<float> w = {0.5f, 0.5f};
  std::vector<int64_t> offsets, list;
  core::invert_partners(src.data(), 2, offsets, list);
  std::vector<float> dx(76), dw_rows(4), dw(2), buf(core::kWindow);
  const std::vector<int64_t> order = core::partner_chain_order(src.data(), 2);
  core::mix_backward_rows(g.data(), x.data(), src.data(), w.data(), boxes.data(), order.data(), L,
                          offsets.data(), list.data(), dx.data(), dw_rows.data(), buf.data(), 0, 4);
  core::reduce_dw_rows(dw_rows.data(), L, dw.data());
  float want = 0;
  for (int c = 2; c < 13; ++c) want += x[19 + c] - x[38 + 19 + c];
  expect(std::fabs(dw[0] - want) < 1e-5f, "dw box");
  expect(dw[1] == 0.0f, "dw empty box");
  expect(dx[19 + 5] == 0.5f && dx[38 + 19 + 5] == 1.5f && dx[0] == 1.0f, "dx box");
}

// The gather over rows that cross boxes (repeated partners, several row widths, boxes cut
// anywhere, special values in the gradient) equals the scalar formula bit for bit: on an AVX-512
// CPU this is the masked 16-lane path for float, elsewhere (and for fp16 and bf16, whose windows
// convert 16 lanes at a time on AVX-512) the scalar one.
template <typename T>
void check_backward_box_rows_exact() {
  using C = core::Compute<T>;
  for (int64_t W : {5, 13, 16, 21, 37}) {
    core::MixLayout L;
    const int64_t n = 5, P = 2, H = 6;
    L.n = n, L.planes = P, L.rows = H, L.row_len = W;
    const int64_t S = P * H * W;
    std::vector<T> x(n * S), g(n * S);
    for (int64_t c = 0; c < n * S; ++c) {
      x[c] = C::store(static_cast<float>((c * 37) % 101) / 7.0f);
      g[c] = C::store(static_cast<float>((c * 53) % 89) / 3.0f - 13.0f);
    }
    g[3] = C::store(INFINITY), g[S + 7] = C::store(NAN), g[2 * S + 1] = C::store(-0.0f);
    g[3 * S + 2] = C::store(1e-40f);
    const std::vector<int64_t> src = {1, 1, 3, 0, 1};  // sample 1 is the partner of 0, 1 and 4
    const std::vector<int64_t> boxes = {0, 4, 1, W - 1, 2, 6, 0, W, 1, 3, W / 2, W,
                                        0, 6, 0, 2, 3, 5, 1, W / 3 + 1};
    const std::vector<float> w = {0.3f, 0.0f, 0.8f, 1.0f, 0.45f};
    std::vector<int64_t> offsets, list;
    core::invert_partners(src.data(), n, offsets, list);
    std::vector<T> dx(n * S);
    std::vector<float> buf(core::kWindow);
    const std::vector<int64_t> order = core::partner_chain_order(src.data(), n);
    core::mix_backward_rows(g.data(), x.data(), src.data(), w.data(), boxes.data(), order.data(),
                            L, offsets.data(), list.data(), dx.data(), nullptr, buf.data(), 0,
                            L.total_rows());
    auto in_box = [&](int64_t i, int64_t y, int64_t c) {
      const int64_t* b = boxes.data() + 4 * i;
      return y >= b[0] && y < b[1] && c >= b[2] && c < b[3];
    };
    bool exact = true;
    for (int64_t k = 0; k < n; ++k)
      for (int64_t p = 0; p < P * H; ++p)
        for (int64_t c = 0; c < W; ++c) {
          const int64_t y = p % H, at = p * W + c;
          float sum = C::load(g[k * S + at]);
          if (in_box(k, y, c)) sum = sum * w[k];
          for (int64_t j = 0; j < n; ++j)
            if (src[j] == k && in_box(j, y, c)) sum = sum + (1.0f - w[j]) * C::load(g[j * S + at]);
          const T want = C::store(sum);
          exact = exact && std::memcmp(&dx[k * S + at], &want, sizeof(T)) == 0;
        }
    expect(exact, "backward over box rows == the gather formula, bit for bit");
  }
}

void test_backward_box_rows_exact() {
  check_backward_box_rows_exact<float>();
  check_backward_box_rows_exact<core::Half>();
  check_backward_box_rows_exact<core::BFloat16>();
}

// The backward's one-partner path (a window inside both boxes with exactly one j, src_j = k,
// the whole-sample blend of a permutation) writes dx_k = (w_k g_k) + ((1 - w_j) g_j) in one
// pass, bit for bit what the general path's gather gives; rows over two windows (D > kWindow),
// one sample with a partial box (general path in the same call), and an inf in g.
void test_backward_one_partner_path_exact() {
  core::MixLayout L;
  const int64_t D = core::kWindow + 904;
  L.n = 3, L.row_len = D;
  std::vector<float> x(3 * D), g(3 * D);
  for (int64_t c = 0; c < 3 * D; ++c) {
    x[c] = static_cast<float>((c * 37) % 101) / 7.0f;
    g[c] = static_cast<float>((c * 53) % 89) / 3.0f - 13.0f;
  }
  g[5] = INFINITY;
  const std::vector<int64_t> src = {1, 2, 0}, boxes = {0, 1, 0, D, 0, 1, 0, D, 0, 1, 7, D - 3};
  const std::vector<float> w = {0.3f, 0.55f, 0.8f};
  std::vector<int64_t> offsets, list;
  core::invert_partners(src.data(), 3, offsets, list);
  std::vector<float> dx(3 * D), dw_rows(3), buf(core::kWindow);
  const std::vector<int64_t> order = core::partner_chain_order(src.data(), 3);
  core::mix_backward_rows(g.data(), x.data(), src.data(), w.data(), boxes.data(), order.data(), L,
                          offsets.data(), list.data(), dx.data(), dw_rows.data(), buf.data(), 0, 3);
  bool exact = true;
  for (int64_t k = 0; k < 3; ++k) {
    const int64_t j = (k + 2) % 3;  // src_j = k
    const int64_t* bk = boxes.data() + 4 * k;
    const int64_t* bj = boxes.data() + 4 * j;
    for (int64_t c = 0; c < D; ++c) {
      float want = g[k * D + c];
      if (c >= bk[2] && c < bk[3]) want = want * w[k];
      if (c >= bj[2] && c < bj[3]) want = want + (1.0f - w[j]) * g[j * D + c];
      const float got = dx[k * D + c];
      exact = exact && (std::memcmp(&got, &want, sizeof(float)) == 0);
    }
  }
  expect(exact, "backward one-partner path == gather, bit for bit");
  // dw: the windows' dot_diff shares, each by the scalar loop alone (the AVX-512 one-partner loop
  // and dot_diff must give its bits)
  for (int64_t k = 0; k < 3; ++k) {
    const int64_t* bk = boxes.data() + 4 * k;
    float want = 0.0f;
    for (int64_t cb = 0; cb < D; cb += core::kWindow) {
      const int64_t c0 = std::max(bk[2], cb), c1 = std::min(bk[3], std::min(cb + core::kWindow, D));
      float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      const float* gk = g.data() + k * D;
      if (c1 > c0)
        want += core::dot_diff_finish(gk + c0, x.data() + k * D + c0, x.data() + src[k] * D + c0,
                                      c1 - c0, part, 0);
    }
    expect(std::memcmp(&dw_rows[k], &want, sizeof(float)) == 0, "backward dw == scalar dot_diff");
  }
}

#if defined(METAMIXER_HAVE_AVX512_MIX2)
// mix_backward_samples (boxes on small maps, AVX-512BW CPUs; float, fp16, bf16): dx equals the
// gather formula bit for bit (one rounding to T at the end) and dw the box sum within float
// rounding, on planes of every gcd with 16 (the periodic
// masks), with 11 samples sharing one partner (two batches of partners, the second adding to
// what the first stored), empty and full boxes, and the samples split across three ranges.
template <typename T>
void check_backward_samples_exact() {
  using C = core::Compute<T>;
  if (!core::avx512::cpu_has_avx512bw()) return;
  for (auto [H, W] : {std::pair<int64_t, int64_t>{4, 4}, {7, 7}, {2, 3}, {8, 12}, {32, 32}}) {
    core::MixLayout L;
    const int64_t n = 14, P = 3, S = P * H * W;
    L.n = n, L.planes = P, L.rows = H, L.row_len = W;
    expect(core::backward_by_samples<T>(L), "small maps take mix_backward_samples");
    std::vector<T> x(n * S), g(n * S);
    uint32_t state = 99u + static_cast<uint32_t>(H * 100 + W);
    auto next = [&state] { return state = state * 1664525u + 1013904223u; };
    for (int64_t c = 0; c < n * S; ++c) {
      x[c] = C::store(static_cast<float>(int(next() % 201) - 100) / 7.0f);
      g[c] = C::store(static_cast<float>(int(next() % 179) - 89) / 3.0f);
    }
    g[3] = C::store(-0.0f), g[S + 1] = C::store(1e-40f);
    std::vector<int64_t> src(n, 0), boxes(4 * n);
    std::vector<float> w(n);
    for (int64_t i = 0; i < n; ++i) {
      src[i] = i < 11 ? 0 : i - 10;  // samples 0-10 all take sample 0 as their partner
      const int64_t y0 = next() % H, c0 = next() % W;
      const int64_t y1 = y0 + 1 + next() % (H - y0), c1 = c0 + 1 + next() % (W - c0);
      int64_t* b = &boxes[4 * i];
      b[0] = y0, b[1] = y1, b[2] = c0, b[3] = c1;
      w[i] = static_cast<float>(next() % 1000) / 999.0f;
    }
    boxes[4 * 2 + 1] = boxes[4 * 2];                   // sample 2: an empty box
    boxes[4 * 3] = 0, boxes[4 * 3 + 1] = H;            // sample 3: the whole map
    boxes[4 * 3 + 2] = 0, boxes[4 * 3 + 3] = W;
    std::vector<int64_t> offsets, list;
    core::invert_partners(src.data(), n, offsets, list);
    const std::vector<int64_t> order = core::partner_chain_order(src.data(), n);
    std::vector<T> dx(n * S);
    std::vector<float> dw(n);
    for (int64_t part = 0; part < 3; ++part)
      core::mix_backward_samples(g.data(), x.data(), src.data(), w.data(), boxes.data(),
                                 order.data(), L, offsets.data(), list.data(), dx.data(),
                                 dw.data(), n * part / 3, n * (part + 1) / 3);
    auto in_box = [&](int64_t i, int64_t at) {
      const int64_t* b = boxes.data() + 4 * i;
      const int64_t y = (at / W) % H, c = at % W;
      return y >= b[0] && y < b[1] && c >= b[2] && c < b[3];
    };
    bool exact = true, close = true;
    for (int64_t k = 0; k < n; ++k) {
      double want_dw = 0.0, scale = 0.0;
      for (int64_t at = 0; at < S; ++at) {
        float sum = C::load(g[k * S + at]);
        if (in_box(k, at)) {
          const double xk = C::load(x[k * S + at]), xs = C::load(x[src[k] * S + at]);
          const double term = double(sum) * (xk - xs);
          want_dw += term, scale += std::fabs(term);
          sum = sum * w[k];
        }
        for (int64_t j = 0; j < n; ++j)
          if (src[j] == k && in_box(j, at)) sum = sum + (1.0f - w[j]) * C::load(g[j * S + at]);
        const T want = C::store(sum);
        exact = exact && std::memcmp(&dx[k * S + at], &want, sizeof(T)) == 0;
      }
      close = close && std::fabs(dw[k] - want_dw) <= 1e-5 * scale + 1e-6;
    }
    expect(exact, "backward by samples: dx == the gather formula, bit for bit");
    expect(close, "backward by samples: dw == the box sum");
  }
}

void test_backward_samples_exact() {
  check_backward_samples_exact<float>();
  check_backward_samples_exact<core::Half>();
  check_backward_samples_exact<core::BFloat16>();
}
#endif

// dot_diff (AVX-512 for float where the CPU has it) gives the scalar loop's bits at every length.
void test_dot_diff_equals_scalar() {
  std::vector<float> g(5000), a(5000), b(5000);
  for (int64_t c = 0; c < 5000; ++c) {
    g[c] = std::sin(0.7f * c) * 3.0f, a[c] = std::cos(0.3f * c) * 1e3f, b[c] = 1e-3f * c;
  }
  a[40] = -0.0f, b[40] = 0.0f, g[41] = 1e-40f;
  bool same = true;
  for (int64_t len : {0, 5, 8, 15, 16, 17, 31, 33, 100, 4096, 4999}) {
    float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    const float want = core::dot_diff_finish(g.data(), a.data(), b.data(), len, part, 0);
    const float got = core::dot_diff(g.data(), a.data(), b.data(), len);
    same = same && std::memcmp(&got, &want, sizeof(float)) == 0;
  }
  expect(same, "dot_diff == scalar loop, bit for bit");
}

// mix_forward_planes (AVX-512 lane masks for box rows, and for runs of small planes, where the
// CPU has it) equals the formula element by element, bit for bit: widths around the 16-lane
// step and past a 512-column chunk, planes of sizes with every gcd with 16, small ones (the
// runs of mix_plane_run) and large ones, boxes with edges anywhere, w in {0, -0, 1, other}, and
// special values (signed zeros for float, inf, NaN; for fp16 and bf16 a NaN with a payload,
// which a copy must keep).
template <typename T>
void check_mix_forward_equals_formula(int64_t width, int64_t rows) {
  using C = core::Compute<T>;
  core::MixLayout L;
  L.n = 4, L.planes = 3, L.rows = rows, L.row_len = width;
  std::vector<T> x(L.n * L.sample_size());
  uint32_t state = 777u + static_cast<uint32_t>(width * 31 + rows);
  auto next = [&state] { return state = state * 1664525u + 1013904223u; };
  if constexpr (std::is_same_v<T, float>) {
    for (auto& v : x) v = next() % 4 == 0 ? (next() % 2 ? -0.0f : 0.0f) : 0.25f * (int(next() % 41) - 20);
    x[2] = INFINITY, x[width] = NAN;
  } else if constexpr (std::is_same_v<T, uint8_t>) {
    for (auto& v : x) v = static_cast<T>(next() % 256);
  } else {  // fp16, bf16: values with fractions, an infinity, and a NaN with a payload
    for (auto& v : x) v = C::store(0.37f * static_cast<float>(int(next() % 201) - 100));
    x[2].bits = 0x7C00, x[width].bits = 0xFF81;
  }
  const std::vector<int64_t> src = {1, 2, 3, 0};
  const std::vector<float> w = {0.0f, -0.0f, 0.3f, 1.0f};
  const int64_t c = width / 3, d = std::max<int64_t>(width - 2, c + 1);
  const int64_t r0 = std::min<int64_t>(1, rows - 1), r1 = std::min<int64_t>(4, rows);
  const std::vector<int64_t> boxes = {r0, r1, c, d, 0, rows, 1 % width, width, r0, r0 + 1, 0, 1,
                                      0, rows, c, d};
  const auto got = forward<T>(x, src, w, boxes, L);
  bool exact = true;
  const int64_t S = L.sample_size();
  for (int64_t i = 0; i < L.n; ++i)
    for (int64_t p = 0; p < S; ++p) {
      const int64_t y = (p / width) % L.rows, col = p % width;
      const int64_t* b = &boxes[4 * i];
      const bool in = y >= b[0] && y < b[1] && col >= b[2] && col < b[3];
      const float a = C::load(x[i * S + p]), o = C::load(x[src[i] * S + p]);
      const float lhs = w[i] * a, rhs = (1.0f - w[i]) * o;
      const T want = in ? C::store(lhs + rhs) : x[i * S + p];
      const T have = got[i * S + p];
      // a copy keeps its bits, NaN payloads included; a blend of NaNs may give any NaN
      const bool nan = in && std::isnan(C::load(have)) && std::isnan(C::load(want));
      exact = exact && (std::memcmp(&have, &want, sizeof(T)) == 0 || nan);
    }
  expect(exact, "mix forward == formula, bit for bit");
}

void test_mix_forward_equals_formula() {
  for (int64_t width : {1, 4, 5, 7, 16, 17, 33, 50, 600}) {
    for (int64_t rows : {1, 4, 5}) {
      check_mix_forward_equals_formula<float>(width, rows);
      check_mix_forward_equals_formula<uint8_t>(width, rows);
      check_mix_forward_equals_formula<core::Half>(width, rows);
      check_mix_forward_equals_formula<core::BFloat16>(width, rows);
    }
  }
}

// mix2_forward_planes (AVX-512 row kernel for float where the CPU has it, else the generic
// windows) equals two mix_forward_planes calls bit for bit: widths around the 16-lane step,
// boxes with edges anywhere (empty, full, one column), repeated partners, w in {0, -0, 1, other},
// and special values (inf, NaN, -0) that an exact select would get wrong. Planes of many rows
// split into several bands of rows (mix2_bands), with box edges inside and across bands.
// outside_unit: one local and one global weight outside [0, 1], which the core accepts (the
// binding does not) and the uint8 AVX-512 kernel leaves to the clamping portable path.
template <typename T>
void check_mix2_equals_two_calls(int64_t width, int64_t rows = 6, bool outside_unit = false) {
  core::MixLayout L;
  L.n = 6, L.planes = 2, L.rows = rows, L.row_len = width;
  std::vector<T> x(L.n * L.sample_size());
  uint32_t state = 12345u + static_cast<uint32_t>(width);
  auto next = [&state] { return state = state * 1664525u + 1013904223u; };
  for (auto& v : x) v = static_cast<T>(next() % 251);
  if constexpr (std::is_same_v<T, uint8_t>) {
    for (auto& v : x) v = next() % 3 == 0 ? 255 : v;  // blends that must reach 255 exactly
  }
  if constexpr (std::is_same_v<T, float>) {
    // signed zeros of both signs meet in the boxes, where w x + xs must keep the reference's sign
    for (size_t p = 0; p < x.size(); ++p)
      if (next() % 4 == 0) x[p] = next() % 2 ? -0.0f : (next() % 2 ? 0.0f : -x[p]);
    x[3] = INFINITY, x[width + 1] = NAN, x[2 * width] = -0.0f;
  }
  // sample 5 (w = -0, whole box) pairs with w = 0 both ways (0 -> 5, 5 -> 0) and with a blend
  // (4 -> 5)
  const std::vector<int64_t> src = {1, 0, 0, 4, 2, 3}, src2 = {5, 2, 0, 1, 5, 0};
  std::vector<core::compute_t<T>> w = {0.0f, 1.0f, 0.3f, 0.0f, 0.7f, -0.0f};
  std::vector<core::compute_t<T>> w2 = {0.25f, 0.6f, 1.0f, 0.0f, 0.9f, 0.45f};
  if (outside_unit) w[2] = -0.5f, w2[3] = 1.25f;
  const int64_t c = std::max<int64_t>(width - 1, 1);
  const int64_t r = rows;
  const std::vector<int64_t> boxes = {1, r - 1, 1, c, 0, r, 0, width, 2, 3, 3 % width, 4 % width + 1,
                                      0, 0, 0, 0, r / 2, r, width / 2, width, 0, r, 0, width};
  const auto u = forward<T>(x, src, w, boxes, L);
  std::vector<int64_t> whole;
  for (int64_t i = 0; i < L.n; ++i) whole.insert(whole.end(), {0, L.rows, 0, width});
  const auto want = forward<T>(u, src2, w2, whole, L);
  std::vector<T> got(x.size()), scratch(2 * core::kWindow);
  const std::vector<int64_t> order = core::partner_chain_order(src2.data(), L.n);
  core::mix2_forward_planes(x.data(), got.data(), src.data(), w.data(), boxes.data(), src2.data(),
                            w2.data(), order.data(), L, scratch.data(), 0, core::mix2_units<T>(L));
  expect(std::memcmp(got.data(), want.data(), sizeof(T) * got.size()) == 0, "mix2 == two mix calls");
  if constexpr (!std::is_same_v<T, double>) {
    // the same output written past the cache, where mix2_can_stream allows it: whole 16-element
    // steps, a 64-byte aligned output, an AVX-512 path (uint8 outside [0, 1] takes the portable
    // one and ignores the request)
    const size_t bytes = (sizeof(T) * got.size() + 63) / 64 * 64;
    const std::unique_ptr<T, decltype(&std::free)> streamed(
        static_cast<T*>(std::aligned_alloc(64, bytes)), &std::free);
    if (core::mix2_can_stream(streamed.get(), L)) {
      core::mix2_forward_planes(x.data(), streamed.get(), src.data(), w.data(), boxes.data(),
                                src2.data(), w2.data(), order.data(), L, scratch.data(), 0,
                                core::mix2_units<T>(L), true);
      expect(std::memcmp(streamed.get(), want.data(), sizeof(T) * got.size()) == 0,
             "mix2 with streamed stores == two mix calls");
    }
  }
}

// mix2 can stream its output on the AVX-512 paths, with whole 16-element rows and an aligned
// output.
void test_mix2_can_stream() {
  auto* aligned = reinterpret_cast<float*>(uintptr_t{64});  // never dereferenced
  const core::MixLayout rows32{2, 3, 32, 32}, rows33{2, 3, 33, 33};
  expect(core::mix2_can_stream(aligned, rows32) == core::cpu_has_avx512f(),
         "float can be streamed where the CPU has AVX-512");
  expect(!core::mix2_can_stream(aligned + 4, rows32), "a misaligned output is not streamed");
  expect(!core::mix2_can_stream(aligned, rows33), "rows of partial steps are not streamed");
  auto* pixels = reinterpret_cast<uint8_t*>(aligned);
  expect(core::mix2_can_stream(pixels, rows32) == core::avx512::cpu_has_avx512bw(),
         "uint8 can be streamed where the CPU has AVX-512BW");
  expect(!core::mix2_can_stream(pixels + 16, rows32), "a misaligned uint8 output is not streamed");
  expect(!core::mix2_can_stream(reinterpret_cast<double*>(aligned), rows32), "double is not streamed");
}

void test_mix2_equals_two_calls() {
  for (int64_t width : {1, 5, 15, 16, 17, 32, 33, 50, 64, 65, 130, 224, 2100}) {
    check_mix2_equals_two_calls<float>(width);
    check_mix2_equals_two_calls<uint8_t>(width);
    check_mix2_equals_two_calls<uint8_t>(width, 6, true);
    check_mix2_equals_two_calls<double>(width);
  }
  for (const auto& [width, rows] : {std::pair<int64_t, int64_t>{2100, 20}, {2112, 20}, {130, 300}, {160, 300}, {33, 1200}}) {
    expect(core::mix2_bands<float>(core::MixLayout{6, 2, rows, width}).count > 1, "several bands");
    check_mix2_equals_two_calls<float>(width, rows);
    check_mix2_equals_two_calls<uint8_t>(width, rows);
    check_mix2_equals_two_calls<double>(width, rows);
  }
}

}  // namespace

int main() {
  test_mix2_equals_two_calls();
  test_mix2_can_stream();
  test_mix_forward_equals_formula();
#if defined(METAMIXER_HAVE_AVX2_PATH)
  test_wide_blend_paths_equal_scalar();
#endif
#if defined(METAMIXER_HAVE_AVX512_MIX2)
  test_16bit_paths_equal_scalar();
#endif
  test_cutmix_copies_exactly();
  test_uint8_rounds_half_to_even();
  test_uint8_simd_equals_scalar();
  test_channels_last_box();
  test_half_and_bfloat16_conversions();
  test_partner_chain_order();
  test_backward_gathers_repeats();
  test_dw_inside_box_only();
  test_backward_one_partner_path_exact();
  test_backward_box_rows_exact();
#if defined(METAMIXER_HAVE_AVX512_MIX2)
  test_backward_samples_exact();
#endif
  test_dot_diff_equals_scalar();
  if (failures) {
    std::printf("%d failure(s)\n", failures);
    return 1;
  }
  std::printf("test_mix: all passed\n");
  return 0;
}
