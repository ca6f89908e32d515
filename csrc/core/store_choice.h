// How mix2 stores its output: through the cache, or streamed past it (non-temporal stores,
// where core::mix2_can_stream allows it). The bits are the same; only the time differs.
//
// Streamed stores neither read each output line first nor leave it dirty for a later operation
// to write back, but the output is then not in cache for the next reader. Which costs less
// depends on the size and on where the threads run, and the same machine changes its mind: on a
// 2-core EPYC virtual machine, in periods when its two cores shared an L3 (a cache line passed
// between them in 40-60 ns), streaming made mix2 at 256x3x32x32 fp32 about 1.3x slower, and
// mix2 plus a pass reading its output 2-2.5x slower; in periods when the pass took about
// 200 ns (cores on different L3s), streaming made mix2 about twice as fast, and mix2 plus the
// reader 2-2.8x faster. At 64x3x224x224 fp32 (38.5 MB) streaming was faster in both kinds of
// period (bench_mix's store-mode rows, bench/mix2_threads.cpp). At 32x32 and 224x224, in both
// kinds of period, mix2's own time picked the mode that was also faster with the reader.
//
// So StoreChoice picks by measurement: per size class (a factor of two) and thread count, it
// keeps the last kSamples times of each mode, tries both at first, then takes the mode with the
// smaller median and gives the other one call in kExplorePeriod, so a change of period is
// noticed within a few dozen calls. Outputs under kMinAdaptiveBytes stay in cache: they fit the
// L2 caches, and their calls are too short to time reliably.
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

  // Whether a call on a `bytes`-byte output with `threads` threads should stream.
  bool stream(int64_t bytes, int threads) {
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
