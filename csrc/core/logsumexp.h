// Torch-free row reductions shared by the fused kernels.
//
// OnlineLogSumExp keeps (max, sum of exp(v - max)) over a stream of values, so a softmax
// over a row of any length needs one read of the row. Merging two partial states is what
// lets a row be split across SIMD lanes or threads. -inf inputs (masked classes) add
// exp(-inf) = 0 and never produce NaN; a NaN input makes the result NaN.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

namespace metamixer::core {

struct OnlineLogSumExp {
  float max = -std::numeric_limits<float>::infinity();
  float sum = 0.0f;

  void add(float v) {
    if (std::isnan(v)) {
      max = sum = v;  // sticky: every later add/merge keeps NaN
      return;
    }
    if (v == -std::numeric_limits<float>::infinity()) return;  // exp(-inf) = 0
    if (v > max) {
      sum = sum * std::exp(max - v) + 1.0f;
      max = v;
    } else {
      sum += std::exp(v - max);
    }
  }

  void merge(const OnlineLogSumExp& o) {
    if (std::isnan(o.max) || std::isnan(max)) {
      max = sum = std::numeric_limits<float>::quiet_NaN();
      return;
    }
    if (o.max == -std::numeric_limits<float>::infinity()) return;
    if (max == -std::numeric_limits<float>::infinity()) {
      *this = o;
      return;
    }
    if (o.max > max) {
      sum = sum * std::exp(max - o.max) + o.sum;
      max = o.max;
    } else {
      sum += o.sum * std::exp(o.max - max);
    }
  }

  // log(sum_i exp(v_i)); -inf for an empty or all -inf row.
  float value() const { return max + std::log(sum); }
};

// logsumexp(scale * x[0..n)) with float accumulation; T is float or any type with an
// explicit conversion to float.
template <typename T>
float row_logsumexp(const T* x, int64_t n, float scale) {
  OnlineLogSumExp acc;
  for (int64_t i = 0; i < n; ++i) acc.add(scale * static_cast<float>(x[i]));
  return acc.value();
}

}  // namespace metamixer::core
