// How mix2 stores its output: through the cache or streamed past it (core::mix2_streams_output),
// for the batches where neither is better everywhere.
//
// A float batch whose input and output together overflow the last-level cache is always
// streamed, and one under kMinAdaptiveBytes is always stored through the cache. In between, the
// better choice depends on where the threads run, not on the batch: on a 2-core EPYC virtual
// machine whose two cores shared a 32 MB L3 (a cache line passed between them in 40-60 ns),
// streaming made mix2 at 256x3x32x32 fp32 1.5x slower and a pass reading its output 4x slower;
// in periods when the line took about 200 ns (cores on different L3s), streaming made mix2
// 1.6-1.8x faster, and mix2 plus the reading pass 2.6x faster (bench/mix2_threads.cpp and
// bench_mix --alone). At 64x3x112x112 too, in both kinds of period, mix2's own time picked the
// mode that was faster with the reader as well.
//
// So StoreChoice picks by measurement: per size class (and thread count), it keeps the last
// kSamples times of each mode, tries both at first, then takes the mode with the smaller median
// and gives the other one call in kExplorePeriod, so a change of period is noticed within a few
// dozen calls. Either way the output's bits are the same; only the time differs.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <map>
#include <mutex>
#include <utility>

namespace metamixer::core {

class StoreChoice {
 public:
  static constexpr int kSamples = 5;
  static constexpr int64_t kExplorePeriod = 16;
  static constexpr int64_t kMinAdaptiveBytes = int64_t{1} << 20;

  // Whether a call on a `bytes`-byte output with `threads` threads should stream; `fits` is
  // false when the batch and the output overflow the last-level cache.
  bool stream(int64_t bytes, int threads, bool fits) {
    if (!fits) return true;
    if (bytes < kMinAdaptiveBytes) return false;
    std::lock_guard<std::mutex> lock(mutex_);
    Class& c = classes_[key(bytes, threads)];
    const int64_t call = c.calls++;
    if (c.count[0] < kSamples || c.count[1] < kSamples) return call % 2 == 1;  // cached first
    const bool best = median(c, true) < median(c, false);
    return call % kExplorePeriod == kExplorePeriod - 1 ? !best : best;
  }

  // The time of a call that stream() sent to mode `streamed`.
  void record(int64_t bytes, int threads, bool streamed, double seconds) {
    if (bytes < kMinAdaptiveBytes) return;
    std::lock_guard<std::mutex> lock(mutex_);
    Class& c = classes_[key(bytes, threads)];
    const int m = streamed ? 1 : 0;
    c.times[m][c.next[m]] = seconds;
    c.next[m] = (c.next[m] + 1) % kSamples;
    c.count[m] = std::min(c.count[m] + 1, kSamples);
  }

 private:
  struct Class {
    std::array<std::array<double, kSamples>, 2> times{};
    std::array<int, 2> next{}, count{};
    int64_t calls = 0;
  };

  // size classes of a factor of two
  static std::pair<int, int> key(int64_t bytes, int threads) {
    int log2 = 0;
    while (bytes > 1) bytes >>= 1, ++log2;
    return {log2, threads};
  }

  static double median(const Class& c, bool streamed) {
    const int m = streamed ? 1 : 0;
    std::array<double, kSamples> t = c.times[m];
    std::nth_element(t.begin(), t.begin() + c.count[m] / 2, t.begin() + c.count[m]);
    return t[c.count[m] / 2];
  }

  std::mutex mutex_;
  std::map<std::pair<int, int>, Class> classes_;
};

}  // namespace metamixer::core
