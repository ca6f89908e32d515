// Row kernels of mixed_kd_loss (formulas and pass structure: see core/mixed_kd_loss.h).
// Included by mixed_kd_loss.h once per vector width, inside namespace METAMIXER_KD_NS; no
// include guard on purpose. U below is either the vector type V or its scalar A (the tail).
#include <algorithm>
#include <cstdint>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace metamixer::core::METAMIXER_KD_NS {

constexpr int64_t kChunk = 512;  // classes per chunk: K chunks of logits stay in L1
constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// The logits of one chunk in the accumulation type: in place for float/double, else converted.
template <typename T>
const acc_t<T>* chunk_view(const T* src, int64_t n, acc_t<T>* buf) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    return src;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = to_acc(src[i]);
    return buf;
  }
}

// Max of a chunk (ignoring NaN), with four independent max chains: one chain would wait on
// the max latency (4 cycles) every vector.
template <typename A>
A chunk_max(const A* p, int64_t n) {
  using V = typename VecOf<A>::type;
  constexpr int64_t W = VecOf<A>::lanes;
  V m[4];
  for (auto& v : m) v = splat<V>(static_cast<A>(kNegInf));
  const int64_t nv = n / W * W, nv4 = n / (4 * W) * (4 * W);
  for (int64_t i = 0; i < nv4; i += 4 * W)
    for (int j = 0; j < 4; ++j) m[j] = vmax(m[j], load<V>(p + i + j * W));
  for (int64_t i = nv4; i < nv; i += W) m[0] = vmax(m[0], load<V>(p + i));
  for (int j = 1; j < 4; ++j) m[0] = vmax(m[0], m[j]);
  A r = hmax(m[0]);
  for (int64_t i = nv; i < n; ++i) r = vmax(r, p[i]);
  return r;
}

// Sum of a chunk (the mean logit of label smoothing).
template <typename A>
double chunk_sum(const A* p, int64_t n) {
  using V = typename VecOf<A>::type;
  constexpr int64_t W = VecOf<A>::lanes;
  V acc{};
  const int64_t nv = n / W * W;
  for (int64_t i = 0; i < nv; i += W) acc += load<V>(p + i);
  double r = double(hsum(acc));
  for (int64_t i = nv; i < n; ++i) r += double(p[i]);
  return r;
}

// The running max after a chunk of max m (a chunk of -inf leaves it; a NaN one only sets it
// while it is -inf).
inline double running_max(double M, double m) {
  return m != kNegInf && (M == kNegInf || m > M) ? m : M;
}

// Factors that bring the row's sums (taken relative to max M) and a chunk's (relative to its
// max m, or to 0 when m = -inf: then its sums are 0, or NaN for a NaN chunk) to a common max.
struct Rescale {
  double row1 = 1, rowT = 1, chunk1 = 1, chunkT = 1, max = kNegInf;
  Rescale(double M, double m, double invT) : max(running_max(M, m)) {
    if (m == kNegInf) return;
    if (M == kNegInf || m > M) {
      if (M != kNegInf) row1 = std::exp(M - m), rowT = std::exp((M - m) * invT);
    } else if (m < M) {
      chunk1 = std::exp(m - M), chunkT = std::exp((m - M) * invT);
    }
  }
};

// The reference a running max stands for in the pair sums (0 while a peer has only -inf, as
// the chunk references), and the change of a pair term (z_t - at(M_t)) - (z_s - at(M_s)) when
// the references move from (t0, s0) to (t1, s1).
inline double at(double max) { return max == kNegInf ? 0.0 : max; }
inline double shift(double t0, double t1, double s0, double s1) {
  return (at(t0) - at(t1)) - (at(s0) - at(s1));
}
// 0 where both maxima are finite; NaN where a peer's row is all -inf (its softmax is undefined),
// as the difference of the lse terms gave before the maxima were cancelled from it.
inline double unbounded(double max_t, double max_s) {
  return max_t == kNegInf || max_s == kNegInf ? std::numeric_limits<double>::quiet_NaN() : 0.0;
}

// Calls f(std::integral_constant<int, K>) for K in 2..8 (loops over peers unroll and the
// per-peer accumulators live in registers), else f(std::integral_constant<int, 0>) (run time K).
template <typename F>
void with_peers(int64_t K, F&& f) {
  switch (K) {
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 5: return f(std::integral_constant<int, 5>{});
    case 6: return f(std::integral_constant<int, 6>{});
    case 7: return f(std::integral_constant<int, 7>{});
    case 8: return f(std::integral_constant<int, 8>{});
    default: return f(std::integral_constant<int, 0>{});
  }
}

// How exp(x) is obtained from exp(x/T): for T in {2, 3, 4} as a power (one exp per element
// instead of two; the results stay within a few ulp), else by a second exp.
struct TempPow {
  int n = 0;  // 0: no integer power; 1: T == 1
  explicit TempPow(double T) { n = (T == 1.0 || T == 2.0 || T == 3.0 || T == 4.0) ? int(T) : 0; }
};
template <typename U>
inline U int_pow(const U& x, int n) {
  if (n == 2) return x * x;
  if (n == 3) return x * x * x;
  const U x2 = x * x;
  return x2 * x2;
}

// Column sums of target t over [i0, i1): exp(z_t - ref), exp((z_t - ref)/T), and for every
// other peer s (pairwise mode) y[s] += e_T (z_t - z_s) where e_T > 0. The forward passes every
// peer's logits minus its own chunk max (ref = 0), so that an offset between the peers' logits,
// which softmax ignores, never enters a sum (with raw z_t - z_s the KL came out of a difference
// of two terms of the offset's size, losing ~eps * offset / T). (The test, Masked, is
// needed only where 0 * -inf would give NaN; the caller reruns masked when the unmasked sums
// come out NaN). KC: K if known, else 0.
// With eo set, e_T is also stored to eo[i] (the stored exponentials, LossArgs::chunk_scale).
// With tail set, one more vector follows from tail (the chunk's ragged end: tail_n classes,
// padded with -inf; always masked), its e_T stored to eo_tail: one call per chunk, so short
// rows pay the function's set-up once. The padding lanes take exp(0) and are then zeroed: the
// exponential of -inf lands in the underflow range, where the AVX-512 exponential's vscalefps
// takes a microcode assist (~150 cycles), which made a 100-class row 70% slower than a
// 112-class one.
template <int KC, bool Masked, typename U, typename A>
void target_cols(const A* const* zc, int64_t K_rt, int64_t t, int64_t i0, int64_t i1, A ref, A invT,
                 TempPow tp, bool pairs, U* y, U& s1, U& sT, A* eo, const A* const* tail,
                 int64_t tail_n, A* eo_tail) {
  constexpr int64_t W = sizeof(U) / sizeof(A);
  const int64_t K = KC > 0 ? KC : K_rt;
  const U zero{};
  U l1{}, lT{}, yl[KC > 0 ? KC : 1];
  for (auto& v : yl) v = zero;
  U* yp = KC > 0 ? yl : y;
  const auto step = [&](const A* const* src, int64_t i, A* out, auto masked, auto padded) {
    const U z = load<U>(src[t] + i);
    U d = z - ref;
    const auto valid = lane_index<U>() < static_cast<A>(tail_n);  // (used when padded)
    if constexpr (decltype(padded)::value) d = select(valid, d, zero);
    U e1, eT;
    if (tp.n == 1) {
      e1 = eT = vexp_bounded(d);
    } else {
      eT = vexp_bounded(d * invT);
      e1 = tp.n ? int_pow(eT, tp.n) : vexp_bounded(d);
    }
    if constexpr (decltype(padded)::value) eT = select(valid, eT, zero), e1 = select(valid, e1, zero);
    if (out) store(out + i, eT);
    l1 += e1;
    lT += eT;
    if (!pairs) return;
    for (int64_t s = 0; s < K; ++s) {
      if (s == t) continue;
      const U term = eT * (z - load<U>(src[s] + i));
      yp[s] += decltype(masked)::value ? select(eT > zero, term, zero) : term;
    }
  };
  for (int64_t i = i0; i < i1; i += W) step(zc, i, eo, std::bool_constant<Masked>{}, std::false_type{});
  if constexpr (W > 1)
    if (tail) step(tail, 0, eo_tail, std::true_type{}, std::true_type{});
  s1 += l1, sT += lT;
  if (KC > 0)
    for (int64_t s = 0; s < K; ++s) y[s] += yl[s];
}

// Ensemble target of one peer over [0, nv): sums of exp((E - ref)/T) and e ((E - ref) - d_k)
// where e > 0, d_k being peer k's logits minus their own chunk max (RowScratch::center_chunk;
// each relative to its own reference, as in target_cols). With tail_n > 0 one more vector
// follows, the chunk's ragged end: E from e + nv (any finite padding) and d_k from dk_tail
// (padded), its first tail_n lanes counted.
// The sums run in the same lane order as target_cols' T-sum, so that where E_k equals a peer's
// logits (K = 2) the two sums round alike and a KL of nearly equal rows keeps its digits.
template <typename U, typename A>
void ensemble_cols(const A* e, const A* dk, int64_t nv, A ref, A invT, const A* dk_tail,
                   int64_t tail_n, U& se, U& de) {
  constexpr int64_t W = sizeof(U) / sizeof(A);
  const U zero{};
  U ls{}, ld{};
  const auto step = [&](const A* ep, const A* zp, auto padded) {
    U d = load<U>(ep) - ref;
    const auto valid = lane_index<U>() < static_cast<A>(tail_n);  // (used when padded)
    if constexpr (decltype(padded)::value) d = select(valid, d, zero);
    U x = vexp_bounded(d * invT);
    if constexpr (decltype(padded)::value) x = select(valid, x, zero);
    ls += x;
    ld += select(x > zero, x * (d - load<U>(zp)), zero);
  };
  for (int64_t i = 0; i < nv; i += W) step(e + i, dk + i, std::false_type{});
  if (tail_n > 0) step(e + nv, dk_tail, std::true_type{});
  se += ls, de += ld;
}

// E[i] = sum_{j: A[k, j] != 0} A[k, j] z_j[i] (a zero weight skips the peer, so its -inf
// logits add nothing, as in reference._ensemble_logits).
template <typename A>
void ensemble_logits(const A* const* zc, int64_t K, const A* coef_row, int64_t n, A* e) {
  std::fill(e, e + n, A(0));
  for (int64_t j = 0; j < K; ++j) {
    const A c = coef_row[j];
    if (c == A(0)) continue;
    const A* zj = zc[j];
    for (int64_t i = 0; i < n; ++i) e[i] += c * zj[i];
  }
}

// `count` vectors of type V carved out of `storage`, aligned for V (std::vector<V> would not
// honour the vector alignment with every allocator).
template <typename V, typename A>
V* vector_slots(std::vector<A>& storage, int64_t count) {
  constexpr int64_t lanes = sizeof(V) / sizeof(A);
  storage.assign((count + 1) * lanes, A(0));
  const auto addr = reinterpret_cast<std::uintptr_t>(storage.data());
  const std::uintptr_t aligned = (addr + sizeof(V) - 1) / sizeof(V) * sizeof(V);
  return reinterpret_cast<V*>(aligned);
}

template <typename T>
struct RowScratch {
  using A = acc_t<T>;
  using V = typename VecOf<A>::type;
  int64_t K;
  std::vector<A> zbuf, ebuf, gbuf, coef, store_v, store_s;
  std::vector<const A*> zc;
  V *v1, *v2, *v3, *v4;  // per-peer vector accumulators / column values (v1: K*K)
  A *s1, *s2;            // the scalar-tail accumulators of target_grad_sums (s1: K*K)
  // The last, partial vector of every peer's chunk, padded to a whole vector (a scalar tail
  // would cost ~15% of a 1000-class row), and the gradient lanes computed from it.
  static constexpr int64_t W = VecOf<A>::lanes;
  std::vector<A> tail_z, tail_e, tail_g;
  std::vector<const A*> tz, te;
  std::vector<A*> tg;
  // The forward's chunk of every peer minus its chunk max (dc), and its padded ragged end (td).
  std::vector<A> dbuf, tail_d;
  std::vector<const A*> dc, td;
  RowScratch(const LossArgs<T>& a, bool grad)
      : K(a.K), zbuf(std::is_same_v<T, A> ? 0 : a.K * kChunk), ebuf(kChunk),
        gbuf(grad && !std::is_same_v<T, A> ? a.K * kChunk : 0), coef(a.K * a.K), zc(a.K),
        tail_z(a.K * W), tail_e(a.K * W), tail_g(a.K * W), tz(a.K), te(a.K), tg(a.K),
        dbuf(grad ? 0 : a.K * kChunk), tail_d(a.K * W), dc(a.K), td(a.K) {
    for (int64_t k = 0; k < K; ++k)
      tz[k] = tail_z.data() + k * W, te[k] = tail_e.data() + k * W, tg[k] = tail_g.data() + k * W,
      td[k] = tail_d.data() + k * W;
    V* v = vector_slots<V>(store_v, K * K + 3 * K);
    v1 = v, v2 = v + K * K, v3 = v2 + K, v4 = v3 + K;
    store_s.assign(K * K + K, A(0));
    s1 = store_s.data(), s2 = s1 + K * K;
    if (a.ensemble)
      for (int64_t i = 0; i < K * K; ++i) coef[i] = static_cast<A>(a.peer[i]);
  }
  void load_chunk(const LossArgs<T>& a, int64_t b, int64_t c0, int64_t n) {
    for (int64_t k = 0; k < K; ++k)
      zc[k] = chunk_view(a.z[k] + b * a.z_stride[k] + c0, n,
                         zbuf.empty() ? nullptr : zbuf.data() + k * kChunk);
  }
  // dc[k] = zc[k] - ref[k] over the chunk's n columns, and td its ragged end [nv, n) padded
  // with -inf (padding lanes: exp(-inf) = 0, and the masked path keeps their pair terms 0).
  // The forward's pair sums then take differences of centred logits.
  void center_chunk(const A* ref, int64_t nv, int64_t n) {
    for (int64_t k = 0; k < K; ++k) {
      A* d = dbuf.data() + k * kChunk;
      const A* z = zc[k];
      const A r = ref[k];
      for (int64_t i = 0; i < nv; i += W) store(d + i, load<V>(z + i) - r);
      for (int64_t i = nv; i < n; ++i) d[i] = z[i] - r;
      dc[k] = d;
    }
    if (nv < n) pad_tail(dc.data(), tail_d, nv, n, A(kNegInf));
  }
  // dst[k * W ...] = the columns [nv, n) of src[k], then `pad` up to a whole vector.
  template <typename P>
  void pad_tail(const P* src, std::vector<A>& dst, int64_t nv, int64_t n, A pad) {
    for (int64_t k = 0; k < K; ++k) {
      std::fill(dst.begin() + k * W, dst.begin() + (k + 1) * W, pad);
      std::copy(src[k] + nv, src[k] + n, dst.begin() + k * W);
    }
  }
};

template <typename T>
void forward_rows(const LossArgs<T>& a, int64_t b_begin, int64_t b_end) {
  using A = acc_t<T>;
  using V = typename VecOf<A>::type;
  constexpr int64_t W = VecOf<A>::lanes;
  const int64_t K = a.K, C = a.C, B = a.B;
  const double invT_d = 1.0 / a.temperature, eps = a.label_smoothing;
  const A invT = static_cast<A>(invT_d);
  const bool pairs = !a.ensemble;
  const TempPow tp(a.temperature);
  RowScratch<T> sc(a, false);
  // Per-row running state: max, sum exp(z - max), sum exp((z - max)/T), sum z, pair sums
  // Y[t*K + s] (scaled like the T-sum of t; in the coordinates z_t - at(M_t), z_s - at(M_s)),
  // and the ensemble target's max and sums (DE in the coordinates E - at(ME), z_k - at(M_k)).
  std::vector<double> M(K), S1(K), ST(K), SZ(K), Y(K * K), ME(K), SE(K), DE(K), LT(K), logST(K);
  std::vector<double> M_before(K), M_after(K);  // the running maxima before and after a chunk
  std::vector<A> ys(K);             // one target's pair sums of a chunk, reduced
  std::vector<A> cmax(K), cref(K);  // this chunk's max per peer, and its reference
  // Stored exponentials (LossArgs::chunk_scale): each chunk's max per peer, for its scale.
  const bool keep = std::is_same_v<T, A> && a.chunk_scale != nullptr;
  const int64_t n_chunks = (C + kChunk - 1) / kChunk;
  std::vector<A> chunk_max_of(keep ? K * n_chunks : 0);
  for (int64_t b = b_begin; b < b_end; ++b) {
    std::fill(M.begin(), M.end(), kNegInf);
    std::fill(ME.begin(), ME.end(), kNegInf);
    for (auto* v : {&S1, &ST, &SZ, &Y, &SE, &DE}) std::fill(v->begin(), v->end(), 0.0);
    for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
      const int64_t n = std::min(kChunk, C - c0), nv = n / W * W;
      sc.load_chunk(a, b, c0, n);
      for (int64_t k = 0; k < K; ++k) {
        cmax[k] = chunk_max(sc.zc[k], n);
        cref[k] = cmax[k] == A(kNegInf) ? A(0) : cmax[k];
        M_before[k] = M[k];
        M_after[k] = running_max(M[k], cmax[k]);
      }
      sc.center_chunk(cref.data(), nv, n);
      for (int64_t t = 0; t < K; ++t) {
        const A m = cmax[t], ref = cref[t];
        A* eo = nullptr;
        if constexpr (std::is_same_v<T, A>)
          if (keep) eo = a.dz[t] + b * a.dz_stride[t] + c0, chunk_max_of[t * n_chunks + c0 / kChunk] = m;
        V vs1{}, vsT{};
        const auto sums = [&](auto masked) {
          vs1 = vsT = V{};
          std::fill(sc.v2, sc.v2 + K, V{});
          with_peers(K, [&](auto kc) {
            target_cols<decltype(kc)::value, decltype(masked)::value, V>(
                sc.dc.data(), K, t, 0, nv, A(0), invT, tp, pairs, sc.v2, vs1, vsT, eo,
                nv < n ? sc.td.data() : nullptr, n - nv, eo ? sc.tg[t] : nullptr);
          });
        };
        sums(std::false_type{});
        // A pair term 0 * -inf (a masked class, or an exponential that underflowed to 0 where
        // the other peer has -inf) leaves NaN: then the masked pass, which skips the terms
        // whose target probability is 0. (NaN logits give NaN either way.)
        bool nan = false;
        for (int64_t s = 0; s < K && pairs; ++s) nan = nan || std::isnan(ys[s] = hsum(sc.v2[s]));
        if (nan) {
          sums(std::true_type{});
          for (int64_t s = 0; s < K; ++s) ys[s] = hsum(sc.v2[s]);
        }
        if (eo && nv < n) std::copy(sc.tg[t], sc.tg[t] + (n - nv), eo + nv);
        const Rescale r(M[t], m, invT_d);
        const double st_before = ST[t], st_chunk = double(hsum(vsT));
        M[t] = r.max;
        S1[t] = S1[t] * r.row1 + double(hsum(vs1)) * r.chunk1;
        ST[t] = ST[t] * r.rowT + st_chunk * r.chunkT;
        if (eps > 0) SZ[t] += chunk_sum(sc.zc[t], n);
        if (!pairs) continue;
        for (int64_t s = 0; s < K; ++s) {
          if (s == t) continue;
          // Moving every term's coordinates adds the same shift to each: shift * its T-sum.
          const double old_shift = shift(M_before[t], r.max, M_before[s], M_after[s]);
          const double chunk_shift = shift(ref, r.max, cref[s], M_after[s]);
          Y[t * K + s] = (Y[t * K + s] + old_shift * st_before) * r.rowT +
                         (double(ys[s]) + chunk_shift * st_chunk) * r.chunkT;
        }
      }
      if (pairs) continue;
      for (int64_t k = 0; k < K; ++k) {
        ensemble_logits(sc.zc.data(), K, sc.coef.data() + k * K, n, sc.ebuf.data());
        const A m = chunk_max(sc.ebuf.data(), n);
        const A ref = m == A(kNegInf) ? A(0) : m;
        V vse{}, vde{};
        if (nv < n) std::fill(sc.ebuf.begin() + n, sc.ebuf.begin() + nv + W, A(0));
        ensemble_cols<V>(sc.ebuf.data(), sc.dc[k], nv, ref, invT, sc.td[k], n - nv, vse, vde);
        const Rescale r(ME[k], m, invT_d);
        const double se_before = SE[k], se_chunk = double(hsum(vse));
        const double old_shift = shift(ME[k], r.max, M_before[k], M[k]);  // (M[k]: updated above)
        const double chunk_shift = shift(ref, r.max, cref[k], M[k]);
        ME[k] = r.max;
        SE[k] = SE[k] * r.rowT + se_chunk * r.chunkT;
        DE[k] = (DE[k] + old_shift * se_before) * r.rowT +
                (double(hsum(vde)) + chunk_shift * se_chunk) * r.chunkT;
      }
    }
    // Row results.
    const int64_t* lab = a.labels + b * a.M;
    const double* wts = a.weights + b * a.M;
    for (int64_t k = 0; k < K; ++k) logST[k] = std::log(ST[k]), LT[k] = M[k] * invT_d + logST[k];
    if (keep) {  // p = e * exp((m_chunk - M)/T) / ST; a chunk of -inf (e = 0) gets 0, not NaN,
                 // unless the whole row is -inf: its loss is NaN, and so must its gradient be
      for (int64_t k = 0; k < K; ++k) {
        A* out = a.chunk_scale + (k * B + b) * (n_chunks + 1);
        const double empty = M[k] == kNegInf ? std::numeric_limits<double>::quiet_NaN() : 0.0;
        for (int64_t c = 0; c < n_chunks; ++c) {
          const double m = chunk_max_of[k * n_chunks + c];  // (the row's max: exp(0) = 1)
          const double rel = m == M[k] ? 1.0 : std::exp((m - M[k]) * invT_d);
          out[c] = static_cast<A>(m == kNegInf ? empty : rel / ST[k]);
        }
        // cT from the sums in double (the backward would take an exponential of two rounded
        // row stats); S1 sums the T-th powers of the T-sum's terms for T in {2, 3, 4}
        out[n_chunks] = static_cast<A>(tp.n > 1 ? int_pow(ST[k], tp.n) / S1[k] : 1.0);
      }
    }
    for (int64_t k = 0; k < K; ++k) {
      const double lse1 = M[k] + std::log(S1[k]);
      const double lseT = LT[k];
      const double lseE = pairs ? 0.0 : ME[k] * invT_d + std::log(SE[k]);
      double* st = a.row_stats + (k * B + b) * 3;
      st[0] = lse1, st[1] = lseT, st[2] = lseE;
      double ce = 0;
      for (int64_t m = 0; m < a.M; ++m) {
        const double nll = lse1 - double(to_acc(a.z[k][b * a.z_stride[k] + lab[m]]));
        const double term = eps > 0 ? (1 - eps) * nll + eps * (lse1 - SZ[k] / double(C)) : nll;
        if (wts[m] != 0) ce += wts[m] * term;  // 0 log 0 = 0: a zero weight on a masked class adds 0
      }
      a.ce_rows[k * B + b] = ce;
      double kd = 0;
      // KL = sum p_t (z_t - z_s)/T - (lseT_t - lseT_s), with the maxima's part of both terms
      // cancelled exactly: in the coordinates of Y, sum p_t (...)/T - (log S_t - log S_s).
      if (pairs) {
        for (int64_t t = 0; t < K; ++t) {
          if (t == k) continue;
          kd += Y[t * K + k] * invT_d / ST[t] - (logST[t] - logST[k]) + unbounded(M[t], M[k]);
        }
      } else {
        kd = DE[k] * invT_d / SE[k] - (std::log(SE[k]) - logST[k]) + unbounded(ME[k], M[k]);
      }
      a.kd_rows[k * B + b] = kd;
    }
  }
}

// Target-side sums for detach_targets=false over [i0, i1):
// pairwise X[t*K + s] += p_t (z_t - z_s); ensemble X[k] += q_k (E_k - z_k) (where p, q > 0),
// each logit taken relative to its peer's anchor (see GradRow), so that an offset between the
// peers' logits cancels before it is summed (grad_cols uses the same anchors, and the
// differences of anchors cancel between the two).
// With ec set, p = ec * es (the stored exponentials, as grad_cols takes them: the two must
// agree, or the target terms that cancel exactly in exact arithmetic leave a residue).
template <typename U, typename A>
void target_grad_sums(const A* const* zc, const A* const* ec, const A* es, const A* coef, int64_t K,
                      bool pairs, int64_t i0, int64_t i1, A invT, const A* rT, const A* rE,
                      const A* anc, const A* ancE, U* x, U* zv) {
  constexpr int64_t W = sizeof(U) / sizeof(A);
  const U zero{};
  for (int64_t i = i0; i < i1; i += W) {
    for (int64_t k = 0; k < K; ++k) zv[k] = load<U>(zc[k] + i);
    for (int64_t t = 0; t < K; ++t) {
      if (pairs) {
        const U p = ec ? load<U>(ec[t] + i) * es[t] : vexp_bounded((zv[t] - anc[t]) * invT - rT[t]);
        for (int64_t s = 0; s < K; ++s)
          if (s != t) x[t * K + s] += select(p > zero, p * ((zv[t] - anc[t]) - (zv[s] - anc[s])), zero);
      } else {
        U e{};
        for (int64_t j = 0; j < K; ++j)
          if (coef[t * K + j] != A(0)) e += coef[t * K + j] * zv[j];
        const U q = vexp_bounded((e - ancE[t]) * invT - rE[t]);
        x[t] += select(q > zero, q * ((e - ancE[t]) - (zv[t] - anc[t])), zero);
      }
    }
  }
}

// Per-row constants of the gradient pass. The softmaxes are rebuilt from the row stats relative
// to per-peer anchors near the logits: s = exp((z - anc) - r1), p = exp((z - anc)/T - rT),
// q = exp((E - ancE)/T - rE), with anc = lse1 and ancE = T lseE rounded to A, and r1, rT, rE
// the rest of lse1, lseT, lseE, taken in double: (z - anc) stays small, so no probability
// carries the rounding of an lse of the logits' size (~6e-5 at 1000 in fp32).
template <typename A>
struct GradRow {
  const A *r1, *rT, *rE, *a1, *a0, *beta, *H, *coef, *cT, *anc, *ancE;
  A invT;
  int64_t K;
  TempPow tp;
  bool pairs, targets;
};

// dZ over columns [i0, i1) of one chunk, before the label one-hot term. With T in {2, 3, 4},
// s = exp(z - lse1) is taken as p^T exp(T lseT - lse1) = p^T cT. With ec set (the forward's
// stored exponentials), p = ec * es[k] instead of an exponential, and z is read only where a
// term needs it; ec may alias gc (in place: each column is read before it is written).
template <int KC, typename U, typename A>
void grad_cols(const GradRow<A>& g, const A* const* zc, const A* const* ec, const A* es,
               A* const* gc, int64_t i0, int64_t i1, U* zv_rt, U* pv_rt, U* gv_rt) {
  constexpr int64_t W = sizeof(U) / sizeof(A);
  const int64_t K = KC > 0 ? KC : g.K;
  const U zero{};
  U zl[KC > 0 ? KC : 1], pl[KC > 0 ? KC : 1], gl[KC > 0 ? KC : 1];
  U* zv = KC > 0 ? zl : zv_rt;
  U* pv = KC > 0 ? pl : pv_rt;
  U* gv = KC > 0 ? gl : gv_rt;
  const bool need_z = !ec || g.targets || !g.pairs || g.tp.n == 0;
  for (int64_t i = i0; i < i1; i += W) {
    for (int64_t k = 0; k < K; ++k) {
      const U z = need_z ? load<U>(zc[k] + i) : zero;
      U s, p;
      if (ec) {
        p = load<U>(ec[k] + i) * es[k];
        s = g.tp.n == 1 ? p : g.tp.n ? int_pow(p, g.tp.n) * g.cT[k] : vexp_bounded((z - g.anc[k]) - g.r1[k]);
      } else if (g.tp.n == 1) {
        s = p = vexp_bounded((z - g.anc[k]) - g.r1[k]);
      } else {
        p = vexp_bounded((z - g.anc[k]) * g.invT - g.rT[k]);
        s = g.tp.n ? int_pow(p, g.tp.n) * g.cT[k] : vexp_bounded((z - g.anc[k]) - g.r1[k]);
      }
      zv[k] = z;
      pv[k] = p;
      gv[k] = g.a1[k] * s - g.a0[k];
    }
    if (g.pairs) {
      U P{};  // student: sum_{j != k} (p_k - p_j) = K p_k - P
      for (int64_t k = 0; k < K; ++k) P += pv[k];
      for (int64_t k = 0; k < K; ++k) gv[k] += g.beta[k] * (A(K) * pv[k] - P);
      if (g.targets) {
        for (int64_t t = 0; t < K; ++t) {  // target: p_t (sum_s beta_s (z_t - z_s)/T - H_t)
          U acc{};
          for (int64_t s = 0; s < K; ++s)
            if (s != t) acc += g.beta[s] * ((zv[t] - g.anc[t]) - (zv[s] - g.anc[s]));
          gv[t] += select(pv[t] > zero, pv[t] * (acc * g.invT - g.H[t]), zero);
        }
      }
    } else {
      for (int64_t k = 0; k < K; ++k) {
        U e{};
        for (int64_t j = 0; j < K; ++j)
          if (g.coef[k * K + j] != A(0)) e += g.coef[k * K + j] * zv[j];
        const U q = vexp_bounded((e - g.ancE[k]) * g.invT - g.rE[k]);
        gv[k] += g.beta[k] * (pv[k] - q);
        if (g.targets) {  // through E into every peer j with A[k, j] != 0
          const U r = select(q > zero,
                             g.beta[k] * q * (((e - g.ancE[k]) - (zv[k] - g.anc[k])) * g.invT - g.H[k]),
                             zero);
          for (int64_t j = 0; j < K; ++j)
            if (g.coef[k * K + j] != A(0)) gv[j] += g.coef[k * K + j] * r;
        }
      }
    }
    for (int64_t k = 0; k < K; ++k) store(gc[k] + i, gv[k]);
  }
}

template <typename T>
void backward_rows(const LossArgs<T>& a, int64_t b_begin, int64_t b_end) {
  using A = acc_t<T>;
  using V = typename VecOf<A>::type;
  constexpr int64_t W = VecOf<A>::lanes;
  const int64_t K = a.K, C = a.C, B = a.B;
  const double T_ = a.temperature, eps = a.label_smoothing;
  RowScratch<T> sc(a, true);
  std::vector<A> r1(K), rT(K), rE(K), a1(K), a0(K), beta(K), H(K), cT(K), anc(K), ancE(K);
  std::vector<double> alpha(K), Xd(K * K);
  std::vector<A*> gc(K);
  std::vector<const A*> ec(K);
  std::vector<A> es(K);  // this chunk's scale of the stored exponentials, per peer
  const bool stored = std::is_same_v<T, A> && a.chunk_scale != nullptr;
  const int64_t n_chunks = (C + kChunk - 1) / kChunk;
  // The gradient rows of a chunk (or the half-precision staging buffer), and where the stored
  // exponentials are (the same memory, before it is overwritten) with their scale.
  const auto point_chunk = [&](int64_t b, int64_t c0) {
    for (int64_t k = 0; k < K; ++k) {
      gc[k] = sc.gbuf.empty() ? reinterpret_cast<A*>(a.dz[k] + b * a.dz_stride[k] + c0)
                              : sc.gbuf.data() + k * kChunk;
      ec[k] = gc[k];
      if (stored) es[k] = a.chunk_scale[(k * B + b) * (n_chunks + 1) + c0 / kChunk];
    }
  };
  bool any_kd = false;
  for (int64_t k = 0; k < K; ++k) {
    alpha[k] = a.grad_ce[k] / double(B);
    beta[k] = static_cast<A>(a.grad_kd[k] * T_ / (double(B) * (a.ensemble ? 1 : K - 1)));
    any_kd = any_kd || a.grad_kd[k] != 0;
  }
  GradRow<A> g{r1.data(), rT.data(), rE.data(), a1.data(), a0.data(), beta.data(), H.data(),
               sc.coef.data(), cT.data(), anc.data(), ancE.data(), static_cast<A>(1.0 / T_), K,
               TempPow(T_), !a.ensemble,
               !a.detach_targets && any_kd};
  for (int64_t b = b_begin; b < b_end; ++b) {
    const int64_t* lab = a.labels + b * a.M;
    const double* wts = a.weights + b * a.M;
    double wsum = 0;
    for (int64_t m = 0; m < a.M; ++m) wsum += wts[m];
    for (int64_t k = 0; k < K; ++k) {
      const double* st = a.row_stats + (k * B + b) * 3;
      // anchors near each peer's logits (lse1 <= max + log C) and its ensemble target's (its
      // lse at T, times T); 0 where not finite (the terms are then NaN or masked anyway)
      anc[k] = std::isfinite(st[0]) ? static_cast<A>(st[0]) : A(0);
      ancE[k] = std::isfinite(st[2]) ? static_cast<A>(T_ * st[2]) : A(0);
      r1[k] = static_cast<A>(st[0] - double(anc[k]));
      rT[k] = static_cast<A>(st[1] - double(anc[k]) / T_);
      rE[k] = static_cast<A>(st[2] - double(ancE[k]) / T_);
      cT[k] = stored ? a.chunk_scale[(k * B + b) * (n_chunks + 1) + n_chunks]
                     : static_cast<A>(std::exp(st[1] * T_ - st[0]));
      a1[k] = static_cast<A>(alpha[k] * wsum);
      a0[k] = static_cast<A>(eps > 0 ? alpha[k] * eps * wsum / double(C) : 0.0);
    }
    if (g.targets) {  // H = beta-weighted (lse diff + KL) per target, from one extra read
      std::fill(Xd.begin(), Xd.end(), 0.0);
      for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
        const int64_t n = std::min(kChunk, C - c0), nv = n / W * W;
        sc.load_chunk(a, b, c0, n);
        point_chunk(b, c0);
        std::fill(sc.v1, sc.v1 + K * K, V{});
        std::fill(sc.s1, sc.s1 + K * K, A(0));
        const A* const* e = stored ? ec.data() : nullptr;
        target_grad_sums<V>(sc.zc.data(), e, es.data(), sc.coef.data(),
                            K, g.pairs, 0, nv, g.invT, rT.data(), rE.data(), anc.data(),
                            ancE.data(), sc.v1, sc.v2);
        target_grad_sums<A>(sc.zc.data(), e, es.data(), sc.coef.data(),
                            K, g.pairs, nv, n, g.invT, rT.data(), rE.data(), anc.data(),
                            ancE.data(), sc.s1, sc.s2);
        for (int64_t i = 0; i < K * K; ++i) Xd[i] += double(hsum(sc.v1[i])) + sc.s1[i];
      }
      for (int64_t t = 0; t < K; ++t) {
        double h = 0;
        if (g.pairs) {
          for (int64_t s = 0; s < K; ++s)
            if (s != t) h += double(beta[s]) * Xd[t * K + s];
        } else {
          h = Xd[t];
        }
        H[t] = static_cast<A>(h / T_);
      }
    }
    for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
      const int64_t n = std::min(kChunk, C - c0), nv = n / W * W;
      sc.load_chunk(a, b, c0, n);
      point_chunk(b, c0);
      if (nv < n) {  // any finite padding: its lanes are not stored
        sc.pad_tail(sc.zc.data(), sc.tail_z, nv, n, A(0));
        if (stored) sc.pad_tail(ec.data(), sc.tail_e, nv, n, A(0));
      }
      with_peers(K, [&](auto kc) {
        constexpr int KC = decltype(kc)::value;
        grad_cols<KC, V>(g, sc.zc.data(), stored ? ec.data() : nullptr, es.data(), gc.data(), 0, nv,
                         sc.v2, sc.v3, sc.v4);
        if (nv < n)  // the ragged end, padded (its extra lanes are computed and not stored)
          grad_cols<KC, V>(g, sc.tz.data(), stored ? sc.te.data() : nullptr, es.data(), sc.tg.data(),
                           0, W, sc.v2, sc.v3, sc.v4);
      });
      if (nv < n)
        for (int64_t k = 0; k < K; ++k) std::copy(sc.tg[k], sc.tg[k] + (n - nv), gc[k] + nv);
      for (int64_t m = 0; m < a.M; ++m) {  // the one-hot term of the labels in this chunk
        const int64_t c = lab[m] - c0;
        if (c < 0 || c >= n) continue;
        for (int64_t k = 0; k < K; ++k)
          gc[k][c] -= static_cast<A>(alpha[k] * (1 - eps) * wts[m]);
      }
      if constexpr (!std::is_same_v<T, A>) {
        for (int64_t k = 0; k < K; ++k) {
          T* out = a.dz[k] + b * a.dz_stride[k] + c0;
          for (int64_t i = 0; i < n; ++i) out[i] = from_acc<T>(gc[k][i]);
        }
      }
    }
  }
}

}  // namespace metamixer::core::METAMIXER_KD_NS
