// Selection stage 4, stop (select_stop): per query head, alpha = exact / prior on the exact
// head, the estimated total z, and the stop point where the ranked clusters' estimated mass
// reaches P_eff * z (whole histogram buckets, then the crossing bucket's clusters ranked
// exactly); marks the chosen clusters for the union and writes the head's statistics. One
// block per head, or a thread-block cluster per head (select_stop_split_kernel, sm_90).
#include <algorithm>

#include "select_common.cuh"

namespace tactic {
namespace cuda {

namespace {

// Kernel 3 (one block per query head): alpha, z, the stop point, marks and statistics.
// Kernel 3 for query head i, by one block (nsplit 1) or by block `rank` of a thread-block
// cluster of nsplit blocks (select_stop_split_kernel; mcs / mcid: room for the
// merged candidates). Every block computes the same decisions from the same values; the passes
// over the clusters (ranking a crossing bucket, marking) take the block's share [lo, hi) only.
template <bool kGroup>
__device__ void stop_head(const StepGeometry& s, const SelectArgs& a, int splits, int64_t i, int rank, int nsplit,
                          SelShared& S, float* mcs, int32_t* mcid) {
  const SelInfo info = a.info[i];
  if (info.all) return;  // uniform: kernel 1 finished this head
  const HeadView v = head_view(s, a, i);
  const int32_t* off = v.off;
  const int64_t C = v.C, always = v.always, total = v.total;
  const int64_t lo = C * rank / nsplit, hi = C * (rank + 1) / nsplit;
  uint8_t* kmark = v.kmark;
  uint8_t* hmark = v.hmark;
  const float* sc = v.sc;
  const int tid = threadIdx.x;
  auto csize = [&](int64_t j) { return (int64_t)off[j + 1] - off[j]; };
  constexpr bool group = kGroup;  // a template choice: the prior rule's kernel stays as it was
  const uint8_t* skip = group ? kmark : nullptr;  // the union: read already, never taken again
  auto mark = [&](int64_t j) {
    if (!group) kmark[j] = 1;
    else if (kmark[j] != 1) kmark[j] = 2;  // group_head: the rest's mark (the union's stays 1)
    if (hmark) hmark[j] = 1;
  };
  const float mx = info.mx, bpl = info.bpl;
  // group_head: the union replaces the head, so the walk starts at bucket 0 with nothing ranked.
  const int bh = group ? 0 : info.bh, bh_whole = group ? 0 : info.bh_whole;
  const int nh_cand = group ? 0 : info.nh_cand, cut_h = group ? 0 : info.cut_h;
  // group_head: the union pass's chunk_sums took the union's share out of the histogram (float
  // atomics: clamped at zero) and summed its prior.
  for (int k = tid; k < kBuckets; k += kSelThreads)
    S.pri[k] = group ? fmaxf(0.f, a.hist_pri[i * kBuckets + k]) : a.hist_pri[i * kBuckets + k];
  for (int k = tid; k < max(nh_cand, 0); k += kSelThreads) S.sorted[k] = a.cand[i * kCand + k];
  const double prior_head = group ? info.prior_union : info.prior_head;
  const int64_t union_tokens = group ? a.union_counts[v.b * s.hkv + v.h] : 0;
  if (tid < 32) {  // the splits' parts, one per lane (splits <= kMaxExactSplits <= 32)
    // (group_head: one part, the sinks' and recent rows' alone; the union's mass comes from
    // the attention pass's record, in log2 units there.)
    ExactPart e = tid < splits ? a.parts[i * kMaxExactSplits + tid] : ExactPart{-INFINITY, 0.0, -INFINITY, 0.0};
    if (group && tid == 0) {
      const float* rec = a.carry + i * carry_record_floats(s.d);
      e.hm = rec[1] > 0.f ? (double)rec[0] * 0.6931471805599453 : -INFINITY;
      e.hs = rec[1];
    }
    double m = fmax(e.am, e.hm);
    for (int o = 16; o > 0; o >>= 1) m = fmax(m, __shfl_xor_sync(0xffffffffu, m, o));
    double sa = e.am == -INFINITY ? 0.0 : e.as * exp(e.am - m);
    double sh = e.hm == -INFINITY ? 0.0 : e.hs * exp(e.hm - m);
    for (int o = 16; o > 0; o >>= 1) {
      sa += __shfl_xor_sync(0xffffffffu, sa, o);
      sh += __shfl_xor_sync(0xffffffffu, sh, o);
    }
    if (tid == 0) {
      S.dsh[0] = m;
      S.dsh[1] = sa;
      S.dsh[2] = sh;
    }
  }
  __syncthreads();
  const double a_mass = S.dsh[1], read_exact = S.dsh[2];
  double prior_all = 0.0;
  for (int k = tid; k < kBuckets; k += kSelThreads) prior_all += (double)S.pri[k];
  prior_all = block_sum(prior_all, S);
  // Priors are relative to the best centroid score mx; exact masses to their own max. alpha
  // maps the first onto the second, so the estimate needs no common reference. (group_head:
  // the histogram holds the rest alone.)
  const double prior_rest = group ? prior_all : fmax(0.0, prior_all - prior_head);
  const double alpha = read_exact / prior_head;
  const double z = a_mass + read_exact + alpha * prior_rest;
  if (!(isfinite(alpha) && alpha > 0) || !(z > 0) || !isfinite(z)) {  // read everything
    for (int64_t j = lo + tid; j < hi; j += kSelThreads) mark(j);
    if (rank == 0 && tid == 0) {
      a.head_tokens[i] = total;
      a.est_mass[i] = 1.0;
    }
    return;
  }

  // Stop point: ranked clusters after the head until the estimate reaches P_eff * z.
  // The certified rule's first read aims at P itself (select_certify bounds the rest), as on the CPU.
  const double p_eff = a.certified ? a.target : fmin(1.0, a.target + a.margin * (1.0 - a.target));
  const double goal = p_eff * z;
  const double acc0 = a_mass + read_exact;
  int bs = bh_whole, cut_s = 0;  // selected: buckets < bs, plus sorted[0..cut_s) of bs
  bool bs_ranked = false;
  int marked = 0;       // buckets < marked: marked (this block's share), their tokens counted
  int64_t tokens = 0;
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
      // Buckets from bs on, whole, until one crosses the goal.
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
        // One pass marks the buckets before bx (taken whatever bx's outcome) and gathers bx's
        // clusters; every block of a split ranks the merged list alike.
        if (tid == 0) S.n_cand = 0;
        __syncthreads();
        for_clusters_in(sc, off, lo, hi, [&](int64_t j, float x, int32_t n, uint8_t mk) {
          if (mk == 1) return;
          const int bk = bucket_of(x, mx, bpl);
          if (bk < bx) {
            mark(j);
            tokens += n;
          } else if (bk == bx) {
            add_candidate(S, j, x);
          }
        }, skip);
        marked = bx;
        const int n = rank_gathered(S, nsplit, mcs, mcid);
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

  // Marks and counts: buckets < bs whole (this block's share; those before `marked` are
  // marked already), plus the ranked prefix of bs (rank 0).
  if (marked < bs)
    for_clusters_in(sc, off, lo, hi, [&](int64_t j, float x, int32_t n, uint8_t mk) {
      const int bk = bucket_of(x, mx, bpl);
      if (bk >= marked && bk < bs && mk != 1) {
        mark(j);
        tokens += n;
      }
    }, skip);
  if (bs_ranked && rank == 0)
    for (int k = tid; k < cut_s; k += kSelThreads) {
      mark(S.sorted[k]);
      tokens += csize(S.sorted[k]);
    }
  tokens = (int64_t)block_sum((double)tokens, S);
  if (nsplit > 1) {  // the cluster's total, summed in rank order
    if (tid == 0) S.dsh[0] = (double)tokens;
    cluster_barrier();
    double t = 0.0;
    for (int q = 0; q < nsplit; ++q) t += cluster_peer(&S, q)->dsh[0];
    tokens = (int64_t)t;
    cluster_barrier();  // no block reads another's shared memory after this one
  }
  if (rank == 0 && tid == 0) {
    a.head_tokens[i] = always + union_tokens + tokens;
    a.est_mass[i] = fmin(1.0, acc / z);
  }
}

// Two blocks per SM (64 registers, 8 bytes of spills): at 118 registers one fit, and B 32 x 32K
// ran its 1024 heads in 8 waves (71 us; 43 at two per SM, B 1 unchanged). Three per SM (40
// registers) spilled ~200 bytes and was slower (44 us).
template <bool kGroup>
__global__ void __launch_bounds__(kSelThreads, 2) select_stop_kernel(StepGeometry s, SelectArgs a, int splits) {
  pdl_begin();  // first: wait for the previous kernel (programmatic dependent launch)
  __shared__ SelShared S;
  stop_head<kGroup>(s, a, splits, blockIdx.x, 0, 1, S, nullptr, nullptr);
}

// Kernel 3, split (sm_90): as select_head_split_kernel, nsplit blocks per query head.
template <bool kGroup>
__global__ void __launch_bounds__(kSelThreads, 1) select_stop_split_kernel(StepGeometry s, SelectArgs a, int splits) {
  pdl_begin();  // first: wait for the previous kernel (programmatic dependent launch)
  __shared__ SelShared S;
  __shared__ float mcs[kCand];
  __shared__ int32_t mcid[kCand];
  const int nsplit = cluster_blocks();
  stop_head<kGroup>(s, a, splits, blockIdx.x / nsplit, cluster_rank(), nsplit, S, mcs, mcid);
}

}  // namespace

void launch_select_stop(const StepGeometry& s, const SelectArgs& a, int nsplit, int splits) {
  cudaStream_t st = as_stream(s.stream);
  const int64_t heads = s.batch * s.hkv * s.g;
  auto run = [&](auto group) {
    constexpr bool G = decltype(group)::value;
    if (nsplit > 1) launch_split<select_stop_split_kernel<G>>(s.pdl, (unsigned)(heads * nsplit), nsplit, st, s, a, splits);
    else launch<select_stop_kernel<G>>(s.pdl, (unsigned)heads, kSelThreads, 0, st, s, a, splits);
  };
  if (a.group_head) run(std::true_type{});
  else run(std::false_type{});
  TACTIC_CUDA_LAUNCH_CHECK("select_stop");
}

int select_stop_split_arch() { return compiled_arch<select_stop_split_kernel<false>>(); }
int select_stop_split_clusters(int n) { return std::min(active_clusters<select_stop_split_kernel<false>>(n), active_clusters<select_stop_split_kernel<true>>(n)); }

}  // namespace cuda
}  // namespace tactic
