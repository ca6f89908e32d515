// How the fused mix2 forward scales to two threads, depending on how the work is split.
//
//   cmake -S . -B build/cmake && cmake --build build/cmake --target bench_mix2_threads
//   ./build/cmake/bench_mix2_threads [N=256] [H=32] [rounds=400] [repeats=8]
//
// A torch-free benchmark of core::mix2_forward_planes on an fp32 [N, 3, H, H] batch with a
// random plan (CutMix boxes of area 1 - lam, lam ~ U(0, 1); random permutations as partners),
// run once each per round in a new (seeded) random order, then in two blocks of rounds, `repeats`
// times over:
//   memcpy, halves     one copy of the batch, each thread copying a contiguous half (as clone)
//   mix2, chain        the split the library uses: the units of the plane-major partner-chain
//                      order cut in two, so each thread touches (planes of) every sample
//   mix2, halves       each thread takes a contiguous half of the batch, chains cut at the half
//   mix2, one thread   the chain order on the main thread alone
//   cached + read      (block) mix2, chain, with stores through the cache, then both threads read
//                      their half of the output (one float per cache line), as the next
//                      operation of a training step would
//   streamed + read    (block) the same with the output streamed past the cache
//                      (non-temporal stores; where the CPU has the AVX-512 path and rows are
//                      whole 16-float steps)
// The first four store the output through the cache; the library picks the store mode by
// timing its own calls (core/store_choice.h), and the last two columns show what each mode
// costs mix2 and a reader of its output. Before each repeat, the one-way time of a cache line
// passed between the two threads (tens of ns when the two CPUs share a cache, hundreds when
// they are far apart). Each line prints the medians of one repeat in microseconds, and the memcpy's bandwidth: the bytes a
// clone moves (2 N 3 H H 4: read and write the batch once) over its time. Threads are pinned
// to the first two CPUs this process may use. Before timing, the halves split is checked to
// give the chain order's output bit for bit.
#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <new>
#include <random>
#include <thread>
#include <vector>

#include "core/mix.h"

namespace {

using metamixer::core::MixLayout;
using Clock = std::chrono::steady_clock;

double micros_since(Clock::time_point start) {
  return std::chrono::duration<double, std::micro>(Clock::now() - start).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// The first two CPUs of this process's affinity mask (-1 where there is no second one).
std::vector<int> first_two_cpus() {
  cpu_set_t set;
  std::vector<int> cpus;
  if (sched_getaffinity(0, sizeof(set), &set) == 0)
    for (int c = 0; c < CPU_SETSIZE && cpus.size() < 2; ++c)
      if (CPU_ISSET(c, &set)) cpus.push_back(c);
  while (cpus.size() < 2) cpus.push_back(-1);
  return cpus;
}

void pin_to(int cpu) {
  if (cpu < 0) return;
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
}

// A second thread that runs the job it is handed while the main thread runs its own part;
// it spins between jobs, so a handover costs a cache-line transfer, not a wake-up.
class Partner {
 public:
  explicit Partner(int cpu) : thread_([this, cpu] { loop(cpu); }) {}
  ~Partner() {
    stop_ = true;
    thread_.join();
  }
  // Runs mine() here and theirs() on the partner thread; returns when both are done.
  void run(const std::function<void()>& mine, const std::function<void()>& theirs) {
    job_ = &theirs;
    done_.store(false);
    epoch_.fetch_add(1);
    mine();
    while (!done_.load()) {
    }
  }

 private:
  void loop(int cpu) {
    pin_to(cpu);
    int seen = 0;
    while (!stop_) {
      const int now = epoch_.load();
      if (now == seen) continue;
      seen = now;
      (*job_)();
      done_.store(true);
    }
  }
  const std::function<void()>* job_ = nullptr;
  std::atomic<int> epoch_{0};
  std::atomic<bool> done_{false}, stop_{false};
  std::thread thread_;
};

// The one-way time (ns) of a cache line passed back and forth between the two threads.
double line_pass_ns(Partner& partner) {
  constexpr int kPasses = 100000;
  alignas(64) std::atomic<int> flag{0};
  const auto start = Clock::now();
  partner.run(
      [&] {
        for (int i = 0; i < kPasses; ++i) {
          flag.store(2 * i + 1, std::memory_order_release);
          while (flag.load(std::memory_order_acquire) != 2 * i + 2) {
          }
        }
      },
      [&] {
        for (int i = 0; i < kPasses; ++i) {
          while (flag.load(std::memory_order_acquire) != 2 * i + 1) {
          }
          flag.store(2 * i + 2, std::memory_order_release);
        }
      });
  return micros_since(start) * 1e3 / (2.0 * kPasses);
}

// A float buffer aligned to 64 bytes, as torch's CPU allocator aligns tensors.
class Buffer {
 public:
  explicit Buffer(int64_t n)
      : n_(n), p_(static_cast<float*>(std::aligned_alloc(64, (n * sizeof(float) + 63) / 64 * 64))) {
    if (p_ == nullptr) throw std::bad_alloc();
  }
  ~Buffer() { std::free(p_); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  float* data() { return p_; }
  float* begin() { return p_; }
  float* end() { return p_ + n_; }

 private:
  int64_t n_;
  float* p_;
};

struct Plan {
  std::vector<int64_t> src, src2, boxes;
  std::vector<float> w, w2;
};

Plan random_plan(int64_t n, int64_t h, std::mt19937& g) {
  Plan p;
  p.src.resize(n), p.src2.resize(n), p.boxes.resize(4 * n), p.w.assign(n, 0.0f), p.w2.resize(n);
  for (int64_t i = 0; i < n; ++i) p.src[i] = p.src2[i] = i;
  std::shuffle(p.src.begin(), p.src.end(), g);
  std::shuffle(p.src2.begin(), p.src2.end(), g);
  std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
  const auto clip = [h](int64_t v) { return std::min<int64_t>(std::max<int64_t>(v, 0), h); };
  for (int64_t i = 0; i < n; ++i) {
    p.w2[i] = uniform(g);
    const auto cut = static_cast<int64_t>(std::sqrt(1.0f - uniform(g)) * static_cast<float>(h));
    const int64_t cy = g() % h, cx = g() % h;
    int64_t* b = &p.boxes[4 * i];
    b[0] = clip(cy - cut / 2), b[1] = clip(cy - cut / 2 + cut);
    b[2] = clip(cx - cut / 2), b[3] = clip(cx - cut / 2 + cut);
  }
  return p;
}

}  // namespace

int main(int argc, char** argv) {
  namespace core = metamixer::core;
  const int64_t n = argc > 1 ? std::atoll(argv[1]) : 256, h = argc > 2 ? std::atoll(argv[2]) : 32;
  const int rounds = argc > 3 ? std::atoi(argv[3]) : 400;
  const int repeats = argc > 4 ? std::atoi(argv[4]) : 8;
  if (n < 2 || h < 1 || rounds < 1 || repeats < 1) {
    std::fprintf(stderr, "usage: %s [N >= 2] [H >= 1] [rounds >= 1] [repeats >= 1]\n", argv[0]);
    return 2;
  }
  MixLayout L;
  L.n = n, L.planes = 3, L.rows = h, L.row_len = h;
  const int64_t elems = n * L.sample_size();
  const size_t bytes = static_cast<size_t>(elems) * sizeof(float);
  Buffer x(elems), out(elems), copy(elems);
  std::mt19937 g(0);
  for (float& v : x) v = static_cast<float>(g() % 256);
  const Plan p = random_plan(n, h, g);
  const std::vector<int64_t> chain = core::partner_chain_order(p.src2.data(), n);
  // chains cut at the half: the first half's samples in chain order, then the second half's
  std::vector<int64_t> halves;
  std::vector<char> seen(n, 0);
  for (const auto& [lo, hi] : {std::pair<int64_t, int64_t>{0, n / 2}, {n / 2, n}})
    for (int64_t s = lo; s < hi; ++s)
      for (int64_t i = s; i >= lo && i < hi && !seen[i]; i = p.src2[i])
        seen[i] = 1, halves.push_back(i);

  const core::Mix2Bands bands = core::mix2_bands<float>(L);
  const int64_t units = core::mix2_units<float>(L), per_sample = L.planes * bands.count;
  std::vector<float> scratch(4 * core::kWindow);
  const bool can_stream = core::mix2_can_stream(out.data(), L);
  const auto forward_stored = [&](const std::vector<int64_t>& order, int t, int64_t begin,
                                  int64_t end, bool stream) {
    core::mix2_forward_planes(x.data(), out.data(), p.src.data(), p.w.data(), p.boxes.data(),
                              p.src2.data(), p.w2.data(), order.data(), L,
                              scratch.data() + 2 * t * core::kWindow, begin, end, stream);
  };
  const auto forward = [&](const std::vector<int64_t>& order, int t, int64_t begin, int64_t end) {
    forward_stored(order, t, begin, end, false);
  };
  volatile float sink[2] = {0.0f, 0.0f};  // keeps the reads
  const auto read_half = [&](int t) {  // one float of every cache line of this thread's half
    float sum = 0.0f;
    for (int64_t e = t * (elems / 2); e < (t + 1) * (elems / 2); e += 16) sum += out.data()[e];
    sink[t] = sum;
  };

  // samples [lo, hi) of `halves` (their own chain positions), every plane and band
  const auto forward_half = [&](int t, int64_t lo, int64_t hi) {
    if (bands.sample_major) return forward(halves, t, lo * per_sample, hi * per_sample);
    for (int64_t b = 0; b < per_sample; ++b) forward(halves, t, b * n + lo, b * n + hi);
  };
  const auto copy_half = [&](int64_t lo, int64_t hi) {
    std::memcpy(copy.data() + lo, x.data() + lo, static_cast<size_t>(hi - lo) * sizeof(float));
  };

  // every split computes the same output: check it once before timing
  forward(chain, 0, 0, units);
  const std::vector<float> expected(out.begin(), out.end());
  std::fill(out.begin(), out.end(), -1.0f);
  forward_half(0, 0, n / 2), forward_half(1, n / 2, n);
  if (std::memcmp(out.data(), expected.data(), bytes) != 0) {
    std::fprintf(stderr, "mix2 over contiguous halves differs from the chain order's output\n");
    return 1;
  }

  const std::vector<int> cpus = first_two_cpus();
  pin_to(cpus[0]);
  Partner partner(cpus[1]);
  const auto timed = [&](const std::function<void()>& mine, const std::function<void()>& theirs) {
    const auto start = Clock::now();
    partner.run(mine, theirs);
    return micros_since(start);
  };
  const auto nothing = [] {};
  // mix2, chain, with the given stores, then the read of the output
  const auto forward_read = [&](bool stream) {
    return timed([&] { forward_stored(chain, 0, 0, units / 2, stream), read_half(0); },
                 [&] { forward_stored(chain, 1, units / 2, units, stream), read_half(1); });
  };
  std::printf("fp32 [%lld, 3, %lld, %lld] (%.1f MB), CPUs %d and %d, medians of %d rounds (us)\n",
              static_cast<long long>(n), static_cast<long long>(h), static_cast<long long>(h),
              static_cast<double>(bytes) / 1e6, cpus[0], cpus[1], rounds);
  std::printf("%8s %14s %11s %12s %16s %15s %16s %11s\n", "line ns", "memcpy halves",
              "mix2 chain", "mix2 halves", "mix2 one thread", "cached + read", "streamed + read",
              "GB/s clone");
  std::mt19937 shuffle_rng(0);
  for (int r = 0; r < repeats; ++r) {
    const double pass = line_pass_ns(partner);
    std::vector<double> t_copy, t_chain, t_halves, t_one, t_cached, t_streamed;
    // one run of each per round, in a new random order every round: no row always inherits the
    // cache state the same predecessor left
    const std::function<void()> rows[] = {
        [&] {
          t_copy.push_back(
              timed([&] { copy_half(0, elems / 2); }, [&] { copy_half(elems / 2, elems); }));
        },
        [&] {
          t_chain.push_back(timed([&] { forward(chain, 0, 0, units / 2); },
                                  [&] { forward(chain, 1, units / 2, units); }));
        },
        [&] {
          t_halves.push_back(
              timed([&] { forward_half(0, 0, n / 2); }, [&] { forward_half(1, n / 2, n); }));
        },
        [&] { t_one.push_back(timed([&] { forward(chain, 0, 0, units); }, nothing)); },
    };
    std::vector<int> order = {0, 1, 2, 3};
    for (int k = 0; k < rounds; ++k) {
      std::shuffle(order.begin(), order.end(), shuffle_rng);
      for (int i : order) rows[i]();
    }
    // each store mode in a block of its own rounds, so every round follows one of its own kind
    for (int k = 0; k < rounds; ++k) t_cached.push_back(forward_read(false));
    for (int k = 0; k < rounds && can_stream; ++k) t_streamed.push_back(forward_read(true));
    const double copy_us = median(t_copy);
    const double streamed = can_stream ? median(t_streamed) : NAN;
    std::printf("%8.0f %14.1f %11.1f %12.1f %16.1f %15.1f %16.1f %11.1f\n", pass, copy_us,
                median(t_chain), median(t_halves), median(t_one), median(t_cached), streamed,
                2.0 * static_cast<double>(bytes) / copy_us / 1e3);
  }
  return 0;
}
