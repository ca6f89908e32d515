// 16-bit float storage types and their conversions to and from float, bit for bit those of
// c10::Half and c10::BFloat16 (round to nearest even; a NaN encodes as c10's quiet NaN). The
// mix core (Compute<Half>, Compute<BFloat16>) and the loss core (to_acc / from_acc in simd.h)
// both use these. The fp16 decode has no branch on the value's class, so loops of it vectorize
// (the branchy decode the loss had before made its fp16 forward + backward 2.9x slower).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace metamixer::core {

// 16-bit float storage types (bit-compatible with c10::Half / c10::BFloat16).
struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float to_float(BFloat16 v) { return bits_float(static_cast<uint32_t>(v.bits) << 16); }

// Round to nearest even; NaN stays a (quiet) NaN.
inline BFloat16 to_bfloat16(float f) {
  const uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return BFloat16{0x7fc0};
  const uint32_t rounding_bias = 0x7fffu + ((u >> 16) & 1u);
  return BFloat16{static_cast<uint16_t>((u + rounding_bias) >> 16)};
}

// IEEE binary16 <-> binary32, exact decode and round-to-nearest-even encode (the classic
// bit-manipulation formulation: scale by powers of two so the FPU does the rounding).
inline float to_float(Half h) {
  const uint32_t w = static_cast<uint32_t>(h.bits) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float exp_scale = bits_float(0x7800000u);  // 2^-112
  const float normalized = bits_float((two_w >> 4) + (0xE0u << 23)) * exp_scale;
  const float denormalized = bits_float((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t result =
      sign | (two_w < (1u << 27) ? float_bits(denormalized) : float_bits(normalized));
  return bits_float(result);
}

inline Half to_half(float f) {
  const float scale_to_inf = bits_float(0x77800000u);   // 2^112
  const float scale_to_zero = bits_float(0x08800000u);  // 2^-110
  const uint32_t w = float_bits(f);
  const uint32_t two_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  float base = (std::fabs(f) * scale_to_inf) * scale_to_zero;
  uint32_t bias = two_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = bits_float((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = float_bits(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
  const uint32_t mantissa_bits = bits & 0x00000FFFu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  return Half{static_cast<uint16_t>((sign >> 16) | (two_w > 0xFF000000u ? 0x7E00u : nonsign))};
}

}  // namespace metamixer::core
