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
#include <algorithm>
#include <string>

#include "select_common.cuh"
#include "tail_sample.hpp"

namespace tactic {
namespace cuda {

namespace {

constexpr int kMassThreads = 256;
constexpr int kMaxG = 16;  // the CUDA backend's largest group

// q . row for the G query heads of a group, one thread per row (qs: [G, D] in shared memory).
template <class T, int D>
__device__ __forceinline__ void group_dot(const T* row, const float* qs, int G, float* l) {
  constexpr int kPer = 16 / sizeof(T), N = D / kPer;
  const uint4* p = reinterpret_cast<const uint4*>(row);
#pragma unroll
  for (int g = 0; g < kMaxG; ++g) l[g] = 0.f;
#pragma unroll 2
  for (int c = 0; c < N; ++c) {
    float e[kPer];
    unpack16<T>(__ldg(p + c), e);
#pragma unroll
    for (int g = 0; g < kMaxG; ++g)
      if (g < G) {
#pragma unroll
        for (int k = 0; k < kPer; ++k) l[g] = fmaf(qs[g * D + c * kPer + k], e[k], l[g]);
      }
  }
}

// Kernel A, grid (sequence x KV head, split): the exact mass sum exp(q.k - mx) of every query
// head of the group over the sinks, the recent rows and the rows of the U1 clusters in this
// block's share of the cluster indices, mx the head's best centroid score (SelInfo::mx; a
// common reference, so the splits' sums simply add). One partial per (head, split) in
// a.parts[].as.
template <class T, int D>
__global__ void __launch_bounds__(kMassThreads) certify_mass_kernel(StepGeometry s, SelectArgs a) {
  pdl_begin();  // first: wait for the previous kernel (programmatic dependent launch)
  typedef cub::BlockScan<int64_t, kMassThreads> ScanI;
  __shared__ typename ScanI::TempStorage tmp;
  __shared__ float qs[kMaxG * D];
  __shared__ int32_t s_ex[kMassThreads], s_start[kMassThreads];
  __shared__ double red[kMassThreads / 32][kMaxG];
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
  for (int e = tid; e < G * D; e += kMassThreads) qs[e] = a.qf[q0 * D + e];
  float mx[kMaxG];
#pragma unroll
  for (int g = 0; g < kMaxG; ++g) mx[g] = g < G ? a.info[q0 + g].mx : 0.f;
  __syncthreads();
  double acc[kMaxG];
#pragma unroll
  for (int g = 0; g < kMaxG; ++g) acc[g] = 0.0;
  auto add_row = [&](int64_t row) {
    float l[kMaxG];
    group_dot<T, D>(K + row * D, qs, G, l);
#pragma unroll
    for (int g = 0; g < kMaxG; ++g)
      if (g < G) acc[g] += exp((double)l[g] - (double)mx[g]);
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
  for (int g = 0; g < kMaxG; ++g) {
    double x = acc[g];
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    if (lane == 0) red[warp][g] = x;
  }
  __syncthreads();
  if (tid < G) {
    double r = 0.0;
    for (int w = 0; w < kMassThreads / 32; ++w) r += red[w][tid];
    a.parts[(q0 + tid) * kMaxExactSplits + split] = ExactPart{(double)mx[tid], r, 0.0, 0.0};
  }
}

constexpr int kMaxDraws = 256;  // tail_samples on CUDA at most (the draws live in shared memory)

struct CertShared {
  double u[kMaxDraws];     // the uniforms (then each draw's Y = mass / pi)
  double su[kMaxDraws];    // the uniforms sorted ascending, and their draw index
  int32_t sidx[kMaxDraws];
  int32_t dc[kMaxDraws];   // each draw's cluster (-1: a zero draw)
  double dpi[kMaxDraws];   // its probability
  double dm[kMaxDraws];    // its exact mass
  int32_t cert[kMaxDraws]; // the certainty clusters and their exact masses
  double cm[kMaxDraws];
  typename cub::BlockScan<double, kSelThreads>::TempStorage dscan;
  int n_cert, n_left, any;
  double dv[8];
};

// Kernel B (one block per query head): sample, bound, top-ups, marks, statistics.
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
  const int32_t* off = v.off;
  const float* sc = v.sc;
  uint8_t* kmark = v.kmark;
  uint8_t* own = a.cert_mark + i * s.cmax;
  int32_t* list = v.head_list;  // the exact head's list is spent: top-up lists go here
  const int32_t slot = s.slots[v.b];
  const T* K = static_cast<const T*>(a.k) + head_index(s, slot, v.h) * s.cap * D;
  const double mx = info.mx, P = a.target;
  const int n = a.tail_samples;
  for (int e = tid; e < D; e += kSelThreads) qs[e] = a.qf[i * D + e];
  if (tid == 0) {
    double r = 0.0;
    for (int k = 0; k < splits; ++k) r += a.parts[i * kMaxExactSplits + k].as;
    X.dv[0] = r;
    X.n_cert = 0;
  }
  if (tid < kMaxDraws) {
    X.dc[tid] = -1;
    X.dm[tid] = 0.0;
  }
  __syncthreads();
  double R = X.dv[0];
  auto wgt = [&](float x, int32_t sz) { return (double)sz * exp((double)x - mx); };
  auto first = [&](int64_t j) { return kmark[j] == 1; };      // in U1 (another head's top-up is 2)
  auto open = [&](int64_t j) { return !first(j) && own[j] == 0; };  // unread and not a certainty cluster
  auto unread = [&](int64_t j) { return !first(j) && own[j] != 1; };
  // A cluster's exact mass, by one warp (lanes over rows; every lane gets the sum).
  auto cluster_mass = [&](int64_t j) {
    double e = 0.0;
    for (int64_t r = v.nsink + off[j] + lane; r < v.nsink + off[j + 1]; r += 32)
      e += exp((double)thread_dot<T, D>(K + r * D, qs) - mx);
    for (int o = 16; o > 0; o >>= 1) e += __shfl_xor_sync(0xffffffffu, e, o);
    return e;
  };
  const bool read_all = !(R > 0) || !isfinite(R);  // overflow or nothing read: take everything

  // 2. The tail sample. W, U: prior mass and tokens of the unread clusters.
  double W = 0.0, U = 0.0;
  for_clusters(sc, off, C, [&](int64_t j, float x, int32_t sz) {
    if (!first(j)) W += wgt(x, sz), U += sz;
  });
  W = block_sum(W, S);
  U = block_sum(U, S);
  const bool prior_ok = W > 0 && isfinite(W);
  double Wr = W, Ur = U;
  int n_left = read_all ? 0 : n;
  // Certainty clusters: expected draw count n_left pi_j >= 1 (the CPU's loop: within a pass,
  // clusters in index order, n_left shrinking as they are taken; pi from the pass's totals).
  while (Ur > 0 && n_left > 2) {
    if (tid == 0) S.n_cand = 0;
    __syncthreads();
    const double wp = Wr, up = Ur;
    const int nl = n_left;
    for_clusters(sc, off, C, [&](int64_t j, float x, int32_t sz) {
      if (!open(j)) return;
      const double pi = prior_ok && wp > 0 ? 0.5 * (wgt(x, sz) / wp + sz / up) : sz / up;
      if (nl * pi >= 1) {  // at most nl such clusters (the pi sum to 1)
        const int at = atomicAdd(&S.n_cand, 1);
        if (at < kCand) {
          S.cid[at] = (int32_t)j;
          S.cval[at] = pi;
        }
      }
    });
    __syncthreads();
    const int nc = min(S.n_cand, kCand);
    for (int k = tid; k < nc; k += kSelThreads) {  // index order
      int r = 0;
      for (int m = 0; m < nc; ++m) r += S.cid[m] < S.cid[k];
      S.sorted[r] = k;
    }
    __syncthreads();
    if (tid == 0) {
      int any = 0, left = nl;
      for (int r = 0; r < nc && left > 2; ++r) {
        const int k = S.sorted[r];
        if (left * S.cval[k] < 1) continue;
        own[S.cid[k]] = 3;
        X.cert[X.n_cert++] = S.cid[k];
        --left;
        any = 1;
      }
      X.n_left = left;
      X.any = any;
    }
    __syncthreads();
    n_left = X.n_left;
    if (!X.any) break;
    Wr = 0.0, Ur = 0.0;  // recomputed, not subtracted (cancellation)
    for_clusters(sc, off, C, [&](int64_t j, float x, int32_t sz) {
      if (open(j)) Wr += wgt(x, sz), Ur += sz;
    });
    Wr = block_sum(Wr, S);
    Ur = block_sum(Ur, S);
  }
  // The draws: u_k = unit(key + 2k) * total over the cumulative sum of the mixture in cluster
  // order; draw k lands on the cluster whose interval [before, after) holds u_k. Two scans
  // in the same order: the first for the total, the second to place the sorted uniforms.
  if (!(Ur > 0)) n_left = 0;  // every unread cluster is a certainty cluster: the tail is exact
  if (n_left > 0) {
    const bool rest_ok = prior_ok && Wr > 0;
    const uint64_t key = draw_key(s.layer, slot, v.h, (i % (s.hkv * s.g)) % s.g, v.total);
    double total = 0.0;
    for (int pass = 0; pass < 2; ++pass) {
      double carry = 0.0;
      for (int64_t base = 0; base < C; base += kSelThreads) {
        const int64_t j = base + tid;
        double x = 0.0;
        if (j < C && open(j)) {
          const int32_t sz = off[j + 1] - off[j];
          x = rest_ok ? 0.5 * (wgt(sc[j], sz) / Wr + sz / Ur) : sz / Ur;
        }
        double incl, agg;
        cub::BlockScan<double, kSelThreads>(X.dscan).InclusiveSum(x, incl, agg);
        if (pass == 1 && x > 0) {
          const double lo = carry + incl - x, hi = carry + incl;
          int l = 0, u = n_left;  // first sorted uniform >= lo
          while (l < u) {
            const int mid = (l + u) >> 1;
            if (X.su[mid] < lo) l = mid + 1;
            else u = mid;
          }
          for (int k = l; k < n_left && (X.su[k] < hi || (hi == total && X.su[k] >= total)); ++k) {
            X.dc[X.sidx[k]] = (int32_t)j;
            X.dpi[X.sidx[k]] = x / total;
          }
        }
        carry += agg;
        __syncthreads();  // dscan is reused
      }
      if (pass == 0) {
        total = carry;
        if (tid < n_left) X.u[tid] = unit_draw(key + 2 * (uint64_t)tid) * total;
        __syncthreads();
        if (tid < n_left) {
          const double x = X.u[tid];
          int r = 0;
          for (int m = 0; m < n_left; ++m) r += X.u[m] < x || (X.u[m] == x && m < tid);
          X.su[r] = x;
          X.sidx[r] = tid;
        }
        __syncthreads();
      }
    }
  }
  // Exact masses of the certainty clusters and of every draw (a cluster drawn twice is scored
  // twice here: the same value).
  const int n_cert = X.n_cert;
  for (int t = warp; t < n_cert + n_left; t += kSelWarps) {
    const int32_t j = t < n_cert ? X.cert[t] : X.dc[t - n_cert];
    const double e = j >= 0 ? cluster_mass(j) : 0.0;
    if (lane == 0) {
      if (t < n_cert) X.cm[t] = e;
      else X.dm[t - n_cert] = e;
    }
  }
  __syncthreads();
  // 3. The bound: Z_up = R + T_up, T_up = t_certain + mean Y + z_c sd(Y) / sqrt(n_left).
  if (tid == 0) {
    double tc = 0.0, sum = 0.0, sq = 0.0;
    for (int t = 0; t < n_cert; ++t) tc += X.cm[t];
    for (int k = 0; k < n_left; ++k) {
      const double y = X.dc[k] >= 0 && X.dpi[k] > 0 ? X.dm[k] / X.dpi[k] : 0.0;
      X.u[k] = y;
      sum += y;
      sq += y * y;
    }
    const double mean = n_left ? sum / n_left : 0.0;
    const double var = n_left > 1 ? fmax(0.0, (sq - n_left * mean * mean) / (n_left - 1)) : 0.0;
    X.dv[1] = tc + mean;
    X.dv[2] = R + tc + mean + (n_left ? a.z_conf * sqrt(var / n_left) : 0.0);
  }
  __syncthreads();
  const double t0 = X.dv[1], z_up = X.dv[2], r0 = R;

  // 4. Top-up rounds while R < P Z_up (read_all: one round that takes everything).
  for (int round = 0; read_all ? round < 1 : (round < a.max_rounds && R < P * z_up); ++round) {
    double w_rest = 0.0;
    for_clusters(sc, off, C, [&](int64_t j, float x, int32_t sz) {
      if (unread(j)) w_rest += wgt(x, sz);
    });
    w_rest = block_sum(w_rest, S);
    const double scale = w_rest > 0 ? fmax(t0 - (R - r0), 0.0) / w_rest : 0.0;
    if (tid == 0) {  // the unread cluster holding the largest draw first
      int32_t hot = -1;
      int hk = -1;
      double best = 0.0;
      for (int k = 0; k < n_left; ++k) {
        const int32_t j = X.dc[k];
        if (j >= 0 && unread(j) && X.u[k] > best) best = X.u[k], hot = j, hk = k;
      }
      double need = P * z_up - R;
      if (hot >= 0) {
        own[hot] = 1;
        R += X.dm[hk];
        need -= scale * wgt(sc[hot], off[hot + 1] - off[hot]);
      }
      X.dv[3] = R;
      X.dv[4] = need;
    }
    __syncthreads();
    R = X.dv[3];
    const double need = X.dv[4];
    if (!read_all && !(need > 0)) continue;
    // Then unread clusters by rank while the rescaled prior taken so far is below `need`:
    // whole histogram buckets, then the crossing bucket's clusters ranked exactly (more than
    // kCand of them: the bucket whole).
    int bx = kBuckets;
    bool whole = read_all;
    if (!read_all) {
      for (int k = tid; k < kBuckets; k += kSelThreads) S.pri[k] = 0.f;
      __syncthreads();
      for_clusters(sc, off, C, [&](int64_t j, float x, int32_t sz) {
        if (unread(j)) atomicAdd(&S.pri[bucket_of(x, info.mx, info.bpl)], (float)wgt(x, sz));
      });
      __syncthreads();
      double before = 0.0;
      bx = crossing_bucket(S.pri, scale, 0.0, need, S, &before);
      if (bx >= kBuckets) {
        whole = true;  // rounding left `need` uncovered: every unread cluster
      } else {
        if (tid == 0) S.n_cand = 0;
        __syncthreads();
        for_clusters(sc, off, C, [&](int64_t j, float x, int32_t) {
          if (bucket_of(x, info.mx, info.bpl) == bx && unread(j)) {
            const int at = atomicAdd(&S.n_cand, 1);
            if (at < kCand) {
              S.cs[at] = x;
              S.cid[at] = (int32_t)j;
            }
          }
        });
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
    // ones), list them in index order and add their exact mass.
    int n_new = 0;
    for (int64_t base = 0; base < C; base += kSelThreads) {
      const int64_t j = base + tid;
      bool take = false;
      if (j < C && !first(j)) {
        const uint8_t o = own[j];
        take = o == 4 || (o != 1 && (whole || bucket_of(sc[j], info.mx, info.bpl) < bx));
      }
      int ex, agg;
      HeadScan(S.scan).ExclusiveSum((int)take, ex, agg);
      if (take) {
        own[j] = 1;
        list[n_new + ex] = (int32_t)j;
      }
      n_new += agg;
      __syncthreads();  // scan storage reuse
    }
    double e = 0.0;
    for (int t = warp; t < n_new; t += kSelWarps) {
      const double m = cluster_mass(list[t]);
      if (lane == 0) e += m;
    }
    R += block_sum(e, S);
    if (whole) break;  // everything is read
  }

  // 5. Marks and statistics: the head attends U1 and its top-ups; est_mass = R / (R + T_hat),
  // T_hat the sample's estimate less the exact mass read since.
  const double t_hat = fmax(t0 - (R - r0), 0.0);
  int64_t tokens = 0;
  for_clusters(sc, off, C, [&](int64_t j, float, int32_t sz) {
    const uint8_t o = own[j];
    const bool in_u1 = first(j);
    if (in_u1 || o == 1) {
      tokens += sz;
      if (v.hmark) v.hmark[j] = 1;
      if (!in_u1 && kmark[j] == 0) kmark[j] = 2;
    }
    if (o) own[j] = 0;
  });
  tokens = (int64_t)block_sum((double)tokens, S);
  if (tid == 0) {
    a.head_tokens[i] = v.always + tokens;
    a.est_mass[i] = read_all || !(R + t_hat > 0) ? 1.0 : fmin(1.0, R / (R + t_hat));
  }
}

template <class T, int D>
void launch_certify_d(const StepGeometry& s, const SelectArgs& a, int splits, cudaStream_t st) {
  const int64_t items = s.batch * s.hkv, heads = items * s.g;
  launch<certify_mass_kernel<T, D>>(s.pdl, dim3((unsigned)items, (unsigned)splits), kMassThreads, 0, st, s, a);
  TACTIC_CUDA_LAUNCH_CHECK("certify_mass");
  launch<certify_kernel<T, D>>(s.pdl, (unsigned)heads, kSelThreads, 0, st, s, a, splits);
  TACTIC_CUDA_LAUNCH_CHECK("certify");
}

}  // namespace

int certify_max_samples() { return kMaxDraws; }

void launch_certify(const StepGeometry& s, const SelectArgs& a) {
  if (a.tail_samples < 2 || a.tail_samples > kMaxDraws)
    throw UnsupportedError("the CUDA certified stop rule draws at most " + std::to_string(kMaxDraws) +
                           " tail samples per query head, got tail_samples=" + std::to_string(a.tail_samples));
  if (s.g > kMaxG) throw UnsupportedError("the CUDA certified stop rule supports up to 16 query heads per KV head");
  cudaStream_t st = as_stream(s.stream);
  const int64_t items = s.batch * s.hkv, sms = a.sm_count > 0 ? a.sm_count : 132;
  const int splits = (int)std::max<int64_t>(1, std::min<int64_t>(kMaxExactSplits, (2 * sms + items - 1) / items));
  dispatch_float(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    switch (s.d) {
      case 64: launch_certify_d<T, 64>(s, a, splits, st); break;
      case 80: launch_certify_d<T, 80>(s, a, splits, st); break;
      case 96: launch_certify_d<T, 96>(s, a, splits, st); break;
      case 128: launch_certify_d<T, 128>(s, a, splits, st); break;
      default: launch_certify_d<T, 256>(s, a, splits, st); break;
    }
  });
}

}  // namespace cuda
}  // namespace tactic
