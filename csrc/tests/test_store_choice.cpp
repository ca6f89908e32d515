// core::StoreChoice: small outputs always cached; larger ones, both modes tried first, then the
// faster by median with the other explored once in kExplorePeriod calls, and a switch when the
// times change; size classes and thread counts apart.
#include <cstdint>
#include <cstdio>

#include "core/store_choice.h"

namespace {

using metamixer::core::StoreChoice;
int failures = 0;

void expect(bool ok, const char* what) {
  if (!ok) {
    std::printf("FAIL %s\n", what);
    ++failures;
  }
}

constexpr int64_t kBytes = int64_t{3} << 20;

// Runs `calls` calls with the given times of the two modes; returns how many streamed.
int64_t run(StoreChoice& choice, int64_t calls, double cached_s, double streamed_s,
            int threads = 2) {
  int64_t streamed = 0;
  for (int64_t k = 0; k < calls; ++k) {
    const bool s = choice.stream(kBytes, threads);
    choice.record(kBytes, threads, s, s ? streamed_s : cached_s);
    streamed += s;
  }
  return streamed;
}

void test_small_outputs_stay_in_cache() {
  StoreChoice choice;
  for (int k = 0; k < 100; ++k) {
    expect(!choice.stream(StoreChoice::kMinAdaptiveBytes - 1, 2), "a small batch is cached");
    choice.record(StoreChoice::kMinAdaptiveBytes - 1, 2, true, 0.0);  // ignored
  }
}

void test_tries_both_then_keeps_the_faster() {
  StoreChoice choice;
  const int64_t first = 2 * StoreChoice::kSamples;
  expect(run(choice, first, 2e-4, 1e-4) == StoreChoice::kSamples, "both modes tried first");
  const int64_t later = 20 * StoreChoice::kExplorePeriod;
  const int64_t explored = later / StoreChoice::kExplorePeriod;
  expect(run(choice, later, 2e-4, 1e-4) == later - explored, "streams, explores cached");
  expect(run(choice, later, 1e-4, 2e-4) <= explored + StoreChoice::kSamples,
         "switches to cached when streaming gets slower");
  expect(run(choice, later, 1e-4, 2e-4) == explored, "cached, explores streaming");
}

void test_classes_are_separate() {
  StoreChoice choice;
  run(choice, 200, 2e-4, 1e-4, 2);
  expect(run(choice, 200, 1e-4, 2e-4, 1) <= 200 / StoreChoice::kExplorePeriod + StoreChoice::kSamples,
         "one thread learns its own choice");
  int64_t streamed = 0;
  for (int k = 0; k < 64; ++k) streamed += choice.stream(kBytes, 2);
  expect(streamed == 64 - 64 / StoreChoice::kExplorePeriod, "two threads keep streaming");
}

}  // namespace

int main() {
  test_small_outputs_stay_in_cache();
  test_tries_both_then_keeps_the_faster();
  test_classes_are_separate();
  if (failures) {
    std::printf("%d failure(s)\n", failures);
    return 1;
  }
  std::printf("test_store_choice: all passed\n");
  return 0;
}
