// Selection stage 5 of the certified stop rule (stop_rule = certified; select.cu runs it after
// select_stop, whose first read then aims at P itself). The CUDA twin of certify() in
// cpp/src/select.cpp, per query head over the union U1 of its group's first reads:
//   certify_mass  R, the exact mass of the sinks, recent rows and U1's rows, for all G heads
//                 of a KV head at once (each row read once), split over many blocks;
//   certify       one block per query head: the tail sample (certainty clusters, then
//                 seeded draws from the defensive mixture, each drawn cluster scored whole),
//                 the bound Z_up, and at most max_rounds top-up rounds (the hottest drawn
//                 cluster, then unread clusters by rank until their rescaled prior covers
//                 P Z_up - R: a histogram of the unread prior and the crossing bucket ranked
//                 exactly), the head's marks and statistics.
// The draws use the CPU's random numbers (tail_sample.hpp), so both backends sample the same
// clusters up to the rounding of the cumulative sums. Unlike the CPU, whose heads run one after
// another (a head certifies over the top-ups of the heads before it), the G heads of a group
// run in parallel and each certifies over U1 and its own top-ups: a subset of what it attends,
// so the guarantee holds as on the CPU at slightly more tokens.
//
// Marks: kv_mark is 1 for U1 (select_stop) and becomes 2 for a top-up (build_rows takes any
// non-zero mark); cert_mark (per query head) is 3 for a certainty cluster, 4 while a ranked
// top-up waits for its pass and 1 once it is read, and is zero again when certify ends.
#pragma once
#include <algorithm>
#include <string>

#include "select_common.cuh"
#include "tail_sample.hpp"

namespace tactic {
namespace cuda {

namespace {

constexpr int kMassThreads = 256;
constexpr int kMaxG = 16;  // the CUDA backend's largest group

// Kernel A, grid (sequence x KV head, split): the exact mass sum exp(q.k - mx) of every query
// head of the group over the sinks, the recent rows and the rows of the U1 clusters in this
// block's share of the cluster indices, mx the head's best centroid score (SelInfo::mx; a
// common reference, so the splits' sums simply add). One thread per row, all G heads at once
// (each row read once); KG >= G query heads per group, compiled for 4, 8 and 16. One partial
// per (head, split) in a.cert_r.
template <class T, int D, int KG>
__global__ void __launch_bounds__(kMassThreads) certify_mass_kernel(StepGeometry s, SelectArgs a) {
  pdl_begin();  // first: wait for the previous kernel (programmatic dependent launch)
  typedef cub::BlockScan<int64_t, kMassThreads> ScanI;
  __shared__ typename ScanI::TempStorage tmp;
  __shared__ __align__(16) float qs[KG * D];
  __shared__ int32_t s_ex[kMassThreads], s_start[kMassThreads];
  __shared__ float red[kMassThreads / 32][KG];
  const int64_t item = blockIdx.x, b = item / s.hkv, h = item % s.hkv, hq = s.hkv * s.g, q0 = b * hq + h * s.g;
  const int split = blockIdx.y, splits = gridDim.y, G = (int)s.g, tid = threadIdx.x;
  if (a.info[q0].all) return;  // a degenerate selection (every head of the group alike): no bound needed
  const int32_t slot = s.slots[b];
  const SlotCounts st = s.state[s.layer * s.max_batch + slot];
  const int64_t hi = head_index(s, slot, h), nsink = st.n_sink, nclu = st.n_clustered, always = nsink + st.n_recent;
  const int64_t C = st.n_clusters;
  const int32_t* off = a.offsets + hi * (s.cmax + 1);
  const uint8_t* kmark = a.kv_mark + item * s.cmax;
  const T* K = static_cast<const T*>(a.k) + hi * s.cap * D;
  for (int e = tid; e < KG * D; e += kMassThreads) qs[e] = e < G * D ? a.qf[q0 * D + e] : 0.f;
  float mx[KG];
#pragma unroll
  for (int g = 0; g < KG; ++g) mx[g] = g < G ? a.info[q0 + g].mx : 0.f;
  __syncthreads();
  // Per-thread sums in float (each thread adds a few hundred terms at most, relative to the
  // head's best centroid score), combined in double.
  float acc[KG];
#pragma unroll
  for (int g = 0; g < KG; ++g) acc[g] = 0.f;
  auto add_row = [&](int64_t row) {
    float l[KG];
    thread_dots<T, D, KG>(K + row * D, qs, l);  // qs is zero past the G heads
#pragma unroll
    for (int g = 0; g < KG; ++g) acc[g] += __expf(l[g] - mx[g]);
  };
  for (int64_t t = (int64_t)split * kMassThreads + tid; t < always; t += (int64_t)splits * kMassThreads)
    add_row(t < nsink ? t : nsink + nclu + (t - nsink));
  // This block's clusters, a batch at a time: a scan places each marked cluster's rows, then
  // the threads take the batch's rows together (as build_rows does).
  const int64_t lo = C * split / splits, hi_c = C * (split + 1) / splits;
  for (int64_t base = lo; base < hi_c; base += kMassThreads) {
    const int64_t j = base + tid;
    const bool marked = j < hi_c && kmark[j];
    const int64_t v = marked ? (int64_t)off[j + 1] - off[j] : 0;
    int64_t ex, agg;
    ScanI(tmp).ExclusiveSum(v, ex, agg);
    s_ex[tid] = (int32_t)ex;
    s_start[tid] = marked ? (int32_t)(nsink + off[j]) : 0;
    __syncthreads();
    for (int64_t r = tid; r < agg; r += kMassThreads) {
      int l = 0, u = kMassThreads;  // last entry with s_ex <= r: the cluster holding row r
      while (u - l > 1) {
        const int mid = (l + u) >> 1;
        if (s_ex[mid] <= r) l = mid;
        else u = mid;
      }
      add_row(s_start[l] + (r - s_ex[l]));
    }
    __syncthreads();
  }
  const int lane = tid & 31, warp = tid >> 5;
#pragma unroll
  for (int g = 0; g < KG; ++g) {
    float x = acc[g];
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    if (lane == 0) red[warp][g] = x;
  }
  __syncthreads();
  if (tid < G) {
    double r = 0.0;
    for (int w = 0; w < kMassThreads / 32; ++w) r += (double)red[w][tid];
    a.cert_r[(q0 + tid) * kMaxCertSplits + split] = r;
  }
}

// for_clusters with each cluster's two marks (U1's kv_mark, the head's cert_mark) loaded along
// with its score and size: read inside the body, each cluster waited on its own round trip.
// Plain loads: the marks change during the kernel.
template <class F>
__device__ __forceinline__ void for_clusters_marked(const float* sc, const int32_t* off, const uint8_t* m1,
                                                    const uint8_t* m2, int64_t C, F&& f) {
  constexpr int U = 8;
  for (int64_t base = threadIdx.x; base < C; base += (int64_t)U * kSelThreads) {
    float v[U];
    int32_t o0[U], o1[U];
    uint8_t a[U], b[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t j = base + (int64_t)u * kSelThreads;
      if (j < C) {
        v[u] = __ldg(sc + j);
        o0[u] = __ldg(off + j);
        o1[u] = __ldg(off + j + 1);
        a[u] = m1[j];
        b[u] = m2[j];
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t j = base + (int64_t)u * kSelThreads;
      if (j < C) f(j, v[u], o1[u] - o0[u], a[u], b[u]);
    }
  }
}

constexpr int kMaxDraws = 256;  // tail_samples on CUDA at most (the draws live in shared memory)

struct CertShared {
  double su[kMaxDraws];    // the uniforms sorted ascending (then each draw's Y = mass / pi),
  int32_t sidx[kMaxDraws];
  int32_t dc[kMaxDraws];   // each draw's cluster (-1: a zero draw)
  double dpi[kMaxDraws];   // its probability
  double dm[kMaxDraws];    // its exact mass
  int32_t cert[kMaxDraws]; // the certainty clusters
  int32_t lid[kCand];      // the short list L (unread clusters of the best score buckets) by index
  float lw[kCand];         // their prior weights (sizes in SelShared::cs during the walk)
  typename cub::BlockScan<double, kSelThreads>::TempStorage dscan;
  int n_cert, n_left, n_out, out_x, out_s, fail;
  double dv[8];
};

// Kernel B (one block per query head): sample, bound, top-ups, marks, statistics. The prior
// weights w_j = |j| exp(score_j - mx) are computed in float (they shape the sampling
// probabilities and the top-up order; the draws' Y use the same values, so the estimate stays
// unbiased); masses and sums are double.
#ifdef TACTIC_CERTIFY_PHASES  // profiling builds only: per-phase SM cycles of one launch in 25, printed
__device__ unsigned int g_cert_tickets = 0;
#define CERT_STAMP(k) do { __syncthreads(); if (threadIdx.x == 0) ph[k] = clock64(); } while (0)
#else
#define CERT_STAMP(k) do {} while (0)
#endif
template <class T, int D>
__global__ void __launch_bounds__(kSelThreads) certify_kernel(StepGeometry s, SelectArgs a, int splits) {
  pdl_begin();  // first: wait for the previous kernel (programmatic dependent launch)
  __shared__ SelShared S;
  __shared__ CertShared X;
  __shared__ float qs[D];
  const int64_t i = blockIdx.x;
  const SelInfo info = a.info[i];
  if (info.all) return;  // select_head selected everything and wrote the statistics
  const HeadView v = head_view(s, a, i);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t C = v.C;
#ifdef TACTIC_CERTIFY_PHASES
  long long ph[10] = {};
  int n_rounds = 0;
#endif
  CERT_STAMP(0);
  const int32_t* off = v.off;
  const float* sc = v.sc;
  uint8_t* kmark = v.kmark;
  uint8_t* own = a.cert_mark + i * s.cmax;
  int32_t* list = v.head_list;  // the exact head's list is spent: top-up lists go here
  const int32_t slot = s.slots[v.b];
  const T* K = static_cast<const T*>(a.k) + head_index(s, slot, v.h) * s.cap * D;
  const float mxf = info.mx, bpl = info.bpl;
  const double mx = mxf, P = a.target;
  const int n = a.tail_samples;
  for (int e = tid; e < D; e += kSelThreads) qs[e] = a.qf[i * D + e];
  for (int k = tid; k < kBuckets; k += kSelThreads) {
    S.tok[k] = 0;
    S.pri[k] = 0.f;
  }
  if (tid == 0) {
    double r = 0.0;
    for (int k = 0; k < splits; ++k) r += a.cert_r[i * kMaxCertSplits + k];
    X.dv[0] = r;
    X.n_cert = 0;
    X.n_out = 0;
    X.out_x = order_float(-INFINITY);
    X.out_s = 0;
    S.n_cand = 0;
  }
  if (tid < kMaxDraws) {
    X.dc[tid] = -1;
    X.dm[tid] = 0.0;
  }
  __syncthreads();
  double R = X.dv[0];
  auto wgt = [&](float x, int32_t sz) { return (double)((float)sz * __expf(x - mxf)); };
  auto first = [&](int64_t j) { return kmark[j] == 1; };      // in U1 (another head's top-up is 2)
  auto open = [&](int64_t j) { return !first(j) && own[j] == 0; };  // unread and not a certainty cluster
  auto unread = [&](int64_t j) { return !first(j) && own[j] != 1; };
  // The exact masses sum exp(q.k - mx) of clusters id_of(0..m) (an id < 0: none), each handed
  // to out(t, mass) by thread t % kSelThreads. The rows of kSelThreads clusters at a time are
  // spread over the whole block, a chunk of kSelThreads rows at a time, and each cluster sums
  // its rows of the chunk in order (deterministic; a warp per cluster left lanes idle and
  // chained the clusters). Uses S.sorted, S.cid, S.cval and S.scan.
  auto masses = [&](int m, auto id_of, auto out) {
    int32_t* item_row = S.sorted;  // a cluster's first row in K
    int32_t* item_at = S.cid;      // its first position in this batch's row order
    double* part = S.cval;         // one chunk's exp(q.k - mx)
    for (int t0 = 0; t0 < m; t0 += kSelThreads) {
      const int t = t0 + tid, nb = min(m - t0, kSelThreads);
      int my_sz = 0, at, rows;
      int32_t row0 = 0;
      if (t < m) {
        const int32_t j = id_of(t);
        if (j >= 0) row0 = (int32_t)v.nsink + off[j], my_sz = off[j + 1] - off[j];
      }
      HeadScan(S.scan).ExclusiveSum(my_sz, at, rows);
      if (tid < nb) item_row[tid] = row0, item_at[tid] = at;
      __syncthreads();
      double mine = 0.0;
      for (int c0 = 0; c0 < rows; c0 += kSelThreads) {
        const int r = c0 + tid;
        double e = 0.0;
        if (r < rows) {
          int l = 0, u = nb;  // the last cluster starting at or before r (it holds r)
          while (u - l > 1) {
            const int mid = (l + u) >> 1;
            if (item_at[mid] <= r) l = mid;
            else u = mid;
          }
          const int64_t row = (int64_t)item_row[l] + (r - item_at[l]);
          e = exp((double)thread_dot<T, D>(K + row * D, qs) - mx);
        }
        part[tid] = e;
        __syncthreads();
        for (int k = max(at, c0); k < min(at + my_sz, c0 + kSelThreads); ++k) mine += part[k - c0];
        __syncthreads();
      }
      if (t < m) out(t, mine);
    }
  };
  const bool read_all = !(R > 0) || !isfinite(R);  // overflow or nothing read: take everything

  // 2. The tail sample. W, U: prior mass and tokens of the unread clusters; their count and
  // prior per score bucket (S.tok, S.pri) pick the short list below and rank the top-ups.
  double W = 0.0, U = 0.0;
  for_clusters_marked(sc, off, kmark, own, C, [&](int64_t j, float x, int32_t sz, uint8_t km, uint8_t) {
    if (km == 1) return;  // in U1
    const double w = wgt(x, sz);
    W += w, U += sz;
    const int bk = bucket_of(x, mxf, bpl);
    atomicAdd(&S.tok[bk], 1);
    atomicAdd(&S.pri[bk], (float)w);
  });
  W = block_sum(W, S);
  U = block_sum(U, S);
  CERT_STAMP(1);
  const bool prior_ok = W > 0 && isfinite(W);
  double Wr = W, Ur = U;
  int n_left = read_all ? 0 : n;
  // Certainty clusters: expected draw count n_left pi_j >= 1, pi_j = (w_j / Wr + |j| / Ur) / 2,
  // taken by one walk in share order (below). At most n - 2 clusters qualify, all among the
  // best by prior, so the walk runs over a short list L: the unread clusters of the best score
  // buckets, at most kCand, in index order; where a cluster outside L could come first (its
  // largest score and size bound its share), the walk goes on over every cluster.
  bool full = true;
  int nl = 0, bl = -1;  // members of L; the last score bucket L covers (-1: L is empty)
  {
    int cnt[kBuckets / kSelThreads], tot = 0;
#pragma unroll
    for (int k = 0; k < kBuckets / kSelThreads; ++k) tot += cnt[k] = S.tok[tid * (kBuckets / kSelThreads) + k];
    int ex, agg;
    HeadScan(S.scan).ExclusiveSum(tot, ex, agg);
    int fit = 0;  // buckets of this thread whose running count stays within kCand
#pragma unroll
    for (int k = 0; k < kBuckets / kSelThreads; ++k) fit += (ex += cnt[k]) <= kCand;
    bl = (int)block_sum((double)fit, S) - 1;
  }
  double wo = 0.0, uo = 0.0;  // prior and tokens outside L
  if (bl >= 0) {
    int ox = order_float(-INFINITY), os = 0, no = 0;  // the outsiders' largest score and size, count
    for_clusters_marked(sc, off, kmark, own, C, [&](int64_t j, float x, int32_t sz, uint8_t km, uint8_t) {
      if (km == 1) return;
      if (bucket_of(x, mxf, bpl) <= bl) {
        S.cid[atomicAdd(&S.n_cand, 1)] = (int32_t)j;
      } else {
        wo += wgt(x, sz), uo += sz;
        ox = max(ox, order_float(x)), os = max(os, sz), ++no;
      }
    });
    for (int o = 16; o > 0; o >>= 1) {  // one atomic per warp (per cluster, they serialised)
      ox = max(ox, __shfl_xor_sync(0xffffffffu, ox, o));
      os = max(os, __shfl_xor_sync(0xffffffffu, os, o));
      no += __shfl_xor_sync(0xffffffffu, no, o);
    }
    if (lane == 0 && no > 0) {
      atomicMax(&X.out_x, ox);
      atomicMax(&X.out_s, os);
      atomicAdd(&X.n_out, no);
    }
    wo = block_sum(wo, S);
    uo = block_sum(uo, S);
    nl = S.n_cand;  // <= kCand by the choice of bl
    // L in index order: a bitonic sort of the kCand slots (empty ones last).
    static_assert(kCand == kSelThreads, "one slot of L per thread");
    if (tid >= nl) S.cid[tid] = INT32_MAX;
    for (int k = 2; k <= kCand; k <<= 1)
      for (int h = k >> 1; h > 0; h >>= 1) {
        __syncthreads();
        const int o = tid ^ h;
        if (o > tid) {
          const int32_t x = S.cid[tid], y = S.cid[o];
          if ((x > y) == ((tid & k) == 0)) S.cid[tid] = y, S.cid[o] = x;
        }
      }
    __syncthreads();
    if (tid < nl) {
      const int32_t id = S.cid[tid];
      X.lid[tid] = id;
      const int32_t sz = off[id + 1] - off[id];
      X.lw[tid] = (float)wgt(sc[id], sz);
      S.cs[tid] = (float)sz;
    }
    __syncthreads();
  }
  CERT_STAMP(2);
  // The walk: the unread clusters in the order of their share at the first totals (W, U),
  // index order on ties, each taken while n_left pi_j >= 1 over the totals less those taken
  // before it; the first that fails ends the walk (the CPU's definition). Over L by one warp:
  // each step takes L's next open member by an argmax (no sort); an outsider of L can come
  // first only where a member's share is at most the outsiders' bound b0, and there the walk
  // is decided only if that member and every outsider would fail (else the full walk below).
  const bool mix0 = prior_ok && W > 0;
  const double iw0 = mix0 ? 0.5 / W : 0.0, iu0 = (mix0 ? 0.5 : 1.0) / U;  // shares at (W, U)
  if (bl >= 0 && n_left > 2 && Ur > 0) {
    // One warp walks L, with no block-wide barrier per step: a peaked head's chain is long.
    if (warp == 0) {
      constexpr int kPer = kCand / 32;
      uint32_t open_bits = 0;
#pragma unroll
      for (int k = 0; k < kPer; ++k) open_bits |= (uint32_t)(k * 32 + lane < nl) << k;
      const bool any_out = X.n_out > 0;
      const double w_out = wgt(unorder_float(X.out_x), X.out_s), s_out = X.out_s;
      int left = n_left, n_cert = 0, fail = 0;
      double wr = W, ur = U;  // the walk: less the clusters taken (the CPU subtracts as it walks)
      double key[kPer];
#pragma unroll
      for (int k = 0; k < kPer; ++k) {
        const int m = k * 32 + lane;
        key[k] = m < nl ? X.lw[m] * iw0 + S.cs[m] * iu0 : -1.0;
      }
      const double b0 = any_out ? w_out * iw0 + s_out * iu0 : -1.0;
      while (ur > 0 && left > 2) {
        double best = -1.0;
        int bm = INT_MAX;  // the next member: largest share, lowest index (L is in index order)
#pragma unroll
        for (int k = 0; k < kPer; ++k)
          if ((open_bits >> k & 1) && key[k] > best) best = key[k], bm = k * 32 + lane;
        for (int o = 16; o > 0; o >>= 1) {
          const double ob = __shfl_xor_sync(0xffffffffu, best, o);
          const int om = __shfl_xor_sync(0xffffffffu, bm, o);
          if (ob > best || (ob == best && om < bm)) best = ob, bm = om;
        }
        const bool mix = prior_ok && wr > 0;
        const double iw = mix ? 0.5 / wr : 0.0, iu = (mix ? 0.5 : 1.0) / ur;
        const bool outs_fail = !any_out || left * (w_out * iw + s_out * iu) < 1;
        if (bm == INT_MAX) {  // L is spent: an outsider is next
          fail = !outs_fail;
          break;
        }
        const bool take = left * (X.lw[bm] * iw + S.cs[bm] * iu) >= 1;
        if (any_out && best <= b0) {  // an outsider may come first
          fail = take || !outs_fail;
          break;
        }
        if (!take) break;
        if (lane == (bm & 31)) {
          open_bits &= ~(1u << (bm >> 5));
          own[X.lid[bm]] = 3;
          X.cert[n_cert] = X.lid[bm];
        }
        ++n_cert;
        --left;
        wr -= X.lw[bm];
        ur -= S.cs[bm];
      }
      if (!fail) {  // wr, ur recounted over L's open members and everything outside L, not
                    // subtracted (the CPU's recount)
        wr = 0.0, ur = 0.0;
#pragma unroll
        for (int k = 0; k < kPer; ++k)
          if (open_bits >> k & 1) wr += X.lw[k * 32 + lane], ur += S.cs[k * 32 + lane];
        for (int o = 16; o > 0; o >>= 1) {
          wr += __shfl_xor_sync(0xffffffffu, wr, o);
          ur += __shfl_xor_sync(0xffffffffu, ur, o);
        }
        wr += wo, ur += uo;
      }
      if (lane == 0) {
        X.n_left = left;
        X.n_cert = n_cert;
        X.fail = fail;
        X.dv[5] = wr;
        X.dv[6] = ur;
      }
    }
    __syncthreads();
    n_left = X.n_left;
    full = X.fail != 0;
    Wr = X.dv[5];
    Ur = X.dv[6];
  }
  CERT_STAMP(3);
  if (full && n_left > 2 && Ur > 0) {
    // The walk over every cluster, from where the one over L stopped (Wr, Ur: the totals less
    // the clusters taken): each step a block-wide argmax of the open clusters' shares at
    // (W, U), index order on ties. Slow (a pass per step), and rare: L holds the best buckets.
    while (Ur > 0 && n_left > 2) {
      double best = -1.0;
      int64_t bj = INT64_MAX;
      for_clusters(sc, off, C, [&](int64_t j, float x, int32_t sz) {
        if (!open(j)) return;
        const double k = wgt(x, sz) * iw0 + sz * iu0;
        if (k > best || (k == best && j < bj)) best = k, bj = j;
      });
      for (int o = 16; o > 0; o >>= 1) {
        const double ob = __shfl_xor_sync(0xffffffffu, best, o);
        const int64_t oj = __shfl_xor_sync(0xffffffffu, bj, o);
        if (ob > best || (ob == best && oj < bj)) best = ob, bj = oj;
      }
      __syncthreads();
      if (lane == 0) S.red_d[warp] = best, S.red_i[warp] = bj;
      __syncthreads();
      best = S.red_d[0], bj = S.red_i[0];
      for (int w = 1; w < kSelWarps; ++w)
        if (S.red_d[w] > best || (S.red_d[w] == best && S.red_i[w] < bj)) best = S.red_d[w], bj = S.red_i[w];
      if (bj == INT64_MAX) break;  // nothing open
      const bool mix = prior_ok && Wr > 0;
      const int32_t sz = off[bj + 1] - off[bj];
      const double wj = wgt(sc[bj], sz);
      const double pj = mix ? 0.5 * (wj / Wr + sz / Ur) : sz / Ur;
      if (n_left * pj < 1) break;
      __syncthreads();  // every thread has read the marks of this step
      if (tid == 0) {
        own[bj] = 3;
        X.cert[X.n_cert] = (int32_t)bj;
        ++X.n_cert;
      }
      --n_left;
      Wr -= wj;
      Ur -= sz;
      __syncthreads();
    }
    Wr = 0.0, Ur = 0.0;  // recounted over what is open
    for_clusters(sc, off, C, [&](int64_t j, float x, int32_t sz) {
      if (open(j)) Wr += wgt(x, sz), Ur += sz;
    });
    Wr = block_sum(Wr, S);
    Ur = block_sum(Ur, S);
  }
  // The draws: u_k = unit(key + 2k) over the cumulative sum of the mixture in cluster order
  // (its total is 1 by construction; the CPU scales by the computed sum, the same up to
  // rounding); draw k lands on the cluster whose interval [before, after) holds u_k. One scan,
  // kPerThread consecutive clusters a thread; a uniform past the rounded end is a zero draw.
  CERT_STAMP(4);
  if (!(Ur > 0)) n_left = 0;  // every unread cluster is a certainty cluster: the tail is exact
  if (n_left > 0) {
    constexpr int kPerThread = 8, kTile = kSelThreads * kPerThread;
    const bool rest_ok = prior_ok && Wr > 0;
    const uint64_t key = draw_key(s.layer, slot, v.h, (i % (s.hkv * s.g)) % s.g, v.total);
    double* uni = S.cval;  // the uniforms in draw order (S.cval is free until the top-ups)
    if (tid < n_left) uni[tid] = unit_draw(key + 2 * (uint64_t)tid);
    __syncthreads();
    if (tid < n_left) {
      const double x = uni[tid];
      int r = 0;
      for (int m = 0; m < n_left; ++m) r += uni[m] < x || (uni[m] == x && m < tid);
      X.su[r] = x;
      X.sidx[r] = tid;
    }
    __syncthreads();
    // pi_j by reciprocals; a thread's clusters' loads all issued before any is used
    const double iw = rest_ok ? 0.5 / Wr : 0.0, iu = (rest_ok ? 0.5 : 1.0) / Ur;
    double carry = 0.0;
    for (int64_t base = 0; base < C; base += kTile) {
      const int64_t j0 = base + (int64_t)tid * kPerThread;
      float xs[kPerThread];
      int32_t o0[kPerThread], o1[kPerThread];
      uint8_t km[kPerThread], ow[kPerThread];
#pragma unroll
      for (int e = 0; e < kPerThread; ++e) {
        const int64_t j = j0 + e;
        if (j < C) {
          xs[e] = __ldg(sc + j);
          o0[e] = __ldg(off + j);
          o1[e] = __ldg(off + j + 1);
          km[e] = kmark[j];
          ow[e] = own[j];
        }
      }
      double x[kPerThread], tsum = 0.0;
#pragma unroll
      for (int e = 0; e < kPerThread; ++e) {
        x[e] = 0.0;
        if (j0 + e < C && km[e] != 1 && ow[e] == 0) {  // open: unread, not a certainty cluster
          const int32_t sz = o1[e] - o0[e];
          x[e] = (rest_ok ? wgt(xs[e], sz) * iw : 0.0) + sz * iu;
        }
        tsum += x[e];
      }
      double ex, agg;
      cub::BlockScan<double, kSelThreads>(X.dscan).ExclusiveSum(tsum, ex, agg);
      double lo = carry + ex;
      if (tsum > 0) {
        int l = 0, u = n_left;  // the first sorted uniform >= lo, then a walk over this thread's intervals
        while (l < u) {
          const int mid = (l + u) >> 1;
          if (X.su[mid] < lo) l = mid + 1;
          else u = mid;
        }
#pragma unroll
        for (int e = 0; e < kPerThread; ++e) {
          if (x[e] > 0) {
            const double hi = lo + x[e];
            for (; l < n_left && X.su[l] < hi; ++l) {
              X.dc[X.sidx[l]] = (int32_t)(j0 + e);
              X.dpi[X.sidx[l]] = x[e];
            }
            lo = hi;
          }
        }
      }
      carry += agg;
      __syncthreads();  // dscan is reused
    }
  }
  // Exact masses of the certainty clusters (summed: t_certain) and of every draw (a cluster
  // drawn twice is scored twice: the same value).
  CERT_STAMP(5);
  // Exact masses: certainty cluster t, then draw t - n_cert (n_cert + n_left = n).
  const int n_cert = X.n_cert;
  double tc = 0.0;
  masses(
      n_cert + n_left, [&](int t) { return t < n_cert ? X.cert[t] : X.dc[t - n_cert]; },
      [&](int t, double e) {
        if (t < n_cert) tc += e;
        else X.dm[t - n_cert] = e;
      });
  tc = block_sum(tc, S);
  CERT_STAMP(6);
  // 3. The bound: Z_up = R + T_up, T_up = t_certain + mean Y + z_c sd(Y) / sqrt(n_left).
  double t0, z_up;
  {
    double y = 0.0;  // draw tid's Y = mass / pi
    if (tid < n_left) {
      y = X.dc[tid] >= 0 && X.dpi[tid] > 0 ? X.dm[tid] / X.dpi[tid] : 0.0;
      X.su[tid] = y;  // the uniforms are spent
    }
    const double sum = block_sum(y, S), sq = block_sum(y * y, S);
    const double mean = n_left ? sum / n_left : 0.0;
    const double var = n_left > 1 ? fmax(0.0, (sq - n_left * mean * mean) / (n_left - 1)) : 0.0;
    t0 = tc + mean;
    z_up = R + tc + mean + (n_left ? a.z_conf * sqrt(var / n_left) : 0.0);
  }
  const double r0 = R;
  CERT_STAMP(7);

  // 4. Top-up rounds while R < P Z_up (read_all: one round that takes everything). The unread
  // prior's total and histogram come from pass A less what the rounds read (w_taken); the
  // round's clusters are looked for in L where the crossing bucket lies within it (no pass over
  // every cluster), else over all clusters.
  double w_taken = 0.0;
  for (int round = 0; read_all ? round < 1 : (round < a.max_rounds && R < P * z_up); ++round) {
#ifdef TACTIC_CERTIFY_PHASES
    ++n_rounds;
#endif
    const double w_rest = fmax(W - w_taken, 0.0);
    const double scale = w_rest > 0 ? fmax(t0 - (R - r0), 0.0) / w_rest : 0.0;
    if (tid == 0) {  // the unread cluster holding the largest draw first
      int32_t hot = -1;
      int hk = -1;
      double best = 0.0;
      for (int k = 0; k < n_left; ++k) {
        const int32_t j = X.dc[k];
        if (j >= 0 && unread(j) && X.su[k] > best) best = X.su[k], hot = j, hk = k;
      }
      double need = P * z_up - R, w = 0.0;
      if (hot >= 0) {
        own[hot] = 1;
        R += X.dm[hk];
        w = wgt(sc[hot], off[hot + 1] - off[hot]);
        need -= scale * w;
        S.pri[bucket_of(sc[hot], mxf, bpl)] -= (float)w;  // read now: not in the ranking below
      }
      X.dv[3] = R;
      X.dv[4] = need;
      X.dv[7] = w;
    }
    __syncthreads();
    R = X.dv[3];
    const double need = X.dv[4];
    w_taken += X.dv[7];
    if (!read_all && !(need > 0)) continue;
    // Then unread clusters by rank while the rescaled prior taken so far is below `need`:
    // whole histogram buckets, then the crossing bucket's clusters ranked exactly (more than
    // kCand of them: the bucket whole).
    int bx = kBuckets;
    bool whole = read_all, use_l = false;
    if (!read_all) {
      double before = 0.0;
      bx = crossing_bucket(S.pri, scale, 0.0, need, S, &before);
      if (bx >= kBuckets) {
        whole = true;  // rounding left `need` uncovered: every unread cluster
      } else {
        use_l = bx <= bl;  // every unread cluster of buckets <= bx is in L
        if (tid == 0) S.n_cand = 0;
        __syncthreads();
        auto consider = [&](int64_t j, float x) {
          if (bucket_of(x, mxf, bpl) == bx && unread(j)) {
            const int at = atomicAdd(&S.n_cand, 1);
            if (at < kCand) {
              S.cs[at] = x;
              S.cid[at] = (int32_t)j;
            }
          }
        };
        if (use_l) {
          if (tid < nl) consider(X.lid[tid], sc[X.lid[tid]]);
        } else {
          for_clusters(sc, off, C, [&](int64_t j, float x, int32_t) { consider(j, x); });
        }
        __syncthreads();
        const int nc = S.n_cand;
        if (nc > kCand) {
          bx += 1;  // the crossing bucket whole
        } else {
          rank_candidates(S.cs, S.cid, nc, S.sorted);
          for (int k = tid; k < nc; k += kSelThreads) {
            const int32_t j = S.sorted[k];
            S.cval[k] = scale * wgt(sc[j], off[j + 1] - off[j]);
          }
          __syncthreads();
          double taken;
          const int cut = cut_candidates(0, nc, before, need, S, &taken);
          for (int k = tid; k < cut; k += kSelThreads) own[S.sorted[k]] = 4;
        }
      }
      __syncthreads();
    }
    // Mark the round's clusters (buckets before bx, or all where `whole`, and the ranked
    // ones), list them in index order, take them out of the unread prior, add their exact mass.
    int n_new = 0;
    double w_new = 0.0;
    auto mark_batch = [&](int64_t j, bool valid) {
      bool take = false;
      if (valid && !first(j)) {
        const uint8_t o = own[j];
        take = o == 4 || (o != 1 && (whole || bucket_of(sc[j], mxf, bpl) < bx));
      }
      int ex, agg;
      HeadScan(S.scan).ExclusiveSum((int)take, ex, agg);
      if (take) {
        own[j] = 1;
        list[n_new + ex] = (int32_t)j;
        const double w = wgt(sc[j], off[j + 1] - off[j]);
        w_new += w;
        atomicAdd(&S.pri[bucket_of(sc[j], mxf, bpl)], -(float)w);
      }
      n_new += agg;
      __syncthreads();  // scan storage reuse
    };
    if (use_l) {
      mark_batch(tid < nl ? X.lid[tid] : 0, tid < nl);
    } else {  // every cluster, kPer consecutive ones a thread, their marks loaded together
      constexpr int kPer = 8;
      for (int64_t base = 0; base < C; base += (int64_t)kPer * kSelThreads) {
        const int64_t j0 = base + (int64_t)tid * kPer;
        float xs[kPer];
        uint8_t km[kPer], ow[kPer];
#pragma unroll
        for (int u = 0; u < kPer; ++u)
          if (j0 + u < C) xs[u] = __ldg(sc + j0 + u), km[u] = kmark[j0 + u], ow[u] = own[j0 + u];
        int cnt = 0;
        bool take[kPer];
#pragma unroll
        for (int u = 0; u < kPer; ++u) {
          take[u] = j0 + u < C && km[u] != 1 &&
                    (ow[u] == 4 || (ow[u] != 1 && (whole || bucket_of(xs[u], mxf, bpl) < bx)));
          cnt += take[u];
        }
        int ex, agg;
        HeadScan(S.scan).ExclusiveSum(cnt, ex, agg);
#pragma unroll
        for (int u = 0; u < kPer; ++u)
          if (take[u]) {
            const int64_t j = j0 + u;
            own[j] = 1;
            list[n_new + ex++] = (int32_t)j;
            const double w = wgt(xs[u], off[j + 1] - off[j]);
            w_new += w;
            atomicAdd(&S.pri[bucket_of(xs[u], mxf, bpl)], -(float)w);
          }
        n_new += agg;
        __syncthreads();  // scan storage reuse
      }
    }
    w_taken += block_sum(w_new, S);
    double e = 0.0;
    masses(n_new, [&](int t) { return list[t]; }, [&](int, double m) { e += m; });
    R += block_sum(e, S);
    if (whole) break;  // everything is read
  }

  // 5. Marks and statistics: the head attends U1 and its top-ups; est_mass = R / (R + T_hat),
  // T_hat the sample's estimate less the exact mass read since.
  CERT_STAMP(8);
  const double t_hat = fmax(t0 - (R - r0), 0.0);
  int64_t tokens = 0;
  for_clusters_marked(sc, off, kmark, own, C, [&](int64_t j, float, int32_t sz, uint8_t km, uint8_t o) {
    const bool in_u1 = km == 1;
    if (in_u1 || o == 1) {
      tokens += sz;
      if (v.hmark) v.hmark[j] = 1;
      if (!in_u1 && km == 0) kmark[j] = 2;
    }
    if (o) own[j] = 0;
  });
  tokens = (int64_t)block_sum((double)tokens, S);
  if (tid == 0) {
    a.head_tokens[i] = v.always + tokens;
    a.est_mass[i] = read_all || !(R + t_hat > 0) ? 1.0 : fmin(1.0, R / (R + t_hat));
  }
#ifdef TACTIC_CERTIFY_PHASES
  CERT_STAMP(9);
  if (tid == 0 && (atomicAdd(&g_cert_tickets, 1u) / gridDim.x) % 25 == 10)
    printf("CERTPH C=%lld head=%lld full=%d nl=%d ncert=%d nleft=%d rounds=%d kcyc A=%.1f L=%.1f chain=%.1f "
           "fallback=%.1f scan=%.1f mass=%.1f bound=%.1f rounds=%.1f final=%.1f\n",
           (long long)C, (long long)i, (int)full, nl, n_cert, n_left, n_rounds, (ph[1] - ph[0]) * 1e-3,
           (ph[2] - ph[1]) * 1e-3, (ph[3] - ph[2]) * 1e-3, (ph[4] - ph[3]) * 1e-3, (ph[5] - ph[4]) * 1e-3,
           (ph[6] - ph[5]) * 1e-3, (ph[7] - ph[6]) * 1e-3, (ph[8] - ph[7]) * 1e-3, (ph[9] - ph[8]) * 1e-3);
#endif
}

template <class T, int D>
void launch_certify_d(const StepGeometry& s, const SelectArgs& a, int splits, cudaStream_t st) {
  const int64_t items = s.batch * s.hkv, heads = items * s.g;
  const dim3 mg((unsigned)items, (unsigned)splits);
  if (s.g <= 4) launch<certify_mass_kernel<T, D, 4>>(s.pdl, mg, kMassThreads, 0, st, s, a);
  else if (s.g <= 8) launch<certify_mass_kernel<T, D, 8>>(s.pdl, mg, kMassThreads, 0, st, s, a);
  else launch<certify_mass_kernel<T, D, 16>>(s.pdl, mg, kMassThreads, 0, st, s, a);
  TACTIC_CUDA_LAUNCH_CHECK("certify_mass");
  launch<certify_kernel<T, D>>(s.pdl, (unsigned)heads, kSelThreads, 0, st, s, a, splits);
  TACTIC_CUDA_LAUNCH_CHECK("certify");
}

// The kernels of one element type, by head dim (select_certify_<type>.cu instantiates one T).
template <class T>
void certify_by_dim(const StepGeometry& s, const SelectArgs& a, int splits, cudaStream_t st) {
  switch (s.d) {
    case 64: launch_certify_d<T, 64>(s, a, splits, st); break;
    case 80: launch_certify_d<T, 80>(s, a, splits, st); break;
    case 96: launch_certify_d<T, 96>(s, a, splits, st); break;
    case 128: launch_certify_d<T, 128>(s, a, splits, st); break;
    default: launch_certify_d<T, 256>(s, a, splits, st); break;
  }
}

}  // namespace

// One translation unit per element type (select_certify_f32/f16/bf16.cu), so the build compiles
// them in parallel: 15 instantiations of certify_kernel in one file took ~200 s, the build's
// critical path.
void launch_certify_typed(float, const StepGeometry& s, const SelectArgs& a, int splits, cudaStream_t st);
void launch_certify_typed(__half, const StepGeometry& s, const SelectArgs& a, int splits, cudaStream_t st);
void launch_certify_typed(__nv_bfloat16, const StepGeometry& s, const SelectArgs& a, int splits, cudaStream_t st);

}  // namespace cuda
}  // namespace tactic
