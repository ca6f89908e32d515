// Unit tests of the torch-free kernel cores, run by ctest (CMakeLists.txt).
#include <cmath>
#include <cstdio>
#include <limits>
#include <vector>

#include "core/logsumexp.h"

namespace {

int failures = 0;

void expect_near(const char* what, double got, double want, double tol) {
  const bool ok = (std::isnan(want) && std::isnan(got)) || got == want ||
                  std::fabs(got - want) <= tol * (1.0 + std::fabs(want));
  if (!ok) {
    std::printf("FAIL %s: got %.9g, want %.9g\n", what, got, want);
    ++failures;
  }
}

double naive_logsumexp(const std::vector<float>& x, double scale) {
  double m = -INFINITY;
  for (float v : x) m = std::fmax(m, scale * v);
  if (std::isinf(m)) return m;
  double s = 0;
  for (float v : x) s += std::exp(scale * v - m);
  return m + std::log(s);
}

void test_logsumexp_matches_naive() {
  std::vector<float> x;
  for (int i = 0; i < 1271; ++i) x.push_back(std::sin(0.37f * i) * 20.0f);
  expect_near("lse 1271", metamixer::core::row_logsumexp(x.data(), 1271, 0.25f),
              naive_logsumexp(x, 0.25), 1e-6);
  expect_near("lse n=1", metamixer::core::row_logsumexp(x.data() + 5, 1, 1.0f), x[5], 0);
}

void test_logsumexp_masked_and_nan() {
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<float> x = {-inf, 1.0f, -inf, 2.0f};
  expect_near("masked", metamixer::core::row_logsumexp(x.data(), 4, 1.0f),
              std::log(std::exp(1.0) + std::exp(2.0)), 1e-6);
  std::vector<float> all_masked = {-inf, -inf};
  expect_near("all masked", metamixer::core::row_logsumexp(all_masked.data(), 2, 1.0f), -inf, 0);
  std::vector<float> with_nan = {1.0f, NAN, 3.0f};
  expect_near("nan", metamixer::core::row_logsumexp(with_nan.data(), 3, 1.0f), NAN, 0);
}

void test_merge_equals_single_pass() {
  std::vector<float> x;
  for (int i = 0; i < 100; ++i) x.push_back(std::cos(1.3f * i) * 50.0f);
  metamixer::core::OnlineLogSumExp a, b;
  for (int i = 0; i < 37; ++i) a.add(x[i]);
  for (int i = 37; i < 100; ++i) b.add(x[i]);
  a.merge(b);
  expect_near("merge", a.value(), naive_logsumexp(x, 1.0), 1e-6);
}

}  // namespace

int main() {
  test_logsumexp_matches_naive();
  test_logsumexp_masked_and_nan();
  test_merge_equals_single_pass();
  std::printf("%s: %d failure(s)\n", failures ? "FAILED" : "OK", failures);
  return failures ? 1 : 0;
}
