// Selection stage 3, exact (select_exact), `tiles` blocks per query head. Every block reads the
// head's finished histogram (select_hist) and finds the exact head's crossing bucket bh itself;
// over its 1/tiles of the clusters it then reads the rows of clusters in buckets before bh
// exactly (their softmax mass and prior), shares the sinks and recent rows with the other
// blocks, and files every cluster of a bucket that may still be ranked (bh and after, at most
// kCand clusters) under its bucket in `ids`. The last block to finish ranks bh's clusters, reads
// the head's share of them, and takes the stop point: alpha = exact / prior on the head, the
// estimated total z, and the ranked prefix whose estimated mass reaches P_eff * z (whole
// buckets, then the crossing bucket's clusters from `ids`, ranked exactly). No block walks all
// of a head's clusters alone. It writes SelInfo and the head's statistics and clears the
// histogram for the next step.
#include <cub/block/block_scan.cuh>

#include "select_common.cuh"

namespace tactic {
namespace cuda {

namespace {

struct MaxSum {  // online softmax state: sum of exp(x - m)
  double m, s;
};
// Adds exp(x - m) to an online (max, sum) pair: one exp per element.
__device__ __forceinline__ MaxSum add(MaxSum a, double x) {
  if (x > a.m) return {x, a.s * exp(a.m - x) + 1.0};
  return {a.m, a.s + exp(x - a.m)};
}

// q . row for one thread: D known at compile time, so the row's 16-byte loads are issued in
// batches of 8 without waiting for each other (a runtime loop left one load in flight).
template <class T, int D>
__device__ __forceinline__ float thread_dot(const T* row, const float* q) {
  constexpr int kPer = 16 / sizeof(T), N = D / kPer, kBatch = 8;
  const uint4* p = reinterpret_cast<const uint4*>(row);
  float acc = 0.f;
#pragma unroll
  for (int c0 = 0; c0 < N; c0 += kBatch) {
    uint4 r[kBatch];
#pragma unroll
    for (int j = 0; j < kBatch; ++j)
      if (c0 + j < N) r[j] = __ldg(p + c0 + j);
#pragma unroll
    for (int j = 0; j < kBatch; ++j)
      if (c0 + j < N) {
        float e[kPer];
        unpack16<T>(r[j], e);
#pragma unroll
        for (int k = 0; k < kPer; ++k) acc = fmaf(q[(c0 + j) * kPer + k], e[k], acc);
      }
  }
  return acc;
}

// The stop point of head i from its combined exact masses (select_exact's last block):
// writes the SelInfo stop fields (or `all` where the estimate is unusable) and the statistics.
// Ranks the clusters filed under bucket bk in `ids` (S.sorted); their number, or -1 past kCand.
__device__ int rank_filed(const int32_t* ids, const int32_t* start, const float* sc, int bk, SelShared& S) {
  const int n = start[bk + 1] - start[bk];
  if (n > kCand) return -1;
  for (int k = threadIdx.x; k < n; k += kSelThreads) {
    const int32_t j = __ldcg(ids + start[bk] + k);
    S.cid[k] = j;
    S.cs[k] = sc[j];
  }
  __syncthreads();
  rank_candidates(S.cs, S.cid, n, S.sorted);
  return n;
}

__device__ void stop_point(const SelectArgs& a, const HeadView& v, SelInfo f, double a_mass, double read_exact,
                           double prior_head, const int32_t* ids, const int32_t* start, SelShared& S) {
  const int64_t i = v.i;
  const int32_t* off = v.off;
  const float* sc = v.sc;
  const int tid = threadIdx.x;
  auto csize = [&](int64_t j) { return (int64_t)off[j + 1] - off[j]; };
  const float mx = f.mx;
  const int bh = f.bh, bh_whole = f.bh_whole, nh_cand = f.nh_cand, cut_h = f.cut_h;
  // S.tok holds the token histogram and S.sorted the head's ranked crossing bucket already.
  for (int k = tid; k < kBuckets; k += kSelThreads) S.pri[k] = __ldcg(a.acc_pri + i * kBuckets + k);
  __syncthreads();
  double prior_all = 0.0;
  for (int k = tid; k < kBuckets; k += kSelThreads) prior_all += (double)S.pri[k];
  prior_all = block_sum(prior_all, S);
  // Priors are relative to the best centroid score mx; exact masses to their own max. alpha
  // maps the first onto the second, so the estimate needs no common reference.
  const double prior_rest = fmax(0.0, prior_all - prior_head);
  const double alpha = read_exact / prior_head;
  const double z = a_mass + read_exact + alpha * prior_rest;
  if (!(isfinite(alpha) && alpha > 0) || !(z > 0) || !isfinite(z)) {  // read everything
    if (tid == 0) {
      f.all = 1;
      a.info[i] = f;
      a.head_tokens[i] = v.total;
      a.est_mass[i] = 1.0;
    }
    return;
  }

  // Stop point: ranked clusters after the head until the estimate reaches P_eff * z.
  const double p_eff = fmin(1.0, a.target + a.margin * (1.0 - a.target));
  const double goal = p_eff * z;
  const double acc0 = a_mass + read_exact;
  int bs = bh_whole, cut_s = 0;  // selected: buckets < bs, plus sorted[0..cut_s) of bs
  bool bs_ranked = false;
  double acc = acc0;
  if (nh_cand > 0 && bh_whole == bh) {  // the head's crossing bucket is partly taken
    bs = bh;
    cut_s = cut_h;
    bs_ranked = true;
  }
  if (acc0 < goal) {
    bool done = false;
    if (bs_ranked) {  // the rest of bucket bh first: its ranked candidates after the head's cut
      for (int k = tid; k < nh_cand; k += kSelThreads)
        S.cval[k] = alpha * (double)csize(S.sorted[k]) * exp((double)sc[S.sorted[k]] - (double)mx);
      __syncthreads();
      double taken;
      const int c2 = cut_candidates(cut_h, nh_cand, acc0, goal, S, &taken);
      acc = taken;
      if (c2 < nh_cand || acc >= goal) {
        cut_s = c2;
        done = true;
      } else {
        bs = bh + 1;  // bh taken whole; continue after it
        cut_s = 0;
        bs_ranked = false;
      }
    }
    if (!done) {
      // Buckets from bs on, whole, until one crosses the goal (S.tok keeps every bucket).
      __syncthreads();
      for (int k = tid; k < kBuckets; k += kSelThreads)
        if (k < bs) S.pri[k] = 0.f;
      __syncthreads();
      double bbefore = 0.0;
      const int bx = crossing_bucket(S.pri, alpha, acc, goal, S, &bbefore);
      if (bx >= kBuckets) {  // rounding left the goal unreached: take everything
        bs = kBuckets;
        cut_s = 0;
        bs_ranked = false;
        acc = z;
      } else {
        const int n = rank_filed(ids, start, sc, bx, S);
        if (n < 0) {
          bs = bx + 1;
          cut_s = 0;
          bs_ranked = false;
          acc = bbefore + alpha * (double)S.pri[bx];
        } else {
          for (int k = tid; k < n; k += kSelThreads)
            S.cval[k] = alpha * (double)csize(S.sorted[k]) * exp((double)sc[S.sorted[k]] - (double)mx);
          __syncthreads();
          double taken;
          cut_s = cut_candidates(0, n, bbefore, goal, S, &taken);
          acc = taken;
          bs = bx;
          bs_ranked = true;
        }
      }
    }
  }

  // Tokens: whole buckets < bs from the histogram, plus the ranked prefix of bs.
  int64_t tokens = 0;
  for (int k = tid; k < kBuckets; k += kSelThreads)
    if (k < bs) tokens += S.tok[k];
  if (bs_ranked)
    for (int k = tid; k < cut_s; k += kSelThreads) tokens += csize(S.sorted[k]);
  tokens = (int64_t)block_sum((double)tokens, S);
  if (tid == 0) {
    f.s_whole = bs;
    f.s_bk = bs;
    f.s_cut = bs_ranked ? cut_s : 0;
    if (f.s_cut > 0) {
      f.s_tid = S.sorted[cut_s - 1];
      f.s_ts = sc[f.s_tid];
    }
    a.info[i] = f;
    a.head_tokens[i] = v.always + tokens;
    a.est_mass[i] = fmin(1.0, acc / z);
  }
}

// Head clusters gathered per flush: their row starts and sizes, then their row offsets.
constexpr int kList = 2 * kSelThreads;

template <class T, int D>
__global__ void __launch_bounds__(kSelThreads, 2) select_exact_kernel(StepGeometry s, SelectArgs a) {
  pdl_begin();  // first: wait for the previous kernel (programmatic dependent launch)
  typedef cub::BlockScan<int, kSelThreads> Scan;
  __shared__ float qs[D];
  __shared__ int32_t l_start[kList], l_ex[kList], start[kBuckets + 1];
  __shared__ int s_n;
  __shared__ MaxSum wa[kSelWarps], wh[kSelWarps];
  __shared__ double wp[kSelWarps];
  __shared__ SelShared S;
  const int64_t i = blockIdx.x;
  const int tiles = gridDim.y, tile = blockIdx.y, tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const HeadView v = head_view(s, a, i);
  const int32_t slot = s.slots[v.b];
  const T* K = static_cast<const T*>(a.k) + head_index(s, slot, v.h) * s.cap * D;
  const int32_t* off = v.off;
  const float* sc = v.sc;
  int32_t* ids = a.ids + i * s.cmax;
  const bool all = selects_all(v, a);
  const float mx = unorder_float(a.seg_max[i]);
  const float bpl = bucket_width(mx, unorder_float(a.seg_min[i]));
  for (int e = tid; e < D; e += kSelThreads) qs[e] = a.qf[i * D + e];
  if (tid == 0) s_n = 0;
  MaxSum ma{-INFINITY, 0.0}, mh{-INFINITY, 0.0};
  double prior = 0.0;
  // Reads the listed clusters' rows (one thread per row) into mh and empties the list.
  auto flush = [&]() {
    __syncthreads();
    const int n = s_n;
    constexpr int PER = kList / kSelThreads;
    int sz[PER], sum = 0;
#pragma unroll
    for (int k = 0; k < PER; ++k) {
      const int e = tid * PER + k;
      sz[k] = e < n ? l_ex[e] : 0;  // l_ex holds sizes until here
      sum += sz[k];
    }
    int ex, total;
    Scan(S.scan).ExclusiveSum(sum, ex, total);
    __syncthreads();
#pragma unroll
    for (int k = 0; k < PER; ++k) {
      l_ex[tid * PER + k] = ex;
      ex += sz[k];
    }
    __syncthreads();
    for (int r = tid; r < total; r += kSelThreads) {
      int lo = 0, hi = n;  // the last entry with l_ex <= r holds row r
      while (hi - lo > 1) {
        const int mid = (lo + hi) >> 1;
        if (l_ex[mid] <= r) lo = mid;
        else hi = mid;
      }
      const int64_t row = (int64_t)l_start[lo] + (r - l_ex[lo]);
      mh = add(mh, thread_dot<T, D>(K + row * D, qs));
    }
    __syncthreads();
    if (tid == 0) s_n = 0;
    __syncthreads();
  };
  // The histogram: tokens per bucket, and each bucket's first place in `ids` (clusters before it).
  const double thr = fmax(1.0, a.head_fraction * (double)v.nclu);
  int bh = kBuckets;
  double before = 0.0;
  if (!all) {
    constexpr int PER = kBuckets / kSelThreads;
    int c[PER], sum = 0;
#pragma unroll
    for (int k = 0; k < PER; ++k) {
      S.tok[tid * PER + k] = __ldcg(a.acc_tok + i * kBuckets + tid * PER + k);
      c[k] = __ldcg(a.acc_cnt + i * kBuckets + tid * PER + k);
      sum += c[k];
    }
    int ex, total;
    Scan(S.scan).ExclusiveSum(sum, ex, total);
#pragma unroll
    for (int k = 0; k < PER; ++k) {
      start[tid * PER + k] = ex;
      ex += c[k];
    }
    if (tid == 0) start[kBuckets] = total;
    __syncthreads();
    bh = crossing_bucket(S.tok, 1.0, 0.0, thr, S, &before);  // the exact head: buckets < bh, then part of bh
  }
  // An overflowing crossing bucket goes into the head whole (more tokens, never fewer).
  const bool ovf = bh < kBuckets && start[bh + 1] - start[bh] > kCand;
  const int head_whole = ovf ? bh + 1 : bh;
  if (!all) {
    // Sinks and recent rows, spread over the head's blocks.
    const int64_t stride = (int64_t)tiles * kSelThreads;
    for (int64_t t = (int64_t)tile * kSelThreads + tid; t < v.always; t += stride) {
      const int64_t row = t < v.nsink ? t : v.nsink + v.nclu + (t - v.nsink);
      ma = add(ma, thread_dot<T, D>(K + row * D, qs));
    }
    // This block's clusters, kU per thread at a time (all their scores loaded before any is
    // used: one pass of latency per kU * kSelThreads clusters, not per kSelThreads): head
    // clusters onto the list, which is read (flush) each time it fills, so the rows of many
    // clusters are in flight together; clusters of buckets that may be ranked later are filed
    // under their bucket.
    constexpr int kU = 8;
    int32_t* cur = a.cursor + i * kBuckets;
    const int64_t lo = v.C * tile / tiles, hi = v.C * (tile + 1) / tiles;
    for (int64_t base = lo; base < hi; base += (int64_t)kU * kSelThreads) {
      float x[kU];
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int64_t j = base + (int64_t)u * kSelThreads + tid;
        x[u] = j < hi ? __ldg(sc + j) : 0.f;
      }
      unsigned in = 0;
      int n_in = 0;
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int64_t j = base + (int64_t)u * kSelThreads + tid;
        if (j < hi) {
          const int b = bucket_of(x[u], mx, bpl);
          if (b < head_whole) {
            in |= 1u << u;
            ++n_in;
          } else if (start[b + 1] - start[b] <= kCand) {
            ids[start[b] + atomicAdd(cur + b, 1)] = (int32_t)j;
          }
        }
      }
      int32_t o0[kU], o1[kU];
#pragma unroll
      for (int u = 0; u < kU; ++u)
        if (in >> u & 1u) {
          const int64_t j = base + (int64_t)u * kSelThreads + tid;
          o0[u] = __ldg(off + j);
          o1[u] = __ldg(off + j + 1);
          prior += (double)(o1[u] - o0[u]) * exp((double)x[u] - (double)mx);
        }
      int pos, tot;
      Scan(S.scan).ExclusiveSum(n_in, pos, tot);
      const int n0 = s_n, end = n0 + tot;
      // This thread's entries go to list places n0 + pos, ...; a full list is read first.
      for (int w0 = 0;; w0 += kList) {
        int p = n0 + pos;
#pragma unroll
        for (int u = 0; u < kU; ++u)
          if (in >> u & 1u) {
            if (p >= w0 && p < w0 + kList) {
              l_start[p - w0] = (int32_t)v.nsink + o0[u];
              l_ex[p - w0] = o1[u] - o0[u];
            }
            ++p;
          }
        if (end - w0 < kList) {
          __syncthreads();
          if (tid == 0) s_n = end - w0;
          __syncthreads();
          break;
        }
        __syncthreads();
        if (tid == 0) s_n = kList;
        flush();
      }
    }
    if (s_n > 0) flush();
  }
  // This block's totals: the largest logit first (max is exact in any order), then every
  // thread rescales its own sum once to it and the sums are added.
  auto reduce = [&](double* out) {  // out: am, as, hm, hs, prior
    double m2[2] = {ma.m, mh.m};
    for (int o = 16; o > 0; o >>= 1)
      for (int k = 0; k < 2; ++k) m2[k] = fmax(m2[k], __shfl_xor_sync(0xffffffffu, m2[k], o));
    __syncthreads();
    if (lane == 0) {
      wa[warp].m = m2[0];
      wh[warp].m = m2[1];
    }
    __syncthreads();
    double M[2] = {-INFINITY, -INFINITY};
    for (int w = 0; w < kSelWarps; ++w) {
      M[0] = fmax(M[0], wa[w].m);
      M[1] = fmax(M[1], wh[w].m);
    }
    double s3[3] = {ma.m == -INFINITY ? 0.0 : ma.s * exp(ma.m - M[0]),
                    mh.m == -INFINITY ? 0.0 : mh.s * exp(mh.m - M[1]), prior};
    for (int o = 16; o > 0; o >>= 1)
      for (int k = 0; k < 3; ++k) s3[k] += __shfl_xor_sync(0xffffffffu, s3[k], o);
    if (lane == 0) {
      wa[warp].s = s3[0];
      wh[warp].s = s3[1];
      wp[warp] = s3[2];
    }
    __syncthreads();
    out[0] = M[0];
    out[2] = M[1];
    out[1] = out[3] = out[4] = 0.0;
    for (int w = 0; w < kSelWarps; ++w) {
      out[1] += wa[w].s;
      out[3] += wh[w].s;
      out[4] += wp[w];
    }
  };
  double t5[5];
  reduce(t5);
  if (tid == 0) a.parts[i * kMaxTiles + tile] = ExactPart{t5[0], t5[1], t5[2], t5[3], t5[4]};
  if (!last_block(a.counters + i, tiles)) return;

  // The head's last block. Clear for the next step what this step leaves: the counter, the
  // best / worst scores (every block has read them) and, below, the histogram and cursors.
  if (tid == 0) {
    a.counters[i] = 0;
    a.seg_max[i] = INT_MIN;
    a.seg_min[i] = INT_MAX;
  }
  SelInfo f{};  // every field: chunk_sums copies the whole struct (initcheck)
  f.mx = mx;
  f.bpl = bpl;
  if (all) {
    if (tid == 0) {
      f.all = 1;
      a.info[i] = f;
      a.head_tokens[i] = v.C == 0 ? v.always : v.total;
      a.est_mass[i] = 1.0;
    }
    return;
  }
  // Combine the blocks' parts (one per lane, in tile order).
  if (tid < 32) {
    ExactPart e{-INFINITY, 0.0, -INFINITY, 0.0, 0.0};
    if (tid < tiles) {
      const ExactPart* p = a.parts + i * kMaxTiles + tid;
      e = ExactPart{__ldcg(&p->am), __ldcg(&p->as), __ldcg(&p->hm), __ldcg(&p->hs), __ldcg(&p->prior)};
    }
    double m = fmax(e.am, e.hm);
    for (int o = 16; o > 0; o >>= 1) m = fmax(m, __shfl_xor_sync(0xffffffffu, m, o));
    double sa = e.am == -INFINITY ? 0.0 : e.as * exp(e.am - m);
    double sh = e.hm == -INFINITY ? 0.0 : e.hs * exp(e.hm - m);
    double pr = e.prior;
    for (int o = 16; o > 0; o >>= 1) {
      sa += __shfl_xor_sync(0xffffffffu, sa, o);
      sh += __shfl_xor_sync(0xffffffffu, sh, o);
      pr += __shfl_xor_sync(0xffffffffu, pr, o);
    }
    if (tid == 0) {
      S.dsh[0] = m;
      S.dsh[1] = sa;
      S.dsh[2] = sh;
      S.dsh[3] = pr;
    }
  }
  __syncthreads();
  const double m_all = S.dsh[0], a_mass0 = S.dsh[1], head0 = S.dsh[2], prior0 = S.dsh[3];
  // The head's share of its crossing bucket: rank its filed clusters, cut where the tokens
  // before reach thr, and read those clusters' rows exactly here.
  int nh_cand = 0, cut_h = 0;
  if (bh < kBuckets && !ovf) {
    nh_cand = rank_filed(ids, start, sc, bh, S);
    for (int k = tid; k < nh_cand; k += kSelThreads) S.cval[k] = (double)(off[S.sorted[k] + 1] - off[S.sorted[k]]);
    __syncthreads();
    double dummy;
    cut_h = cut_candidates(0, nh_cand, before, thr, S, &dummy);
  }
  ma = MaxSum{-INFINITY, 0.0};
  mh = MaxSum{-INFINITY, 0.0};
  prior = 0.0;
  for (int c0 = 0; c0 < cut_h; c0 += kList) {
    for (int k = tid; k < min(kList, cut_h - c0); k += kSelThreads) {
      const int32_t j = S.sorted[c0 + k];
      l_start[k] = (int32_t)v.nsink + off[j];
      l_ex[k] = off[j + 1] - off[j];
      prior += (double)(off[j + 1] - off[j]) * exp((double)sc[j] - (double)mx);
    }
    if (tid == 0) s_n = min(kList, cut_h - c0);
    flush();
  }
  reduce(t5);  // t5[2], t5[3]: the crossing clusters' (max, sum); t5[4]: their prior
  const double m_head = fmax(m_all, t5[2]);
  const double w_all = m_all == -INFINITY ? 0.0 : exp(m_all - m_head);
  const double a_mass = a_mass0 * w_all;
  const double read_exact = head0 * w_all + (t5[2] == -INFINITY ? 0.0 : t5[3] * exp(t5[2] - m_head));
  const double prior_head = prior0 + t5[4];
  f.bh = bh;
  f.bh_whole = head_whole;
  f.nh_cand = nh_cand;
  f.cut_h = cut_h;
  if (cut_h > 0) {
    f.h_tid = S.sorted[cut_h - 1];
    f.h_ts = sc[f.h_tid];
  }
  __syncthreads();
  stop_point(a, v, f, a_mass, read_exact, prior_head, ids, start, S);
  // The next step's histogram and cursors start from zero (only touched buckets were written).
  __syncthreads();
  for (int k = tid; k < kBuckets; k += kSelThreads)
    if (start[k + 1] > start[k]) {
      a.acc_tok[i * kBuckets + k] = 0;
      a.acc_cnt[i * kBuckets + k] = 0;
      a.acc_pri[i * kBuckets + k] = 0.f;
      a.cursor[i * kBuckets + k] = 0;
    }
}

}  // namespace

void launch_select_exact(const StepGeometry& s, const SelectArgs& a, int tiles) {
  cudaStream_t st = as_stream(s.stream);
  const int64_t heads = s.batch * s.hkv * s.g;
  dispatch_float(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    const dim3 eg((unsigned)heads, (unsigned)tiles);
    switch (s.d) {
      case 64: launch<select_exact_kernel<T, 64>>(s.pdl, eg, kSelThreads, 0, st, s, a); break;
      case 80: launch<select_exact_kernel<T, 80>>(s.pdl, eg, kSelThreads, 0, st, s, a); break;
      case 96: launch<select_exact_kernel<T, 96>>(s.pdl, eg, kSelThreads, 0, st, s, a); break;
      case 128: launch<select_exact_kernel<T, 128>>(s.pdl, eg, kSelThreads, 0, st, s, a); break;
      default: launch<select_exact_kernel<T, 256>>(s.pdl, eg, kSelThreads, 0, st, s, a); break;
    }
  });
  TACTIC_CUDA_LAUNCH_CHECK("select_exact");
}

}  // namespace cuda
}  // namespace tactic
