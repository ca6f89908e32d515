// Exhaustive tests of the 16-bit float conversions (csrc/core/half.h), which the mix core and the
// loss core both use, run by ctest. Every binary16 and bfloat16 value decodes exactly and
// encodes back to itself; two million float bit patterns (and the halfway points between
// neighbouring 16-bit values) encode to the nearest 16-bit value, ties to even, found here
// independently by a binary search over the decoded values.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "core/half.h"

namespace core = metamixer::core;

namespace {

int failures = 0;

void expect(bool ok, const char* what, uint32_t detail) {
  if (!ok && ++failures <= 10) std::printf("FAIL %s (0x%08x)\n", what, detail);
}

float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// The value of binary16 `h` from its fields.
double half_value(uint16_t h) {
  const int sign = h >> 15, exp = (h >> 10) & 31, mant = h & 1023;
  double v = exp == 0 ? std::ldexp(mant, -24) : std::ldexp(1024 + mant, exp - 25);
  if (exp == 31) v = mant ? NAN : INFINITY;
  return sign ? -v : v;
}

double bf16_value(uint16_t b) { return from_bits(static_cast<uint32_t>(b) << 16); }

// Round-to-nearest-even encoding of f, given the values of the positive 16-bit patterns
// 0 .. top (increasing) and the value just past the top (the next binade's first value, where
// rounding overflows to infinity, pattern top + 1).
uint16_t nearest(float f, const std::vector<double>& values, double past_top) {
  const double a = std::fabs(static_cast<double>(f));
  const uint16_t sign = std::signbit(f) ? 0x8000 : 0;
  const auto it = std::upper_bound(values.begin(), values.end(), a);  // first value > a
  const size_t lo = static_cast<size_t>(it - values.begin()) - 1;       // values[lo] <= a
  const double hi_value = lo + 1 < values.size() ? values[lo + 1] : past_top;
  const double below = a - values[lo], above = hi_value - a;
  const bool up = above < below || (above == below && (lo & 1));
  return static_cast<uint16_t>(sign | (lo + (up ? 1 : 0)));
}

void test_half() {
  std::vector<double> values;  // positive finite halves, increasing with their bits
  for (uint32_t h = 0; h < 0x7C00; ++h) values.push_back(half_value(static_cast<uint16_t>(h)));
  for (uint32_t h = 0; h < 65536; ++h) {
    const core::Half x{static_cast<uint16_t>(h)};
    const double want = half_value(x.bits);
    const float got = core::to_float(x);
    if (std::isnan(want)) {
      expect(std::isnan(got), "half NaN decodes to NaN", h);
      const uint16_t back = core::to_half(got).bits;
      expect((back & 0x7C00) == 0x7C00 && (back & 0x3FF) != 0, "half NaN encodes to NaN", h);
      continue;
    }
    expect(static_cast<double>(got) == want && std::signbit(got) == (h >> 15 == 1),
           "half decodes exactly", h);
    expect(core::to_half(got).bits == h, "half encodes back to itself", h);
  }
  uint32_t state = 2463534242u;
  for (int n = 0; n < 2000000; ++n) {
    state ^= state << 13, state ^= state >> 17, state ^= state << 5;  // xorshift32
    const float f = from_bits(state);
    if (std::isnan(f)) continue;
    expect(core::to_half(f).bits == nearest(f, values, 65536.0), "half rounds to nearest even", state);
  }
  for (uint32_t h = 0; h + 1 < 0x7C00; ++h) {  // the halfway points: ties go to the even pattern
    const float mid = static_cast<float>((values[h] + values[h + 1]) / 2);
    expect(core::to_half(mid).bits == (h & 1 ? h + 1 : h), "half tie to even", h);
  }
  expect(core::to_half(65520.0f).bits == 0x7C00, "half overflows to inf at 65520", 65520);
}

void test_bfloat16() {
  std::vector<double> values;  // positive finite bfloat16 values, increasing with their bits
  for (uint32_t b = 0; b < 0x7F80; ++b) values.push_back(bf16_value(static_cast<uint16_t>(b)));
  for (uint32_t b = 0; b < 65536; ++b) {
    const core::BFloat16 x{static_cast<uint16_t>(b)};
    const float got = core::to_float(x);
    uint32_t bits;
    std::memcpy(&bits, &got, 4);
    expect(bits == b << 16, "bf16 decodes exactly", b);
    const uint16_t back = core::to_bfloat16(got).bits;
    expect(std::isnan(got) ? back == 0x7FC0 : back == b, "bf16 encodes back (NaN as c10's)", b);
  }
  uint32_t state = 88172645u;
  for (int n = 0; n < 2000000; ++n) {
    state ^= state << 13, state ^= state >> 17, state ^= state << 5;
    const float f = from_bits(state);
    if (std::isnan(f)) continue;
    expect(core::to_bfloat16(f).bits == nearest(f, values, std::ldexp(1.0, 128)),
           "bf16 rounds to nearest even", state);
  }
}

}  // namespace

int main() {
  test_half();
  test_bfloat16();
  if (failures) {
    std::printf("%d failure(s)\n", failures);
    return 1;
  }
  std::printf("test_half: all passed\n");
  return 0;
}
